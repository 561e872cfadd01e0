"""Restore a run's checkpoint, with the run's own saved config, on any mesh."""

from pathlib import Path
from typing import Any

import jax

from training import rundir
from training.checkpoint import Checkpointer
from training.experiment import Experiment

# A restored run evaluates on whatever devices there are: plain data parallelism.
RESTORE_MESH = {"mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1, "mesh.pipeline": 1,
                "mesh.expert": 1}


def restore_run(workdir: str | Path, step: int | None = None,
                devices: list[jax.Device] | None = None,
                overrides: dict[str, Any] | None = None) -> tuple[Experiment, Any, int]:
    """(experiment, train state, step) of a run's checkpoint (default: the latest).

    The run's saved config is used with a data-parallel mesh over `devices` (checkpoints
    do not depend on the mesh) and any dotted-key `overrides`.
    """
    config = rundir.load_config(workdir).replace(**{**RESTORE_MESH, **(overrides or {})})
    exp = Experiment.build(config, workdir, devices)
    with Checkpointer(rundir.checkpoint_dir(workdir), read_only=True) as ckpt:
        step = rundir.pick_step(ckpt.all_steps(), step, workdir)
        state = exp.from_checkpoint(ckpt.restore(step, exp.abstract_state))
    return exp, state, step
