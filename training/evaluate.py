"""Evaluation over a whole split, and restoring a finished run for evaluation."""

import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from configs.errors import ConfigError
from losses.objectives import split_objective_params
from training.checkpoint import Checkpointer
from training.experiment import Experiment

CONFIG_FILE = "config.json"


def evaluate(exp: Experiment, params: Any, tokens: np.ndarray | None = None,
             eval_step: Any = None) -> dict[str, float]:
    """Mean token loss over every target of `tokens` (default: the validation split)."""
    source = exp.eval_source(tokens)
    eval_step = eval_step or exp.eval_step
    loss_sum = jnp.zeros((), jnp.float32)
    count = jnp.zeros((), jnp.float32)
    for i in range(len(source)):
        l, c = eval_step(params, exp.to_global(source[i]))
        loss_sum, count = loss_sum + l, count + c  # stays on device: no sync per batch
    loss = float(loss_sum / count)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "num_tokens": int(count)}


def load_run_config(workdir: str | Path) -> ConfigDict:
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError("workdir", f"{workdir} has no {CONFIG_FILE}: not a training run")
    return ConfigDict(json.loads(path.read_text()))


def restore_run(workdir: str | Path, step: int | None = None,
                devices: list[jax.Device] | None = None,
                overrides: dict[str, Any] | None = None) -> tuple[Experiment, Any, int]:
    """(experiment, train state, step) of a run's checkpoint, on a mesh of `devices`.

    The run's saved config is used, so the checkpoint can be restored on another mesh
    shape by overriding `mesh.*` (the default, data=-1, fits any device count).
    """
    config = load_run_config(workdir)
    config.mesh.data, config.mesh.fsdp = -1, 1
    config.mesh.tensor = config.mesh.pipeline = config.mesh.expert = 1
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    exp = Experiment.build(config, workdir, devices)
    ckpt = Checkpointer(Path(workdir) / "checkpoints", read_only=True)
    steps = ckpt.all_steps()
    if not steps:
        raise ConfigError("workdir", f"{workdir} has no checkpoints")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ConfigError("step", f"no checkpoint for step {step} in {workdir}; "
                                  f"have {steps}")
    state = exp.from_checkpoint(ckpt.restore(step, exp.abstract_state))
    ckpt.close()
    return exp, state, step


def write_eval_result(workdir: str | Path, result: dict[str, Any], suffix: str = "") -> Path:
    """Save an eval result under WORKDIR/eval/ (process 0 only)."""
    out = Path(workdir) / "eval" / f"step_{result['step']}{suffix}.json"
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result) + "\n")
    return out


def sample(exp: Experiment, params: Any, prompts: list[str], length: int, sp: Any,
           seed: int = 0) -> tuple[list[str], dict[str, float]]:
    """Generate `length` tokens after each prompt with the run's tokenizer."""
    from inference.generate import Generator
    tok = exp.data.tokenizer
    try:
        ids = [tok.encode(p).tolist() for p in prompts]
    except ValueError as e:
        raise ConfigError("prompt", str(e)) from None
    gen = Generator(exp.graphdef, exp.model_cfg, exp.config.seq_len)
    out, stats = gen.generate(split_objective_params(params)[0], ids, length, sp, seed)
    return [tok.decode(o) for o in out], stats
