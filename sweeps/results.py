"""Per-variant result files (`DIR/<variant>/sweep_result.json`) and the metrics they summarise."""

import json
import os
import statistics
from pathlib import Path
from typing import Any

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config
from jaxlm.training.metrics import read_metrics

RESULT_FILE = "sweep_result.json"
RUN_CONFIG = "config.json"  # what a variant's run recorded (training/rundir.py)
LOG_FILE = "sweep.log"

# The results table's columns, after `name`, `status` and one column per override key.
METRIC_COLUMNS = ("step", "final_train_loss", "best_eval_loss", "final_eval_loss",
                  "tokens_per_sec", "num_params", "wall_seconds")


def variant_dir(workdir: str | Path, name: str) -> Path:
    return Path(workdir) / name


def read_result(vdir: Path) -> dict[str, Any] | None:
    path = vdir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def write_result(vdir: Path, result: dict[str, Any]) -> Path:
    vdir.mkdir(parents=True, exist_ok=True)
    path = vdir / RESULT_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def is_finished(vdir: Path, config_json: dict[str, Any]) -> bool:
    """Finished: a successful result for exactly this resolved config."""
    result = read_result(vdir)
    return bool(result and result.get("status") == "ok" and result.get("config") == config_json)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict)
                   else {f"{prefix}{key}": value})
    return out


def check_recorded_config(vdir: Path, name: str, config: Any) -> None:
    """Refuse a variant whose directory holds a run of another config: its checkpoints,
    metrics and losses are that config's, so it is never resumed or reported as this one."""
    path = vdir / RUN_CONFIG
    if not path.is_file():
        return
    try:
        saved = _flat(Config.from_dict(json.loads(path.read_text())).to_dict())
    except (ValueError, ConfigError) as e:
        raise ConfigError("variant", f"{path} of variant {name} is damaged ({e}); remove "
                                     f"{vdir} or use another --workdir") from None
    new = _flat(Config.from_dict(config).to_dict())
    for key in sorted(set(saved) | set(new)):
        if saved.get(key) != new.get(key):
            raise ConfigError(key, f"is {new.get(key)!r} for variant {name}, but {vdir} "
                                   f"holds its run with {saved.get(key)!r}; use another "
                                   f"--workdir for this sweep, or remove {vdir} to run it "
                                   f"again")


def summarise_metrics(vdir: Path, final_eval: dict[str, Any]) -> dict[str, Any]:
    """Final train loss, best and final eval loss, median tokens/s, from a finished run."""
    train, evals = read_metrics(vdir)
    eval_points = [(r["step"], r["eval_loss"]) for r in evals]
    eval_points.append((final_eval["step"], final_eval["eval_loss"]))
    best_step, best = min(eval_points, key=lambda p: (p[1], p[0]))
    speeds = [r["tokens_per_sec"] for r in train if r.get("tokens_per_sec")]
    return {
        "step": final_eval["step"],
        "final_train_loss": train[-1]["loss"] if train else None,
        "best_eval_loss": best,
        "best_eval_step": best_step,
        "final_eval_loss": final_eval["eval_loss"],
        "tokens_per_sec": statistics.median(speeds) if speeds else None,
    }


def first_line(error: BaseException | str) -> str:
    if isinstance(error, BaseException):
        text = str(error).strip()
        if not isinstance(error, ConfigError):
            text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    else:
        text = error.strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0].strip() if lines else "unknown error"


