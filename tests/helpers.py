"""Shared test helpers."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.monitoring
import numpy as np

from jaxlm.data.packing import windows_source
from jaxlm.training.loop import Hook

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], cwd: Path = ROOT, timeout: int = 300, env_extra=None):
    """Run `python <args>` in a fresh interpreter; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(ROOT / ".pytest_cache" / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def step0_run(config, workdir: Path, devices=None) -> Path:
    """A run directory with a step-0 checkpoint of a random init (no training)."""
    from jaxlm.configs.sections import Config
    from jaxlm.training import rundir
    from jaxlm.training.checkpoint import Checkpointer
    from jaxlm.training.experiment import Experiment
    config = Config.from_dict(config)
    exp = Experiment.build(config, workdir, devices or jax.devices()[:1])
    rundir.save_config(config, workdir)
    with Checkpointer(rundir.checkpoint_dir(workdir)) as ckpt:
        ckpt.save(0, exp.init_state())
        ckpt.wait()
    return workdir


def model_config(vocab_size: int = 65, seq_len: int = 0, **keys):
    """The ModelConfig of a `model` section with these keys (nested sections as dicts,
    e.g. `moe={"num_experts": 4}`), on data of `vocab_size` tokens."""
    from jaxlm.configs.sections import Model
    from jaxlm.models.config import ModelConfig
    return ModelConfig.from_section(Model.parse(keys), vocab_size, seq_len=seq_len)


def train_source(exp) -> Any:
    """Random access to an Experiment's training windows: `[s]` is this process's rows of
    step s's `inputs` and `targets` (the keys the train step takes for windows)."""
    train = exp.config.train
    ds = windows_source(exp.data, seq_len=train.seq_len, global_batch=train.batch_size,
                        seed=train.seed, process_index=jax.process_index(),
                        process_count=jax.process_count())
    return ds.map(lambda b: {k: b[k] for k in ("inputs", "targets")})


def run_steps(config, workdir, devices, n: int | None = None):
    """Train `n` steps (default config.steps) in-process; returns (losses, params on host)."""
    from jaxlm.training.experiment import Experiment
    exp = Experiment.build(config, workdir, devices)
    state = exp.init_state()
    source = train_source(exp)
    losses = []
    for step in range(config.steps if n is None else n):
        state, metrics = exp.train_step(state, exp.to_global(source[step]))
        losses.append(float(metrics["loss"]))
    natural = exp.to_checkpoint(state)  # layers in model order, whatever the mesh
    return np.array(losses), jax.device_get(natural.params), exp, state


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


@contextlib.contextmanager
def no_compilation():
    """Collects the lowering and compilation events inside the block. Tracing for abstract
    shapes (`eval_shape`) is not compilation and is not collected."""
    compiled = []

    def listener(event, duration, **kwargs):
        if "compile" in event and "jaxpr_trace" not in event:
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def params_fast_only(values, fast):
    """Parametrize over `values`, marking all but those in `fast` as `slow`: the fast tier
    keeps a representative subset, the full suite runs them all."""
    import pytest
    return [v if v in fast else pytest.param(v, marks=pytest.mark.slow) for v in values]



class Call(Hook):
    """A training-loop hook that calls `fn(info)`; the cadence as in `Hook`."""

    def __init__(self, fn, every=1, at_last=False, on_stop=False, waits=False, saves=False):
        self.fn, self.every, self.at_last, self.on_stop = fn, every, at_last, on_stop
        self.waits, self.saves = waits, saves

    def on_step(self, info):
        self.fn(info)
