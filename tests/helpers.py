"""Shared test helpers."""

import contextlib
import functools
import io
import os
import runpy
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

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


def call_cli(args: list[str], cwd: Path = ROOT) -> SimpleNamespace:
    """Run `python <args>` (a script path or `-m module`, as in `run_cli`) in this process;
    returns `returncode`, `stdout` and `stderr` as the interpreter would give them: a
    SystemExit message is printed to stderr with status 1, an uncaught exception is a
    traceback with status 1. The absl flags the script defines are removed afterwards and
    the rest unparsed, so the next call parses its own command line. For failures that
    happen before any device is configured: `--cpu_devices` is refused here."""
    from absl import app, flags, logging
    app.define_help_flags()  # absl.app's own flags stay defined across calls
    assert not any(a.startswith("--cpu_devices") for a in args), "use run_cli"
    if args[0] == "-m":
        name, argv = args[1], [args[1], *args[2:]]
        target = functools.partial(runpy.run_module, name, run_name="__main__", alter_sys=True)
    else:
        path, argv = str(cwd / args[0]), list(args)
        target = functools.partial(runpy.run_path, path, run_name="__main__")
    before, verbosity, devices = set(flags.FLAGS), logging.get_verbosity(), jax.device_count()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with (contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err),
          mock.patch.object(sys, "argv", argv), warnings.catch_warnings()):
        # `python -m` of a module this process imported already: runpy's warning about it
        # is not something the real command prints.
        warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
        try:
            target()
        except SystemExit as e:
            code = _exit_status(e.code, err)
        except Exception:  # noqa: BLE001 -- what the interpreter does with it
            traceback.print_exc(file=err)
            code = 1
        finally:
            for name in set(flags.FLAGS) - before:
                delattr(flags.FLAGS, name)
            flags.FLAGS.unparse_flags()
            logging.set_verbosity(verbosity)
    assert jax.device_count() == devices
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def _exit_status(code, err) -> int:
    """The exit status of `SystemExit(code)`, printing a message as the interpreter does."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=err)
    return 1


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
