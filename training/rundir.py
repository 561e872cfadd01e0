"""A run directory: its files, its saved config, its lock, and choosing a checkpoint.

    WORKDIR/config.json     the resolved config, written once the run trains (a start
                            or a resume whose restore succeeded, with steps left)
    WORKDIR/checkpoints/N/  orbax checkpoints (training/checkpoint.py)
    WORKDIR/metrics.jsonl   training and eval records (training/metrics.py)
    WORKDIR/data/           the tokenized corpus, when data.path is a text file
    WORKDIR/eval/           results of eval.py
    WORKDIR/run.lock        held by the process training in it (or importing, merging)
    WORKDIR/.incomplete     an import or merge into it was killed half-way
    WORKDIR/damaged_checkpoints/N/   checkpoints that failed to restore, moved aside
    WORKDIR/lora_base/0/    a LoRA run's frozen base, stored once (training/lora.py)
    WORKDIR/lora_base.json  where that base came from
    WORKDIR/fingerprints.json  what its data, tokenizer and base were (data/fingerprints.py)
    WORKDIR/quantization.json  a quantized run's record (evaluation/quantized_run.py)
    WORKDIR/hf/             an imported run's original Hugging Face files (HF_DIR)
"""

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config
from jaxlm.configs.specs import parse_mixture
from jaxlm.data.pipeline import TokenData, is_prepared
from jaxlm.storage import dirs
from jaxlm.data import fingerprints

HF_DIR = "hf"  # inside a run directory: the files an imported model came with

CONFIG_FILE = dirs.RUN_CONFIG
CHECKPOINTS = dirs.RUN_CHECKPOINTS
LOCK_FILE = dirs.LOCK_FILE

# Config sections that must not change when a run resumes: they define the model, its
# parameter shapes, the optimizer state or the data stream.
FROZEN_KEYS = ("model", "data", "seed", "seq_len", "batch_size", "optimizer", "lora")
# Keys that shape the learning-rate schedule: `steps` may change on resume only when asked
# (the cosine decay is stretched); the others may, with a notice.
SCHEDULE_KEYS = ("learning_rate", "min_learning_rate", "warmup_steps", "schedule",
                 "decay_fraction")


def checkpoint_dir(workdir: str | os.PathLike) -> Path:
    return Path(workdir).absolute() / CHECKPOINTS


def check_workdir(workdir: str | os.PathLike) -> Path:
    """The absolute run directory; a path that exists but is not a directory is an error."""
    path = Path(workdir).absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError("workdir", f"{workdir} is a file, not a directory")
    return path


def _read_json(path: Path, key: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(key, f"{path} is damaged (not JSON: {e}); restore it or use a new "
                               "--workdir") from None
    if not isinstance(data, dict):
        raise ConfigError(key, f"{path} is damaged (not a JSON object)")
    return data


def load_config(workdir: str | os.PathLike, key: str = "workdir") -> Config:
    """The run's saved config; `key` names the flag or config key in errors."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(key, f"{workdir} has no {CONFIG_FILE}: not a training run")
    return Config.from_dict(_read_json(path, key))


def check_resume(config: Config, workdir: Path, latest_step: int | None,
                 allow_schedule_change: bool = False) -> list[str]:
    """Refuse a resume that would change the model, the data stream or (unless allowed) the
    schedule's length, or that has nothing left to train, and any training of a quantized
    run. Returns notices to print."""
    path = workdir / CONFIG_FILE
    saved_config = Config.from_dict(_read_json(path, "workdir")) if path.is_file() else None
    if saved_config is not None and saved_config.quant.ptq:
        raise ConfigError("workdir", f"{workdir} is a quantized run (eval.py --save), whose "
                                     "weights do not train; fine-tune it with LoRA in a new "
                                     f"--workdir (init.from_workdir={workdir}, lora.rank=N)")
    if config.quant.ptq:
        raise ConfigError("quant.ptq", "marks a quantized run written by eval.py --save, "
                                       "whose weights do not train; drop it (QLoRA on such "
                                       "a run: init.from_workdir=RUN, lora.rank=N)")
    if saved_config is None:
        return []
    # Keys an older config.json lacks compare as their defaults.
    saved = saved_config.to_dict()
    current = config.to_dict()
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
    steps, saved_steps = current["steps"], saved.get("steps", current["steps"])
    if latest_step is not None and latest_step > steps:
        raise ConfigError("steps", f"is {steps} but the run in {workdir} is already at step "
                                   f"{latest_step}; use a larger steps or a new --workdir")
    if steps != saved_steps and not allow_schedule_change:
        raise ConfigError("steps", f"is {steps} but the run in {workdir} was started with "
                                   f"{saved_steps}, which sets its learning-rate schedule; "
                                   "pass --allow_schedule_change to continue on the schedule "
                                   "for the new length, or use a new --workdir")
    changed = [k for k in ("steps", *SCHEDULE_KEYS) if saved.get(k, current[k]) != current[k]]
    notices = ["Resuming with a changed schedule: " + ", ".join(
        f"{k} {saved[k]} -> {current[k]}" for k in changed)] if changed else []
    flat_saved, flat_current = _flat(saved), _flat(current)
    other = [k for k in flat_current if k.split(".")[0] not in (*FROZEN_KEYS, *changed)
             and flat_saved.get(k, flat_current[k]) != flat_current[k]]
    if other:
        notices.append(f"Resuming the run in {workdir} with changed settings: " + ", ".join(
            f"{k} {flat_saved[k]!r} -> {flat_current[k]!r}" for k in other))
    return notices


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"mesh.fsdp": 4, ...}: the leaves of a nested config dict under dotted keys."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def save_config(config: Config, workdir: Path) -> None:
    """Write `config.json` atomically (a crash never leaves half a file)."""
    dirs.write_text_atomically(workdir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2))


def lock(workdir: Path) -> contextlib.AbstractContextManager[None]:
    """Hold WORKDIR/run.lock while training (`storage/dirs.py`): a second process is
    refused, naming the holder. Multi-process runs lock on process 0 only
    (`training/trainer.py`)."""
    return dirs.lock(workdir)


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
    if config.data.mixture.strip():  # the first source: mixture sources share the tokenizer
        path = Path(parse_mixture(config.data.mixture)[0][0])
    directory = path if path is not None and is_prepared(path) else Path(workdir) / "data"
    try:
        data = TokenData.load(directory)
    except ConfigError as e:
        raise ConfigError(key, f"cannot read the tokenizer of {workdir}: {e}") from None
    fingerprints.check_tokenizer(workdir, data.tokenizer, directory, key)
    return data
