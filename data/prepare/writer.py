"""Token files of one split: shards of whole documents, their document index and (SFT)
their loss weights."""

import os
from pathlib import Path
from typing import Any

import numpy as np


class SplitWriter:
    """Appends whole documents to token shards `{split}-NNNNN.bin` (one shard is named
    `{split}.bin`), their end offsets to `{split}.idx` (with `index`) and, with `weights`,
    one uint8 loss weight per token to `{split}.weights`."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_bytes: int,
                 weights: bool = False, index: bool = True):
        self.root, self.split, self.dtype, self.shard_bytes = root, split, dtype, shard_bytes
        self.shards: list[str] = []
        self.tokens = self.documents = self.text_bytes = self.weight_sum = 0
        self._file: Any = None
        self._file_bytes = 0
        self._index = open(root / f"{split}.idx", "wb") if index else None  # noqa: SIM115
        if self._index is not None:
            self._index.write(np.zeros(1, np.int64).tobytes())
        self._weights = open(root / f"{split}.weights", "wb") if weights else None  # noqa: SIM115

    def add(self, tokens: np.ndarray, lengths: np.ndarray, text_bytes: np.ndarray,
            weights: np.ndarray | None = None) -> None:
        """Append documents: `tokens` concatenated, `lengths` [documents] of them."""
        if not len(lengths):
            return
        if self._weights is not None:
            assert weights is not None and len(weights) == len(tokens)
            self._weights.write(weights.astype(np.uint8).tobytes())
            self.weight_sum += int(weights.sum())
        ends = np.cumsum(lengths)
        if self._index is not None:
            self._index.write((self.tokens + ends).astype(np.int64).tobytes())
        self.tokens += int(ends[-1])
        self.documents += len(lengths)
        self.text_bytes += int(text_bytes.sum())
        done = 0  # documents of this batch written so far
        while done < len(lengths):
            if self._file is None or self._file_bytes >= self.shard_bytes:
                self._next_shard()
            # The documents that fit in this shard (at least one: a shard is never empty).
            room = (self.shard_bytes - self._file_bytes) // self.dtype.itemsize
            base = ends[done - 1] if done else 0
            n = max(int(np.searchsorted(ends[done:] - base, room, side="right")),
                    1 if self._file_bytes == 0 else 0)
            if n == 0:
                self._file_bytes = self.shard_bytes  # full: the next document starts one
                continue
            stop = ends[done + n - 1]
            chunk = tokens[base:stop]
            self._file.write(chunk.tobytes())
            self._file_bytes += chunk.nbytes
            done += n

    def _next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.shards.append(name)
        self._file = open(self.root / name, "wb")
        self._file_bytes = 0

    def close(self) -> dict[str, Any]:
        """Close the files; returns the split's entry of meta.json."""
        if self._file is not None:
            self._file.close()
        if self._index is not None:
            self._index.close()
        if len(self.shards) == 1:  # one shard: the same name as a one-text split
            os.replace(self.root / self.shards[0], self.root / f"{self.split}.bin")
            self.shards = [f"{self.split}.bin"]
        out = {"shards": self.shards, "index": f"{self.split}.idx", "tokens": self.tokens,
               "documents": self.documents, "bytes": self.text_bytes}
        if self._weights is not None:
            self._weights.close()
            out.update(weights=f"{self.split}.weights", completion_tokens=self.weight_sum)
        return out


