"""What a prepared directory is: `meta.json`, its format versions, token dtypes, the text
files behind a `data.path`, and the one fingerprint of a preparation's inputs."""

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.configs.errors import ConfigError
from jaxlm.data.readers import files_under

META = "meta.json"
RUN_CONFIG = "config.json"  # a training run's directory holds it (training/rundir.py)
EMBEDDED_CORPUS = Path(__file__).parent.parent / "corpora" / "tinyshakespeare.txt"
FORMAT_VERSION = 1  # one text, split by token position
CORPUS_FORMAT_VERSION = 2  # documents, sharded, split by document
SFT_FORMAT_VERSION = 3  # format 2 plus a per-token loss weight stream (`{split}.weights`)
FORMAT_VERSIONS = (FORMAT_VERSION, CORPUS_FORMAT_VERSION, SFT_FORMAT_VERSION)
SHARD_BYTES = 256 << 20
PREPARED = "a prepared data directory"


def is_prepared(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / META).is_file()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def text_files(path: Path) -> list[Path]:
    """The files of a text `data.path`: the file itself, or every non-hidden file under
    the directory, sorted (read concatenated)."""
    if path.is_file():
        return [path]
    files = files_under(path)
    if not files:
        raise ConfigError("data.path", f"directory {path} has no text files")
    return files


def fingerprint(settings: str, files: list[Path]) -> str:
    """16 hex digits of a sha256 over `settings` and each input file's path, size and
    mtime: a preparation with the same fingerprint would write the same directory."""
    h = hashlib.sha256(settings.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def saved_fingerprint(output: Path) -> str | None:
    """The fingerprint in `output`'s meta.json; None when it has none or cannot be read."""
    try:
        return json.loads((output / META).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def read_json_file(path: Path, key: str) -> dict[str, Any]:
    """A JSON object from `path`; a ConfigError naming `key` when it is damaged."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(key, f"{path} is damaged ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(key, f"{path} is damaged (not a JSON object)")
    return data
