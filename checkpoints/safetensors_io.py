"""Reading and writing the safetensors format one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header (name ->
dtype, shape, byte range) and the raw tensors. `SafetensorsReader` checks each file
before it reads a tensor: the byte ranges it maps lie in the data section, overlap no
other and hold exactly their dtype and shape, and the `safetensors` library accepts the
file (a JSON object of at most 100 MB whose ranges tile the data section). An index may
name only shard files inside the model directory. The reader maps the data section
with `np.memmap` per tensor, so reading a slice touches only its pages and nothing
stays mapped afterwards (the library's NumPy API has no bfloat16 and copies whole
tensors). `write_safetensors` writes the header first, then streams each tensor from a
callback, so only one tensor is in memory at a time; `write_sharded` splits a model
over files of at most `max_shard_bytes` with the `model.safetensors.index.json` that
Hugging Face reads.
"""

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import ml_dtypes
import numpy as np

from jaxlm.configs.errors import ConfigError

DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
SINGLE_FILE = "model.safetensors"
CHUNK_BYTES = 16 * 2**20  # the most a read or write converts at once
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's limit
DAMAGED = "re-download or re-export the model"


class Entry:
    """One tensor: its file, dtype code, shape and absolute byte range in the file."""

    __slots__ = ("path", "code", "shape", "begin", "end")

    def __init__(self, path: Path, code: str, shape: tuple[int, ...], begin: int, end: int):
        self.path, self.code, self.shape, self.begin, self.end = path, code, shape, begin, end


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _read_header(path: Path, key: str = "from_hf") -> dict[str, Entry]:
    """The tensors of one file, checked: every byte range lies in the data section,
    overlaps no other and holds exactly its dtype and shape; then the safetensors
    library validates the rest of the format."""
    def bad(why: str) -> ConfigError:
        return ConfigError(key, f"{path} is not a valid safetensors file ({why}); {DAMAGED}")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise bad(f"header length {length} in a file of {size} bytes")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise bad(f"header: {e}") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)
    start, data_bytes = 8 + length, size - 8 - length
    entries: dict[str, Entry] = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"tensor {name}: not a JSON object")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_int(d) for d in shape)):
            raise bad(f"tensor {name}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and
                all(_is_int(o) for o in offsets) and offsets[0] <= offsets[1] <= data_bytes):
            raise bad(f"tensor {name}: byte range {offsets!r} is not within the "
                      f"{data_bytes}-byte data section")
        if not isinstance(code, str):
            raise bad(f"tensor {name}: dtype {code!r} is not a string")
        if code in DTYPES:
            want = math.prod(shape) * np.dtype(DTYPES[code]).itemsize
            if offsets[1] - offsets[0] != want:
                raise bad(f"tensor {name}: {offsets[1] - offsets[0]} bytes, but {code} "
                          f"{shape} takes {want}")
        entries[name] = Entry(path, code, tuple(shape), start + offsets[0], start + offsets[1])
    spans = sorted((e.begin, e.end, n) for n, e in entries.items() if e.end > e.begin)
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise bad(f"tensors {a} and {b} share bytes")
    # Deferred: only an import reads safetensors files.
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="numpy") as f:
            names = set(f.keys())
    except SafetensorError as e:
        raise bad(str(e).removeprefix("Error while deserializing header: ")) from None
    if set(entries) != names:
        raise bad("its tensor names differ from what the safetensors library reads")
    return entries


def _index_files(index: Path, key: str) -> dict[str, str]:
    """tensor -> shard file name of a `model.safetensors.index.json`, each name a path
    inside the index's directory."""
    def bad(why: str) -> ConfigError:
        return ConfigError(key, f"{index} is damaged ({why}); {DAMAGED}")

    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"not JSON: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise bad("no 'weight_map' object of tensor names to files")
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise bad(f"tensor {tensor} maps to {name!r}, not a file name")
        parts = PurePosixPath(name.replace("\\", "/"))
        if parts.is_absolute() or ".." in parts.parts or Path(name).is_absolute():
            raise ConfigError(key, f"{index} lists {name!r} for tensor {tensor}: shard files "
                                   f"must lie inside {index.parent}; fix the index")
    return weight_map


class SafetensorsReader:
    """The tensors of a model directory: `model.safetensors`, or the shards listed in
    `model.safetensors.index.json`."""

    def __init__(self, directory: str | os.PathLike, key: str = "from_hf"):
        directory = Path(directory)
        index = directory / INDEX_FILE
        weight_map: dict[str, str] = {}
        if index.is_file():
            weight_map = _index_files(index, key)
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise ConfigError(key, f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}")
        self.entries: dict[str, Entry] = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise ConfigError(key, f"{index} lists {name}, which is missing; {DAMAGED}")
            for tensor, entry in _read_header(path, key).items():
                if tensor in self.entries:
                    raise ConfigError(key, f"tensor {tensor} is in both {name} and "
                                           f"{self.entries[tensor].path.name}; {DAMAGED}")
                self.entries[tensor] = entry
        for tensor, name in weight_map.items():
            entry = self.entries.get(tensor)
            if entry is None or entry.path != directory / name:
                raise ConfigError(key, f"{index} places tensor {tensor} in {name}, which "
                                       f"does not hold it; {DAMAGED}")

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> np.dtype:
        entry = self.entries[name]
        if entry.code not in DTYPES:
            raise ConfigError("from_hf", f"{name} in {entry.path.name} has dtype {entry.code}, "
                                         f"which is not one of {sorted(DTYPES)}")
        return np.dtype(DTYPES[entry.code])

    def is_float(self, name: str) -> bool:
        return self.entries[name].code in FLOAT_DTYPES

    def file(self, name: str) -> Path:
        return self.entries[name].path

    def row_bytes(self, name: str) -> int:
        """Bytes of one index along the tensor's first axis."""
        return math.prod(self.shape(name)[1:]) * self.dtype(name).itemsize

    def view(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of the tensor (all by default) as a read-only memory map:
        nothing is read until used, and dropping the array unmaps it."""
        entry = self.entries[name]
        shape = entry.shape
        stop = shape[0] if stop is None and shape else stop
        if shape and not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"{name}: rows [{start}, {stop}) of {shape[0]}")
        rows = (stop - start,) if shape else ()
        dtype = self.dtype(name)
        if entry.end == entry.begin or (shape and stop == start):
            return np.zeros((*rows, *shape[1:]), dtype)
        offset = entry.begin + start * self.row_bytes(name)
        return np.memmap(entry.path, dtype=dtype, mode="r", offset=offset,
                         shape=(*rows, *shape[1:]))


Producer = Callable[[], np.ndarray]


def write_safetensors(path: str | os.PathLike,
                      tensors: Iterable[tuple[str, np.dtype, tuple[int, ...], Producer]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write (name, dtype, shape, producer) tensors in order; each producer is called once,
    when its bytes are written. Returns the file size."""
    tensors = list(tensors)
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape, _ in tensors:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    tmp = Path(path).with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, dtype, shape, produce in tensors:
            array = np.asarray(produce()).astype(dtype, copy=False)
            if array.shape != tuple(shape):
                raise ValueError(f"{name}: produced {array.shape}, declared {tuple(shape)}")
            rows = max(1, CHUNK_BYTES // max(1, array[:1].nbytes)) if array.ndim else 1
            for lo in range(0, max(1, len(array) if array.ndim else 1), rows):
                # A transposed tensor becomes contiguous one block of rows at a time.
                part = array[lo:lo + rows] if array.ndim else array
                f.write(np.ascontiguousarray(part).reshape(-1).view(np.uint8).data)
    tmp.replace(path)
    return 8 + len(text) + offset


def write_sharded(directory: str | os.PathLike,
                  tensors: list[tuple[str, np.dtype, tuple[int, ...], Producer]],
                  max_shard_bytes: int) -> list[str]:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` files of at most
    `max_shard_bytes` (a larger tensor gets a file of its own) plus the index."""
    shards: list[list[Any]] = [[]]
    size = 0
    for t in tensors:
        nbytes = int(np.prod(t[2], dtype=np.int64)) * np.dtype(t[1]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    directory = Path(directory)
    if len(shards) == 1:
        write_safetensors(directory / SINGLE_FILE, shards[0])
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        write_safetensors(directory / name, shard)
        for t in shard:
            weight_map[t[0]] = name
            total += int(np.prod(t[2], dtype=np.int64)) * np.dtype(t[1]).itemsize
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return names
