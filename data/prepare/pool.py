"""Documents of a corpus read, parsed and tokenized in worker processes, in input order.

A `Worker` holds what every task needs (the reading settings and the tokenizer); it is
built once per process from `WorkerSettings`: in this process for `workers=0`, else by the
pool's initializer in each worker process, which keeps it for the tasks it is given.
"""

import collections
import multiprocessing as mp
import dataclasses
import hashlib
import os
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxlm.data.readers import Parsed, Task, parse_task
from jaxlm.data.tokenizers import Tokenizer, encode_documents_flat, tokenizer_from_dict


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """What a worker reads with: the text field, bad-document handling, the split, and
    (for tokenizing) the tokenizer as stored in meta.json with its directory."""

    text_field: str
    skip_bad: bool
    val_fraction: float
    tokenizer: dict[str, Any] | None = None
    root: str = ""
    dtype: str = "uint16"


@dataclasses.dataclass
class Tokenized:
    """One task's documents, tokenized: tokens of every kept document concatenated."""

    tokens: np.ndarray  # [sum of lengths], the storage dtype
    lengths: np.ndarray  # int64 [documents]
    is_val: np.ndarray  # bool [documents]
    text_bytes: np.ndarray  # int64 [documents]: UTF-8 bytes of each document's text
    bad: int
    empty: int
    error: tuple[str, str] | None


def is_val(text_bytes: bytes, val_fraction: float) -> bool:
    """Split by content: a 64-bit hash of the document's UTF-8 text below the fraction."""
    h = int.from_bytes(hashlib.blake2b(text_bytes, digest_size=8).digest(), "little")
    return h < val_fraction * 2.0**64


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class Worker:
    """The operations on one task of documents: `chars`, `train_texts`, `tokenize`."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.tok: Tokenizer | None = (None if settings.tokenizer is None else
                                      tokenizer_from_dict(settings.tokenizer, settings.root))

    def _parse(self, task: Task) -> Parsed:
        return parse_task(task, self.settings.text_field, self.settings.skip_bad)

    def chars(self, task: Task) -> tuple[set[str], tuple[str, str] | None]:
        """The characters of the task's documents."""
        p = self._parse(task)
        chars: set[str] = set()
        for t in p.texts:
            chars.update(t)
        return chars, p.error

    def train_texts(self, task: Task) -> tuple[list[str], tuple[str, str] | None]:
        """The task's non-empty documents of the training split."""
        p = self._parse(task)
        vf = self.settings.val_fraction
        return [t for t in p.texts if t and not is_val(_utf8(t), vf)], p.error

    def tokenize(self, task: Task) -> Tokenized:
        """The task's non-empty documents, tokenized, with their split."""
        assert self.tok is not None
        p = self._parse(task)
        texts = [t for t in p.texts if t]
        raw = [_utf8(t) for t in texts]
        tokens, lengths = encode_documents_flat(self.tok, texts, np.dtype(self.settings.dtype))
        split = np.array([is_val(r, self.settings.val_fraction) for r in raw], bool)
        return Tokenized(tokens, lengths, split, np.array([len(r) for r in raw], np.int64),
                         p.bad, len(p.texts) - len(texts), p.error)


_PROCESS_WORKER: list[Worker] = []  # a pool process's Worker, set by its initializer


def _start_worker(settings: WorkerSettings, threads: int) -> None:
    """A pool process: the HF tokenizers' thread pool size (read when it first starts),
    Ctrl-C left to the main process (it stops the pool), and this process's Worker."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _PROCESS_WORKER[:] = [Worker(settings)]


def _run(op: str, task: Task) -> Any:
    return getattr(_PROCESS_WORKER[0], op)(task)


def map_ordered(tasks: Iterator[Task], op: str, settings: WorkerSettings, workers: int,
                progress: Any) -> Iterator[Any]:
    """`Worker(settings).op(task)` for each task, in order; `workers=0` runs them in this
    process. Workers (spawned processes) each take a task at a time; at most 2 per worker
    are in flight, so memory stays bounded."""
    if workers == 0:
        worker = Worker(settings)
        for task in tasks:
            result = getattr(worker, op)(task)
            progress.update(task.nbytes)
            yield result
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_start_worker, initargs=(settings, threads)) as pool:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append((task.nbytes, pool.apply_async(_run, (op, task))))
            if len(pending) >= 2 * workers:
                nbytes, result = pending.popleft()
                yield result.get()
                progress.update(nbytes)
        while pending:
            nbytes, result = pending.popleft()
            yield result.get()
            progress.update(nbytes)
