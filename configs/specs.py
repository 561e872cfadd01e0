"""The data settings written as one value: a tokenizer spec, a BPE vocabulary size, a
mixture of prepared directories, a validation fraction. Each has one check here, used as
an annotated type by the run's `data` section (and any flag section that takes the same
value), and callable with the key to name where a value comes from elsewhere
(`tokenizer_spec(spec, "--tokenizer")`)."""

import math
from typing import Annotated

from pydantic import AfterValidator, Field

from jaxlm.configs.errors import ConfigError, require

TOKENIZER_FORMS = "char, byte, bpe, hf:PATH, sentencepiece:PATH, from:DIR"
# from:DIR reuses exactly the tokenizer of a run directory or a prepared data directory.
PATH_KINDS = ("hf", "sentencepiece", "from")
MIN_BPE_VOCAB = 257  # the 256 byte symbols of a byte-level BPE + end-of-document
MAX_VOCAB = 2**31 - 1  # token ids are int32


def tokenizer_spec(spec: str, key: str = "") -> str:
    """`spec` if it is char | byte | bpe | hf:PATH | sentencepiece:PATH | from:DIR."""
    kind, _, path = spec.partition(":")
    ok = spec in ("char", "byte", "bpe") or (kind in PATH_KINDS and bool(path.strip()))
    require(ok, key, f"unknown tokenizer {spec!r}; choose one of {TOKENIZER_FORMS}")
    return spec


def split_tokenizer_spec(spec: str, key: str = "") -> tuple[str, str | None]:
    """`char` -> ("char", None); `hf:PATH` -> ("hf", PATH); an unknown spec is refused."""
    kind, _, path = tokenizer_spec(spec, key).partition(":")
    return kind, (path or None)


def bpe_vocab_size(size: int, key: str = "") -> int:
    """`size` if a byte-level BPE can have that many ids."""
    require(size >= MIN_BPE_VOCAB, key, f"{size} is too small for a byte-level BPE: it needs "
                                        f"at least {MIN_BPE_VOCAB} ids (256 bytes + "
                                        f"end-of-document)")
    require(size <= MAX_VOCAB, key, f"{size} is too large: token ids are int32 (at most "
                                    f"{MAX_VOCAB})")
    return size


def parse_mixture(spec: str, key: str = "data.mixture") -> list[tuple[str, float]]:
    """`DIR:WEIGHT,DIR:WEIGHT,...` -> [(DIR, weight)]; weights finite, >= 0, not all zero."""
    items = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        path, sep, weight = item.rpartition(":")
        require(bool(sep and path), key, f"{item!r} is not DIR:WEIGHT")
        try:
            w = float(weight)
        except ValueError:
            raise ConfigError(key, f"weight {weight!r} of {path} is not a number") from None
        require(math.isfinite(w) and w >= 0, key, f"weight of {path} must be a finite "
                                                  f"number >= 0, got {weight}")
        items.append((path, w))
    require(bool(items), key, "no sources; expected DIR:WEIGHT,DIR:WEIGHT,...")
    require(sum(w for _, w in items) > 0, key, f"the weights sum to zero ({spec})")
    return items


def mixture_spec(spec: str, key: str = "") -> str:
    """`spec` if it is empty (no mixture) or a valid `DIR:WEIGHT,...`."""
    if spec.strip():
        parse_mixture(spec, key)
    return spec


TokenizerSpec = Annotated[str, AfterValidator(tokenizer_spec)]
BpeVocabSize = Annotated[int, AfterValidator(bpe_vocab_size)]
MixtureSpec = Annotated[str, AfterValidator(mixture_spec)]
ValFraction = Annotated[float, Field(gt=0, lt=1)]  # the share of a corpus held out
