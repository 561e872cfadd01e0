"""What a run does besides training: time-based checkpoints, the profiler window, wandb."""

import json

import jax
import pytest

from benchmarks.profile_ops import newest_trace, op_table
from jaxlm.configs.errors import ConfigError
from tests.helpers import Call, no_compilation, run_cli
from jaxlm.training import trainer
from jaxlm.training.hooks import Checkpoints, ProfileWindow
from jaxlm.training.loop import TrainLoop


class _Ckpt:
    def __init__(self):
        self.saved = []

    def save(self, step, state, data_iter):
        self.saved.append(step)


class _Exp:
    def to_checkpoint(self, state):
        return state


def _saved_steps(every_minutes):
    """10 steps of 25 s on a fake clock, checkpoint_every=4."""
    now = [0.0]
    ckpt = _Ckpt()

    def step(state, batch):
        now[0] += 25.0
        return state + 1, {}
    hooks = [Call(lambda info: setattr(info, "finite", True)),  # stands in for the guard
             Checkpoints(_Exp(), ckpt, None, 4, every_minutes, clock=lambda: now[0])]
    TrainLoop(step, lambda: None, 10, hooks).run(0, 0)
    return ckpt.saved


def test_checkpoints_by_steps_or_minutes_whichever_comes_first():
    assert _saved_steps(0.0) == [4, 8, 10]
    # 75 s at step 3 (> 1 min since the start), step 4 on cadence resets the clock, 75 s
    # more at step 7, step 8 on cadence, the last step.
    assert _saved_steps(1.0) == [3, 4, 7, 8, 10]


def _one_device_config(tiny_config, steps=6):
    c = tiny_config
    c.steps, c.mesh.data, c.log_every = steps, 1, 2
    return c


@pytest.mark.parametrize("start,first,num,want", [
    (0, 3, 2, [3, 4]), (0, 1, 2, [1, 2]), (3, 2, 4, [4, 5]), (0, 9, 5, [9, 10]), (6, 2, 2, [])])
def test_profiler_window_covers_its_steps(start, first, num, want, monkeypatch, tmp_path):
    """Steps traced for a window of `num` steps from `first`, in a 10-step run resumed at
    `start`: the trace starts before step `first` (before the loop if it is the first
    step) and stops after its last step or the run's."""
    traced, running = [], [False]
    monkeypatch.setattr(jax.profiler, "start_trace",
                        lambda *a, **k: running.__setitem__(0, True))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: running.__setitem__(0, False))

    def step(state, batch):
        if running[0]:
            traced.append(state + 1)
        return state + 1, {}

    TrainLoop(step, lambda: None, 10, [ProfileWindow(str(tmp_path), first, num)]).run(
        start, start)
    assert traced == want and not running[0]


def test_a_loop_that_fails_stops_an_open_trace(monkeypatch, tmp_path):
    running = [False]
    monkeypatch.setattr(jax.profiler, "start_trace",
                        lambda *a, **k: running.__setitem__(0, True))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: running.__setitem__(0, False))

    def step(state, batch):
        if state == 3:
            raise KeyboardInterrupt
        return state + 1, {}
    with pytest.raises(KeyboardInterrupt):
        TrainLoop(step, lambda: None, 10, [ProfileWindow(str(tmp_path), 2, 5)]).run(0, 0)
    assert not running[0]


@pytest.mark.slow
def test_profiler_window_traces_its_steps(tiny_config, tmp_path):
    c = _one_device_config(tiny_config)
    c.profile.start_step, c.profile.num_steps = 3, 2
    trainer.train(c, tmp_path, jax.devices()[:1])
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
    rows, steps = op_table(newest_trace(tmp_path / "profile"), "jit_train_step")
    assert steps == 2  # the window's step markers
    assert len(rows) > 20 and all(r["calls"] >= 2 for r in rows[:5])  # ops of both steps
    assert not any(r["op"].startswith("while") for r in rows)


def _wandb_records(path):
    """Protobuf records of an offline `.wandb` file (a LevelDB-style log of 32 KiB blocks
    after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2
    data, out, partial, i, block = path.read_bytes(), [], b"", 7, 32768
    while i + 7 <= len(data):
        left = block - i % block
        length, kind = int.from_bytes(data[i + 4:i + 6], "little"), data[i + 6]
        if left < 7 or (length == 0 and kind == 0):
            i += left
            continue
        chunk, i = data[i + 7:i + 7 + length], i + 7 + length
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(partial)
            out.append(record)
    return out


@pytest.mark.slow
def test_wandb_offline_run_and_resume(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is the optional .[wandb] extra")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    c = _one_device_config(tiny_config, steps=4)
    c.checkpoint_every, c.eval_every = 4, 4
    c.log.wandb_project = "jaxlm-test"
    trainer.train(c, tmp_path, jax.devices()[:1])
    c.steps = 6
    trainer.train(c, tmp_path, jax.devices()[:1], allow_schedule_change=True)  # resumes at 4
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(runs) == 2  # the same wandb run, twice
    history, config = {}, {}
    for path in runs:
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {it.key or "/".join(it.nested_key): json.loads(it.value_json)
                         for it in record.history.item}
                history.setdefault(items["_step"], {}).update(items)
            elif kind == "run":
                assert record.run.run_id == run_id
                config.update({u.key or "/".join(u.nested_key): json.loads(u.value_json)
                               for u in record.run.config.update})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for record in records:  # every scalar of metrics.jsonl, at its step
        for key, value in record.items():
            if key != "step":
                assert history[record["step"]][key] == pytest.approx(value), (record, key)
    assert sorted(history) == [2, 4, 6]
    assert config["optimizer"]["name"] == "adamw" and config["steps"] in (4, 6)


def test_wandb_missing_is_a_config_error_before_compiling(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer.importlib.util, "find_spec", lambda name: None)
    c = _one_device_config(tiny_config)
    c.log.wandb_project = "jaxlm-test"
    with no_compilation() as compiled, pytest.raises(ConfigError) as err:
        trainer.train(c, tmp_path, jax.devices()[:1])
    assert err.value.key == "log.wandb_project" and "pip install" in str(err.value)
    assert compiled == []


def test_a_window_beyond_the_run_is_a_config_error():
    from jaxlm.configs.sections import Config
    with pytest.raises(ConfigError) as err:
        Config().replace(**{"profile.start_step": 5000, "profile.num_steps": 2})
    assert err.value.key == "profile.start_step" and "beyond steps 2000" in str(err.value)


@pytest.mark.slow
def test_cli_prints_its_devices_and_logs_mfu_for_a_configured_peak(tmp_path):
    res = run_cli(["train.py", "--config=configs/shakespeare_char.py:tiny", "--cpu_devices=2",
                   f"--workdir={tmp_path}", "--config.steps=4", "--config.log_every=1",
                   "--config.eval_every=0", "--config.log.peak_flops_per_device=1e11"])
    assert res.returncode == 0, res.stderr
    assert "Devices: 2 x cpu (cpu), 1 process" in res.stdout + res.stderr
    timed = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if "tokens_per_sec" in r]
    assert len(timed) == 3
    for r in timed:
        assert r["mfu"] == pytest.approx(r["flops_per_sec_per_device"] / 1e11, rel=1e-9)
