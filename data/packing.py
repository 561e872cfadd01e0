"""Training and evaluation batches: random windows or packed documents, from one prepared
set or a mixture, as grain datasets whose iterator state is checkpointable.

Every batch is a dict of [rows, seq_len] arrays: int32 `inputs`, `targets`,
`segment_ids`, `positions` and float32 `weights`; a mixture of several sources adds
int32 `source` [rows] (index into `Mixture.names`) and, in training, float64
`tokens_seen` [sources] (weighted targets of the global batches so far, per source, kept
in the iterator's state), and evaluation batches add float32 `target_bytes` [rows] (UTF-8 bytes of each row's weighted
targets, for bits per byte). `split_row_info` separates these host-side keys from what
the model takes.

`packing="windows"`: random windows of seq_len + 1 tokens (`WindowPlans`: one source
draws the starts of global batch s from (seed, s)), segment_ids 1, positions
0..seq_len-1, weights 1.

`packing="documents"`: each document's inputs and targets are shifted within the
document (inputs d[:-1], targets d[1:]), cut into pieces of at most seq_len pairs
(consecutive pieces overlap by one token, so every target is predicted once), and
pieces are packed first-fit into rows (grain's FirstFitPackIterDataset). `segment_ids`
number the pieces of a row from 1 (0 = padding), `positions` restart at 0 for every
piece, and `weights` are 1 on real targets and 0 on padding (for an SFT set, the stored
weight of each target token: 0 on prompt tokens). SFT sets are always packed as
documents (`resolve_packing`), and their examples are never cut (training/layout.py
refuses a seq_len shorter than an example).
A preference set trains in rows of (chosen, rejected) pairs instead (data/preference.py).
A document's first token is never a target: nothing is predicted across a document
boundary.

Order and processes: documents are shuffled per epoch by (seed, epoch) (grain's
shuffle + repeat); the packing plan works on token *positions* only, so every process
computes the same global batch of positions cheaply and then reads the tokens of its
own rows (process_index / process_count) alone. The global batch is identical for any
number of processes, and the iterator's state (get_state / set_state, or
grain.checkpoint.CheckpointSave / CheckpointRestore with orbax) resumes exactly.
"""

import collections.abc
import math
from typing import Any

import grain
import numpy as np

from jaxlm.configs.sections import Packing
from jaxlm.data.mixture import Mixture
from jaxlm.data.pipeline import Batch, EvalBatches, TokenData, process_rows, target_bytes
from jaxlm.data.preference import pair_rows

# Host-side bookkeeping, not model inputs: [rows] (`source`, `target_bytes`) or per batch.
ROW_KEYS = ("source", "target_bytes", "tokens_seen")
DEFAULT_PACKING_BINS = 128


def _seed32(*parts: int) -> int:
    """A 32-bit seed (grain's shuffle takes [0, 2**32)) from a seed and stream ids."""
    return int(np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1)[0])


def stores_documents(data: Mixture) -> bool:
    """Whether the data is a corpus of documents (stored as [BOS] tokens [EOS])."""
    return all(s.train_docs is not None for s in data.sources)


def split_row_info(batch: Batch) -> tuple[Batch, Batch]:
    """(model batch, host info): `source` / `target_bytes` [rows] and `tokens_seen`
    [sources] are host-side bookkeeping and must not be sharded like the [rows, seq_len]
    arrays."""
    model = {k: v for k, v in batch.items() if k not in ROW_KEYS}
    return model, {k: v for k, v in batch.items() if k in ROW_KEYS}


def tokens_per_source(batch: Batch, num_sources: int) -> np.ndarray:
    """float64 [sources]: weighted target tokens of this batch's rows from each source."""
    per_row = batch["weights"].sum(axis=1)
    source = batch.get("source", np.zeros(len(per_row), np.int32))
    return np.bincount(source, weights=per_row, minlength=num_sources)


def bits_per_byte(loss_sum: float, num_bytes: float) -> float:
    """Summed token loss (nats) over the UTF-8 bytes of the evaluated targets, in bits:
    comparable across tokenizers (char, byte, BPE)."""
    return float(loss_sum) / math.log(2.0) / max(float(num_bytes), 1e-12)


def resolve_packing(packing: Packing, data: Mixture) -> Packing:
    """The packing training and evaluation use: `documents` whenever a source is an SFT
    set (windows would cut examples and run across them), else `packing`."""
    if any(s.is_sft for s in data.sources):
        return "documents"
    return packing


def target_weights(weights: list[Any], idx_BxL: np.ndarray, valid_BxL: np.ndarray,
                   source_B: np.ndarray) -> np.ndarray:
    """float32 [B, L]: the loss weight of each row's targets. Padding weighs 0, a target
    of an SFT source its stored weight (the token at idx + 1), any other target 1."""
    out_BxL = valid_BxL.astype(np.float32)
    for s in np.unique(source_B):
        if weights[s] is None:
            continue
        rows = source_B == s
        at = np.where(valid_BxL[rows], idx_BxL[rows] + 1, 0)
        out_BxL[rows] = np.where(valid_BxL[rows], weights[s][at], 0).astype(np.float32)
    return out_BxL


# Documents: grain pipeline over token positions.

class _Pieces(collections.abc.Sequence):
    """A document's pieces, made on demand: {"idx": int64 [n]}, the stream positions of
    the piece's inputs (its targets are at idx + 1), n <= seq_len."""

    def __init__(self, start: int, stop: int, seq_len: int):
        self.start, self.stop, self.seq_len = start, stop, seq_len

    def __len__(self) -> int:
        return max(0, -(-(self.stop - self.start) // self.seq_len))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        a = self.start + i * self.seq_len
        return {"idx": np.arange(a, min(a + self.seq_len, self.stop), dtype=np.int64)}


class _DocumentPieces(grain.experimental.FlatMapTransform):
    """Document index -> its pieces (documents of fewer than 2 tokens have none)."""

    def __init__(self, offsets: np.ndarray, seq_len: int):
        self.offsets, self.seq_len = offsets, seq_len
        pairs = np.diff(offsets) - 1
        self.max_fan_out = max(1, int(-(-pairs.max() // seq_len))) if len(pairs) else 1

    def flat_map(self, doc: int) -> _Pieces:
        doc = int(doc)
        return _Pieces(int(self.offsets[doc]), int(self.offsets[doc + 1]) - 1, self.seq_len)


def _tag_source(row: dict[str, np.ndarray], source: int) -> dict[str, Any]:
    return {**row, "source": np.int32(source)}


def packed_rows(offsets: np.ndarray, seq_len: int, seed: int,
                num_epochs: int | None = None,
                num_packing_bins: int = DEFAULT_PACKING_BINS) -> grain.IterDataset:
    """Rows of packed token positions: {"idx": int64 [L], "idx_segment_ids",
    "idx_positions": int32 [L]}; documents in a (seed, epoch) shuffle per epoch."""
    num_docs = len(offsets) - 1
    ds = grain.MapDataset.range(num_docs).shuffle(seed=_seed32(seed, 0)).repeat(num_epochs)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = grain.experimental.FlatMapIterDataset(ds, _DocumentPieces(offsets, seq_len))
    return grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"idx": seq_len}, num_packing_bins=num_packing_bins,
        seed=_seed32(seed, 1), shuffle_bins=True)


class _ReadPackedRows(grain.transforms.Map):
    """A global batch of packed positions -> this process's rows of tokens.

    Hand-written: grain packs the positions, but reading only this process's rows of
    several memory-mapped sources is specific to this layout."""

    def __init__(self, tokens: list[Any], global_batch: int, rows: slice, mixture: bool,
                 weights: list[Any] | None = None):
        self.tokens, self.global_batch, self.rows, self.mixture = \
            tokens, global_batch, rows, mixture
        self.weights = weights or [None] * len(tokens)

    def map(self, plan: dict[str, np.ndarray]) -> Batch:
        idx_BxL = plan["idx"]
        seg_BxL = plan["idx_segment_ids"]
        pos_BxL = plan["idx_positions"]
        source_B = plan["source"] if self.mixture else np.zeros(len(idx_BxL), np.int32)
        short = self.global_batch - len(idx_BxL)
        if short:  # the last batch of a finite run: pad with empty rows
            pad = lambda x: np.concatenate([x, np.zeros((short, *x.shape[1:]), x.dtype)])  # noqa: E731
            idx_BxL, seg_BxL, pos_BxL, source_B = map(pad, (idx_BxL, seg_BxL, pos_BxL,
                                                            source_B))
        # Weighted targets per source of the whole global batch (every process agrees).
        weights_BxL = target_weights(self.weights, idx_BxL, seg_BxL > 0, source_B)
        source_tokens = np.bincount(source_B, weights=weights_BxL.sum(axis=1),
                                    minlength=len(self.tokens))
        idx_BxL, seg_BxL, weights_BxL = \
            idx_BxL[self.rows], seg_BxL[self.rows], weights_BxL[self.rows]
        pos_BxL, source_B = pos_BxL[self.rows], source_B[self.rows]
        valid_BxL = seg_BxL > 0
        inputs_BxL = np.zeros(idx_BxL.shape, np.int32)
        targets_BxL = np.zeros(idx_BxL.shape, np.int32)
        for s in np.unique(source_B):
            rows = source_B == s
            at = np.where(valid_BxL[rows], idx_BxL[rows], 0)
            toks = self.tokens[s]
            inputs_BxL[rows] = np.where(valid_BxL[rows], toks[at], 0)
            targets_BxL[rows] = np.where(valid_BxL[rows], toks[at + valid_BxL[rows]], 0)
        batch = {"inputs": inputs_BxL, "targets": targets_BxL,
                 "segment_ids": seg_BxL.astype(np.int32),
                 "positions": np.where(valid_BxL, pos_BxL, 0).astype(np.int32),
                 "weights": weights_BxL}
        if self.mixture:
            batch["source"] = source_B.astype(np.int32)
            batch["source_tokens"] = source_tokens
        return batch


def _document_dataset(data: Mixture, seq_len: int, global_batch: int, seed: int,
                      rows: slice, num_epochs: int | None,
                      num_packing_bins: int) -> grain.IterDataset:
    sources, weights, mixture = data.sources, data.weights, data.is_mixture
    streams = {}
    for i, (source, w) in enumerate(zip(sources, weights)):
        if w <= 0:
            continue  # evaluation-only source
        ds = packed_rows(source.docs("train"), seq_len, _seed32(seed, 2, i), num_epochs,
                         num_packing_bins)
        streams[str(i)] = ds.map(lambda row, i=i: _tag_source(row, i)) if mixture else ds
    if mixture:
        ds = grain.IterDataset.mix(streams, {k: float(weights[int(k)]) for k in streams})
    else:
        ds = streams["0"]
    ds = ds.batch(global_batch, drop_remainder=False)
    ds = ds.map(_ReadPackedRows([s.train for s in sources], global_batch, rows, mixture,
                                [s.weights("train") for s in sources]))
    return _CountTokens(ds, len(sources)) if mixture else ds


# Windows.

class _SourceRows:
    """Random access to the window starts of one source of several: row k -> a start in
    [0, n - L) drawn from (seed, source, k)."""

    def __init__(self, num_starts: int, seed: int, source: int):
        self.num_starts, self.seed, self.source = num_starts, seed, source

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> tuple[int, int]:
        rng = np.random.default_rng([self.seed, self.source, int(k)])
        return self.source, int(rng.integers(0, self.num_starts))


class WindowPlans(collections.abc.Sequence):
    """Random access: step s -> where the windows of global batch s start, {"source":
    int32 [B], "start": int64 [B]}. One source draws the B starts from
    default_rng([seed, s]); several take rows from grain's deterministic mix of the
    training sources by weight, row k of source i starting at a draw from (seed, i, k)."""

    def __init__(self, data: Mixture, seq_len: int, global_batch: int, seed: int):
        self.num_starts = [len(s.train) - seq_len for s in data.sources]
        self.global_batch, self.seed = global_batch, seed
        self.mixed = None
        if data.is_mixture:
            kept = [i for i, w in enumerate(data.weights) if w > 0]
            rows = [grain.MapDataset.source(_SourceRows(self.num_starts[i], seed, i))
                    for i in kept]
            self.mixed = grain.MapDataset.mix(rows, [float(data.weights[i]) for i in kept])

    def __len__(self) -> int:
        return 2**62  # endless: one global batch per step

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        if self.mixed is None:
            rng = np.random.default_rng([self.seed, step])
            start = rng.integers(0, self.num_starts[0], size=self.global_batch)
            return {"source": np.zeros(self.global_batch, np.int32), "start": start}
        first = int(step) * self.global_batch
        source, start = zip(*(self.mixed[first + j] for j in range(self.global_batch)))
        return {"source": np.asarray(source, np.int32), "start": np.asarray(start, np.int64)}


class _ReadWindows(grain.transforms.Map):
    """A global batch's window plan -> this process's rows of tokens (with `source` and
    `source_tokens` when there are several sources)."""

    def __init__(self, tokens: list[Any], seq_len: int, rows: slice, mixture: bool):
        self.tokens, self.rows, self.mixture = tokens, rows, mixture
        self.offsets = np.arange(seq_len + 1)

    def map(self, plan: dict[str, np.ndarray]) -> Batch:
        start_B, source_B = plan["start"][self.rows], plan["source"][self.rows]
        windows = np.zeros((len(start_B), len(self.offsets)), np.int32)
        for s in np.unique(source_B):
            rows = source_B == s
            windows[rows] = self.tokens[s][start_B[rows, None] + self.offsets]
        n, seq_len = len(start_B), len(self.offsets) - 1
        batch = {"inputs": windows[:, :-1], "targets": windows[:, 1:],
                 "segment_ids": np.ones((n, seq_len), np.int32),
                 "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                              (n, seq_len)).copy(),
                 "weights": np.ones((n, seq_len), np.float32)}
        if self.mixture:  # every row of the global batch: seq_len targets
            batch["source"] = source_B.astype(np.int32)
            batch["source_tokens"] = np.bincount(plan["source"], minlength=len(
                self.tokens)) * float(seq_len)
        return batch


def windows_source(data: Mixture, *, seq_len: int, global_batch: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Random access to this process's rows of the training windows: `[s]` is step s's
    batch, as the windows `train_dataset` yields."""
    plans = WindowPlans(data, seq_len, global_batch, seed)
    rows = process_rows(global_batch, process_index, process_count)
    return grain.MapDataset.source(plans).map(
        _ReadWindows([s.train for s in data.sources], seq_len, rows, data.is_mixture))


class _CountTokens(grain.IterDataset):
    """Turns each mixture batch's `source_tokens` (weighted targets of the global batch per
    source) into `tokens_seen`, the running total, which the iterator's state keeps: a
    resumed run continues the count exactly."""

    def __init__(self, parent: grain.IterDataset, num_sources: int):
        super().__init__(parent)
        self.num_sources = num_sources

    def __iter__(self) -> "_CountTokensIterator":
        return _CountTokensIterator(self._parent.__iter__(), self.num_sources)


class _CountTokensIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, num_sources: int):
        super().__init__(parent)
        self.seen = np.zeros(num_sources, np.float64)

    def __next__(self) -> Batch:
        batch = dict(next(self._parent))
        self.seen = self.seen + batch.pop("source_tokens")
        return {**batch, "tokens_seen": self.seen.copy()}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "tokens_seen": self.seen.tolist()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.seen = np.asarray(state["tokens_seen"], np.float64)


# Public entry points.

def train_dataset(data: Mixture, *, seq_len: int, global_batch: int, seed: int,
                  packing: Packing = "windows", process_index: int = 0, process_count: int = 1,
                  num_epochs: int | None = None, prefetch: int = 2,
                  num_packing_bins: int = DEFAULT_PACKING_BINS) -> grain.IterDataset:
    """This process's rows of every global training batch, as a grain IterDataset.

    `num_epochs` (documents only; None = endless) ends after that many passes, the last
    batch padded with empty rows. Windows are endless. The arguments are those
    training/layout.py `check_layout` accepted: the data fits seq_len and the packing,
    and the processes divide global_batch."""
    packing = resolve_packing(packing, data)
    rows = process_rows(global_batch, process_index, process_count)
    if data.sources[0].is_preference:  # one source (training/layout.py): rows of pairs
        ds = pair_rows(data.sources[0], "train", seq_len=seq_len, global_batch=global_batch,
                       seed=seed, rows=rows, num_epochs=num_epochs)
        return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    if packing == "windows":
        ds = windows_source(data, seq_len=seq_len, global_batch=global_batch, seed=seed,
                            process_index=process_index, process_count=process_count)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
        return _CountTokens(ds, len(data.sources)) if data.is_mixture else ds
    ds = _document_dataset(data, seq_len, global_batch, seed, rows, num_epochs,
                           num_packing_bins)
    return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)


def pair_eval_batches(data: TokenData, *, seq_len: int, global_batch: int,
                      process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """A preference set's validation split once, in batches of whole pairs (the last
    padded with empty rows): this process's rows of each."""
    rows = process_rows(global_batch, process_index, process_count)
    return pair_rows(data, "val", seq_len=seq_len, global_batch=global_batch, seed=0,
                     rows=rows, num_epochs=1)


def train_batches(data: Mixture, **kwargs: Any) -> grain.DatasetIterator:
    """`iter(train_dataset(data, **kwargs))`: a checkpointable iterator of batches."""
    return iter(train_dataset(data, **kwargs))


class PackedEvalBatches:
    """Evaluation documents packed into rows in file order, each target exactly once.

    Random access (`len`, `[i]`) like EvalBatches, so it needs the whole plan up front:
    grain's packers are iterators, so this next-fit plan is computed here (positions
    only: 4 int64 per piece). Rows and keys as the training documents batches, plus
    `target_bytes` when `token_bytes` is given."""

    def __init__(self, tokens: Any, offsets: np.ndarray, seq_len: int, global_batch: int,
                 process_index: int = 0, process_count: int = 1, max_batches: int = 0,
                 token_bytes: np.ndarray | None = None, weights: Any = None):
        self.weights = weights  # SFT: uint8 [tokens] loss weights of the tokens as targets
        self.tokens, self.seq_len, self.global_batch = tokens, seq_len, global_batch
        self.token_bytes = token_bytes
        rows = process_rows(global_batch, process_index, process_count)
        self.rows = np.arange(rows.start, rows.stop)
        starts, rows, cols, lens = [], [], [], []
        row, col = 0, 0
        for a, b in zip(offsets[:-1].tolist(), (offsets[1:] - 1).tolist()):
            for s in range(a, b, seq_len):
                n = min(seq_len, b - s)
                if col + n > seq_len:
                    row, col = row + 1, 0
                starts.append(s), rows.append(row), cols.append(col), lens.append(n)
                col += n
        self.piece_start = np.asarray(starts, np.int64)
        self.piece_row = np.asarray(rows, np.int64)
        self.piece_col = np.asarray(cols, np.int64)
        self.piece_len = np.asarray(lens, np.int64)
        self.num_targets = int(self.piece_len.sum())
        num_rows = int(self.piece_row[-1]) + 1 if starts else 0
        n = -(-num_rows // global_batch)
        self.num_batches = min(n, max_batches) if max_batches > 0 else n

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> Batch:
        if not 0 <= index < self.num_batches:
            raise IndexError(index)
        L = self.seq_len
        global_rows = index * self.global_batch + self.rows
        idx_BxL = np.zeros((len(global_rows), L), np.int64)
        seg_BxL = np.zeros((len(global_rows), L), np.int32)
        pos_BxL = np.zeros((len(global_rows), L), np.int32)
        lo, hi = np.searchsorted(self.piece_row, [global_rows[0], global_rows[-1] + 1])
        first_of_row = np.r_[True, self.piece_row[lo + 1:hi] != self.piece_row[lo:hi - 1]] \
            if hi > lo else np.zeros(0, bool)
        segment = 0
        for k, p in enumerate(range(lo, hi)):
            segment = 1 if first_of_row[k] else segment + 1
            r = int(self.piece_row[p] - global_rows[0])
            c, n = int(self.piece_col[p]), int(self.piece_len[p])
            idx_BxL[r, c:c + n] = np.arange(self.piece_start[p], self.piece_start[p] + n)
            seg_BxL[r, c:c + n] = segment
            pos_BxL[r, c:c + n] = np.arange(n)
        valid_BxL = seg_BxL > 0
        at = np.where(valid_BxL, idx_BxL, 0)
        batch = {"inputs": np.where(valid_BxL, self.tokens[at], 0).astype(np.int32),
                 "targets": np.where(valid_BxL, self.tokens[at + valid_BxL], 0).astype(np.int32),
                 "segment_ids": seg_BxL, "positions": pos_BxL,
                 "weights": target_weights([self.weights], idx_BxL, valid_BxL,
                                           np.zeros(len(idx_BxL), np.int64))}
        if self.token_bytes is not None:
            batch["target_bytes"] = target_bytes(batch, self.token_bytes)
        return batch


def eval_batches(data: TokenData, *, seq_len: int, global_batch: int,
                 packing: Packing = "windows", split: str = "val", process_index: int = 0,
                 process_count: int = 1, max_batches: int = 0
                 ) -> EvalBatches | PackedEvalBatches:
    """Every target of a split once, with `target_bytes` for bits per byte: windows
    (EvalBatches) or packed documents (PackedEvalBatches). An SFT set is packed as
    documents whatever `packing`, weighted by its loss weights: the completion-only loss.
    The split fits seq_len (training/layout.py checks it)."""
    packing = resolve_packing(packing, Mixture.of_set(data))
    tokens = data.tokens(split)
    if packing == "windows":
        return EvalBatches(tokens, seq_len, global_batch, process_index, process_count,
                           max_batches, token_bytes=data.token_bytes)
    return PackedEvalBatches(tokens, data.docs(split), seq_len, global_batch, process_index,
                             process_count, max_batches, token_bytes=data.token_bytes,
                             weights=data.weights(split))


def eval_sources(data: Mixture, **kwargs: Any) -> dict[str, EvalBatches | PackedEvalBatches]:
    """Per-source evaluation batches: {source name: batches}."""
    kwargs["packing"] = resolve_packing(kwargs.get("packing", "windows"), data)
    return {name: eval_batches(s, **kwargs) for name, s in zip(data.names, data.sources)}
