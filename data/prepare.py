"""Prepare text into memory-mapped token files plus `meta.json`.

  python -m jaxlm.data.prepare --input=PATH_OR_GLOB [--input=...] --output=DIR --tokenizer=KIND
      [--vocab_size=N] [--text_field=text] [--workers=N] [--val_fraction=F]
      [--split_blank_lines] [--skip_bad] [--overwrite] [--bpe_train_mb=N] [--shard_mb=N]
  python -m jaxlm.data.prepare --format=sft --input=F.jsonl --output=DIR --tokenizer=BASE
      [--seq_len=N] [--val_fraction=F] [--truncate] [--strict] [--end_text=TEXT]
      [--chat_template=auto|simple|FILE] [--overwrite]

Two layouts:

* One text (`prepare`, used for `data.path` = a text file or a directory of text files
  concatenated, and the embedded corpus; the CLI uses it for a single plain-text file):
  `train.bin`, `val.bin`, the first (1 - val_fraction) of the token stream for training
  and the rest for validation (nanoGPT's split). Format version 1.
* A corpus of documents (`prepare_corpus`: JSON lines, Parquet, text files or
  blank-line-separated blocks): streamed through worker processes, written as token
  shards `{split}-NNNNN.bin` (`{split}.bin` when one is enough) with a document index
  `{split}.idx` (int64 offsets, [documents + 1]), split train/validation by document by
  a hash of each document's text. Format version 2.
* Supervised fine-tuning examples (`prepare_sft`, `--format=sft`; records in
  data/sft.py): format 2 with one example per document, plus `{split}.weights`, a uint8
  loss weight per token (1 on completion tokens). `--tokenizer` may name a prepared
  directory or a run directory, whose tokenizer is reused exactly. Format version 3.

Token files are uint16 when the vocabulary fits, else uint32. A file-backed tokenizer
(bpe, hf:, sentencepiece:) is kept in the directory, so evaluation decodes with it.
"""

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.configs.errors import ConfigError, exit_on_environment_error
from jaxlm.configs.sections import parse_mixture
from jaxlm.data.preference import make_pair
from jaxlm.data.readers import COMPRESSED, Task, expand_inputs, file_format, parse_task, read_tasks
from jaxlm.data.sft import (DEFAULT_END_TEXT, BadRecord, ChatTemplate, Example, find_chat_template,
                            make_example, special_token_strings, template_directory)
from jaxlm.data.tokenizers import (DEFAULT_BPE_VOCAB, HF_FILE, SENTENCEPIECE_FILE,
                                   ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer,
                                   describe_tokenizer, encode_documents_flat, file_sha256,
                                   fit_tokenizer, load_hf_tokenizer, load_sentencepiece,
                                   parse_tokenizer_spec, tokenizer_from_dict, train_bpe,
                                   vocabulary)
from jaxlm.storage import dirs

META = "meta.json"
RUN_CONFIG = "config.json"  # a training run's directory holds it (training/rundir.py)
EMBEDDED_CORPUS = Path(__file__).parent / "corpora" / "tinyshakespeare.txt"
FORMAT_VERSION = 1  # one text, split by token position
CORPUS_FORMAT_VERSION = 2  # documents, sharded, split by document
SFT_FORMAT_VERSION = 3  # format 2 plus a per-token loss weight stream (`{split}.weights`)
FORMAT_VERSIONS = (FORMAT_VERSION, CORPUS_FORMAT_VERSION, SFT_FORMAT_VERSION)
SHARD_BYTES = 256 << 20


def is_prepared(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / META).is_file()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# One text (format 1).

def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in
                                              p.relative_to(path).parts))
    if not files:
        raise ConfigError("data.path", f"directory {path} has no text files")
    return files


def _fingerprint(files: list[Path], tokenizer: str, val_fraction: float,
                 extra: str = "") -> str:
    h = hashlib.sha256(f"{FORMAT_VERSION}|{tokenizer}|{val_fraction}".encode())
    if extra:  # only for tokenizers beyond char/byte: their fingerprints stay as they were
        h.update(extra.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _tokenizer_extra(tokenizer: str, vocab_size: int) -> str:
    kind, path = parse_tokenizer_spec(tokenizer)
    if kind == "bpe":
        return f"|vocab={vocab_size}"
    if path is not None:
        file = Path(path) / HF_FILE if kind == "hf" and Path(path).is_dir() else Path(path)
        return f"|{file_sha256(file)}" if file.is_file() else ""
    return ""


def _keep_tokenizer(tok: Tokenizer, out_dir: Path) -> Tokenizer:
    """Copy a file-backed tokenizer into `out_dir` and return it loaded from the copy."""
    if isinstance(tok, HFTokenizer):
        dst = out_dir / HF_FILE
        if tok.path.resolve() != dst.resolve():
            shutil.copyfile(tok.path, dst)
        return HFTokenizer(dst, kind=tok.kind, bos_id=tok.bos_id, eos_id=tok.eos_id,
                           sha256=tok.sha256)
    if tok.kind == "sentencepiece":
        dst = out_dir / SENTENCEPIECE_FILE
        shutil.copyfile(tok.path, dst)
        return tokenizer_from_dict({**tok.to_dict(), "file": SENTENCEPIECE_FILE}, out_dir)
    return tok


def prepare(source: str | os.PathLike, out_dir: str | os.PathLike, *, tokenizer: str = "char",
            val_fraction: float = 0.1, vocab_size: int = DEFAULT_BPE_VOCAB,
            overwrite: bool = False, wait: bool = False, key: str = "--output") -> Path:
    """Tokenize `source` (file or directory, concatenated) into `out_dir` as one text;
    reuse it if already up to date. `vocab_size` is used by bpe only. Owned as the corpus
    builders own theirs (`_build_atomically`): another prepared set is replaced only with
    `overwrite`; `wait` waits for a concurrent preparation of `out_dir` instead of
    refusing it (the processes of one run); `key` names `out_dir` in errors."""
    source, out_dir = Path(source), Path(out_dir).absolute()
    if not source.exists():
        raise ConfigError("data.path", f"no such file or directory: {source}")
    kind, path = parse_tokenizer_spec(tokenizer)
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError("data.val_fraction", f"must be in (0, 1), got {val_fraction}")
    files = _text_files(source)
    given = tokenizer_of_directory(path, "data.tokenizer") if kind == "from" else None
    extra = (json.dumps(vocabulary(given), sort_keys=True) if given is not None
             else _tokenizer_extra(tokenizer, vocab_size))
    fingerprint = _fingerprint(files, tokenizer, val_fraction, extra)
    if not _needs_build(out_dir, fingerprint, overwrite, key):
        return out_dir
    try:
        text = "".join(f.read_text(encoding="utf-8") for f in files)
    except UnicodeDecodeError as e:
        raise ConfigError("data.path", f"{source} is not UTF-8 text ({e})") from None
    if not text:
        raise ConfigError("data.path", f"{source} is empty: no text to train on")
    settings = {"format_version": FORMAT_VERSION, "tokenizer": tokenizer,
                "val_fraction": val_fraction, "vocab_size": vocab_size}
    return _build_atomically(out_dir, fingerprint, files, settings, lambda tmp: _build_text(
        text, source, tmp, tokenizer, given, settings), overwrite=overwrite, wait=wait, key=key)


def _build_text(text: str, source: Path, tmp: Path, tokenizer: str, given: Tokenizer | None,
                settings: dict[str, Any]) -> dict[str, Any]:
    """Fit (or keep) the tokenizer, encode `text` and write both splits into `tmp`."""
    vocab_size = settings["vocab_size"]
    if given is not None:
        tok: Tokenizer = _keep_tokenizer(given, tmp)
    elif tokenizer == "bpe":
        trained = train_bpe([text], vocab_size, tmp / HF_FILE)
        tok = HFTokenizer(tmp / HF_FILE, kind="bpe", eos_id=trained.eos_id)
    else:
        tok = _keep_tokenizer(fit_tokenizer(tokenizer, text, vocab_size), tmp)
    try:
        ids = tok.encode(text)
    except ValueError as e:  # a character that a reused (from:DIR) char vocabulary lacks
        raise ConfigError("data.path", f"{source}: {e} ({tokenizer}: "
                                       f"{describe_tokenizer(tok)}); the model cannot "
                                       f"represent it: remove or replace it in the text"
                          ) from None
    n_train = int(len(ids) * (1.0 - settings["val_fraction"]))
    dtype = token_dtype(tok.vocab_size)
    for split, part in (("train", ids[:n_train]), ("val", ids[n_train:])):
        part.astype(dtype).tofile(tmp / f"{split}.bin")
    return {"format_version": FORMAT_VERSION, "source": str(source.resolve()),
            "tokenizer": tok.to_dict(), "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name,
            "counts": {"train": n_train, "val": len(ids) - n_train},
            "val_fraction": settings["val_fraction"]}


# A corpus of documents (format 2).

@dataclasses.dataclass
class _Tokenized:
    """One task's documents, tokenized: tokens of every kept document concatenated."""

    tokens: np.ndarray  # [sum of lengths], the storage dtype
    lengths: np.ndarray  # int64 [documents]
    is_val: np.ndarray  # bool [documents]
    text_bytes: np.ndarray  # int64 [documents]: UTF-8 bytes of each document's text
    bad: int
    empty: int
    error: tuple[str, str] | None


_STATE: dict[str, Any] = {}


def _init_worker(settings: dict[str, Any], threads: int | None = None) -> None:
    """Per-process setup: the tokenizer (if any) and the reading settings."""
    if threads:  # the HF tokenizers' thread pool, read when it first starts
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    _STATE.clear()
    _STATE.update(settings)
    if settings.get("tokenizer") is not None:
        _STATE["tok"] = tokenizer_from_dict(settings["tokenizer"], settings["root"])


def _init_pool_worker(settings: dict[str, Any], threads: int | None = None) -> None:
    """A worker process: Ctrl-C reaches the whole process group; the main process stops
    the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(settings, threads)


def _is_val(text_bytes: bytes, val_fraction: float) -> bool:
    """Split by content: a 64-bit hash of the document's UTF-8 text below the fraction."""
    h = int.from_bytes(hashlib.blake2b(text_bytes, digest_size=8).digest(), "little")
    return h < val_fraction * 2.0**64


def _parse(task: Task):
    return parse_task(task, _STATE["text_field"], _STATE["skip_bad"])


def _op_chars(task: Task) -> tuple[set[str], tuple[str, str] | None]:
    p = _parse(task)
    chars: set[str] = set()
    for t in p.texts:
        chars.update(t)
    return chars, p.error


def _op_train_texts(task: Task) -> tuple[list[str], tuple[str, str] | None]:
    p = _parse(task)
    vf = _STATE["val_fraction"]
    return [t for t in p.texts if t and not _is_val(t.encode("utf-8", "surrogatepass"), vf)], \
        p.error


def _op_tokenize(task: Task) -> _Tokenized:
    p = _parse(task)
    texts = [t for t in p.texts if t]
    raw = [t.encode("utf-8", "surrogatepass") for t in texts]
    dtype = np.dtype(_STATE["dtype"])
    tokens, lengths = encode_documents_flat(_STATE["tok"], texts, dtype)
    is_val = np.array([_is_val(r, _STATE["val_fraction"]) for r in raw], bool)
    return _Tokenized(tokens, lengths, is_val, np.array([len(r) for r in raw], np.int64),
                      p.bad, len(p.texts) - len(texts), p.error)


_OPS: dict[str, Callable[[Task], Any]] = {
    "chars": _op_chars, "train_texts": _op_train_texts, "tokenize": _op_tokenize}


def _work(op: str, task: Task) -> Any:
    return _OPS[op](task)


def _map_ordered(tasks: Iterator[Task], op: str, settings: dict[str, Any], workers: int,
                 progress: Any) -> Iterator[Any]:
    """Results of `op` over `tasks`, in order. Workers (spawned processes) each take a
    task at a time; at most 2 per worker are in flight, so memory stays bounded."""
    if workers == 0:
        _init_worker(settings)
        for task in tasks:
            result = _work(op, task)
            progress.update(task.nbytes)
            yield result
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_pool_worker, initargs=(settings, threads)) as pool:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append((task.nbytes, pool.apply_async(_work, (op, task))))
            if len(pending) >= 2 * workers:
                nbytes, result = pending.popleft()
                yield result.get()
                progress.update(nbytes)
        while pending:
            nbytes, result = pending.popleft()
            yield result.get()
            progress.update(nbytes)


def _raise(error: tuple[str, str] | None) -> None:
    if error is not None:
        raise ConfigError(*error)


class _SplitWriter:
    """Appends whole documents to token shards and their end offsets to `{split}.idx`."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_bytes: int,
                 weights: bool = False):
        self.root, self.split, self.dtype, self.shard_bytes = root, split, dtype, shard_bytes
        self.shards: list[str] = []
        self.tokens = self.documents = self.text_bytes = self.weight_sum = 0
        self._file: Any = None
        self._file_bytes = 0
        self._index = open(root / f"{split}.idx", "wb")
        self._index.write(np.zeros(1, np.int64).tobytes())
        # SFT: one uint8 loss weight per token, in one file beside the shards.
        self._weights = open(root / f"{split}.weights", "wb") if weights else None  # noqa: SIM115

    def add(self, tokens: np.ndarray, lengths: np.ndarray, text_bytes: np.ndarray,
            weights: np.ndarray | None = None) -> None:
        if not len(lengths):
            return
        if self._weights is not None:
            assert weights is not None and len(weights) == len(tokens)
            self._weights.write(weights.astype(np.uint8).tobytes())
            self.weight_sum += int(weights.sum())
        ends = np.cumsum(lengths)
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
        if self._file is not None:
            self._file.close()
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


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool, total: int | None, desc: str) -> Any:
    if not enabled:
        return _NoProgress()
    # Deferred: only the command line draws progress bars.
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def _corpus_fingerprint(files: list[Path], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def prepare_corpus(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *,
                   tokenizer: str = "bpe", vocab_size: int = DEFAULT_BPE_VOCAB,
                   text_field: str = "text", workers: int = 1, val_fraction: float = 0.1,
                   split_blank_lines: bool = False, skip_bad: bool = False,
                   overwrite: bool = False, shard_bytes: int = SHARD_BYTES,
                   progress: bool = True, bpe_train_chars: int = 0) -> Path:
    """Stream a corpus of documents into `output` (format 2); returns `output`.

    Idempotent: the same inputs (paths, sizes, mtimes) and settings reuse `output`; an
    `output` prepared from anything else is refused unless `overwrite`. Everything is
    written into a hidden sibling directory renamed into place at the end, so a crash
    never leaves an `output` that looks prepared. `workers=0` tokenizes in this process.
    Char and byte reserve an end-of-document id (the corpus has several documents);
    bpe trains on the training documents (streamed) with `vocab_size` ids, or on their
    first `bpe_train_chars` characters when > 0: the trainer's memory is its table of
    distinct pre-tokenized words, which grows with the text it sees.
    """
    output = Path(output).absolute()
    kind, tok_path = parse_tokenizer_spec(tokenizer, "--tokenizer")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError("--val_fraction", f"must be in (0, 1), got {val_fraction}")
    if workers < 0:
        raise ConfigError("--workers", f"must be >= 0, got {workers}")
    if bpe_train_chars < 0:
        raise ConfigError("--bpe_train_mb", f"must be >= 0, got {bpe_train_chars / 1e6}")
    if shard_bytes <= 0:
        raise ConfigError("--shard_mb", f"must be > 0, got {shard_bytes} bytes")
    if kind == "bpe" and vocab_size < 257:
        raise ConfigError("--vocab_size", f"{vocab_size} is too small for a byte-level BPE: "
                                          f"it needs at least 257 ids (256 bytes + "
                                          f"end-of-document)")
    given: Tokenizer | None = None
    if kind == "hf":
        given = load_hf_tokenizer(tok_path, "--tokenizer")
    elif kind == "sentencepiece":
        given = load_sentencepiece(tok_path, "--tokenizer")
    # Never read the output (or its staging directories) back as input.
    files = [f for f in expand_inputs(inputs, "--input")
             if output not in f.parents and not dirs.is_staging(f, output)]
    if not files:
        raise ConfigError("--input", f"no input files outside --output {output}")
    settings = {"format_version": CORPUS_FORMAT_VERSION, "tokenizer": kind,
                "tokenizer_file": None if given is None else
                {k: v for k, v in given.to_dict().items() if k != "file"},
                "vocab_size": vocab_size if kind == "bpe" else None,
                "bpe_train_chars": bpe_train_chars if kind == "bpe" else 0,
                "text_field": text_field, "val_fraction": val_fraction,
                "split_blank_lines": split_blank_lines, "skip_bad": skip_bad}
    fingerprint = _corpus_fingerprint(files, settings)
    if not _needs_build(output, fingerprint, overwrite):
        return output
    return _build_atomically(output, fingerprint, files, settings, lambda tmp: _build(
        files, tmp, kind, given, settings, vocab_size, workers, shard_bytes, progress),
        overwrite=overwrite)


PREPARED = "a prepared data directory"


def _saved_fingerprint(output: Path) -> str | None:
    try:
        return json.loads((output / META).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _needs_build(output: Path, fingerprint: str, overwrite: bool, key: str = "--output"
                 ) -> bool:
    """False when `output` is already prepared with `fingerprint`; an error when it holds
    anything else (another prepared set unless `overwrite`; `storage/dirs.py`)."""
    return dirs.check_output(output, key, PREPARED, is_prepared, overwrite,
                             same=lambda p: _saved_fingerprint(p) == fingerprint)


def _build_atomically(output: Path, fingerprint: str, files: list[Path],
                      settings: dict[str, Any], build: Callable[[Path], dict[str, Any]], *,
                      overwrite: bool, wait: bool = False, key: str = "--output") -> Path:
    """Under `output`'s lock (refused while another preparation holds it, or awaited with
    `wait`), check it again, run `build(staging directory) -> meta` in a hidden sibling,
    write the meta and rename the directory into place (replacing an older `output`).
    A failure or a kill leaves `output` as it was."""
    with dirs.output_lock(output, key, wait=wait):
        if not _needs_build(output, fingerprint, overwrite, key):  # built meanwhile
            return output
        with dirs.staged(output) as tmp:
            meta = build(tmp)
            meta.update(fingerprint=fingerprint, inputs=[str(f) for f in files],
                        settings=settings)
            (tmp / META).write_text(json.dumps(meta, indent=2))
    return output


def _build(files: list[Path], tmp: Path, kind: str, given: Tokenizer | None,
           settings: dict[str, Any], vocab_size: int, workers: int, shard_bytes: int,
           progress: bool) -> dict[str, Any]:
    """Fit the tokenizer (char: collect characters; bpe: train), then tokenize and write."""
    compressed = any(f.name.lower().endswith((".gz", ".zst")) or file_format(f) == "parquet"
                     for f in files)
    total = None if compressed else sum(f.stat().st_size for f in files)
    read = dict(text_field=settings["text_field"], split_blank_lines=settings["split_blank_lines"])
    base = {"text_field": settings["text_field"], "skip_bad": settings["skip_bad"],
            "val_fraction": settings["val_fraction"], "tokenizer": None, "root": str(tmp)}

    if kind == "char":
        chars: set[str] = set()
        bar = _progress(progress, total, "characters")
        try:
            for found, error in _map_ordered(read_tasks(files, **read), "chars", base,
                                                workers, bar):
                _raise(error)
                chars |= found
        finally:
            bar.close()
        tok: Tokenizer = CharTokenizer(sorted(chars), eos=True)
    elif kind == "byte":
        tok = ByteTokenizer(eos=True)
    elif kind == "bpe":
        bar = _progress(progress, total, "train bpe")

        def texts() -> Iterator[str]:
            seen = 0
            for batch, error in _map_ordered(read_tasks(files, **read), "train_texts", base,
                                             workers, bar):
                _raise(error)
                yield from batch
                seen += sum(len(t) for t in batch)
                if 0 < settings["bpe_train_chars"] <= seen:
                    return  # trained on a prefix of the training documents
        try:
            tok = train_bpe(texts(), vocab_size, tmp / HF_FILE, "--vocab_size")
        finally:
            bar.close()
    else:
        assert given is not None
        tok = _keep_tokenizer(given, tmp)

    dtype = token_dtype(tok.vocab_size)
    writers = {s: _SplitWriter(tmp, s, dtype, shard_bytes) for s in ("train", "val")}
    settings_tok = {**base, "tokenizer": tok.to_dict(), "dtype": dtype.name}
    bad = empty = 0
    bar = _progress(progress, total, "tokenize")
    try:
        for r in _map_ordered(read_tasks(files, **read), "tokenize", settings_tok, workers,
                              bar):
            _raise(r.error)
            bad, empty = bad + r.bad, empty + r.empty
            ends = np.cumsum(r.lengths)
            starts = ends - r.lengths
            for split, mask in (("train", ~r.is_val), ("val", r.is_val)):
                if not mask.any():
                    continue
                if mask.all():
                    toks = r.tokens
                else:
                    toks = np.concatenate([r.tokens[a:b] for a, b in
                                           zip(starts[mask], ends[mask])])
                writers[split].add(toks, r.lengths[mask], r.text_bytes[mask])
    finally:
        bar.close()
        splits = {s: w.close() for s, w in writers.items()}
    docs = splits["train"]["documents"] + splits["val"]["documents"]
    if docs == 0:
        raise ConfigError("--input", f"empty corpus: no non-empty documents in "
                                     f"{len(files)} file(s)" +
                          (f" ({bad} bad ones skipped)" if bad else ""))
    _require_both_splits(splits, settings["val_fraction"], "documents", "a corpus")
    return {"format_version": CORPUS_FORMAT_VERSION, "tokenizer": tok.to_dict(),
            "vocab_size": tok.vocab_size, "dtype": dtype.name, "splits": splits,
            "counts": {s: splits[s]["tokens"] for s in splits},
            "documents": {s: splits[s]["documents"] for s in splits},
            "skipped": {"bad": bad, "empty": empty},
            "val_fraction": settings["val_fraction"]}


# Supervised fine-tuning examples (format 3).

def _read_json_file(path: Path, key: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(key, f"{path} is damaged ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(key, f"{path} is damaged (not a JSON object)")
    return data


def prepared_directory_of(path: str | os.PathLike, key: str = "--tokenizer") -> Path | None:
    """The prepared data directory behind `path`: `path` itself when prepared, or, for a
    training run's directory (it has config.json), its `data.path` when that is prepared,
    its mixture's first source, else the run's own `data/` (the embedded corpus and text
    files are prepared there on the run's first start). None when `path` is neither."""
    path = Path(path)
    if is_prepared(path):
        return path
    if not (path / RUN_CONFIG).is_file():
        return None
    data = _read_json_file(path / RUN_CONFIG, key).get("data", {})
    source = Path(data["path"]) if data.get("path") else None
    if str(data.get("mixture", "")).strip():
        source = Path(parse_mixture(data["mixture"], key)[0][0])
    directory = source if source is not None and is_prepared(source) else path / "data"
    if not is_prepared(directory):
        raise ConfigError(key, f"the run {path} has no prepared data at {directory} (it is "
                               f"written on the run's first start): nothing to take its "
                               f"tokenizer from")
    return directory


def tokenizer_of_directory(path: str | os.PathLike, key: str = "data.tokenizer") -> Tokenizer:
    """`from:DIR`: exactly the tokenizer of a run directory or a prepared data directory."""
    directory = prepared_directory_of(path, key) if Path(path).is_dir() else None
    if directory is None:
        raise ConfigError(key, f"from:{path}: not a run directory or a prepared data "
                               f"directory")
    return reuse_tokenizer(directory, key)[0]


def run_seq_len(path: str | os.PathLike) -> int | None:
    """The training seq_len of a run directory (from its config.json); None for anything
    else."""
    config = Path(path) / RUN_CONFIG
    if not config.is_file():
        return None
    seq_len = _read_json_file(config, "--tokenizer").get("seq_len")
    return int(seq_len) if isinstance(seq_len, int) else None


def reuse_tokenizer(directory: Path, key: str = "--tokenizer"
                    ) -> tuple[Tokenizer, dict[str, Any]]:
    """(the tokenizer, meta) of a prepared directory: exactly its vocabulary and ids."""
    meta = _read_json_file(directory / META, key)
    try:
        return tokenizer_from_dict(meta["tokenizer"], directory), meta
    except (KeyError, ValueError, TypeError, OSError) as e:
        raise ConfigError(key, f"cannot load the tokenizer of {directory}: {e}") from None


def sft_tokenizer(spec: str, chat_template: str = "auto"
                  ) -> tuple[Tokenizer, ChatTemplate | None]:
    """`--tokenizer` and `--chat_template` of SFT preparation -> (tokenizer, template).

    `spec` is a prepared data directory or a run directory (its tokenizer is reused
    exactly), `byte`, `hf:PATH` or `sentencepiece:PATH`; char and bpe would fit a new
    vocabulary to the fine-tuning data, which no base model shares. `chat_template`:
    `auto` (the tokenizer's Hugging Face template when it has one, else the simple one),
    `simple`, or a Jinja file."""
    spec = spec.removeprefix("from:")
    directory = prepared_directory_of(spec) if Path(spec).is_dir() else None
    found: ChatTemplate | None = None
    if directory is not None:
        tok, meta = reuse_tokenizer(directory)
        saved = meta.get("chat_template")
        if isinstance(saved, dict):
            if not (isinstance(saved.get("source"), str) and
                    isinstance(saved.get("special_tokens"), dict)):
                raise ConfigError("--tokenizer", f"{directory / META} is damaged (its "
                                                 f"chat_template has no source and "
                                                 f"special_tokens); prepare it again")
            found = ChatTemplate(saved["source"], saved["special_tokens"],
                                 f"the chat template in {directory / META}")
    else:
        kind, path = parse_tokenizer_spec(spec, "--tokenizer")
        if kind in ("char", "bpe"):
            raise ConfigError("--tokenizer", f"{kind} would fit a new vocabulary to the "
                                             f"fine-tuning data; pass the base model's "
                                             f"tokenizer: its run directory, its prepared "
                                             f"data directory, or byte, hf:PATH, "
                                             f"sentencepiece:PATH")
        if kind == "byte":
            tok = ByteTokenizer()
        elif kind == "hf":
            tok = load_hf_tokenizer(path, "--tokenizer")
            found = find_chat_template(tok, template_directory(path))
        else:
            tok = load_sentencepiece(path, "--tokenizer")
    if chat_template == "auto":
        return tok, found
    if chat_template == "simple":
        return tok, None
    file = Path(chat_template)
    if not file.is_file():
        raise ConfigError("--chat_template", f"expected auto, simple or a Jinja template "
                                             f"file; no such file: {file}")
    try:
        source = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("--chat_template", f"{file} is not UTF-8 text ({e.reason} at byte "
                                             f"{e.start})") from None
    return tok, ChatTemplate(source, special_token_strings(tok), str(file))


def prepare_sft(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *,
                tokenizer: str, seq_len: int | None = None, val_fraction: float = 0.1,
                truncate: bool = False, strict: bool = False,
                end_text: str = DEFAULT_END_TEXT, chat_template: str = "auto",
                overwrite: bool = False, shard_bytes: int = SHARD_BYTES,
                progress: bool = True, record_format: str = "sft") -> Path:
    """JSON-lines SFT records (data/sft.py) -> `output` (format 3); returns `output`.
    `record_format="preference"`: preference records, two examples each (data/preference.py).

    Like a corpus of documents (one document per example, split by a hash of the
    record), plus `{split}.weights`: one uint8 per token, 1 where the token is a
    completion target. Bad records are counted by reason (with the first file and line)
    in the meta and skipped, or, with `strict`, refused. Examples longer than
    seq_len + 1 tokens are bad unless `truncate` (cut at seq_len + 1). Without `seq_len`,
    a run directory as `tokenizer` gives its seq_len; otherwise examples of any length
    are kept, and a training run refuses, before compiling, a seq_len shorter than the
    longest. Idempotent and atomic as `prepare_corpus`."""
    output = Path(output).absolute()
    if seq_len is None:
        seq_len = run_seq_len(tokenizer)
    if seq_len is None and truncate:
        raise ConfigError("--truncate", "needs --seq_len (or a run directory as "
                                        "--tokenizer, whose seq_len is used): the length "
                                        "to cut examples at")
    if seq_len is not None and seq_len < 1:
        raise ConfigError("--seq_len", f"must be >= 1, got {seq_len}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError("--val_fraction", f"must be in (0, 1), got {val_fraction}")
    if shard_bytes <= 0:
        raise ConfigError("--shard_mb", f"must be > 0, got {shard_bytes} bytes")
    tok, template = sft_tokenizer(tokenizer, chat_template)
    if tok.eos_id is None and end_text:
        try:
            tok.encode(end_text)
        except ValueError as e:
            raise ConfigError("--end_text", f"{end_text!r}: {e}") from None
    files = [f for f in expand_inputs(inputs, "--input")
             if output not in f.parents and not dirs.is_staging(f, output)]
    if not files:
        raise ConfigError("--input", f"no input files outside --output {output}")
    for f in files:
        if file_format(f) != "jsonl":
            raise ConfigError("--input", f"{f} is not JSON lines (.jsonl, .json or .ndjson, "
                                         f"optionally .gz or .zst): SFT records are JSON "
                                         f"lines")
    settings = {"format_version": SFT_FORMAT_VERSION, "format": record_format,
                "tokenizer": tok.to_dict(), "seq_len": seq_len, "truncate": truncate,
                "strict": strict, "val_fraction": val_fraction, "end_text": end_text,
                "chat_template": None if template is None else template.source}
    fingerprint = _corpus_fingerprint(files, settings)
    if not _needs_build(output, fingerprint, overwrite):
        return output
    return _build_atomically(output, fingerprint, files, settings, lambda tmp: _build_sft(
        files, tmp, tok, template, settings, shard_bytes, progress), overwrite=overwrite)


def _build_sft(files: list[Path], tmp: Path, tok: Tokenizer, template: ChatTemplate | None,
               settings: dict[str, Any], shard_bytes: int, progress: bool
               ) -> dict[str, Any]:
    """Read, check, tokenize and write every record (in this process: SFT sets are small
    next to pretraining corpora, and the per-record checks are cheap)."""
    tok = _keep_tokenizer(tok, tmp)
    dtype = token_dtype(tok.vocab_size)
    writers = {s: _SplitWriter(tmp, s, dtype, shard_bytes, weights=True)
               for s in ("train", "val")}
    bad: dict[str, dict[str, Any]] = {}
    records = truncated = 0
    longest = {"train": 0, "val": 0}
    compressed = any(f.name.lower().endswith(COMPRESSED) for f in files)
    bar = _progress(progress, None if compressed else sum(f.stat().st_size for f in files),
                    "sft")
    try:
        for task in read_tasks(files):
            kept: dict[str, list[Example]] = {"train": [], "val": []}
            for item, line in zip(task.items, task.lines):
                records += 1
                try:
                    exs = (make_pair if settings["format"] == "preference" else
                           lambda *a, **k: [make_example(*a, **k)])(
                        item, tok, template, seq_len=settings["seq_len"],
                        truncate=settings["truncate"], end_text=settings["end_text"])
                except BadRecord as e:
                    if settings["strict"]:
                        raise ConfigError("--input", f"{task.file}:{line}: {e.reason}: "
                                                     f"{e.detail} (--strict refuses the "
                                                     f"file at its first bad record)"
                                          ) from None
                    entry = bad.setdefault(e.reason, {"count": 0, "file": task.file,
                                                      "line": line, "detail": e.detail})
                    entry["count"] += 1
                    continue
                truncated += any(ex.truncated for ex in exs)
                split = "val" if _is_val(exs[0].key, settings["val_fraction"]) else "train"
                kept[split] += exs
            for split, exs in kept.items():
                if exs:
                    longest[split] = max(longest[split], *(len(x.tokens) for x in exs))
                    writers[split].add(np.concatenate([x.tokens for x in exs]).astype(dtype),
                                       np.array([len(x.tokens) for x in exs], np.int64),
                                       np.array([x.text_bytes for x in exs], np.int64),
                                       np.concatenate([x.weights for x in exs]))
            bar.update(task.nbytes)
    finally:
        bar.close()
        splits = {s: w.close() for s, w in writers.items()}
    _check_sft_splits(splits, records, bad, files, settings)
    return {"format_version": SFT_FORMAT_VERSION, "format": settings["format"],
            "tokenizer": tok.to_dict(), "vocab_size": tok.vocab_size, "dtype": dtype.name,
            "splits": splits, "counts": {s: splits[s]["tokens"] for s in splits},
            "documents": {s: splits[s]["documents"] for s in splits},
            "examples": {s: splits[s]["documents"] for s in splits},
            "completion_tokens": {s: splits[s]["completion_tokens"] for s in splits},
            "longest": longest, "records": records, "truncated": truncated,
            "bad": dict(sorted(bad.items())),
            "skipped": {"bad": sum(b["count"] for b in bad.values()), "empty": 0},
            "seq_len": settings["seq_len"], "truncate": settings["truncate"],
            "template": "simple" if template is None else "chat_template",
            "chat_template": None if template is None else
            {"source": template.source, "special_tokens": template.special_tokens},
            "end": "eos" if tok.eos_id is not None else settings["end_text"],
            "val_fraction": settings["val_fraction"]}


def _check_sft_splits(splits: dict[str, Any], records: int, bad: dict[str, Any],
                      files: list[Path], settings: dict[str, Any]) -> None:
    examples = splits["train"]["documents"] + splits["val"]["documents"]
    if examples == 0:
        reasons = ", ".join(f"{r} {b['count']} (first {b['file']}:{b['line']})"
                            for r, b in sorted(bad.items()))
        raise ConfigError("--input", f"no usable SFT records in {len(files)} file(s): "
                                     f"{records} record(s)" +
                          (f", all bad: {reasons}" if reasons else ""))
    _require_both_splits(splits, settings["val_fraction"], "examples", "SFT data")


def _require_both_splits(splits: dict[str, Any], val_fraction: float, unit: str,
                         what: str) -> None:
    """ConfigError naming --val_fraction when the train or the validation split is empty."""
    total = splits["train"]["documents"] + splits["val"]["documents"]
    for split in ("train", "val"):
        if splits[split]["documents"] == 0:
            raise ConfigError("--val_fraction", f"the {split} split is empty ({total} {unit}, "
                                                f"val_fraction {val_fraction}); {what} needs "
                                                f"{unit} in both splits")


def describe_bad(meta: dict[str, Any]) -> list[str]:
    """One line per reason of the bad records a prepared SFT directory skipped."""
    return [f"skipped {b['count']} bad record(s): {reason} (first at {b['file']}:"
            f"{b['line']}: {b['detail']})" for reason, b in meta.get("bad", {}).items()]


# Command line.

def _flag_amount(value: float, flag: str, scale: float, allow_zero: bool = False) -> int:
    """`value` (a size in millions or MiB) times `scale` as an int; a ConfigError naming
    `flag` unless it is finite and > 0 (>= 0 with `allow_zero`)."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(flag, f"must be a number {'>=' if allow_zero else '>'} 0, got "
                                f"{value}")
    return int(value * scale)


_CONFIG_TO_FLAG = {"data.path": "--input", "data.tokenizer": "--tokenizer",
                   "data.val_fraction": "--val_fraction", "data.vocab_size": "--vocab_size"}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", action="append", required=True,
                    help="a file, directory or glob (repeatable)")
    ap.add_argument("--output", required=True, help="the prepared directory")
    ap.add_argument("--tokenizer", default="char",
                    help="char | byte | bpe | hf:PATH | sentencepiece:PATH")
    ap.add_argument("--vocab_size", type=int, default=DEFAULT_BPE_VOCAB, help="bpe only")
    ap.add_argument("--bpe_train_mb", type=float, default=0,
                    help="bpe only: train on the first N million characters of the "
                         "training documents (0: all)")
    ap.add_argument("--text_field", default="text", help="JSON / Parquet field of the text")
    ap.add_argument("--workers", type=int, default=1,
                    help="tokenizer processes (0: tokenize in this process)")
    ap.add_argument("--val_fraction", type=float, default=0.1)
    ap.add_argument("--split_blank_lines", action="store_true",
                    help="plain text: one document per blank-line-separated block")
    ap.add_argument("--skip_bad", action="store_true",
                    help="count and skip non-UTF-8 documents and invalid JSON lines")
    ap.add_argument("--overwrite", action="store_true",
                    help="rebuild an output prepared from other inputs or settings")
    ap.add_argument("--shard_mb", type=float, default=SHARD_BYTES / 2**20,
                    help="token shard size in MiB")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    sft = ap.add_argument_group("supervised fine-tuning (--format=sft)")
    sft.add_argument("--format", choices=("auto", "sft", "preference"), default="auto",
                     help="auto: text or a corpus of documents, by the inputs; sft: "
                          "prompt/completion or chat records with per-token loss weights; "
                          "preference: prompt/chosen/rejected records, as sft (docs/alignment.md)")
    sft.add_argument("--seq_len", type=int, default=None,
                     help="sft: the training seq_len; longer examples are bad records "
                          "(default: the seq_len of a run directory given as --tokenizer; "
                          "else no limit here, and training refuses a shorter seq_len)")
    sft.add_argument("--truncate", action="store_true",
                     help="sft: cut examples longer than seq_len + 1 tokens instead")
    sft.add_argument("--strict", action="store_true",
                     help="sft: refuse the input at its first bad record")
    sft.add_argument("--end_text", default=DEFAULT_END_TEXT,
                     help="sft: appended to every completion when the tokenizer has no EOS")
    sft.add_argument("--chat_template", default="auto",
                     help="sft: auto | simple | a Jinja template file")
    args = ap.parse_args(argv)
    with _one_line_on_failure(args.output):
        if args.format in ("sft", "preference"):
            _main_sft(args)
        else:
            _main_text(args)


class _Terminated(Exception):
    """SIGTERM, raised in the main thread so that an unfinished build is cleaned up."""


@contextlib.contextmanager
def _one_line_on_failure(output: str) -> Iterator[None]:
    """SIGTERM and Ctrl-C stop the build (its staging directory is removed on the way
    out), and they, a full disk and an unwritable --output exit with one line."""
    def on_sigterm(signum: int, frame: Any) -> None:
        raise _Terminated
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except (KeyboardInterrupt, _Terminated) as e:
        why = "Ctrl-C" if isinstance(e, KeyboardInterrupt) else "SIGTERM"
        raise SystemExit(f"interrupted ({why}): {output} was not prepared; run the same "
                         "command again") from None
    except Exception as e:  # noqa: BLE001 -- a full disk or an unwritable path is one line
        exit_on_environment_error(e)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main_text(args: argparse.Namespace) -> None:
    try:
        single = (len(args.input) == 1 and Path(args.input[0]).is_file() and
                  file_format(Path(args.input[0])) == "text" and
                  not args.input[0].lower().endswith((".gz", ".zst")) and
                  not args.split_blank_lines)
        if single:  # one text: the nanoGPT split by token position (format 1)
            try:
                out = prepare(args.input[0], args.output, tokenizer=args.tokenizer,
                              val_fraction=args.val_fraction, vocab_size=args.vocab_size,
                              overwrite=args.overwrite)
            except ConfigError as e:
                flag = _CONFIG_TO_FLAG.get(e.key, e.key)
                raise ConfigError(flag, str(e).split(": ", 1)[1]) from None
        else:
            out = prepare_corpus(args.input, args.output, tokenizer=args.tokenizer,
                                 vocab_size=args.vocab_size, text_field=args.text_field,
                                 bpe_train_chars=_flag_amount(args.bpe_train_mb,
                                                              "--bpe_train_mb", 1e6, True),
                                 workers=args.workers, val_fraction=args.val_fraction,
                                 split_blank_lines=args.split_blank_lines,
                                 skip_bad=args.skip_bad, overwrite=args.overwrite,
                                 shard_bytes=_flag_amount(args.shard_mb, "--shard_mb",
                                                          2**20),
                                 progress=not args.quiet)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    meta = json.loads((out / META).read_text())
    summary = {"output": str(out), "vocab_size": meta["vocab_size"], **meta["counts"]}
    if "documents" in meta:
        summary.update(documents=meta["documents"], skipped=meta["skipped"])
    print(json.dumps(summary))


def _main_sft(args: argparse.Namespace) -> None:
    try:
        out = prepare_sft(args.input, args.output, tokenizer=args.tokenizer,
                          seq_len=args.seq_len, val_fraction=args.val_fraction,
                          truncate=args.truncate, strict=args.strict,
                          end_text=args.end_text, chat_template=args.chat_template,
                          overwrite=args.overwrite,
                          shard_bytes=_flag_amount(args.shard_mb, "--shard_mb", 2**20),
                          progress=not args.quiet, record_format=args.format)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    meta = json.loads((out / META).read_text())
    for line in describe_bad(meta):
        print(line, file=sys.stderr)
    print(json.dumps({"output": str(out), "vocab_size": meta["vocab_size"],
                      "records": meta["records"], "examples": meta["examples"],
                      "tokens": meta["counts"], "completion_tokens": meta["completion_tokens"],
                      "truncated": meta["truncated"], "bad": {r: b["count"] for r, b in
                                                              meta["bad"].items()},
                      "template": meta["template"]}))


if __name__ == "__main__":
    main()
