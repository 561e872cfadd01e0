"""Restore a run's checkpoint, with the run's own saved config, on any mesh."""

import json
import math
import sys
from pathlib import Path
from typing import Any

import jax

from jaxlm.configs.errors import RunError, environment_error, environment_message
from jaxlm.configs.sections import MESH_AXES
from jaxlm.data import fingerprints
from jaxlm.storage.dirs import write_text_atomically
from jaxlm.training import rundir
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.experiment import Experiment

# A restored run evaluates on whatever devices there are: plain data parallelism, every
# other mesh axis (context included) of size 1.
RESTORE_MESH = {f"mesh.{axis}": -1 if axis == "data" else 1 for axis in MESH_AXES}


def restore_run(workdir: str | Path, step: int | None = None,
                devices: list[jax.Device] | None = None,
                overrides: dict[str, Any] | None = None) -> tuple[Experiment, Any, int]:
    """(experiment, train state, step) of a run's checkpoint (default: the latest).

    The run's saved config is used with a data-parallel mesh over `devices` (checkpoints
    do not depend on the mesh) and any dotted-key `overrides`.
    """
    exp = load_run(workdir, devices, overrides)
    with Checkpointer(rundir.checkpoint_dir(workdir), read_only=True) as ckpt:
        if step is None:  # the newest that restores (a damaged one is reported, not moved)
            rundir.pick_step(ckpt.all_steps(), None, workdir)
            state, step = ckpt.restore_latest(exp.checkpoint_abstract, warn=print_warning)
        else:
            state = restore_step(ckpt, rundir.pick_step(ckpt.all_steps(), step, workdir),
                                 exp.checkpoint_abstract)
    return exp, exp.from_checkpoint(state), step


def load_run(workdir: str | Path, devices: list[jax.Device] | None = None,
             overrides: dict[str, Any] | None = None) -> Experiment:
    """The run's experiment (its saved config, a data-parallel mesh), nothing restored."""
    config = rundir.load_config(workdir).replace(**{**RESTORE_MESH, **(overrides or {})})
    fingerprints.check_data(config, workdir)  # before its text is tokenized again
    exp = Experiment.build(config, workdir, devices)
    fingerprints.check_tokenizer(workdir, exp.data.tokenizer, fingerprints.data_name(config),
                                 "workdir")
    return exp


def json_line(result: dict[str, Any]) -> str:
    """One result as strict JSON: a non-finite number (a diverged checkpoint) is null."""
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return json.dumps({k: clean(v) for k, v in result.items()}, allow_nan=False)


def save_result(path: Path, text: str) -> None:
    """Write an eval result file that has been printed already, atomically; a failure (a
    full disk, a read-only run directory) is one RunError line that says so."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, text)
    except OSError as e:  # named by the result file, not the temporary file beside it
        env = environment_error(e)
        if env is not None:
            env = OSError(env.errno, env.strerror, str(path))
        why = environment_message(env, "evaluate again to save it") if env else \
            f"{path}: {e.strerror or e}"
        raise RunError(f"the result printed above was not saved: {why}") from None


def restore_step(ckpt: Checkpointer, step: int, abstract_state: Any) -> Any:
    """One given step; a damaged one is a RunError naming it."""
    return ckpt.restore_given(step, lambda s: ckpt.restore(s, abstract_state))


def print_warning(message: str) -> None:
    """A warning line, on stderr (stdout carries the results)."""
    print(message, file=sys.stderr)
