"""A run directory: its files, its saved config, and choosing one of its checkpoints.

    WORKDIR/config.json     the resolved config (written on the first start)
    WORKDIR/checkpoints/N/  orbax checkpoints (training/checkpoint.py)
    WORKDIR/metrics.jsonl   training and eval records (training/metrics.py)
    WORKDIR/data/           the tokenized corpus, when data.path is a text file
    WORKDIR/eval/           results of eval.py
"""

import json
import os
from pathlib import Path
from typing import Any

from configs.errors import ConfigError
from configs.sections import Config
from data.pipeline import TokenData, is_prepared

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"

# Config sections that must not change when a run resumes: they define the model, its
# parameter shapes or the data stream.
FROZEN_KEYS = ("model", "data", "seed", "seq_len", "batch_size")


def checkpoint_dir(workdir: str | os.PathLike) -> Path:
    return Path(workdir).absolute() / CHECKPOINTS


def load_config(workdir: str | os.PathLike, key: str = "workdir") -> Config:
    """The run's saved config; `key` names the flag or config key in errors."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(key, f"{workdir} has no {CONFIG_FILE}: not a training run")
    return Config.from_dict(json.loads(path.read_text()))


def save_or_check_config(config: Config, workdir: Path, write: bool = True) -> None:
    """Write `config.json` on the first start; on resume, refuse a changed model or data.

    `write=False` checks only (processes other than 0 do not write)."""
    path = workdir / CONFIG_FILE
    current = config.to_dict()
    if path.is_file():  # keys an older config.json lacks have their defaults
        saved = Config.from_dict(json.loads(path.read_text())).to_dict()
        for key in FROZEN_KEYS:
            a, b = saved.get(key), current.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                for sub in sorted(set(a) | set(b)):
                    if a.get(sub) != b.get(sub):
                        raise ConfigError(f"{key}.{sub}", f"is {b.get(sub)!r} but the run in "
                                          f"{workdir} used {a.get(sub)!r}; use a new --workdir")
            elif a != b:
                raise ConfigError(key, f"is {b!r} but the run in {workdir} used {a!r}; "
                                       "use a new --workdir")
    if write:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(current, indent=2))
        tmp.replace(path)


def pick_step(steps: list[int], step: int | None, workdir: Any, *, key: str = "step",
              workdir_key: str = "workdir") -> int:
    """`step` if it is one of the run's checkpoints, the latest for None; else an error
    naming `key` (the step flag) or `workdir_key` (a run without checkpoints)."""
    if not steps:
        raise ConfigError(workdir_key, f"{workdir} has no checkpoints")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ConfigError(key, f"no checkpoint for step {step} in {workdir}; have {steps}")
    return step


def load_data(config: Config, workdir: str | os.PathLike, key: str = "workdir") -> TokenData:
    """Another run's prepared data (its tokenizer and vocabulary): `data.path` when that is
    a prepared directory, else the run's own `data/`; `key` names the flag in errors."""
    path = Path(config.data.path) if config.data.path else None
    directory = path if path is not None and is_prepared(path) else Path(workdir) / "data"
    try:
        return TokenData.load(directory)
    except ConfigError as e:
        raise ConfigError(key, f"cannot read the tokenizer of {workdir}: {e}") from None
