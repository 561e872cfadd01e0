"""Reading and writing the safetensors format one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header (name ->
dtype, shape, byte range) and the raw tensors. `SafetensorsReader` maps the data
section with `np.memmap` per tensor, so reading a slice touches only its pages and
nothing stays mapped afterwards (the `safetensors` package's NumPy API has no
bfloat16). `write_safetensors` writes the header first, then streams each tensor from
a callback, so only one tensor is in memory at a time; `write_sharded` splits a model
over files of at most `max_shard_bytes` with the `model.safetensors.index.json` that
Hugging Face reads.
"""

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxlm.configs.errors import ConfigError

DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
SINGLE_FILE = "model.safetensors"
CHUNK_BYTES = 16 * 2**20  # the most a read or write converts at once
INDEX_FILE = "model.safetensors.index.json"


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(the JSON header without __metadata__, byte offset of the data section)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConfigError("from_hf", f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError("from_hf", f"{path} is not a safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + length


class SafetensorsReader:
    """The tensors of a model directory: `model.safetensors`, or the shards listed in
    `model.safetensors.index.json`."""

    def __init__(self, directory: str | os.PathLike, key: str = "from_hf"):
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise ConfigError(key, f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}")
        self.entries: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise ConfigError(key, f"{index} lists {name}, which is missing")
            header, start = _read_header(path)
            for tensor, info in header.items():
                self.entries[tensor] = (path, info, start)

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        path, info, _ = self.entries[name]
        if info["dtype"] not in DTYPES:
            raise ConfigError("from_hf", f"{name} in {path.name} has dtype {info['dtype']}, "
                                         f"which is not one of {sorted(DTYPES)}")
        return np.dtype(DTYPES[info["dtype"]])

    def row_bytes(self, name: str) -> int:
        """Bytes of one index along the tensor's first axis."""
        return int(np.prod(self.shape(name)[1:], dtype=np.int64)) * self.dtype(name).itemsize

    def view(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of the tensor (all by default) as a read-only memory map:
        nothing is read until used, and dropping the array unmaps it."""
        path, info, data_start = self.entries[name]
        shape = self.shape(name)
        stop = shape[0] if stop is None and shape else stop
        rows = (stop - start,) if shape else ()
        dtype = self.dtype(name)
        if info["data_offsets"][1] == info["data_offsets"][0] or (shape and stop == start):
            return np.zeros((*rows, *shape[1:]), dtype)
        offset = data_start + info["data_offsets"][0] + start * self.row_bytes(name)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(*rows, *shape[1:]))


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
