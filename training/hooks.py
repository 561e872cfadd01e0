"""The training loop's hooks: metrics one step behind, progress bar, evaluation,
checkpoints, and stopping on SIGTERM. `training/trainer.py` wires them to a `TrainLoop`.
"""

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
from tqdm import tqdm

from training.checkpoint import Checkpointer
from training.evaluate import evaluate
from training.experiment import Experiment
from training.loop import StepInfo, TrainLoop
from training.metrics import MetricWriter


def log(msg: str) -> None:
    """A line above the progress bar, from process 0 only."""
    if jax.process_index() == 0:
        tqdm.write(msg)


class Metrics:
    """Writes the metrics of logging steps, one step behind the device.

    `collect` runs every step: it writes the record kept from an earlier step (finished
    by now, so reading it does not stall the device) and keeps this step's if it is a
    logging step. `flush` writes the kept record at once. Records get `tokens_per_sec`
    over the steps since the previous record, excluding time spent in evaluation.
    """

    def __init__(self, writer: MetricWriter, log_every: int, tokens_per_step: int,
                 start_time: float):
        self.writer, self.log_every, self.tokens_per_step = writer, log_every, tokens_per_step
        self.start_time = start_time
        self.compile_seconds: float | None = None
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
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
        self._clock = (now, step)
        self.writer.write(step, **values)
        for listener in self.listeners:
            listener(values)

    def reset_clock(self, step: int) -> None:
        """Throughput counts from now (after compilation or an evaluation)."""
        self._clock = (time.time(), step)

    def finish(self, info: StepInfo) -> None:
        self.flush()


class Progress:
    """A tqdm bar with loss, learning rate and tokens/s (process 0 only)."""

    def __init__(self, start: int, total: int):
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                        disable=jax.process_index() != 0, smoothing=0.1)

    def advance(self, info: StepInfo) -> None:
        self.bar.update(1)

    def show(self, values: dict[str, Any]) -> None:
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['learning_rate']:.2e}",
                             tok_s=f"{values.get('tokens_per_sec', 0):,.0f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


class Evaluation:
    """Evaluates on the validation split and writes an eval record."""

    def __init__(self, exp: Experiment, metrics: Metrics):
        self.exp, self.metrics = exp, metrics
        self.last: dict[str, Any] = {}

    def __call__(self, info: StepInfo) -> None:
        self.metrics.flush()  # this step's training record comes before its eval record
        self.last = evaluate(self.exp, info.state.params)
        self.metrics.writer.write(info.step, eval_loss=self.last["eval_loss"])
        log(f"step {info.step}: eval_loss {self.last['eval_loss']:.4f} "
            f"(perplexity {self.last['perplexity']:.2f}, {self.last['num_tokens']:,} tokens)")
        self.metrics.reset_clock(info.step)  # eval time is not train time


class Checkpoints:
    """Saves the state (layers in model order) and the data iterator."""

    def __init__(self, exp: Experiment, ckpt: Checkpointer, data_iter: Any):
        self.exp, self.ckpt, self.data_iter = exp, ckpt, data_iter

    def __call__(self, info: StepInfo) -> None:
        self.ckpt.save(info.step, self.exp.to_checkpoint(info.state), self.data_iter)


@contextlib.contextmanager
def stop_on_sigterm(loop: TrainLoop) -> Iterator[None]:
    """SIGTERM asks the loop to stop (it then checkpoints and exits); a no-op off the main
    thread, where Python cannot install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: loop.request_stop("SIGTERM"))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
