"""What a run's token ids mean: fingerprints of its data, its tokenizer and a LoRA run's
frozen base, kept in WORKDIR/fingerprints.json and checked wherever the run is read back
(a resume, eval.py, init.from_workdir, a distillation teacher, a speculative draft,
convert.py --merge_lora and --to_hf).

    {"data": [{"path": "/x/input.txt", "sha256": "..."},      a text: its content
              {"path": "/x/prepared", "fingerprint": "..."}],  a prepared set: its meta.json's
     "tokenizer": {"kind": "char", "chars": "..."},            `vocabulary` (data/tokenizers.py)
     "lora_base": {"sha256": "..."}}                           the files of WORKDIR/lora_base/

A run made before the record existed has none: it is accepted, and its next start of
train.py writes the record (and the base's hash, taken from the base it then uses).
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config, parse_mixture
from jaxlm.data.prepare.formats import EMBEDDED_CORPUS, META, is_prepared, text_files
from jaxlm.storage import dirs
from jaxlm.data.tokenizers import (Tokenizer, file_sha256, vocabulary,
                                   vocabulary_difference)

FILE = "fingerprints.json"


def data_sources(config: Config) -> list[Path]:
    """The data a run reads: its mixture's sources, or `data.path` (the embedded corpus
    when empty)."""
    if config.data.mixture.strip():
        return [Path(p) for p, _ in parse_mixture(config.data.mixture)]
    return [Path(config.data.path) if config.data.path else EMBEDDED_CORPUS]


def data_name(config: Config) -> str:
    """The run's data as the config names it, for messages."""
    return config.data.mixture.strip() or config.data.path or "the embedded corpus"


def data_fingerprint(path: Path) -> dict[str, Any]:
    """A prepared set's own fingerprint (its meta.json's), or the sha256 of a text's
    content (of each file's, in order, for a directory of texts); {} for a missing path
    or an unreadable meta.json (loading the data reports those)."""
    out: dict[str, Any] = {"path": str(path.absolute())}
    if is_prepared(path):
        try:
            return {**out, "fingerprint": json.loads((path / META).read_text())["fingerprint"]}
        except (OSError, ValueError, KeyError, TypeError):
            return {}
    if path.is_file():
        return {**out, "sha256": file_sha256(path)}
    if not path.is_dir():
        return {}
    h = hashlib.sha256()
    for f in text_files(path):
        h.update(f"{f.relative_to(path)}|{file_sha256(f)}\n".encode())
    return {**out, "sha256": h.hexdigest()}


def read(workdir: str | os.PathLike) -> dict[str, Any]:
    """The run's record; {} for a run made before records existed."""
    path = Path(workdir) / FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError("workdir", f"{path} is damaged ({e}); restore it, or delete it to "
                                     f"record the run's current data again") from None
    if not isinstance(record, dict):
        raise ConfigError("workdir", f"{path} is damaged (not a JSON object); restore it, or "
                                     f"delete it to record the run's current data again")
    return record


def _write(workdir: Path, record: dict[str, Any]) -> None:
    """Write the record atomically (process 0 only)."""
    if jax.process_index() != 0:
        return
    dirs.write_text_atomically(workdir / FILE, json.dumps(record, indent=2) + "\n")


def write(workdir: str | os.PathLike, config: Config, tokenizer: Tokenizer,
          lora_base: Path | None = None) -> None:
    """Record the run's data and tokenizer. A LoRA run's base keeps its recorded hash; a
    run without one takes the hash of the base now in `lora_base` (if stored)."""
    workdir = Path(workdir)
    old = read(workdir)
    record = {"data": [data_fingerprint(p) for p in data_sources(config)],
              "tokenizer": vocabulary(tokenizer)}
    if "lora_base" in old:
        record["lora_base"] = old["lora_base"]
    elif lora_base is not None and lora_base.is_dir():
        record["lora_base"] = {"sha256": base_sha256(lora_base)}
    _write(workdir, record)


def check_data(config: Config, workdir: str | os.PathLike) -> None:
    """Refuse data that changed since the run in `workdir` recorded it (run before the
    data is read, so a changed text is not tokenized again into the run's data/)."""
    recorded = read(workdir).get("data")
    if not isinstance(recorded, list):
        return
    key = "data.mixture" if config.data.mixture.strip() else "data.path"
    for old, path in zip(recorded, data_sources(config)):
        new = data_fingerprint(path)
        if not isinstance(old, dict) or not new:
            continue
        for field, how in (("sha256", "changed since the run in {w} tokenized it"),
                           ("fingerprint", "was prepared again since the run in {w} "
                                           "trained on it")):
            a, b = old.get(field), new.get(field)
            if a is not None and b is not None and a != b:
                fix = ("restore it" if field == "sha256" else
                       "prepare it again from the same inputs and settings")
                raise ConfigError(key, f"{path} {how.format(w=workdir)} ({field} {a[:8]} -> "
                                       f"{b[:8]}); {fix}, or use a new --workdir")


def check_tokenizer(workdir: str | os.PathLike, tokenizer: Tokenizer, source: Any,
                    key: str = "data.tokenizer", fix: str = "use a new --workdir") -> None:
    """Refuse a tokenizer (of the data at `source`) other than the one the run in
    `workdir` recorded; `fix` is what the message suggests besides restoring the data."""
    recorded = read(workdir).get("tokenizer")
    if not isinstance(recorded, dict):
        return
    difference = vocabulary_difference(recorded, vocabulary(tokenizer))
    if difference is not None:
        raise ConfigError(key, f"the tokenizer of {source} is not the one the run in "
                               f"{workdir} was trained with ({difference}): the data changed "
                               f"since; restore it, or {fix}")


def base_sha256(directory: Path) -> str:
    """One sha256 over the files of a stored base (their paths and contents)."""
    h = hashlib.sha256()
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(directory)}|{file_sha256(f)}\n".encode())
    return h.hexdigest()


def record_base(workdir: str | os.PathLike, directory: Path) -> None:
    """Record the hash of the base just stored in `directory` (process 0 only)."""
    if jax.process_index() != 0:
        return
    _write(Path(workdir), {**read(workdir), "lora_base": {"sha256": base_sha256(directory)}})


def check_base(workdir: str | os.PathLike, directory: Path) -> None:
    """Refuse a stored base whose files are not the ones the run recorded."""
    recorded = read(workdir).get("lora_base")
    if not isinstance(recorded, dict) or "sha256" not in recorded:
        return
    actual = base_sha256(directory)
    if actual != recorded["sha256"]:
        raise ConfigError("workdir", f"{directory} is not the frozen base the LoRA run in "
                                     f"{workdir} stored (sha256 {recorded['sha256'][:8]} -> "
                                     f"{actual[:8]}): it was replaced or changed; restore "
                                     f"it, or train the run again in a new --workdir")
