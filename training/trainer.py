"""The training loop: resume, step, log one step behind, evaluate, checkpoint, stop cleanly."""

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict

from configs.errors import ConfigError
from data.pipeline import train_iterator
from models import active_params, count_params
from training.checkpoint import Checkpointer
from training.evaluate import CONFIG_FILE, evaluate
from training.experiment import Experiment
from training.metrics import MetricWriter, progress_bar

# Config sections that must not change when a run resumes: they define the model,
# its parameter shapes or the data stream.
_FROZEN_KEYS = ("model", "data", "seed", "seq_len", "batch_size")


def log(msg: str) -> None:
    if jax.process_index() == 0:
        from tqdm import tqdm
        tqdm.write(msg)


def save_or_check_config(config: ConfigDict, workdir: Path) -> None:
    """Write `config.json` on the first start; on resume, refuse a changed model or data."""
    path = workdir / CONFIG_FILE
    current = json.loads(config.to_json_best_effort())
    if path.is_file():
        saved = json.loads(path.read_text())
        for key in _FROZEN_KEYS:
            a, b = saved.get(key), current.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                for sub in sorted(set(a) | set(b)):
                    if a.get(sub) != b.get(sub):
                        raise ConfigError(f"{key}.{sub}", f"is {b.get(sub)!r} but the run in "
                                          f"{workdir} used {a.get(sub)!r}; use a new --workdir")
            elif a != b:
                raise ConfigError(key, f"is {b!r} but the run in {workdir} used {a!r}; "
                                       "use a new --workdir")
    if jax.process_index() == 0:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(current, indent=2))
        tmp.replace(path)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[threading.Event]:
    """An event set by SIGTERM (the loop then saves and exits); a no-op off the main thread."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(config: ConfigDict, workdir: str | Path,
          devices: list[jax.Device] | None = None) -> dict[str, Any]:
    """Train (or resume) the run in `workdir`; returns a summary of the final state."""
    t_start = time.time()
    workdir = Path(workdir).absolute()
    exp = Experiment.build(config, workdir, devices)
    workdir.mkdir(parents=True, exist_ok=True)
    save_or_check_config(config, workdir)

    ckpt = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    data_iter = train_iterator(exp.train_source(), config.data.prefetch)
    writer = MetricWriter(workdir)
    start = ckpt.latest_step()
    if start is not None:
        state = exp.from_checkpoint(ckpt.restore(start, exp.abstract_state, data_iter))
        writer.truncate_after(start)
        log(f"Resumed from {ckpt.directory} at step {start}.")
    else:
        state, start = exp.init_state(), 0

    tokens_per_step = config.batch_size * config.seq_len
    n_params = count_params(exp.abstract_state.params)
    mesh_desc = " x ".join(f"{k}={v}" for k, v in exp.mesh.shape.items() if v > 1) or "1 device"
    if exp.model_cfg.moe_num_experts:
        active = active_params(exp.model_cfg, n_params)
        log(f"MoE: {exp.model_cfg.moe_num_experts} experts, top-{exp.model_cfg.moe_top_k}, "
            f"{n_params:,} parameters in total, {active:,} active per token.")
    log(f"Model: {n_params:,} parameters ({exp.model_cfg.num_layers} layers, d_model "
        f"{exp.model_cfg.d_model}, vocab {exp.model_cfg.vocab_size} padded to "
        f"{exp.model_cfg.padded_vocab}). Mesh: {mesh_desc}. Data: {exp.data.path} "
        f"({len(exp.data.train):,} train / {len(exp.data.val):,} val tokens).")
    if exp.describe_pipeline():
        log(exp.describe_pipeline())

    every = lambda n, step: n > 0 and step % n == 0  # noqa: E731
    last_eval: dict[str, Any] = {}
    pending: tuple[int, Any] | None = None
    clock = {"time": None, "step": start}
    compile_seconds = None

    def flush(p: tuple[int, Any] | None) -> None:
        """Read a finished step's metrics (one step behind the device) and write them."""
        if p is None:
            return
        step, metrics = p
        values = dict(jax.device_get(metrics))
        if "moe_load" in values:  # max/mean expert load: 1.0 is perfectly balanced
            load = values["moe_load"]
            values["moe_load_max_over_mean"] = float(load.max() / load.mean())
        now = time.time()
        if clock["time"] is not None and step > clock["step"]:
            values["tokens_per_sec"] = tokens_per_step * (step - clock["step"]) / (
                now - clock["time"])
        clock.update(time=now, step=step)
        writer.write(step, **values)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['learning_rate']:.2e}",
                        tok_s=f"{values.get('tokens_per_sec', 0):,.0f}", refresh=False)

    step = start
    with stop_on_sigterm() as stop, progress_bar(start, config.steps) as bar:
        while step < config.steps:
            batch = exp.to_global(next(data_iter))
            state, metrics = exp.train_step(state, batch)
            step += 1
            if compile_seconds is None:  # first step: includes compilation
                jax.block_until_ready(metrics)
                compile_seconds = time.time() - t_start
                clock.update(time=time.time(), step=step)
            flush(pending)
            pending = (step, metrics) if every(config.log_every, step) or \
                step == config.steps else None
            bar.update(1)
            last = step == config.steps
            if every(config.eval_every, step) or last:
                flush(pending)
                pending = None
                last_eval = evaluate(exp, state.params)
                writer.write(step, eval_loss=last_eval["eval_loss"])
                log(f"step {step}: eval_loss {last_eval['eval_loss']:.4f} "
                    f"(perplexity {last_eval['perplexity']:.2f}, "
                    f"{last_eval['num_tokens']:,} tokens)")
                clock.update(time=time.time(), step=step)  # eval time is not train time
            if every(config.checkpoint_every, step) or last or stop.is_set():
                ckpt.save(step, exp.to_checkpoint(state), data_iter)
            if stop.is_set():
                flush(pending)
                log(f"SIGTERM: saved step {step} to {ckpt.directory}; exiting.")
                break
        flush(pending)
    ckpt.wait()
    ckpt.close()
    writer.close()
    summary = {"step": step, "workdir": str(workdir), "checkpoints": str(ckpt.directory),
               "metrics": str(writer.path), "wall_seconds": round(time.time() - t_start, 1),
               "compile_seconds": round(compile_seconds or 0.0, 1),
               "num_params": n_params, **last_eval, "interrupted": stop.is_set()}
    return summary
