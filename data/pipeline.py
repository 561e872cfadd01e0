"""Token data sets and grain pipelines for training and evaluation.

Training draws random windows of `seq_len + 1` tokens. The windows of global step `s`
depend only on (`seed`, `s`), and each process takes its rows of the global batch, so
the data order is the same for any number of processes and survives restarts exactly.
Evaluation walks the whole validation split in non-overlapping windows.
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import grain
import numpy as np

from configs.errors import ConfigError
from data.prepare import EMBEDDED_CORPUS, META, is_prepared, prepare
from data.tokenizers import Tokenizer, tokenizer_from_dict

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class TokenData:
    """A prepared data set: memory-mapped token splits plus its tokenizer."""

    path: Path
    tokenizer: Tokenizer
    vocab_size: int
    train: np.ndarray
    val: np.ndarray

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenData":
        path = Path(path)
        if not is_prepared(path):
            raise ConfigError("data.path", f"{path} is not a prepared token directory "
                                           f"(no {META})")
        try:
            meta = json.loads((path / META).read_text())
            tok = tokenizer_from_dict(meta["tokenizer"])
            vocab, dtype = int(meta["vocab_size"]), np.dtype(meta["dtype"])
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError("data.path", f"{path / META} is malformed: {e}") from None
        splits = {}
        for split in ("train", "val"):
            f = path / f"{split}.bin"
            if not f.is_file():
                raise ConfigError("data.path", f"missing token file {f}")
            arr = np.memmap(f, dtype=dtype, mode="r")
            if arr.size and int(arr.max()) >= vocab:
                raise ConfigError("data.path", f"{f} has token id {int(arr.max())} >= vocab "
                                               f"size {vocab} from {path / META}")
            splits[split] = arr
        return cls(path, tok, vocab, splits["train"], splits["val"])


def resolve_data(data_cfg: Any, workdir: str | os.PathLike) -> TokenData:
    """Load `data.path`: a prepared directory is used as is; text is prepared under workdir."""
    source = Path(data_cfg.path) if data_cfg.path else EMBEDDED_CORPUS
    if not source.exists():
        raise ConfigError("data.path", f"no such file or directory: {source}")
    if is_prepared(source):
        data = TokenData.load(source)
        if data.tokenizer.kind != data_cfg.tokenizer:
            raise ConfigError("data.tokenizer",
                              f"{source} was prepared with the {data.tokenizer.kind!r} "
                              f"tokenizer, not {data_cfg.tokenizer!r}")
        return data
    out = prepare(source, Path(workdir) / "data", tokenizer=data_cfg.tokenizer,
                  val_fraction=data_cfg.val_fraction)
    return TokenData.load(out)


class TrainBatches:
    """Random-access source: index `s` -> this process's rows of global batch `s`."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        assert global_batch % process_count == 0, (global_batch, process_count)  # layout.py
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.global_batch = global_batch
        rows = global_batch // process_count
        self.rows = slice(process_index * rows, (process_index + 1) * rows)
        self._offsets = np.arange(seq_len + 1)

    def __len__(self) -> int:
        return 2**62  # endless: one batch per step

    def starts(self, step: int) -> np.ndarray:
        """Window start positions of the whole global batch of `step`."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_batch)

    def __getitem__(self, step: int) -> Batch:
        windows = self.tokens[self.starts(step)[self.rows, None] + self._offsets]
        windows = windows.astype(np.int32)
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


class EvalBatches:
    """Non-overlapping windows covering every validation target once; padding has weight 0."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int,
                 process_index: int = 0, process_count: int = 1, max_batches: int = 0):
        assert global_batch % process_count == 0, (global_batch, process_count)  # layout.py
        self.tokens, self.seq_len, self.global_batch = tokens, seq_len, global_batch
        self.num_targets = len(tokens) - 1
        self.num_windows = -(-self.num_targets // seq_len)
        n = -(-self.num_windows // global_batch)
        self.num_batches = min(n, max_batches) if max_batches > 0 else n
        rows = global_batch // process_count
        self.rows = slice(process_index * rows, (process_index + 1) * rows)

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> Batch:
        window = np.arange(self.global_batch)[self.rows] + index * self.global_batch
        pos = window[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        valid = pos < len(self.tokens)
        windows = self.tokens[np.where(valid, pos, 0)].astype(np.int32)
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:],
                "weights": valid[:, 1:].astype(np.float32)}


def train_iterator(source: TrainBatches, prefetch: int = 2) -> grain.DatasetIterator:
    """A checkpointable iterator over training batches, prefetched on a background thread."""
    ds = grain.MapDataset.source(source).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    return iter(ds)
