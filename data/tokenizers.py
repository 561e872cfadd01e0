"""Character- and byte-level tokenizers, serialisable into a prepared data set's metadata."""

from typing import Any, Protocol

import numpy as np


class Tokenizer(Protocol):
    kind: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...
    def decode(self, ids: Any) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...


class CharTokenizer:
    """One token per Unicode character of a fixed vocabulary (sorted, as nanoGPT does)."""

    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        if np.any(np.diff(self._codepoints.astype(np.int64)) <= 0):
            raise ValueError("CharTokenizer: vocabulary must be sorted and unique")

    @classmethod
    def fit(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codepoints, cps)
        ids = np.minimum(ids, self.vocab_size - 1)
        bad = self._codepoints[ids] != cps
        if bad.any():
            ch = chr(int(cps[np.argmax(bad)]))
            raise ValueError(f"character {ch!r} is not in the tokenizer's vocabulary")
        return ids.astype(np.int32)

    def decode(self, ids: Any) -> str:
        return "".join(self.chars[int(i)] if int(i) < self.vocab_size else "\ufffd"
                       for i in np.asarray(ids).reshape(-1))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": "".join(self.chars)}


class ByteTokenizer:
    """UTF-8 bytes: a fixed vocabulary of 256."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Any) -> str:
        data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


TOKENIZERS = ("char", "byte")


def fit_tokenizer(kind: str, text: str) -> Tokenizer:
    if kind == "char":
        return CharTokenizer.fit(text)
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {kind!r}; choose one of {TOKENIZERS}")


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    if d["kind"] == "char":
        return CharTokenizer(list(d["chars"]))
    if d["kind"] == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {d['kind']!r}")
