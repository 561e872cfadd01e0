"""Train (or resume) a run: build the experiment, restore, and run the loop with its hooks."""

import time
from pathlib import Path
from typing import Any

import jax

from configs.sections import Config
from data.pipeline import train_iterator
from models import active_params, count_params
from training import rundir
from training.checkpoint import Checkpointer
from training.experiment import Experiment
from training.hooks import Checkpoints, Evaluation, Metrics, Progress, log, stop_on_sigterm
from training.init_from import InitSource, check_source, restore_initial_state
from training.loop import TrainLoop
from training.metrics import MetricWriter

__all__ = ["log", "train"]


def train(config: Any, workdir: str | Path,
          devices: list[jax.Device] | None = None) -> dict[str, Any]:
    """Train (or resume) the run in `workdir`; returns a summary of the final state.

    `config`: a Config, or a ConfigDict (resolved here, once).
    """
    t_start = time.time()
    config = Config.from_dict(config)
    workdir = Path(workdir).absolute()
    rundir.save_or_check_config(config, workdir, write=False)  # refuse a resume first
    exp = Experiment.build(config, workdir, devices)
    source = _init_source(exp, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rundir.save_or_check_config(config, workdir, write=jax.process_index() == 0)

    ckpt = Checkpointer(rundir.checkpoint_dir(workdir), keep=config.intervals.keep_checkpoints)
    data_iter = train_iterator(exp.train_source(), config.data.prefetch)
    writer = MetricWriter(workdir)
    state, start = _restore_or_init(exp, ckpt, data_iter, writer, source)
    n_params = count_params(exp.abstract_state.params)
    log(describe(exp, n_params))

    intervals, total = config.intervals, config.train.steps
    loop = TrainLoop(exp.train_step, lambda: exp.to_global(next(data_iter)), total)
    metrics = Metrics(writer, intervals.log_every,
                      config.train.batch_size * config.train.seq_len, t_start)
    progress = Progress(start, total)
    metrics.listeners.append(progress.show)
    evaluation = Evaluation(exp, metrics)
    loop.add_hook(metrics.collect, every=1)
    loop.add_hook(progress.advance, every=1)
    loop.add_hook(evaluation, every=intervals.eval_every, at_last=True)
    loop.add_hook(Checkpoints(exp, ckpt, data_iter), every=intervals.checkpoint_every,
                  at_last=True, on_stop=True)
    loop.add_hook(metrics.finish, every=0, at_last=True, on_stop=True)
    with stop_on_sigterm(loop):
        state, step = loop.run(state, start)
    progress.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
    interrupted = step < total
    if interrupted:
        log(f"{loop.stop_reason}: saved step {step} to {ckpt.directory}; exiting.")
    return {"step": step, "workdir": str(workdir), "checkpoints": str(ckpt.directory),
            "metrics": str(writer.path), "wall_seconds": round(time.time() - t_start, 1),
            "compile_seconds": round(metrics.compile_seconds or 0.0, 1),
            "num_params": n_params, **evaluation.last, "interrupted": interrupted}


def _init_source(exp: Experiment, workdir: Path) -> InitSource | None:
    """The checked `init.from_workdir` run for a run without checkpoints (else None)."""
    if not exp.config.init.from_workdir:
        return None
    with Checkpointer(rundir.checkpoint_dir(workdir), read_only=True) as ckpt:
        if ckpt.latest_step() is not None:
            return None  # a resume: the run's own checkpoints win
    return check_source(exp.config, exp.model_cfg)


def _restore_or_init(exp: Experiment, ckpt: Checkpointer, data_iter: Any,
                     writer: MetricWriter, source: InitSource | None = None
                     ) -> tuple[Any, int]:
    """The latest checkpoint (and data position); else step 0 with the parameters of
    `source` or a fresh sharded init."""
    start = ckpt.latest_step()
    if start is None and source is not None:
        log(f"Starting from the parameters of {source.workdir} (step {source.step}); "
            "fresh optimizer, step 0.")
        return restore_initial_state(exp, source), 0
    if start is None:
        return exp.init_state(), 0
    state = exp.from_checkpoint(ckpt.restore(start, exp.abstract_state, data_iter))
    writer.truncate_after(start)
    log(f"Resumed from {ckpt.directory} at step {start}.")
    return state, start


def describe(exp: Experiment, n_params: int) -> str:
    """The start-up summary: model, mesh, data (and MoE, pipeline)."""
    m = exp.model_cfg
    mesh = " x ".join(f"{k}={v}" for k, v in exp.mesh.shape.items() if v > 1) or "1 device"
    lines = []
    if m.moe_num_experts:
        lines.append(f"MoE: {m.moe_num_experts} experts, top-{m.moe_top_k}, {n_params:,} "
                     f"parameters in total, {active_params(m, n_params):,} active per token.")
    lines.append(f"Model: {n_params:,} parameters ({m.num_layers} layers, d_model {m.d_model}, "
                 f"vocab {m.vocab_size} padded to {m.padded_vocab}). Mesh: {mesh}. Data: "
                 f"{exp.data.path} ({len(exp.data.train):,} train / {len(exp.data.val):,} val "
                 f"tokens).")
    if exp.describe_pipeline():
        lines.append(exp.describe_pipeline())
    return "\n".join(lines)
