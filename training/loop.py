"""The training loop: a short `while` over steps, and the one protocol for what runs after
each step, `Hook`.

    loop = TrainLoop(train_step, next_batch, total_steps=1000,
                     hooks=[guard, metrics, evaluation, write, progress, checkpoints])
    state, step = loop.run(state, start_step)

Each step makes one `StepInfo`. The loop first asks every hook whether it is `due` (its
declared cadence: `every`, `at_last`, `on_stop`), notes in the info whether this pass reads
the step's values (`sync`) and saves the state (`saving`), then calls `on_step(info)` of the
due hooks in the order of `hooks`. Hooks talk only through the info: they add fields to a
step's metrics record (`record`), hand finished records to the writers (`ready`) and mark
what they checked (`finite`, `failure`). Metrics are still on the device: a hook that reads them waits
for that step, so hooks that run every step read the previous step's (`info.previous`,
finished by then), and read the current one only when `info.sync` says this pass waits for
the device anyway (see `training/hooks.py`). `on_start(step)` runs before the first step,
`on_end()` after the last, however the loop ends. A pass that marks a `failure` (the
divergence guard: a step is not finite) skips the due hooks that read the state (`waits`,
`saves`: nothing evaluates or saves it), runs the rest (the step's records are written) and
ends the loop with `RunError(failure)`. Each step runs inside a
`jax.profiler.StepTraceAnnotation("train")`, the step marker of TensorBoard's trace viewer.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxlm.configs.errors import RunError


@dataclasses.dataclass(eq=False)
class StepInfo:
    """One step, as hooks see it; hooks fill in `record`, `ready`, `finite` and `failure`."""

    step: int  # optimizer steps done, this one included
    state: Any  # the train state after this step (device arrays); None once the next ran
    metrics: Any  # this step's metrics (device arrays; reading them waits for the step)
    last: bool  # the run's final step
    stopping: bool  # the loop stops after this step (a stop was requested)
    previous: StepInfo | None = None  # the step before (its metrics finished by now)
    # This pass reads this step's values: the loop ends after it, or a due hook waits for
    # the device or saves the state.
    sync: bool = False
    saving: bool = False  # a due hook saves the state (`Hook.saves`)
    # Host fields of this step's metrics record, e.g. `skipped_total`, `tokens/<source>`.
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Records complete in this pass, (step, fields) in the order they are written: the
    # training record of the previous or this step, then this step's eval record.
    ready: list[tuple[int, dict[str, Any]]] = dataclasses.field(default_factory=list)
    finite: bool = False  # the divergence guard has checked this step and its parameters
    failure: str | None = None  # why the run cannot go on (e.g. "divergence at step 9: ...")
    excluded_seconds: float = 0.0  # wall time hooks spent off training (evaluation)


class Hook:
    """Something the loop does after steps. Subclasses override the methods they need and
    set the cadence: `on_step` runs after every `every`-th step (0: not on a cadence), after
    the final step if `at_last`, and after the step where the loop stops early if `on_stop`.
    `waits`: `on_step` waits for the device; `saves`: `on_step` saves the state."""

    every: int = 1
    at_last: bool = False
    on_stop: bool = False
    waits: bool = False
    saves: bool = False

    def due(self, info: StepInfo) -> bool:
        on_cadence = self.every > 0 and info.step % self.every == 0
        return on_cadence or (self.at_last and info.last) or (self.on_stop and info.stopping)

    def on_start(self, step: int) -> None:
        """Before the first step; the loop continues after `step`."""

    def on_step(self, info: StepInfo) -> None:
        """After a step on which the hook is due."""

    def on_end(self) -> None:
        """After the loop, however it ends (an error or Ctrl-C too)."""


class TrainLoop:
    """Runs `step_fn(state, batch) -> (state, metrics)` until `total_steps`, calling hooks."""

    def __init__(self, step_fn: Callable[[Any, Any], tuple[Any, Any]],
                 next_batch: Callable[[], Any], total_steps: int, hooks: Sequence[Hook] = ()):
        self.step_fn, self.next_batch, self.total_steps = step_fn, next_batch, total_steps
        self.hooks = list(hooks)
        self._stop = threading.Event()
        self.stop_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        """Stop after the current step (its on-stop hooks run). Safe from signal handlers."""
        self.stop_reason = self.stop_reason or reason
        self._stop.set()

    def run(self, state: Any, start: int) -> tuple[Any, int]:
        """Train from step `start` to `total_steps` or an early stop; (final state, step)."""
        step, previous = start, None
        try:
            for hook in self.hooks:
                hook.on_start(start)
            while step < self.total_steps:
                with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                    state, metrics = self.step_fn(state, self.next_batch())
                step += 1
                info = StepInfo(step, state, metrics, last=step == self.total_steps,
                                stopping=self._stop.is_set(), previous=previous)
                self._run_hooks(info)
                if info.stopping:
                    break
                info.state = info.previous = None  # the next step takes (donates) the state
                previous = info
        finally:
            for hook in self.hooks:
                hook.on_end()
        return state, step

    def _run_hooks(self, info: StepInfo) -> None:
        due = [hook for hook in self.hooks if hook.due(info)]
        info.saving = any(hook.saves for hook in due)
        info.sync = info.last or info.stopping or info.saving or any(h.waits for h in due)
        for hook in due:
            if info.failure is None or not (hook.waits or hook.saves):
                hook.on_step(info)
        if info.failure is not None:
            raise RunError(info.failure)
