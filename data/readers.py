"""Streaming corpus readers: input files -> bounded batches of raw documents -> texts.

The main process only reads bytes (`read_tasks`); decoding, JSON parsing and errors
happen in the workers (`parse_task`), so reading never holds more than a few batches.

Formats, by file name (a trailing `.gz` or `.zst` is decompressed on the fly):

  *.jsonl, *.json, *.ndjson   JSON lines, one document per line in `text_field`
  *.parquet                   Parquet, one document per row of column `text_field`
  anything else               plain UTF-8 text: one document per file, or one per
                              blank-line-separated block with `split_blank_lines`

A file that cannot be read to its end (a truncated or corrupt .gz or .zst, a damaged
Parquet page, an I/O error) is a `ConfigError` naming the file and how far it was read:
its documents are never silently cut short. A JSON line is bad (skipped and counted with
`skip_bad`) when it is not UTF-8, not JSON, nested too deeply, holds a lone UTF-16
surrogate escape (not text) or is not an object.
"""

import dataclasses
import glob
import gzip
import io
import json
import os
import re
import zlib
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


def files_under(directory: Path) -> list[Path]:
    """Every non-hidden file under `directory` (none of its parts starts with a dot), sorted."""
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
            found = files_under(path)
        elif path.is_file():
            found = [path]
        elif glob.has_magic(spec):
            found = []
            for m in sorted(glob.glob(spec, recursive=True)):
                found += files_under(Path(m)) if Path(m).is_dir() else [Path(m)]
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


class _ZstdFile(io.RawIOBase):
    """The decompressed bytes of a .zst file of one or more frames. A file that ends
    inside a frame raises EOFError (zstandard's stream reader would end silently)."""

    def __init__(self, path: Path):
        # Deferred: only for .zst inputs.
        import zstandard
        self._zstd = zstandard
        self._raw = open(path, "rb")  # noqa: SIM115
        self._obj = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False  # bytes of an unfinished frame were fed
        self._out = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._out:
            data = self._raw.read(1 << 17)
            if not data:
                if self._in_frame:
                    raise EOFError("the zstd file ends inside a frame (truncated)")
                return 0
            while data:
                if self._obj.eof:
                    self._obj = self._zstd.ZstdDecompressor().decompressobj()
                self._out += self._obj.decompress(data)
                self._in_frame = not self._obj.eof
                data = self._obj.unused_data if self._obj.eof else b""
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_binary(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when it ends in .gz or .zst."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdFile(path))  # type: ignore[return-value]
    return open(path, "rb")


def _read_errors(path: Path) -> tuple[type[BaseException], ...]:
    """What reading `path` raises for a damaged or truncated file (or an I/O error)."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    if path.name.lower().endswith(".zst"):
        # Deferred: only for .zst inputs.
        import zstandard
        errors += (zstandard.ZstdError,)
    return errors


def _damaged(path: Path, where: str, e: BaseException) -> ConfigError:
    return ConfigError("--input", f"{path} is damaged or truncated after {where} ({e}); "
                                  f"repair or re-download it, or leave it out of --input")


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


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) of the file, decompressed; a damaged or truncated file
    is a ConfigError after its last whole line."""
    n = 0
    try:
        with open_binary(path) as f:
            for n, line in enumerate(f, 1):  # n: where reading stopped
                yield n, line
    except _read_errors(path) as e:
        raise _damaged(path, f"line {n}", e) from None


def _jsonl_tasks(path: Path) -> Iterator[Task]:
    items, lines, size = [], [], 0
    for n, line in _lines(path):
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
        try:
            with open_binary(path) as f:
                data = f.read()
        except _read_errors(path) as e:
            raise _damaged(path, "its start", e) from None
        yield Task("text", str(path), [data], [1], len(data))
        return
    items, lines, size = [], [], 0
    doc: list[bytes] = []
    start = 1
    for n, line in _lines(path):
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


def _is_text_type(t: Any) -> bool:
    # Deferred: optional and heavy, only for Parquet inputs.
    import pyarrow as pa
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t) or
            pa.types.is_string_view(t))


def _parquet_tasks(path: Path, text_field: str) -> Iterator[Task]:
    # Deferred: optional and heavy, only for Parquet inputs.
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise ConfigError("--input", f"{path} is not a Parquet file ({e})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise ConfigError("--text_field", f"{path} has no column {text_field!r} (columns: "
                                          f"{', '.join(schema.names)})")
    kind = schema.field(text_field).type
    if not _is_text_type(kind):
        raise ConfigError("--text_field", f"{path}: column {text_field!r} holds {kind}, not "
                                          f"text; name a string column (columns: "
                                          f"{', '.join(schema.names)})")
    row = 1
    batches = pf.iter_batches(batch_size=1024, columns=[text_field])
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise _damaged(path, f"row {row - 1}", e) from None
        if batch is None:
            return
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


class BadLine(ValueError):
    """A JSON line that is no JSON value usable as text: `reason` is `invalid_utf8` or
    `invalid_json`, `detail` says why; `cause` is the UnicodeDecodeError of a line that
    is not UTF-8."""

    def __init__(self, reason: str, detail: str, cause: UnicodeDecodeError | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.cause = reason, detail, cause


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(value: Any) -> str | None:
    """A lone UTF-16 surrogate (which a JSON escape can write) in any string, key or value,
    of a parsed JSON value, as its escape; None when every string is Unicode text."""
    stack = [value]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"\\u{ord(x[e.start]):04x}"
        elif isinstance(x, dict):
            stack += [*x.keys(), *x.values()]
        elif isinstance(x, list):
            stack += x
    return None


def json_line(line: bytes) -> Any:
    """The JSON value of one line; raises BadLine when it is not UTF-8, not JSON, nested
    too deeply to parse, or holds a lone surrogate escape (`"\\ud800"`: not text)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine("invalid_utf8", f"not UTF-8 ({e.reason} at byte {e.start})", e
                      ) from None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise BadLine("invalid_json", f"not valid JSON ({e})") from None
    except RecursionError:
        raise BadLine("invalid_json", "JSON nested too deeply to parse") from None
    if _SURROGATE_ESCAPE.search(line):
        bad = _lone_surrogate(value)
        if bad is not None:
            raise BadLine("invalid_json", f"a string holds a lone UTF-16 surrogate ({bad}), "
                                          f"which is not text")
    return value


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def parse_task(task: Task, text_field: str = "text", skip_bad: bool = False) -> Parsed:
    """Decode a task's documents. Bad items (not UTF-8; for JSON lines also not JSON,
    nested too deeply, a lone surrogate escape, not an object) are counted and skipped
    with `skip_bad`, else reported; a missing or non-string text field is always an
    error."""
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
        if task.kind == "text":
            try:
                out.texts.append(item.decode("utf-8"))
            except UnicodeDecodeError as e:
                if skip_bad:
                    out.bad += 1
                    continue
                out.error = ("--input", _decode_error(task.file, line, item, e))
                return out
            continue
        try:
            record = json_line(item)
            if not isinstance(record, dict):
                raise BadLine("invalid_json", f"a JSON {_json_type(record)}, not an object")
        except BadLine as e:
            if skip_bad:
                out.bad += 1
                continue
            if e.cause is not None:
                out.error = ("--input", _decode_error(task.file, line, item, e.cause))
            else:
                out.error = ("--input", f"{task.file}:{line}: {e.detail}; pass --skip_bad "
                                        f"to skip such lines")
            return out
        value = record.get(text_field)
        if not isinstance(value, str):
            what = (f" has no string field {text_field!r} (has: "
                    f"{', '.join(record) or 'nothing'})" if text_field not in record else
                    f": field {text_field!r} is a JSON {_json_type(value)}, not a string")
            out.error = ("--text_field", f"{task.file}:{line}{what}")
            return out
        out.texts.append(value)
    return out

