"""A split stored as several memory-mapped token files, read as one token stream."""

import os
from collections.abc import Sequence
from typing import Any

import numpy as np


class ShardedTokens:
    """Token shards (`np.memmap`s) concatenated lazily: `len`, integer and slice indexing.

    Integer-array indexing (windows: `tokens[starts_B[:, None] + offsets_L]`) gathers
    from whichever shards the indices fall in; slices inside one shard are views.
    """

    def __init__(self, shards: Sequence[np.ndarray]):
        if not shards:
            raise ValueError("ShardedTokens needs at least one shard")
        self.shards = list(shards)
        self.dtype = self.shards[0].dtype
        sizes = np.array([len(s) for s in self.shards], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # [num_shards + 1]
        self.size = int(self.starts[-1])
        self.shape = (self.size,)
        self.ndim = 1

    @classmethod
    def open(cls, files: Sequence[str | os.PathLike], dtype: Any) -> "np.ndarray | ShardedTokens":
        """One file: its memmap itself; several: a ShardedTokens over their memmaps."""
        maps = [np.memmap(f, dtype=dtype, mode="r") if os.path.getsize(f) else
                np.zeros(0, dtype) for f in files]
        return maps[0] if len(maps) == 1 else cls(maps)

    def __len__(self) -> int:
        return self.size

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate([np.asarray(s) for s in self.shards])
        return out if dtype is None else out.astype(dtype)

    def max(self) -> Any:
        return max(s.max() for s in self.shards if len(s))

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.size)
            if step == 1:
                shard = int(np.searchsorted(self.starts, start, side="right")) - 1
                if start >= stop:
                    return np.zeros(0, self.dtype)
                if stop <= self.starts[shard + 1]:
                    base = self.starts[shard]
                    return self.shards[shard][start - base:stop - base]
            return self[np.arange(start, stop, step)]
        if np.isscalar(index):
            i = int(index)
            if i < 0:
                i += self.size
            if not 0 <= i < self.size:
                raise IndexError(f"index {index} out of range for {self.size} tokens")
            shard = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self.shards[shard][i - self.starts[shard]]
        idx = np.asarray(index)
        if idx.size and (idx.min() < 0 or idx.max() >= self.size):
            raise IndexError(f"index out of range for {self.size} tokens")
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty(idx.shape, self.dtype)
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self.shards[s][idx[mask] - self.starts[s]]
        return out
