"""The loop and its hooks: cadences, the final step, early stops, metrics one step behind,
the record hooks add to, the divergence guard's mark that checkpoints need."""

import math
from types import SimpleNamespace

import jax.numpy as jnp
import pytest

from jaxlm.configs.errors import RunError
from jaxlm.training.hooks import Checkpoints, DivergenceGuard, Metrics, SourceTokens
from jaxlm.training.loop import Hook, TrainLoop
from tests.helpers import Call


def _step(state, batch):
    return state + 1, {"loss": jnp.asarray(float(state + 1)), "learning_rate": jnp.asarray(0.1)}


def _loop(total, stop_at=None):
    calls = []
    hooks = [Call(lambda info, name=name: calls.append((name, info.step)), every=every,
                  at_last=at_last, on_stop=on_stop)
             for name, every, at_last, on_stop in (("log", 2, False, False),
                                                   ("eval", 5, True, False),
                                                   ("save", 4, True, True))]
    loop = TrainLoop(_step, lambda: None, total, hooks)
    if stop_at is not None:
        loop.hooks.append(Call(lambda info: loop.request_stop("test")
                               if info.step == stop_at else None))
    return loop, calls


def test_hooks_run_on_their_cadence_and_at_the_last_step():
    loop, calls = _loop(10)
    state, step = loop.run(0, 0)
    assert (state, step) == (10, 10)
    assert [s for n, s in calls if n == "log"] == [2, 4, 6, 8, 10]
    assert [s for n, s in calls if n == "eval"] == [5, 10]
    assert [s for n, s in calls if n == "save"] == [4, 8, 10]
    assert calls[-2:] == [("eval", 10), ("save", 10)]  # in the order of `hooks`


def test_a_stop_runs_the_on_stop_hooks_after_the_next_step():
    loop, calls = _loop(10, stop_at=3)
    _, step = loop.run(0, 0)
    assert step == 4 and loop.stop_reason == "test"
    assert ("save", 4) in calls and ("eval", 4) not in calls


def test_resume_starts_at_the_given_step():
    loop, calls = _loop(10)
    _, step = loop.run(6, 6)
    assert step == 10 and [s for n, s in calls if n == "log"] == [8, 10]


class _Ends(Hook):
    def __init__(self, events):
        self.events = events

    def on_start(self, step):
        self.events.append(("start", step))

    def on_end(self):
        self.events.append("end")


def test_on_start_and_on_end_run_once_also_when_a_hook_raises():
    events = []

    def fail(info):
        if info.step == 3:
            raise RunError("boom")
    loop = TrainLoop(_step, lambda: None, 10, [_Ends(events), Call(fail)])
    with pytest.raises(RunError, match="boom"):
        loop.run(1, 1)
    assert events == [("start", 1), "end"]


def test_the_previous_step_is_handed_on_without_its_state():
    seen = []
    loop = TrainLoop(_step, lambda: None, 3, [Call(lambda info: seen.append(
        (info.step, info.state, info.previous and (info.previous.step, info.previous.state))))])
    loop.run(0, 0)
    assert seen == [(1, 1, None), (2, 2, (1, None)), (3, 3, (2, None))]


def _ready(steps_with_loss=None, total=5, log_every=2, extra=()):
    """(steps of the records ready in each pass, their fields) of a loop with Metrics."""
    passes, fields = [], {}

    def look(info):
        passes.append([s for s, _ in info.ready])
        fields.update({s: v for s, v in info.ready})
    metrics = Metrics(log_every=log_every, tokens_per_step=10, start_time=0.0)
    loop = TrainLoop(_step, lambda: None, total, [*extra, metrics, Call(look)])
    loop.run(0, 0)
    return passes, fields


def test_metrics_are_ready_one_step_behind_and_once():
    passes, fields = _ready()
    # The record of step 2 is read while step 3 runs; the last step's at once.
    assert passes == [[], [], [2], [], [4, 5]]
    assert fields[4]["loss"] == 4.0 and "tokens_per_sec" in fields[5]


def test_a_pass_that_waits_for_the_device_reads_its_own_step():
    passes, _ = _ready(extra=[Call(lambda info: None, every=4, waits=True)])
    assert passes == [[], [], [2], [4], [5]]


def test_hooks_add_fields_to_the_record_of_their_step():
    tokens = SourceTokens(["a", "b"])
    counts = iter(range(1, 10))

    def count(info):
        n = next(counts)
        tokens.read({"tokens_seen": [n, 10 * n]})
    _, fields = _ready(extra=[Call(count), tokens])
    assert fields[2]["tokens/a"] == 2.0 and fields[2]["tokens/b"] == 20.0
    assert fields[5]["tokens/a"] == 5.0


def _guarded(losses, nan_policy="stop", checkpoint_every=4, total=8, **kw):
    """A loop whose step s has loss `losses.get(s, 1.0)`, with the guard and checkpoints;
    (saved steps, records ready)."""
    saved, ready = [], {}

    class Ckpt:
        def save(self, step, state, data_iter):
            saved.append(step)

    class Exp:
        def to_checkpoint(self, state):
            return state

    def step(state, batch):
        loss = losses.get(state.n + 1, 1.0)
        return (SimpleNamespace(n=state.n + 1, params=jnp.full(2, kw.get("params", 1.0))),
                {"loss": jnp.asarray(loss), "skipped": jnp.asarray(int(math.isnan(loss)))})
    guard = DivergenceGuard(nan_policy, kw.get("max_skipped", 3))
    hooks = [guard, Call(lambda info: ready.update({s: v for s, v in info.ready})),
             Checkpoints(Exp(), Ckpt(), None, checkpoint_every)]
    hooks.insert(1, Metrics(log_every=1, tokens_per_step=1, start_time=0.0))
    loop = TrainLoop(step, lambda: None, total, hooks)
    try:
        loop.run(SimpleNamespace(n=0, params=jnp.ones(2)), 0)
    except RunError as e:
        return saved, ready, str(e)
    return saved, ready, None


def test_a_nonfinite_loss_ends_the_run_after_its_record_with_no_save_after_it():
    nan = float("nan")
    saved, ready, error = _guarded({6: nan})  # found in the next pass, step 7's
    assert saved == [4] and sorted(ready) == [1, 2, 3, 4, 5, 6]
    assert error == "divergence at step 6: loss is nan" and math.isnan(ready[6]["loss"])
    saved, ready, error = _guarded({4: nan})  # a checkpoint step: checked in its own pass
    assert saved == [] and sorted(ready) == [1, 2, 3, 4]
    assert error == "divergence at step 4: loss is nan"


def test_nonfinite_parameters_are_never_saved():
    saved, ready, error = _guarded({}, params=float("inf"))
    assert saved == [] and sorted(ready) == [1, 2, 3, 4]
    assert error == "divergence at step 4: the parameters are not finite"


def test_the_skip_policy_counts_skipped_steps_in_each_record():
    nan = float("nan")
    saved, ready, error = _guarded({3: nan, 4: nan, 6: nan}, nan_policy="skip")
    assert error is None and saved == [4, 8]
    assert [ready[s]["skipped_total"] for s in range(1, 9)] == [0, 0, 1, 2, 2, 3, 3, 3]
    saved, _, error = _guarded({5: nan, 6: nan, 7: nan}, nan_policy="skip")
    assert saved == [4] and error.startswith("divergence at step 7: 3 updates in a row")


def test_checkpoints_save_only_a_step_the_guard_marked_finite():
    class Ckpt:
        def save(self, *a):
            raise AssertionError("saved an unchecked step")
    loop = TrainLoop(_step, lambda: None, 4, [Checkpoints(None, Ckpt(), None, 2)])
    with pytest.raises(RuntimeError, match="step 2 is not marked finite"):
        loop.run(0, 0)


def test_an_eval_record_follows_its_steps_record_and_its_time_is_not_train_time(monkeypatch):
    from jaxlm.training import hooks
    now = [0.0]
    monkeypatch.setattr(hooks.time, "time", lambda: now[0])

    def evaluate(exp, params):
        now[0] += 100.0  # an evaluation of 100 s
        return {"eval_loss": 2.0, "perplexity": 7.4, "num_tokens": 8, "bits_per_byte": 1.0}
    monkeypatch.setattr(hooks, "evaluate", evaluate)
    device_get = hooks.jax.device_get

    def wait_and_get(tree):
        now[0] += 1.0  # reading a step's metrics waits for it: a step of 1 s
        return device_get(tree)
    monkeypatch.setattr(hooks.jax, "device_get", wait_and_get)
    passes = []
    metrics = hooks.Metrics(log_every=1, tokens_per_step=10, start_time=0.0)
    loop = TrainLoop(lambda s, b: (SimpleNamespace(n=s.n + 1, params=None),
                                   {"loss": jnp.asarray(1.0)}), lambda: None, 6,
                     [metrics, hooks.Evaluation(None, 3),
                      Call(lambda info: passes.append(info.ready))])
    loop.run(SimpleNamespace(n=0, params=None), 0)
    assert [[(s, "loss" in v) for s, v in ready] for ready in passes] == [
        [], [(1, True)], [(2, True), (3, True), (3, False)], [], [(4, True)],
        [(5, True), (6, True), (6, False)]]
    throughput = [v["tokens_per_sec"] for ready in passes for _, v in ready
                  if "tokens_per_sec" in v]
    assert throughput == [10.0] * 5  # steps 2-6, one step of 10 tokens per second each
