"""The training loop's hooks (`training/loop.py` `Hook`), in the order `training/trainer.py`
runs them after each step:

1. `SourceTokens`: a mixture's tokens per source, into the step's record.
2. `DivergenceGuard`: checks the previous step's loss and gradient norm, and the current
   step (and its parameters when the state is saved this step); marks the step `finite`,
   or the pass's `failure`.
3. `Metrics`: reads the logging steps' metrics one step behind and hands their records to
   the writers (`StepInfo.ready`).
4. `Evaluation`: an eval record at its cadence.
5. `WriteRecords`: `metrics.jsonl`, TensorBoard and wandb, every ready record.
6. `Progress`: the progress bar, with the latest training record.
7. `Checkpoints`: saves the state of a step the guard marked `finite` (by steps and by wall
   time); every record up to that step is written by then.
8. `ProfileWindow`: a `jax.profiler` trace of a window of steps.

`stop_on_signals` turns SIGTERM and Ctrl-C into a stop request.
"""

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.evaluate import NonFiniteEval, evaluate
from jaxlm.training.experiment import Experiment
from jaxlm.training.flops import throughput_fields
from jaxlm.training.loop import Hook, StepInfo, TrainLoop
from jaxlm.training.metrics import MetricWriter


def log(msg: str) -> None:
    """A line above the progress bar, from process 0 only."""
    if jax.process_index() == 0:
        tqdm.write(msg)


class SourceTokens(Hook):
    """`tokens/<source>` in the training records of a mixture: the weighted target tokens
    seen so far from each source. The data pipeline counts them on the host (`tokens_seen`,
    kept in the iterator's state, so a resumed run continues the count); `read` takes each
    batch's count as the loop fetches it and `on_step` adds it to that step's record."""

    def __init__(self, names: list[str]):
        self.names = names
        self._latest: np.ndarray | None = None

    def read(self, host: dict[str, np.ndarray]) -> None:
        self._latest = host["tokens_seen"]

    def on_step(self, info: StepInfo) -> None:
        if self._latest is not None:
            info.record.update({f"tokens/{name}": float(n)
                                for name, n in zip(self.names, self._latest)})


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class DivergenceGuard(Hook):
    """Ends the run when the loss or the gradient norm is not finite.

    Each step it reads the previous step's loss and gradient norm (finished by then: the
    device is not stalled), and the current step's when the pass reads it anyway
    (`StepInfo.sync`). When the state is saved this step (`StepInfo.saving`) it also checks
    that every parameter is finite and marks the step `finite`; `Checkpoints` saves only a
    step so marked. What it finds sets `StepInfo.failure`: the loop writes the records
    ready so far, evaluates and saves nothing, and raises. With `nan_policy="stop"` any
    non-finite value ends the run; with `"skip"` the train step has dropped that update (the
    state is unchanged) and the run ends after `max_skipped` such steps in a row;
    `skipped_total` counts them, in each checked step's record.
    """

    QUANTITIES = ("loss", "grad_norm", "skipped")

    def __init__(self, nan_policy: str, max_skipped: int):
        self.nan_policy, self.max_skipped = nan_policy, max_skipped
        self.skipped_in_a_row = self.skipped_total = 0
        self._checked = -1  # the latest step checked

    def on_step(self, info: StepInfo) -> None:
        info.failure = info.failure or self._failure(info)
        if info.failure is None and info.saving:
            if bool(_all_finite(info.state.params)):
                info.finite = True
            else:
                info.failure = f"divergence at step {info.step}: the parameters are not finite"

    def _failure(self, info: StepInfo) -> str | None:
        """The first failure among the unchecked previous step and, on a `sync` pass, this."""
        steps = [info.previous] if info.previous and info.previous.step > self._checked else []
        for checked in steps + ([info] if info.sync else []):
            failure = self._check(checked)
            if failure is not None:
                return failure
        return None

    def _check(self, info: StepInfo) -> str | None:
        health = {k: info.metrics[k] for k in self.QUANTITIES if k in info.metrics}
        values = {k: float(np.asarray(v)) for k, v in jax.device_get(health).items()}
        self._checked = info.step
        if self.nan_policy == "skip":
            skipped = int(values.get("skipped", 0))
            self.skipped_total += skipped
            self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
            info.record["skipped_total"] = self.skipped_total
            if self.skipped_in_a_row >= self.max_skipped:
                return (f"divergence at step {info.step}: {self.max_skipped} updates in a row "
                        f"had a non-finite loss or gradient norm and were skipped "
                        f"(nan_policy=skip, max_skipped={self.max_skipped})")
            return None
        for name in ("loss", "grad_norm"):
            if name in values and not np.isfinite(values[name]):
                return f"divergence at step {info.step}: {name} is {values[name]}"
        return None


class Metrics(Hook):
    """The training records of logging steps (every `log_every`-th and the last), one step
    behind the device.

    Each step it finishes the record kept from the previous step (finished by now, so
    reading it does not stall the device) and keeps this step's if it is a logging step;
    when the pass reads the current step anyway (`StepInfo.sync`: evaluation, a checkpoint,
    the end of the loop) it finishes this step's at once. A finished record is the step's
    metrics, its `record` fields, `tokens_per_sec` over the steps since the previous record
    (leaving out the first step, which compiles, and `StepInfo.excluded_seconds`) and from
    it, given the model's FLOPs per token, `flops_per_sec_per_device` (model FLOPs) and,
    given a peak FLOP/s per device, `mfu` (`training/flops.py`); it goes to `StepInfo.ready`.
    """

    def __init__(self, log_every: int, tokens_per_step: int, start_time: float,
                 flops_per_token: float = 0.0, num_devices: int = 1,
                 peak_flops: float | None = None):
        self.log_every, self.tokens_per_step = log_every, tokens_per_step
        self.flops_per_token, self.num_devices = flops_per_token, num_devices
        self.peak_flops = peak_flops
        self.start_time = start_time
        self.compile_seconds: float | None = None
        self._pending: StepInfo | None = None
        self._clock: tuple[float, int] | None = None  # (time, step) the throughput counts from

    def on_step(self, info: StepInfo) -> None:
        if self.compile_seconds is None:  # the first step includes compilation
            jax.block_until_ready(info.metrics)
            self.compile_seconds = time.time() - self.start_time
            self._clock = (time.time(), info.step)
        elif info.previous is not None and self._clock is not None:  # e.g. evaluation time
            self._clock = (self._clock[0] + info.previous.excluded_seconds, self._clock[1])
        if self._pending is not None:
            self._finish(self._pending, info)
            self._pending = None
        if (self.log_every > 0 and info.step % self.log_every == 0) or info.last:
            if info.sync:
                self._finish(info, info)
            else:
                self._pending = info

    def _finish(self, done: StepInfo, info: StepInfo) -> None:
        """Put `done`'s record into `info.ready` (waits for its step)."""
        values = dict(jax.device_get(done.metrics))
        if "moe_load" in values:  # max/mean expert load: 1.0 is perfectly balanced
            load = values["moe_load"]
            values["moe_load_max_over_mean"] = float(load.max() / load.mean())
        now = time.time()
        if self._clock is not None and done.step > self._clock[1]:
            values["tokens_per_sec"] = (self.tokens_per_step * (done.step - self._clock[1])
                                        / (now - self._clock[0]))
            if self.flops_per_token > 0:
                values.update(throughput_fields(values["tokens_per_sec"], self.flops_per_token,
                                                self.num_devices, self.peak_flops))
        self._clock = (now, done.step)
        info.ready.append((done.step, {**values, **done.record}))


class Evaluation(Hook):
    """Every `every`-th step and after the last: evaluates on the validation split(s) and
    readies an eval record, eval_loss and bits_per_byte (and both per source for a
    mixture; a per-pair objective's validation metrics), after the step's training record. Its time is `excluded_seconds`."""

    at_last, waits = True, True

    def __init__(self, exp: Experiment, every: int):
        self.exp, self.every = exp, every
        self.last: dict[str, Any] = {}

    def on_step(self, info: StepInfo) -> None:
        began = time.time()
        try:
            self.last = evaluate(self.exp, info.state.params)
        except NonFiniteEval as e:  # as the divergence guard's: nothing of this step is saved
            info.failure = f"divergence at step {info.step}: {e}"
            return
        info.ready.append((info.step, {k: v for k, v in self.last.items()
                                       if k not in ("perplexity", "num_tokens")}))
        log(f"step {info.step}: eval_loss {self.last['eval_loss']:.4f} "
            f"(perplexity {self.last['perplexity']:.2f}, {self.last['num_tokens']:,} tokens, "
            f"{self.last['bits_per_byte']:.4f} bits per byte)")
        info.excluded_seconds += time.time() - began


class WriteRecords(Hook):
    """Writes every ready record (`metrics.jsonl`, TensorBoard, wandb: `MetricWriter`)."""

    def __init__(self, writer: MetricWriter):
        self.writer = writer

    def on_step(self, info: StepInfo) -> None:
        for step, values in info.ready:
            self.writer.write(step, **values)


def si(value: float) -> str:
    """3 significant digits with an SI prefix: 8.21e10 -> '82.1G'."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{prefix}"
    return f"{value:.3g}"


class Progress(Hook):
    """A tqdm bar with loss, learning rate, tokens/s, model FLOP/s per device and MFU of the
    latest training record (process 0 only)."""

    def __init__(self, start: int, total: int):
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                        disable=jax.process_index() != 0, smoothing=0.1)

    def on_step(self, info: StepInfo) -> None:
        for _, values in info.ready:
            if "loss" in values:
                self.show(values)
        self.bar.update(1)

    def show(self, values: dict[str, Any]) -> None:
        extra = {}
        if "flops_per_sec_per_device" in values:
            extra["flop_s_dev"] = si(values["flops_per_sec_per_device"])
        if "mfu" in values:
            extra["mfu"] = f"{values['mfu']:.1%}"
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['learning_rate']:.2e}",
                             tok_s=f"{values.get('tokens_per_sec', 0):,.0f}", **extra,
                             refresh=False)

    def on_end(self) -> None:
        self.bar.close()


class Checkpoints(Hook):
    """Saves the state (layers in model order) and the data iterator of a step the
    divergence guard has marked `finite` (it runs before, and raises on anything else).

    Due every `every`-th step, after the last, on a stop, and once `every_minutes` of wall
    time (on `clock`, in seconds) have passed since the last save or the start, whichever
    came last; the clock is read without waiting for the device.
    """

    at_last, on_stop, saves = True, True, True

    def __init__(self, exp: Experiment, ckpt: Checkpointer, data_iter: Any, every: int,
                 every_minutes: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.exp, self.ckpt, self.data_iter, self.every = exp, ckpt, data_iter, every
        self.every_seconds, self.clock = 60.0 * every_minutes, clock
        self.last_save = clock()

    def due(self, info: StepInfo) -> bool:
        return super().due(info) or (self.every_seconds > 0 and
                                     self.clock() - self.last_save >= self.every_seconds)

    def on_step(self, info: StepInfo) -> None:
        if not info.finite:
            raise RuntimeError(f"step {info.step} is not marked finite: a DivergenceGuard "
                               "must run before Checkpoints")
        self.ckpt.save(info.step, self.exp.to_checkpoint(info.state), self.data_iter)
        self.last_save = self.clock()


class ProfileWindow(Hook):
    """A `jax.profiler` trace of steps `first` .. `first + num_steps - 1` into `directory`
    (TensorBoard's profile plugin reads it; `perfetto_trace.json.gz` opens in Perfetto).

    It starts the trace after step `first - 1` (before the loop when the window opens at
    the run's first step) and stops it after the window's last step (or the run's), waiting
    for the device at both ends so the trace holds exactly those steps; `on_end` stops a
    trace the loop left open.
    """

    def __init__(self, directory: str, first: int, num_steps: int):
        self.directory, self.first, self.last = directory, first, first + num_steps - 1
        self.active = False
        self.traced: list[int] = []

    def on_start(self, step: int) -> None:
        if self.first <= step + 1 <= self.last:
            self._start()

    def on_step(self, info: StepInfo) -> None:
        if self.active:
            self.traced.append(info.step)
            if info.step >= self.last or info.last or info.stopping:
                jax.block_until_ready(info.state)
                self._stop()
        elif info.step + 1 == self.first and not (info.last or info.stopping):
            jax.block_until_ready(info.state)
            self._start()

    def _start(self) -> None:
        jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
        self.active = True

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self.active = False
        log(f"Profiled steps {self.traced[0]}-{self.traced[-1]} into {self.directory} "
            f"(tensorboard --logdir {self.directory}, or perfetto_trace.json.gz in "
            "https://ui.perfetto.dev).")

    def on_end(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


@contextlib.contextmanager
def stop_on_signals(loop: TrainLoop) -> Iterator[None]:
    """SIGTERM and Ctrl-C (SIGINT) ask the loop to stop: it saves a checkpoint after the
    current step and exits. A second Ctrl-C exits at once (KeyboardInterrupt). A no-op off
    the main thread, where Python cannot install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum: int, frame: Any) -> None:
        if loop.stop_reason == "Ctrl-C":
            raise KeyboardInterrupt
        loop.request_stop("Ctrl-C")
        log("Ctrl-C: saving a checkpoint after this step (Ctrl-C again exits at once).")

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM,
                                              lambda *_: loop.request_stop("SIGTERM")),
                signal.SIGINT: signal.signal(signal.SIGINT, on_sigint)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
