"""The training loop: a short `while` over steps, with hooks that run at a cadence.

    loop = TrainLoop(train_step, next_batch, total_steps=1000)
    loop.add_hook(write_metrics, every=1)
    loop.add_hook(save_checkpoint, every=500, at_last=True, on_stop=True)
    state, step = loop.run(state, start_step)

After every step the loop calls each hook that is due, in the order they were added,
with a `StepInfo`. A hook is due when the step is a multiple of its `every`, on the final
step if `at_last`, and on the step after which the loop stops early if `on_stop`
(`request_stop`, e.g. from a signal handler). Metrics in `StepInfo` are still on the
device: a hook that reads them waits for that step, so hooks that run every step read
the previous step's (see `training/hooks.py`).
"""

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

Hook = Callable[["StepInfo"], None]


@dataclasses.dataclass(frozen=True)
class StepInfo:
    step: int  # optimizer steps done, this one included
    state: Any  # the train state after this step (device arrays)
    metrics: Any  # this step's metrics (device arrays; reading them waits for the step)
    last: bool  # the run's final step
    stopping: bool  # the loop stops after this step (a stop was requested)


@dataclasses.dataclass(frozen=True)
class _Scheduled:
    fn: Hook
    every: int
    at_last: bool
    on_stop: bool

    def due(self, info: StepInfo) -> bool:
        on_cadence = self.every > 0 and info.step % self.every == 0
        return on_cadence or (self.at_last and info.last) or (self.on_stop and info.stopping)


class TrainLoop:
    """Runs `step_fn(state, batch) -> (state, metrics)` until `total_steps`, calling hooks."""

    def __init__(self, step_fn: Callable[[Any, Any], tuple[Any, Any]],
                 next_batch: Callable[[], Any], total_steps: int):
        self.step_fn, self.next_batch, self.total_steps = step_fn, next_batch, total_steps
        self.hooks: list[_Scheduled] = []
        self._stop = threading.Event()
        self.stop_reason: str | None = None

    def add_hook(self, fn: Hook, *, every: int = 1, at_last: bool = False,
                 on_stop: bool = False) -> None:
        """Call `fn(info)` after every `every`-th step (0: never on a cadence), after the
        final step if `at_last`, and after the step where the loop stops early if `on_stop`."""
        self.hooks.append(_Scheduled(fn, every, at_last, on_stop))

    def request_stop(self, reason: str) -> None:
        """Stop after the current step (its on-stop hooks run). Safe from signal handlers."""
        self.stop_reason = self.stop_reason or reason
        self._stop.set()

    def run(self, state: Any, start: int) -> tuple[Any, int]:
        """Train from step `start` to `total_steps` or an early stop; (final state, step)."""
        step = start
        while step < self.total_steps:
            state, metrics = self.step_fn(state, self.next_batch())
            step += 1
            info = StepInfo(step, state, metrics, last=step == self.total_steps,
                            stopping=self._stop.is_set())
            for hook in self.hooks:
                if hook.due(info):
                    hook.fn(info)
            if info.stopping:
                break
        return state, step
