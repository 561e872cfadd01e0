"""Streaming corpus readers: input files -> bounded batches of raw documents -> texts.

The main process only reads bytes (`read_tasks`); decoding, JSON parsing and errors
happen in the workers (`parse_task`), so reading never holds more than a few batches.

Formats, by file name (a trailing `.gz` or `.zst` is decompressed on the fly):

  *.jsonl, *.json, *.ndjson   JSON lines, one document per line in `text_field`
  *.parquet                   Parquet, one document per row of column `text_field`
  anything else               plain UTF-8 text: one document per file, or one per
                              blank-line-separated block with `split_blank_lines`
"""

import dataclasses
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from jaxlm.configs.errors import ConfigError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED = (".gz", ".zst")
TASK_BYTES = 1 << 20  # raw bytes per batch of documents sent to a worker
TASK_DOCS = 4096


def file_format(path: Path) -> str:
    """`jsonl`, `parquet` or `text`, from the name (after any .gz / .zst suffix)."""
    name = path.name.lower()
    for c in COMPRESSED:
        if name.endswith(c):
            name = name[:-len(c)]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(directory).parts))


def expand_inputs(specs: Sequence[str | os.PathLike], key: str = "--input") -> list[Path]:
    """Files named by paths, directories (every non-hidden file under it) or globs,
    in the order given (each directory or glob sorted), without duplicates."""
    if not specs:
        raise ConfigError(key, "no input given")
    files: list[Path] = []
    for spec in specs:
        spec = str(spec)
        path = Path(spec)
        if path.is_dir():
            found = _files_under(path)
        elif path.is_file():
            found = [path]
        elif glob.has_magic(spec):
            found = []
            for m in sorted(glob.glob(spec, recursive=True)):
                found += _files_under(Path(m)) if Path(m).is_dir() else [Path(m)]
        else:
            raise ConfigError(key, f"no such file or directory: {spec}")
        if not found:
            raise ConfigError(key, f"{spec} matches no files")
        files += found
    seen: set[Path] = set()
    out = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def open_binary(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when it ends in .gz or .zst."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        # Deferred: optional, only for .zst inputs.
        import zstandard
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


@dataclasses.dataclass
class Task:
    """A batch of raw documents from one file, for a worker.

    kind: `jsonl` (items are lines, bytes), `text` (items are documents, bytes) or
    `parquet` (items are str or None). `lines[i]` is the 1-based line (row for parquet)
    where item i starts. `nbytes` counts the input bytes read for the progress bar."""

    kind: str
    file: str
    items: list[Any]
    lines: list[int]
    nbytes: int


def _jsonl_tasks(path: Path) -> Iterator[Task]:
    items, lines, size = [], [], 0
    with open_binary(path) as f:
        for n, line in enumerate(f, 1):
            size += len(line)
            if not line.strip():
                continue
            items.append(line)
            lines.append(n)
            if size >= TASK_BYTES or len(items) >= TASK_DOCS:
                yield Task("jsonl", str(path), items, lines, size)
                items, lines, size = [], [], 0
    if items or size:
        yield Task("jsonl", str(path), items, lines, size)


def _text_tasks(path: Path, split_blank_lines: bool) -> Iterator[Task]:
    if not split_blank_lines:
        with open_binary(path) as f:
            data = f.read()
        yield Task("text", str(path), [data], [1], len(data))
        return
    items, lines, size = [], [], 0
    doc: list[bytes] = []
    start = 1
    with open_binary(path) as f:
        for n, line in enumerate(f, 1):
            size += len(line)
            if line.strip():
                if not doc:
                    start = n
                doc.append(line)
                continue
            if doc:
                items.append(b"".join(doc))
                lines.append(start)
                doc = []
                if size >= TASK_BYTES or len(items) >= TASK_DOCS:
                    yield Task("text", str(path), items, lines, size)
                    items, lines, size = [], [], 0
    if doc:
        items.append(b"".join(doc))
        lines.append(start)
    if items or size:
        yield Task("text", str(path), items, lines, size)


def _parquet_tasks(path: Path, text_field: str) -> Iterator[Task]:
    # Deferred: optional and heavy, only for Parquet inputs.
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise ConfigError("--input", f"{path} is not a Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ConfigError("--text_field", f"{path} has no column {text_field!r} (columns: "
                                          f"{', '.join(names)})")
    row = 1
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        col = batch.column(0)
        items = col.to_pylist()
        size = col.nbytes
        yield Task("parquet", str(path), items, list(range(row, row + len(items))), size)
        row += len(items)


def read_tasks(files: Sequence[Path], text_field: str = "text",
               split_blank_lines: bool = False) -> Iterator[Task]:
    """Batches of raw documents from every file in order (bounded: ~TASK_BYTES each)."""
    for path in files:
        fmt = file_format(path)
        if fmt == "jsonl":
            yield from _jsonl_tasks(path)
        elif fmt == "parquet":
            yield from _parquet_tasks(path, text_field)
        else:
            yield from _text_tasks(path, split_blank_lines)


@dataclasses.dataclass
class Parsed:
    """A task's documents as text. `bad` counts skipped items; `error` is the first
    bad item's message when not skipping (the caller raises it)."""

    texts: list[str]
    bad: int = 0
    error: tuple[str, str] | None = None  # (flag, message)


def _decode_error(file: str, line: int, data: bytes, e: UnicodeDecodeError) -> str:
    where = line + data.count(b"\n", 0, e.start)
    return (f"{file}:{where}: not UTF-8 ({e.reason} at byte {e.start}); pass --skip_bad "
            f"to skip such documents")


_JSON_TYPES = {bool: "boolean", int: "number", float: "number", type(None): "null",
               list: "array", dict: "object"}


def parse_task(task: Task, text_field: str = "text", skip_bad: bool = False) -> Parsed:
    """Decode a task's documents. Bad items (not UTF-8, not a JSON object) are counted
    and skipped with `skip_bad`, else reported; a missing text field is always an error."""
    out = Parsed([])
    for item, line in zip(task.items, task.lines):
        if task.kind == "parquet":
            if not isinstance(item, str):
                what = "null" if item is None else f"{type(item).__name__} {item!r}, not text"
                out.error = ("--text_field", f"{task.file}: row {line} has no text in column "
                                             f"{text_field!r} ({what})")
                return out
            out.texts.append(item)
            continue
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError as e:
            if skip_bad:
                out.bad += 1
                continue
            out.error = ("--input", _decode_error(task.file, line, item, e))
            return out
        if task.kind == "text":
            out.texts.append(text)
            continue
        try:
            record = json.loads(text)
        except ValueError as e:
            if skip_bad:
                out.bad += 1
                continue
            out.error = ("--input", f"{task.file}:{line}: not valid JSON ({e}); pass "
                                    f"--skip_bad to skip such lines")
            return out
        value = record.get(text_field) if isinstance(record, dict) else None
        if isinstance(record, dict) and text_field in record and not isinstance(value, str):
            out.error = ("--text_field", f"{task.file}:{line}: field {text_field!r} is a "
                                         f"JSON {_JSON_TYPES.get(type(value), 'value')}, not "
                                         f"a string")
            return out
        if not isinstance(value, str):
            fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            out.error = ("--text_field", f"{task.file}:{line} has no string field "
                                         f"{text_field!r} (has: {fields})")
            return out
        out.texts.append(value)
    return out
