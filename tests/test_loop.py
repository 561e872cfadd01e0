"""The loop and its hooks: cadences, the final step, early stops, metrics one step behind."""

import jax.numpy as jnp

from jaxlm.training.hooks import Metrics
from jaxlm.training.loop import TrainLoop


def _loop(total, stop_at=None):
    calls = []

    def step_fn(state, batch):
        return state + 1, {"loss": jnp.asarray(float(state + 1)),
                           "learning_rate": jnp.asarray(0.1)}

    loop = TrainLoop(step_fn, lambda: None, total)
    for name, every, at_last, on_stop in (("log", 2, False, False), ("eval", 5, True, False),
                                          ("save", 4, True, True)):
        loop.add_hook(lambda info, name=name: calls.append((name, info.step)), every=every,
                      at_last=at_last, on_stop=on_stop)
    if stop_at is not None:
        loop.add_hook(lambda info: loop.request_stop("test") if info.step == stop_at else None)
    return loop, calls


def test_hooks_run_on_their_cadence_and_at_the_last_step():
    loop, calls = _loop(10)
    state, step = loop.run(0, 0)
    assert (state, step) == (10, 10)
    assert [s for n, s in calls if n == "log"] == [2, 4, 6, 8, 10]
    assert [s for n, s in calls if n == "eval"] == [5, 10]
    assert [s for n, s in calls if n == "save"] == [4, 8, 10]
    assert calls[-2:] == [("eval", 10), ("save", 10)]  # in the order they were added


def test_a_stop_runs_the_on_stop_hooks_after_the_next_step():
    loop, calls = _loop(10, stop_at=3)
    state, step = loop.run(0, 0)
    assert step == 4 and loop.stop_reason == "test"
    assert ("save", 4) in calls and ("eval", 4) not in calls


def test_resume_starts_at_the_given_step():
    loop, calls = _loop(10)
    _, step = loop.run(6, 6)
    assert step == 10 and [s for n, s in calls if n == "log"] == [8, 10]


class _Writer:
    def __init__(self):
        self.records = []

    def write(self, step, **values):
        self.records.append((step, values))


def test_metrics_are_written_one_step_behind_and_once():
    writer = _Writer()
    metrics = Metrics(writer, log_every=2, tokens_per_step=10, start_time=0.0)
    loop = TrainLoop(lambda s, b: (s + 1, {"loss": jnp.asarray(1.0 * s),
                                           "learning_rate": jnp.asarray(0.0)}), lambda: None, 5)
    seen = []
    loop.add_hook(metrics.collect, every=1)
    loop.add_hook(lambda info: seen.append([s for s, _ in writer.records]), every=1)
    loop.add_hook(metrics.finish, every=0, at_last=True, on_stop=True)
    loop.run(0, 0)
    # The record of step 2 is written while step 3 runs; the last step's at the end.
    assert seen == [[], [], [2], [2], [2, 4]]
    assert [s for s, _ in writer.records] == [2, 4, 5]
    metrics.flush()  # nothing pending: no duplicate
    assert [s for s, _ in writer.records] == [2, 4, 5]
    assert "tokens_per_sec" in writer.records[-1][1]
