"""Tokenizers, serialisable into a prepared data set's metadata.

Kinds (`data.tokenizer` / `--tokenizer`):

  char                one token per Unicode character of the corpus (sorted, as nanoGPT)
  byte                UTF-8 bytes, 256 ids
  bpe                 a byte-level BPE trained with Hugging Face `tokenizers` on the corpus
  hf:PATH             a Hugging Face `tokenizer.json` (or a directory holding one)
  sentencepiece:PATH  a SentencePiece `.model` file

Every tokenizer has `encode`, `encode_batch`, `decode`, `to_dict`, `kind`, `vocab_size`,
`bos_id` / `eos_id` (or None) and `token_bytes` (the UTF-8 length of each token's text,
0 for special tokens), used for bits per byte. `encode` never adds special tokens;
`encode_document` adds BOS (when the tokenizer has one distinct from EOS) and EOS, as
the prepared data stores every document.

Char and byte have no special tokens unless created with `eos=True`: then one reserved
id after the characters (char) or the 256 bytes (byte) ends every document. Preparation
reserves it only for corpora of several documents, so a single text (the embedded
tiny-Shakespeare default) keeps its vocabulary and ids.
"""

import functools
import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.specs import bpe_vocab_size, split_tokenizer_spec

DEFAULT_BPE_VOCAB = 4096
BPE_EOS = "<|endoftext|>"
HF_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    token_bytes: np.ndarray  # [vocab] int32: UTF-8 bytes of each token's text

    def encode(self, text: str) -> np.ndarray: ...
    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...
    def decode(self, ids: Any) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...


class CharTokenizer:
    """One token per Unicode character of a fixed vocabulary (sorted, as nanoGPT does)."""

    kind = "char"
    bos_id = None

    def __init__(self, chars: list[str], eos: bool = False):
        self.chars = list(chars)
        self.eos_id = len(self.chars) if eos else None
        self.vocab_size = len(self.chars) + int(eos)
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        if np.any(np.diff(self._codepoints.astype(np.int64)) <= 0):
            raise ValueError("CharTokenizer: vocabulary must be sorted and unique")
        self.token_bytes = np.array([len(c.encode("utf-8", "surrogatepass"))
                                     for c in self.chars] + [0] * int(eos), dtype=np.int32)

    @classmethod
    def fit(cls, text: str, eos: bool = False) -> "CharTokenizer":
        return cls(sorted(set(text)), eos=eos)

    def encode(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        if not self.chars:
            if cps.size:
                raise ValueError(f"character {text[0]!r} is not in the tokenizer's vocabulary")
            return np.zeros(0, np.int32)
        ids = np.searchsorted(self._codepoints, cps)
        ids = np.minimum(ids, len(self.chars) - 1)
        bad = self._codepoints[ids] != cps
        if bad.any():
            ch = chr(int(cps[np.argmax(bad)]))
            raise ValueError(f"character {ch!r} is not in the tokenizer's vocabulary")
        return ids.astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Any) -> str:
        n = len(self.chars)
        return "".join(self.chars[int(i)] if int(i) < n else
                       ("" if int(i) == self.eos_id else "\ufffd")
                       for i in np.asarray(ids).reshape(-1))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "chars": "".join(self.chars)}
        if self.eos_id is not None:
            d["eos_id"] = self.eos_id
        return d


class ByteTokenizer:
    """UTF-8 bytes: a fixed vocabulary of 256 (257 with the end-of-document id 256)."""

    kind = "byte"
    bos_id = None

    def __init__(self, eos: bool = False):
        self.eos_id = 256 if eos else None
        self.vocab_size = 256 + int(eos)
        self.token_bytes = np.array([1] * 256 + [0] * int(eos), dtype=np.int32)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Any) -> str:
        data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        if self.eos_id is not None:
            d["eos_id"] = self.eos_id
        return d


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checked_sha256(path: Path, recorded: str | None) -> str:
    """The file's sha256; a ValueError when it differs from the `recorded` one (a
    prepared directory's meta.json records the hash of the tokenizer file it keeps)."""
    actual = file_sha256(path)
    if recorded is not None and actual != recorded:
        raise ValueError(f"{path} is not the tokenizer file this data was prepared with "
                         f"(sha256 {actual[:8]}, recorded {recorded[:8]}): it was changed "
                         f"or damaged; restore it, or prepare the data again")
    return actual


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted (character -> byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_types(decoder: dict[str, Any] | None) -> set[str]:
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        return set().union(*(_decoder_types(d) for d in decoder.get("decoders", [])))
    return {decoder.get("type", "")}


_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer from a tokenizer.json (kinds `hf` and `bpe`)."""

    def __init__(self, path: str | os.PathLike, kind: str = "hf", bos_id: int | None = None,
                 eos_id: int | None = None, sha256: str | None = None):
        # Deferred: Hugging Face tokenizers loads only for bpe and hf: tokenizers.
        from tokenizers import Tokenizer as _HF
        self.path = Path(path)
        self.kind = kind
        self.sha256 = _checked_sha256(self.path, sha256)
        try:
            self.tok = _HF.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception for a bad file
            raise ValueError(f"{self.path} is not a Hugging Face tokenizer.json ({e})"
                             ) from None
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.bos_id, self.eos_id = bos_id, eos_id
        self.token_bytes = self._token_bytes(vocab)

    def _token_bytes(self, vocab: dict[str, int]) -> np.ndarray:
        spec = json.loads(self.path.read_text(encoding="utf-8"))
        special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
        decoders = _decoder_types(spec.get("decoder"))
        alphabet = _byte_level_alphabet() if "ByteLevel" in decoders else None
        out = np.zeros(self.vocab_size, np.int32)
        for token, i in vocab.items():
            if token in special:
                continue
            if alphabet is not None:
                out[i] = sum(1 if c in alphabet else len(c.encode()) for c in token)
            elif _BYTE_FALLBACK.match(token):
                out[i] = 1
            else:
                if "WordPiece" in decoders and token.startswith("##"):
                    token = token[2:]
                out[i] = len(token.replace("\u2581", " ").encode("utf-8", "surrogatepass"))
        return out

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self.tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encs]

    def decode(self, ids: Any) -> str:
        return self.tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                               skip_special_tokens=True)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "file": self.path.name, "sha256": self.sha256,
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id}


class SentencePieceTokenizer:
    """A SentencePiece model (`.model` file)."""

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike, sha256: str | None = None):
        # Deferred: optional, only for sentencepiece: tokenizers.
        import sentencepiece as spm
        self.path = Path(path)
        self.sha256 = _checked_sha256(self.path, sha256)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise ConfigError("tokenizer", f"{self.path} is not a SentencePiece model "
                                           f"({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        sizes = []
        for i in range(self.vocab_size):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                sizes.append(0)  # <unk> stands for text it cannot tell: counted as 0 bytes
            elif self.sp.is_byte(i):
                sizes.append(1)
            else:
                sizes.append(len(self.sp.id_to_piece(i).replace("\u2581", " ").encode()))
        self.token_bytes = np.array(sizes, np.int32)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text), np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in self.sp.encode(list(texts))]

    def decode(self, ids: Any) -> str:
        return self.sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "file": self.path.name, "sha256": self.sha256,
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id}


def vocabulary(tok: Tokenizer) -> dict[str, Any]:
    """What fixes a tokenizer's ids (its kind, characters or file hash, special ids): two
    tokenizers with equal vocabularies encode every text alike."""
    return {k: v for k, v in tok.to_dict().items() if k != "file"}


def describe_tokenizer(tok: Tokenizer) -> str:
    """`char, 65 tokens` or `hf tokenizer.json (sha256 1a2b3c4d), 50257 tokens`."""
    d = tok.to_dict()
    what = f"{d['file']} (sha256 {str(d.get('sha256'))[:8]})" if "file" in d else d["kind"]
    if d["kind"] != "char" and "file" in d:
        what = f"{d['kind']} {what}"
    return f"{what}, {tok.vocab_size} tokens"


def first_vocabulary_difference(a: Tokenizer, b: Tokenizer) -> str | None:
    """A short phrase naming how `b`'s vocabulary differs from `a`'s; None when equal."""
    return vocabulary_difference(vocabulary(a), vocabulary(b))


def vocabulary_difference(va: dict[str, Any], vb: dict[str, Any]) -> str | None:
    """`first_vocabulary_difference` of two `vocabulary` records (e.g. one saved by a run)."""
    if va == vb:
        return None
    if va.get("kind") != vb.get("kind"):
        return f"a {vb.get('kind')} tokenizer, not {va.get('kind')}"
    if va["kind"] == "char" and va.get("chars") != vb.get("chars"):
        ca, cb = set(va.get("chars", "")), set(vb.get("chars", ""))
        extra, missing = sorted(cb - ca), sorted(ca - cb)
        parts = ([f"characters {''.join(extra)[:20]!r} added"] if extra else []) + \
            ([f"{''.join(missing)[:20]!r} missing"] if missing else [])
        return ", ".join(parts) or "the same characters in another order"
    if va.get("sha256") != vb.get("sha256"):
        return (f"another {va['kind']} file: sha256 {str(va.get('sha256'))[:8]} -> "
                f"{str(vb.get('sha256'))[:8]}, {vb.get('vocab_size')} tokens")
    return "other special-token ids"


def parse_tokenizer_spec(spec: str, key: str = "data.tokenizer") -> tuple[str, str | None]:
    """`char` -> ("char", None); `hf:PATH` -> ("hf", PATH); an unknown spec is a
    ConfigError naming `key` (configs/specs.py holds the rule)."""
    return split_tokenizer_spec(spec, key)


def tokenizer_kind(spec: str) -> str:
    return spec.partition(":")[0]


def _special_from_config(directory: Path, vocab: dict[str, int]) -> dict[str, int | None]:
    """bos/eos ids from a model directory's tokenizer_config.json (or special_tokens_map)."""
    out: dict[str, int | None] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = directory / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for role in ("bos", "eos"):
            tok = cfg.get(f"{role}_token")
            if isinstance(tok, dict):
                tok = tok.get("content")
            if role not in out and isinstance(tok, str) and tok in vocab:
                out[role] = vocab[tok]
    return out


_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]")
_EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[SEP]")


def load_hf_tokenizer(path: str | os.PathLike, key: str = "data.tokenizer",
                      kind: str = "hf") -> HFTokenizer:
    """A tokenizer.json file, or a directory holding one (e.g. a model's directory).

    BOS/EOS come from the directory's tokenizer_config.json when it names them, else from
    the usual special-token names; a BOS equal to the EOS is dropped (GPT-2 style)."""
    path = Path(path)
    file = path / HF_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(key, f"no tokenizer file {file}" if path.is_dir() or path.exists()
                          else f"no such tokenizer file: {path}")
    # Deferred: Hugging Face tokenizers loads only for bpe and hf: tokenizers.
    from tokenizers import Tokenizer as _HF
    try:
        vocab = _HF.from_file(str(file)).get_vocab(with_added_tokens=True)
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON
        raise ConfigError(key, f"{file} is not a Hugging Face tokenizer.json ({e})") from None
    special = _special_from_config(file.parent, vocab)
    if "bos" not in special:
        special["bos"] = next((vocab[n] for n in _BOS_NAMES if n in vocab), None)
    if "eos" not in special:
        special["eos"] = next((vocab[n] for n in _EOS_NAMES if n in vocab), None)
    bos = special["bos"] if special["bos"] != special["eos"] else None
    return HFTokenizer(file, kind=kind, bos_id=bos, eos_id=special["eos"])


def load_sentencepiece(path: str | os.PathLike,
                       key: str = "data.tokenizer") -> SentencePieceTokenizer:
    if not Path(path).is_file():
        raise ConfigError(key, f"no such tokenizer file: {path}")
    try:
        return SentencePieceTokenizer(path)
    except ConfigError as e:
        raise ConfigError(key, str(e).split(": ", 1)[1]) from None


def train_bpe(texts: Iterable[str], vocab_size: int, out_file: str | os.PathLike,
              key: str = "data.vocab_size") -> HFTokenizer:
    """Train a byte-level BPE on streamed `texts` and save it as `out_file` (tokenizer.json).

    The vocabulary holds the 256 byte symbols, the end-of-document token and the merges."""
    # Deferred: Hugging Face tokenizers loads only for bpe and hf: tokenizers.
    from tokenizers import Tokenizer as _HF, decoders, models, pre_tokenizers, trainers
    bpe_vocab_size(vocab_size, key)
    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out_file))
    return HFTokenizer(out_file, kind="bpe", bos_id=None, eos_id=tok.token_to_id(BPE_EOS))


def encode_document(tok: Tokenizer, text: str) -> np.ndarray:
    """The ids stored for one document: [BOS] + encode(text) + [EOS], where they exist."""
    return _with_specials(tok, tok.encode(text))


def _with_specials(tok: Tokenizer, ids: np.ndarray) -> np.ndarray:
    head = [] if tok.bos_id is None else [tok.bos_id]
    tail = [] if tok.eos_id is None else [tok.eos_id]
    if not head and not tail:
        return ids.astype(np.int32, copy=False)
    return np.concatenate([np.asarray(head, np.int32), ids.astype(np.int32, copy=False),
                           np.asarray(tail, np.int32)])


def encode_documents(tok: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode_document` for a batch (HF tokenizers encode it in parallel)."""
    return [_with_specials(tok, ids) for ids in tok.encode_batch(texts)]


def encode_documents_flat(tok: Tokenizer, texts: Sequence[str],
                          dtype: Any = np.int32) -> tuple[np.ndarray, np.ndarray]:
    """(ids [total], lengths [documents]) of `encode_documents`, concatenated in one pass
    (what preparation writes; avoids one small array per document)."""
    head = [] if tok.bos_id is None else [tok.bos_id]
    tail = [] if tok.eos_id is None else [tok.eos_id]
    if isinstance(tok, HFTokenizer):
        encs = tok.tok.encode_batch_fast(list(texts), add_special_tokens=False)
        lengths = np.fromiter((len(e) for e in encs), np.int64, len(encs))
        flat = itertools.chain.from_iterable((*head, *e.ids, *tail) for e in encs) \
            if head or tail else itertools.chain.from_iterable(e.ids for e in encs)
        total = int(lengths.sum()) + len(encs) * (len(head) + len(tail))
        return np.fromiter(flat, dtype, total), lengths + len(head) + len(tail)
    ids = tok.encode_batch(texts)
    h, t = np.asarray(head, dtype), np.asarray(tail, dtype)
    parts = [p for x in ids for p in (h, x, t)]
    flat = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
    return flat, np.array([len(x) for x in ids], np.int64) + len(head) + len(tail)


def fit_tokenizer(kind: str, text: str, vocab_size: int = DEFAULT_BPE_VOCAB,
                  out_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer for one text: char and bpe are fitted on it, the others fixed.

    `kind` is a tokenizer spec; bpe writes its tokenizer.json into `out_dir`."""
    kind, path = parse_tokenizer_spec(kind)
    if kind == "char":
        return CharTokenizer.fit(text)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if out_dir is None:
            raise ValueError("fit_tokenizer: bpe needs out_dir for its tokenizer.json")
        return train_bpe([text], vocab_size, Path(out_dir) / HF_FILE)
    if kind == "hf":
        return load_hf_tokenizer(path)
    return load_sentencepiece(path)


def tokenizer_from_dict(d: dict[str, Any], root: str | os.PathLike | None = None) -> Tokenizer:
    """Rebuild a tokenizer from `to_dict()`; file-backed kinds load `root / d["file"]`."""
    if d["kind"] == "char":
        return CharTokenizer(list(d["chars"]), eos=d.get("eos_id") is not None)
    if d["kind"] == "byte":
        return ByteTokenizer(eos=d.get("eos_id") is not None)
    if d["kind"] in ("hf", "bpe", "sentencepiece"):
        if root is None:
            raise ValueError(f"a {d['kind']} tokenizer needs the directory holding "
                             f"{d['file']}")
        file = Path(root) / d["file"]
        if not file.is_file():
            raise ValueError(f"missing tokenizer file {file}")
        if d["kind"] == "sentencepiece":
            return SentencePieceTokenizer(file, sha256=d.get("sha256"))
        return HFTokenizer(file, kind=d["kind"], bos_id=d.get("bos_id"),
                           eos_id=d.get("eos_id"), sha256=d.get("sha256"))
    raise ValueError(f"unknown tokenizer {d['kind']!r}")
