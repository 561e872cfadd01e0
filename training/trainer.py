"""Train (or resume) a run: build the experiment, restore, and run the loop with its hooks."""

import contextlib
import dataclasses
import importlib.util
import time
from pathlib import Path
from typing import Any

import jax

from jaxlm.configs.errors import ConfigError, RunError
from jaxlm.configs.sections import Config
from jaxlm.models.model import active_params, count_params
from jaxlm.storage import dirs
from jaxlm.data import fingerprints
from jaxlm.training import lora, rundir
from jaxlm.training.checkpoint import Checkpointer, SaveFailed
from jaxlm.training.experiment import Experiment
from jaxlm.training.flops import model_flops_per_token, peak_flops_per_device
from jaxlm.training.grpo import GrpoSteps
from jaxlm.training.hooks import (Checkpoints, DivergenceGuard, Evaluation, Metrics, Progress,
                                  ProfileWindow, SourceTokens, WriteRecords, log,
                                  stop_on_signals)
from jaxlm.training.init_from import InitSource, check_source, restore_initial_state
from jaxlm.training.loop import Hook, TrainLoop
from jaxlm.training.metrics import MetricWriter, has_wandb_login, start_wandb

PROFILE_DIR = "profile"

__all__ = ["describe_devices", "log", "train"]


def train(config: Any, workdir: str | Path, devices: list[jax.Device] | None = None, *,
          allow_schedule_change: bool = False) -> dict[str, Any]:
    """Train (or resume) the run in `workdir`; returns a summary of the final state.

    `config`: a Config, or a ConfigDict (resolved here, once). The run holds WORKDIR's lock
    (process 0); a resume must keep the model and data, and may change `steps` only with
    `allow_schedule_change`.
    """
    t_start = time.time()
    config = Config.from_dict(config)
    workdir = rundir.check_workdir(workdir)
    primary = jax.process_index() == 0
    with rundir.lock(workdir) if primary else contextlib.nullcontext():
        dirs.check_complete(workdir)
        with Checkpointer(rundir.checkpoint_dir(workdir), read_only=True) as existing:
            latest = existing.latest_step()
        for notice in rundir.check_resume(config, workdir, latest, allow_schedule_change):
            log(notice)  # checked before the data is read or anything is built
        fingerprints.check_data(config, workdir)
        if config.log.wandb_project and importlib.util.find_spec("wandb") is None:
            raise ConfigError("log.wandb_project", "needs the wandb package: pip install -e "
                                                   "'.[wandb]'")
        if config.log.wandb_project and primary and not has_wandb_login():
            raise ConfigError("log.wandb_project", "wandb has no API key: run `wandb login`, "
                                                   "set WANDB_API_KEY, or set "
                                                   "WANDB_MODE=offline (sync later with "
                                                   "`wandb sync`)")
        exp = Experiment.build(config, workdir, devices)
        fingerprints.check_tokenizer(workdir, exp.data.tokenizer, fingerprints.data_name(config))
        # init.from_workdir starts a new run; a resume continues from its own checkpoints.
        source = check_source(config, exp.model_cfg, exp.data.tokenizer) if config.init.from_workdir and \
            latest is None else None
        rollouts = GrpoSteps.build(exp) if config.grpo.prompts else None
        return _run(exp, workdir, t_start, source, rollouts)


def _run(exp: Experiment, workdir: Path, t_start: float, source: InitSource | None,
         rollouts: GrpoSteps | None = None) -> dict[str, Any]:
    """Restore or initialise, then train to `steps` with the hooks (GRPO: each step
    samples its batch with `rollouts`); the summary."""
    config = exp.config
    ckpt = Checkpointer(rundir.checkpoint_dir(workdir), keep=config.intervals.keep_checkpoints)
    data_iter = exp.train_batches()
    writer = MetricWriter(workdir, wandb_run=start_wandb(
        workdir, config.log.wandb_project, config.log.wandb_entity, config.to_dict())
        if config.log.wandb_project and jax.process_index() == 0 else None)
    try:
        state, start = _restore_or_init(exp, ckpt, data_iter, writer, source)
        if start < config.train.steps and jax.process_index() == 0:
            rundir.save_config(config, workdir)  # only a run that trains records its config
            fingerprints.write(workdir, config, exp.data.tokenizer,
                               lora.base_dir(workdir) if lora.enabled(config) else None)
        n_params = count_params(exp.abstract_state.params)
        log(describe(exp, n_params))
        loop, metrics, evaluation = _loop(exp, workdir, ckpt, data_iter, writer, start,
                                          t_start, rollouts)
        with stop_on_signals(loop):
            try:
                state, step = loop.run(state, start)
            except SaveFailed:
                raise
            except RunError as e:
                ckpt.wait()
                raise RunError(f"{e}; nothing after it was saved, the last checkpoint is step "
                               f"{ckpt.latest_step()} in {ckpt.directory}") from None
        ckpt.wait()
    except BaseException:  # e.g. a second Ctrl-C: exit at once; an unfinished save is only
        writer.close()     # a temporary directory, which orbax removes at the next start
        raise
    ckpt.close()
    writer.close()
    interrupted = step < config.train.steps
    if interrupted:
        log(f"{loop.stop_reason}: saved step {step} to {ckpt.directory}; exiting.")
    elif start == config.train.steps:
        log(f"The run in {workdir} is already at step {start}: nothing to train.")
    return {"step": step, "workdir": str(workdir), "checkpoints": str(ckpt.directory),
            "metrics": str(writer.path), "wall_seconds": round(time.time() - t_start, 1),
            "compile_seconds": round(metrics.compile_seconds or 0.0, 1),
            "num_params": n_params, **evaluation.last, "interrupted": interrupted}


def _loop(exp: Experiment, workdir: Path, ckpt: Checkpointer, data_iter: Any,
          writer: MetricWriter, start: int, t_start: float, rollouts: GrpoSteps | None = None
          ) -> tuple[TrainLoop, Metrics, Evaluation]:
    """The loop and its hooks, in the order they run after each step (`training/hooks.py`)."""
    config = exp.config
    intervals, train = config.intervals, config.train
    counter = SourceTokens(exp.data.names) if exp.data.is_mixture else None

    def next_batch() -> dict[str, jax.Array]:
        batch, host = exp.to_device(next(data_iter), train=True)
        if counter is not None:
            counter.read(host)
        return batch

    metrics = Metrics(intervals.log_every, train.batch_size * train.seq_len, t_start,
                      flops_per_token=model_flops_per_token(exp.model_cfg, train.seq_len),
                      num_devices=exp.mesh.devices.size,
                      peak_flops=peak_flops_per_device(config.log.peak_flops_per_device,
                                                       exp.mesh.devices.flat[0].device_kind))
    evaluation = Evaluation(exp, intervals.eval_every)
    hooks: list[Hook] = [counter] if counter is not None else []
    hooks += [DivergenceGuard(train.nan_policy, train.max_skipped), metrics, evaluation,
              WriteRecords(writer), Progress(start, train.steps),
              Checkpoints(exp, ckpt, data_iter, intervals.checkpoint_every,
                          intervals.checkpoint_every_minutes)]
    if config.profile.num_steps:
        hooks.append(ProfileWindow(str(workdir / PROFILE_DIR), config.profile.start_step,
                                   config.profile.num_steps))
    step_fn: Any = exp.train_step
    if rollouts is not None:  # the batch of step s is sampled from the state: pass s
        step_fn, next_batch = rollouts, iter(range(start, train.steps)).__next__
    return TrainLoop(step_fn, next_batch, train.steps, hooks), metrics, evaluation


def _restore_or_init(exp: Experiment, ckpt: Checkpointer, data_iter: Any,
                     writer: MetricWriter, source: InitSource | None = None
                     ) -> tuple[Any, int]:
    """The newest checkpoint that restores (and its data position); else step 0 with the
    parameters of `source` or a fresh sharded init. Records of metrics.jsonl after the
    restored step are dropped: the run writes them again, identically."""
    restored = ckpt.restore_latest(exp.checkpoint_abstract, data_iter, move_aside=True,
                                   warn=log)
    if restored is None:  # also drops records of a run killed before its first checkpoint
        writer.truncate_after(0, warn=log)
        if source is not None:
            state, step = restore_initial_state(exp, source, warn=log)
            source = dataclasses.replace(source, step=step)  # the step it came from
            log(f"Starting from the parameters of {source.workdir} (step {step}); "
                "fresh optimizer, step 0.")
        else:
            state = exp.init_state()
        if exp.trainable is not None:  # LoRA: the frozen base is stored once, now
            exp.save_base(state, {"workdir": str(source.workdir), "step": source.step}
                          if source is not None else {"workdir": None, "init": "random"})
        return state, 0
    state, start = restored
    writer.truncate_after(start, warn=log)
    log(f"Resumed from {ckpt.directory} at step {start}.")
    return exp.from_checkpoint(state), start


def describe_devices() -> str:
    """The devices this run uses, e.g. `Devices: 8 x NVIDIA H100 80GB HBM3 (gpu), 1 process;
    peak 989 TFLOP/s bf16 each`."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    peak = peak_flops_per_device(0.0, devices[0].device_kind)
    return (f"Devices: {len(devices)} x {', '.join(kinds)} ({jax.default_backend()}), "
            f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''}; "
            + (f"peak {peak / 1e12:,.0f} TFLOP/s bf16 each." if peak else
               "no peak FLOP/s known (no MFU unless log.peak_flops_per_device is set)."))


def describe(exp: Experiment, n_params: int) -> str:
    """The start-up summary: model, mesh, data (and MoE, pipeline)."""
    cfg, m = exp.model_cfg, exp.model_cfg.model
    mesh = " x ".join(f"{k}={v}" for k, v in exp.mesh.shape.items() if v > 1) or "1 device"
    lines = []
    if m.moe.num_experts:
        lines.append(f"MoE: {m.moe.num_experts} experts, top-{m.moe.top_k}, {n_params:,} "
                     f"parameters in total, {active_params(cfg, n_params):,} active per token.")
    lines.append(f"Model: {n_params:,} parameters ({m.num_layers} layers, d_model {m.d_model}, "
                 f"vocab {cfg.vocab_size} padded to {cfg.padded_vocab}). Mesh: {mesh}. Data: "
                 f"{describe_data(exp)}.")
    if exp.describe_pipeline():
        lines.append(exp.describe_pipeline())
    return "\n".join(lines)


def describe_data(exp: Experiment) -> str:
    """Each source's path, tokens (and mixture weight), the tokenizer and the packing."""
    sources = exp.data.named()
    parts = [f"{s.path} ({len(s.train):,} train / {len(s.val):,} val tokens"
             + (f", weight {w:.2f})" if len(sources) > 1 else ")") for _, s, w in sources]
    tok = exp.data.tokenizer
    return (f"{' + '.join(parts)}, {tok.kind} tokenizer of {tok.vocab_size:,} ids, "
            f"packing={exp.packing}"
            + (" (SFT: loss on completion tokens only)" if any(
                s.is_sft for _, s, _ in sources) else ""))
