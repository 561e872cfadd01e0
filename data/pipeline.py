"""Token data sets and the evaluation windows.

Evaluation walks the whole validation split in non-overlapping windows (`EvalBatches`).
Training batches (random windows or packed documents, of one set or a mixture) are made
in data/packing.py; mixtures are in data/mixture.py.
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Data
from jaxlm.data.prepare import (EMBEDDED_CORPUS, FORMAT_VERSION, FORMAT_VERSIONS, META,
                                SFT_FORMAT_VERSION, is_prepared, prepare,
                                tokenizer_of_directory)
from jaxlm.data.readers import COMPRESSED, file_format
from jaxlm.data.shards import ShardedTokens
from jaxlm.data.tokenizers import (Tokenizer, first_vocabulary_difference,
                                   load_hf_tokenizer, load_sentencepiece, parse_tokenizer_spec,
                                   tokenizer_from_dict, vocabulary_difference)

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class TokenData:
    """A prepared data set: memory-mapped token splits plus its tokenizer.

    `train` / `val` are the splits' token streams (a memmap, or a ShardedTokens over
    several shard files). Corpora of documents (format 2) also have `train_docs` /
    `val_docs`, int64 document offsets into those streams [documents + 1]; one-text sets
    (format 1) have None there, and `docs()` then treats each split as one document.
    """

    path: Path
    tokenizer: Tokenizer
    vocab_size: int
    train: Any
    val: Any
    train_docs: np.ndarray | None = None
    val_docs: np.ndarray | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    # SFT sets (format 3): uint8 [tokens] per split, 1 where the token is a completion
    # target (its loss counts), 0 elsewhere; None for other sets (every target counts).
    train_weights: Any = None
    val_weights: Any = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenData":
        path = Path(path)
        if not is_prepared(path):
            raise ConfigError("data.path", f"{path} is not a prepared token directory "
                                           f"(no {META})")
        try:
            meta = json.loads((path / META).read_text())
            version = meta.get("format_version", FORMAT_VERSION)
            vocab, dtype = int(meta["vocab_size"]), np.dtype(meta["dtype"])
            layout = {s: meta["splits"][s] for s in ("train", "val")} if "splits" in meta \
                else {s: {"shards": [f"{s}.bin"]} for s in ("train", "val")}
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError("data.path", f"{path / META} is malformed: {e}") from None
        if version not in FORMAT_VERSIONS:  # e.g. made by a newer version of this code
            raise ConfigError("data.path", f"{path} was prepared in format {version}; this "
                                           f"version reads formats "
                                           f"{', '.join(map(str, FORMAT_VERSIONS))}: prepare "
                                           f"it again")
        try:
            tok = tokenizer_from_dict(meta["tokenizer"], path)
        except (KeyError, ValueError, TypeError, OSError) as e:
            raise ConfigError("data.path", f"{path / META}: cannot load its tokenizer: "
                                           f"{e}") from None
        splits, docs, weights = {}, {}, {}
        for split in ("train", "val"):
            files = [path / f for f in layout[split]["shards"]]
            for f in files:
                if not f.is_file():
                    raise ConfigError("data.path", f"missing token file {f}")
            arr = ShardedTokens.open(files, dtype)
            if len(arr) and int(arr.max()) >= vocab:
                bad = files[0] if len(files) == 1 else path / f"{split} shards"
                raise ConfigError("data.path", f"{bad} has token id {int(arr.max())} >= vocab "
                                               f"size {vocab} from {path / META}")
            splits[split] = arr
            docs[split] = None
            if "index" in layout[split]:
                f = path / layout[split]["index"]
                if not f.is_file():
                    raise ConfigError("data.path", f"missing document index {f}")
                offsets = np.fromfile(f, dtype=np.int64)
                if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(arr) or \
                        np.any(np.diff(offsets) < 0):
                    raise ConfigError("data.path", f"{f} does not index {split}'s "
                                                   f"{len(arr)} tokens")
                docs[split] = offsets
            weights[split] = _load_weights(path, layout[split], len(arr), docs[split], version)
        return cls(path, tok, vocab, splits["train"], splits["val"], docs["train"],
                   docs["val"], meta, weights["train"], weights["val"])

    def tokens(self, split: str) -> Any:
        return {"train": self.train, "val": self.val}[split]

    def docs(self, split: str) -> np.ndarray:
        """int64 document offsets [documents + 1] of a split (one document if unindexed)."""
        offsets = {"train": self.train_docs, "val": self.val_docs}[split]
        if offsets is None:
            return np.array([0, len(self.tokens(split))], np.int64)
        return offsets

    def weights(self, split: str) -> Any:
        """uint8 [tokens] loss weights of a split's tokens as targets (SFT), or None."""
        return {"train": self.train_weights, "val": self.val_weights}[split]

    @property
    def is_sft(self) -> bool:
        """Whether the set carries per-token loss weights (supervised fine-tuning)."""
        return self.train_weights is not None

    @property
    def is_preference(self) -> bool:
        """Whether the set holds (chosen, rejected) pairs of SFT examples
        (data/preference.py)."""
        return self.is_sft and self.meta.get("format") == "preference"

    @property
    def token_bytes(self) -> np.ndarray:
        """[vocab] int32: UTF-8 bytes of each token's text (0 for special tokens)."""
        return self.tokenizer.token_bytes


def _load_weights(path: Path, layout: dict[str, Any], num_tokens: int,
                  offsets: np.ndarray | None, version: int) -> np.ndarray | None:
    """An SFT split's weight stream (memory-mapped), checked against its tokens."""
    if version != SFT_FORMAT_VERSION:
        return None
    if "weights" not in layout or offsets is None:
        raise ConfigError("data.path", f"{path / META} is an SFT set (format "
                                       f"{SFT_FORMAT_VERSION}) without weights or a "
                                       f"document index: prepare it again")
    f = path / layout["weights"]
    if not f.is_file():
        raise ConfigError("data.path", f"missing loss weights {f}")
    w = np.memmap(f, dtype=np.uint8, mode="r") if f.stat().st_size else np.zeros(0, np.uint8)
    if len(w) != num_tokens:
        raise ConfigError("data.path", f"{f} has {len(w)} weights for {num_tokens} tokens")
    return w


def check_tokenizer_spec(spec: str, tok: Tokenizer, source: str,
                         key: str = "data.tokenizer") -> None:
    """Refuse a `data.tokenizer` that is not the tokenizer `source` (prepared data) was
    made with: another kind, another `from:DIR` vocabulary, or another (or a missing)
    `hf:` / `sentencepiece:` file."""
    kind, path = parse_tokenizer_spec(spec, key)
    if kind == "from":
        named = tokenizer_of_directory(path, key)
    elif kind == "hf" and tok.kind == "hf":
        named = load_hf_tokenizer(path, key)
    elif kind == "sentencepiece" and tok.kind == "sentencepiece":
        named = load_sentencepiece(path, key)
    elif tok.kind != kind:
        raise ConfigError(key, f"{source} was prepared with the {tok.kind!r} tokenizer, "
                               f"not {spec!r}")
    else:
        return
    if kind == "from":
        difference = first_vocabulary_difference(named, tok)
    else:  # the file fixes the ids; special ids may come from other files beside it
        difference = vocabulary_difference(
            {"kind": kind, "sha256": named.sha256, "vocab_size": named.vocab_size},
            {"kind": kind, "sha256": tok.sha256, "vocab_size": tok.vocab_size})
    if difference is not None:
        fix = f"prepare it with --tokenizer={path}" if kind == "from" else \
            f"set data.tokenizer to the file it was prepared with, or prepare it again " \
            f"with --tokenizer={spec}"
        raise ConfigError(key, f"{source}'s tokenizer is not {path}'s ({difference}): {fix}")


def resolve_data(data_cfg: Data, workdir: str | os.PathLike) -> TokenData:
    """Load `data.path`: a prepared directory is used as is; text is prepared under workdir."""
    source = Path(data_cfg.path) if data_cfg.path else EMBEDDED_CORPUS
    if not source.exists():
        raise ConfigError("data.path", f"no such file or directory: {source}")
    if is_prepared(source):
        data = TokenData.load(source)
        check_tokenizer_spec(data_cfg.tokenizer, data.tokenizer, str(source))
        return data
    if source.is_file() and (file_format(source) != "text" or
                             source.name.lower().endswith(COMPRESSED)):
        raise ConfigError("data.path", f"{source} is a corpus file, not text: prepare it "
                                       f"once with python -m jaxlm.data.prepare --input={source} "
                                       f"--output=DIR --tokenizer=... and set data.path=DIR")
    # The run's own copy: rebuilt when its text changes; the run's processes wait for
    # the one that prepares it.
    out = prepare(source, Path(workdir) / "data", tokenizer=data_cfg.tokenizer,
                  val_fraction=data_cfg.val_fraction,
                  vocab_size=data_cfg.vocab_size,
                  overwrite=True, wait=True, key="workdir")
    return TokenData.load(out)


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    """This process's rows of a global batch (training/layout.py checks that the processes
    divide it)."""
    assert global_batch % process_count == 0, (global_batch, process_count)
    per = global_batch // process_count
    return slice(process_index * per, (process_index + 1) * per)


def target_bytes(batch: Batch, token_bytes: np.ndarray) -> np.ndarray:
    """float32 [rows]: UTF-8 bytes of the weighted targets of each row."""
    per_token_BxL = np.asarray(token_bytes)[batch["targets"]] * batch["weights"]
    return per_token_BxL.sum(axis=1).astype(np.float32)


class EvalBatches:
    """Non-overlapping windows covering every validation target once; padding has weight 0.

    With `token_bytes` ([vocab], from the tokenizer) batches also carry `target_bytes`
    (float32 [rows]): the UTF-8 bytes of each row's weighted targets, for bits per byte.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int,
                 process_index: int = 0, process_count: int = 1, max_batches: int = 0,
                 token_bytes: np.ndarray | None = None):
        self.rows = process_rows(global_batch, process_index, process_count)
        self.tokens, self.seq_len, self.global_batch = tokens, seq_len, global_batch
        self.token_bytes = token_bytes
        self.num_targets = len(tokens) - 1
        self.num_windows = -(-self.num_targets // seq_len)
        n = -(-self.num_windows // global_batch)
        self.num_batches = min(n, max_batches) if max_batches > 0 else n

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> Batch:
        window = np.arange(self.global_batch)[self.rows] + index * self.global_batch
        pos = window[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        valid = pos < len(self.tokens)
        windows = self.tokens[np.where(valid, pos, 0)].astype(np.int32)
        batch = {"inputs": windows[:, :-1], "targets": windows[:, 1:],
                 "weights": valid[:, 1:].astype(np.float32)}
        if self.token_bytes is not None:
            batch["target_bytes"] = target_bytes(batch, self.token_bytes)
        return batch

