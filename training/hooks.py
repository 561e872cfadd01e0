"""The training loop's hooks: metrics one step behind, the divergence guard, progress bar,
evaluation, checkpoints (by steps and by wall time), a profiler window, and stopping on
SIGTERM or Ctrl-C. `training/trainer.py` wires them to a `TrainLoop`.
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

from jaxlm.configs.errors import RunError
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.evaluate import NonFiniteEval, evaluate
from jaxlm.training.experiment import Experiment
from jaxlm.training.flops import throughput_fields
from jaxlm.training.loop import StepInfo, TrainLoop
from jaxlm.training.metrics import MetricWriter


def log(msg: str) -> None:
    """A line above the progress bar, from process 0 only."""
    if jax.process_index() == 0:
        tqdm.write(msg)


class Metrics:
    """Writes the metrics of logging steps, one step behind the device.

    `collect` runs every step: it writes the record kept from an earlier step (finished
    by now, so reading it does not stall the device) and keeps this step's if it is a
    logging step. `flush` writes the kept record at once. Records get `tokens_per_sec`
    over the steps since the previous record, excluding time spent in evaluation, and from
    it, given the model's FLOPs per token, `flops_per_sec_per_device` (model FLOPs) and,
    given a peak FLOP/s per device, `mfu` (`training/flops.py`).
    """

    def __init__(self, writer: MetricWriter, log_every: int, tokens_per_step: int,
                 start_time: float, flops_per_token: float = 0.0, num_devices: int = 1,
                 peak_flops: float | None = None):
        self.writer, self.log_every, self.tokens_per_step = writer, log_every, tokens_per_step
        self.flops_per_token, self.num_devices = flops_per_token, num_devices
        self.peak_flops = peak_flops
        self.start_time = start_time
        self.compile_seconds: float | None = None
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        # More values for each record: extra(step) -> {name: value}.
        self.extras: list[Callable[[int], dict[str, Any]]] = []
        self._pending: tuple[int, Any] | None = None
        self._clock: tuple[float, int] | None = None  # (time, step) the throughput counts from

    def collect(self, info: StepInfo) -> None:
        if self.compile_seconds is None:  # the first step includes compilation
            jax.block_until_ready(info.metrics)
            self.compile_seconds = time.time() - self.start_time
            self.reset_clock(info.step)
        self.flush()
        if (self.log_every > 0 and info.step % self.log_every == 0) or info.last:
            self._pending = (info.step, info.metrics)

    def flush(self) -> None:
        """Write the kept record now (waits for its step)."""
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        values = dict(jax.device_get(metrics))
        if "moe_load" in values:  # max/mean expert load: 1.0 is perfectly balanced
            load = values["moe_load"]
            values["moe_load_max_over_mean"] = float(load.max() / load.mean())
        now = time.time()
        if self._clock is not None and step > self._clock[1]:
            values["tokens_per_sec"] = (self.tokens_per_step * (step - self._clock[1])
                                        / (now - self._clock[0]))
            if self.flops_per_token > 0:
                values.update(throughput_fields(values["tokens_per_sec"], self.flops_per_token,
                                                self.num_devices, self.peak_flops))
        self._clock = (now, step)
        for extra in self.extras:
            values.update(extra(step))
        self.writer.write(step, **values)
        for listener in self.listeners:
            listener(values)

    def reset_clock(self, step: int) -> None:
        """Throughput counts from now (after compilation or an evaluation)."""
        self._clock = (time.time(), step)

    def finish(self, info: StepInfo) -> None:
        self.flush()


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class DivergenceGuard:
    """Stops the run when the loss or the gradient norm is not finite.

    It runs every step and reads the previous step's loss and gradient norm (finished by
    then: the device is not stalled). With `nan_policy="stop"` any non-finite value ends the
    run; with `"skip"` the train step has dropped that update (the state is unchanged) and the
    run ends after `max_skipped` such steps in a row; `skipped_total` counts them. `check_now` reads the current step and
    the parameters themselves, and runs before every checkpoint: nothing non-finite is saved.
    """

    QUANTITIES = ("loss", "grad_norm", "skipped")

    def __init__(self, nan_policy: str, max_skipped: int):
        self.nan_policy, self.max_skipped = nan_policy, max_skipped
        self.skipped_in_a_row = self.skipped_total = 0
        self._previous: tuple[int, dict[str, Any]] | None = None

    def __call__(self, info: StepInfo) -> None:
        previous = self._previous
        self._previous = (info.step, {k: info.metrics[k] for k in self.QUANTITIES
                                      if k in info.metrics})
        if previous is not None:
            self._check(*previous)

    def check_now(self, info: StepInfo) -> None:
        """The current step and the parameters (waits for the step)."""
        self.__call__(info)
        previous, self._previous = self._previous, None
        self._check(*previous)
        if not bool(_all_finite(info.state.params)):
            raise RunError(f"divergence at step {info.step}: the parameters are not finite")

    def _check(self, step: int, health: dict[str, Any]) -> None:
        values = {k: float(np.asarray(v)) for k, v in jax.device_get(health).items()}
        if self.nan_policy == "skip":
            skipped = int(values.get("skipped", 0))
            self.skipped_total += skipped
            self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
            if self.skipped_in_a_row >= self.max_skipped:
                raise RunError(f"divergence at step {step}: {self.max_skipped} updates in a "
                               f"row had a non-finite loss or gradient norm and were skipped "
                               f"(nan_policy=skip, max_skipped={self.max_skipped})")
            return
        for name in ("loss", "grad_norm"):
            if name in values and not np.isfinite(values[name]):
                raise RunError(f"divergence at step {step}: {name} is {values[name]}")


def si(value: float) -> str:
    """3 significant digits with an SI prefix: 8.21e10 -> '82.1G'."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{prefix}"
    return f"{value:.3g}"


class Progress:
    """A tqdm bar with loss, learning rate, tokens/s, model FLOP/s per device and MFU
    (process 0 only)."""

    def __init__(self, start: int, total: int):
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                        disable=jax.process_index() != 0, smoothing=0.1)

    def advance(self, info: StepInfo) -> None:
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

    def close(self) -> None:
        self.bar.close()


class SourceTokens:
    """`tokens/<source>` in the training records of a mixture: the weighted target tokens
    seen so far from each source. The data pipeline counts them on the host (`tokens_seen`,
    kept in the iterator's state, so a resumed run continues the count); `read` takes each
    batch's count as the loop fetches it and the hook files it under its step."""

    def __init__(self, names: list[str]):
        self.names = names
        self._latest: np.ndarray | None = None
        self._by_step: dict[int, np.ndarray] = {}

    def read(self, host: dict[str, np.ndarray]) -> None:
        self._latest = host["tokens_seen"]

    def __call__(self, info: StepInfo) -> None:
        self._by_step[info.step] = self._latest

    def values(self, step: int) -> dict[str, float]:
        seen = self._by_step.get(step)
        self._by_step = {s: v for s, v in self._by_step.items() if s > step}
        if seen is None:
            return {}
        return {f"tokens/{name}": float(n) for name, n in zip(self.names, seen)}


class Evaluation:
    """Evaluates on the validation split(s) and writes an eval record: eval_loss and
    bits_per_byte (and both per source for a mixture)."""

    def __init__(self, exp: Experiment, metrics: Metrics):
        self.exp, self.metrics = exp, metrics
        self.last: dict[str, Any] = {}

    def __call__(self, info: StepInfo) -> None:
        self.metrics.flush()  # this step's training record comes before its eval record
        try:
            self.last = evaluate(self.exp, info.state.params)
        except NonFiniteEval as e:  # as the divergence guard: the trainer names the last save
            raise RunError(f"divergence at step {info.step}: {e}") from None
        self.metrics.writer.write(info.step, **{k: v for k, v in self.last.items()
                                                if k.startswith(("eval_loss", "bits_per"))})
        log(f"step {info.step}: eval_loss {self.last['eval_loss']:.4f} "
            f"(perplexity {self.last['perplexity']:.2f}, {self.last['num_tokens']:,} tokens, "
            f"{self.last['bits_per_byte']:.4f} bits per byte)")
        self.metrics.reset_clock(info.step)  # eval time is not train time


class Checkpoints:
    """Saves the state (layers in model order) and the data iterator, after the divergence
    guard has checked the step and the parameters.

    Called on the step cadence (`checkpoint_every`); `on_clock`, called every step, also
    saves once `every_minutes` of wall time (on `clock`, in seconds) have passed since the
    last save or the start, whichever came last. It reads only the clock: no device wait.
    """

    def __init__(self, exp: Experiment, ckpt: Checkpointer, data_iter: Any,
                 guard: DivergenceGuard, every_minutes: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.exp, self.ckpt, self.data_iter, self.guard = exp, ckpt, data_iter, guard
        self.every_seconds, self.clock = 60.0 * every_minutes, clock
        self.last_save = clock()

    def __call__(self, info: StepInfo) -> None:
        self.guard.check_now(info)
        self.ckpt.save(info.step, self.exp.to_checkpoint(info.state), self.data_iter)
        self.last_save = self.clock()

    def on_clock(self, info: StepInfo) -> None:
        if self.every_seconds > 0 and self.clock() - self.last_save >= self.every_seconds:
            self(info)


class ProfileWindow:
    """A `jax.profiler` trace of steps `first` .. `first + num_steps - 1` into `directory`
    (TensorBoard's profile plugin reads it; `perfetto_trace.json.gz` opens in Perfetto).

    Called after every step: it starts the trace after step `first - 1` and stops it after
    the window's last step (or the run's), waiting for the device at both ends so the
    trace holds exactly those steps. `begin(start)` starts it before the loop when the
    window opens at the run's first step; leaving the `with` block stops an open trace.
    """

    def __init__(self, directory: str, first: int, num_steps: int):
        self.directory, self.first, self.last = directory, first, first + num_steps - 1
        self.active = False
        self.traced: list[int] = []

    def begin(self, start: int) -> None:
        if self.first <= start + 1 <= self.last:
            self._start()

    def __call__(self, info: StepInfo) -> None:
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

    def __enter__(self) -> "ProfileWindow":
        return self

    def __exit__(self, *exc: Any) -> None:
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
