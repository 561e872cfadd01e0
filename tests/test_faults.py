"""Fault injection: kill -9 and SIGTERM at several points, a damaged checkpoint, a
divergence, a concurrent run, damaged run files. Each checks that nothing good was lost and
that the next run continues from the right step with the metrics of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm.configs.errors import ConfigError, RunError
from jaxlm.evaluation.request import EvalRequest
from jaxlm.evaluation.restore import json_line
from jaxlm.training import rundir, trainer
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.hooks import Progress
from jaxlm.training.metrics import MetricWriter
from jaxlm.training.metrics import WALL_CLOCK_KEYS
from tests.helpers import ROOT, call_cli, run_cli, train_source

STEPS, EVERY = 12, 4


def records(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k not in WALL_CLOCK_KEYS}
            for ln in lines]


def steps_on_disk(workdir: Path) -> list[int]:
    return Checkpointer(rundir.checkpoint_dir(workdir), read_only=True).all_steps()


def one():
    return jax.devices()[:1]


@pytest.fixture
def config(tiny_config):
    c = tiny_config
    c.steps, c.log_every, c.eval_every, c.checkpoint_every = STEPS, 1, 6, EVERY
    c.keep_checkpoints, c.mesh.data = 5, 1
    return c


@pytest.fixture
def reference(config, tmp_path):
    trainer.train(config, tmp_path / "ref", one())
    return records(tmp_path / "ref")


def _sigterm_at(monkeypatch, cls, method, when):
    """Send SIGTERM to this process right after `cls.method(...)` returns when `when(...)`."""
    original = getattr(cls, method)

    def patched(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if when(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(cls, method, patched)


@pytest.mark.parametrize("point", ["before_first_checkpoint", "during_save",
                                   "right_after_save", "on_a_logging_step"])
def test_sigterm_then_resume_equals_an_uninterrupted_run(point, config, reference, tmp_path,
                                                         monkeypatch):
    if point == "before_first_checkpoint":
        _sigterm_at(monkeypatch, MetricWriter, "write", lambda step, **v: step == 2)
    elif point == "during_save":  # the async save of step 4 is still being written
        _sigterm_at(monkeypatch, Checkpointer, "save", lambda step, *a: step == EVERY)
    elif point == "right_after_save":
        original = Checkpointer.save

        def save_then_wait_then_sigterm(self, step, *args):
            out = original(self, step, *args)
            if step == EVERY:
                self.wait()
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        monkeypatch.setattr(Checkpointer, "save", save_then_wait_then_sigterm)
    else:  # the record of the stopping step is written once, not twice
        _sigterm_at(monkeypatch, MetricWriter, "write",
                    lambda step, **v: step == 6 and "loss" in v)
    first = trainer.train(config, tmp_path / "run", one())
    assert first["interrupted"] and first["step"] < STEPS
    assert steps_on_disk(tmp_path / "run")[-1] == first["step"]
    steps = [r["step"] for r in records(tmp_path / "run") if "loss" in r]
    assert steps == sorted(set(steps))  # no record twice
    monkeypatch.undo()
    second = trainer.train(config, tmp_path / "run", one())
    assert second["step"] == STEPS and not second["interrupted"]
    assert records(tmp_path / "run") == reference


def _cli(workdir: Path, *extra: str) -> list[str]:
    return ["train.py", "--config=configs/shakespeare_char.py:tiny", f"--workdir={workdir}",
            "--config.steps=40", "--config.checkpoint_every=10", "--config.log_every=5",
            "--config.eval_every=20", "--config.keep_checkpoints=5", *extra]


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory) -> list[dict]:
    """The records of an uninterrupted `_cli` run (one per module: the run is
    deterministic)."""
    workdir = tmp_path_factory.mktemp("cli_reference") / "ref"
    ref = run_cli(_cli(workdir))
    assert ref.returncode == 0, ref.stderr
    return records(workdir)


_KILL_DURING_SAVE = """
import os, signal, sys
sys.argv = sys.argv[1:]
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.hooks import Progress
original = Checkpointer.save
def save_then_die(self, step, *args):
    out = original(self, step, *args)
    if step == 20:  # the asynchronous write of step 20 is in flight
        os.kill(os.getpid(), signal.SIGKILL)
    return out
Checkpointer.save = save_then_die
import runpy
runpy.run_path("train.py", run_name="__main__")
"""

_CTRL_C_TWICE = """
import os, signal, sys
sys.argv = sys.argv[1:]
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.metrics import MetricWriter
write, save = MetricWriter.write, Checkpointer.save
def write_then_ctrl_c(self, step, **values):
    write(self, step, **values)
    if step == 15 and "loss" in values:  # Ctrl-C: save after this step and stop
        os.kill(os.getpid(), signal.SIGINT)
def save_then_ctrl_c(self, step, *args):
    out = save(self, step, *args)
    if step > 15:  # the second Ctrl-C, while the stop's checkpoint is being written
        print(f"second Ctrl-C at step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGINT)
    return out
MetricWriter.write, Checkpointer.save = write_then_ctrl_c, save_then_ctrl_c
import runpy
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before_first_checkpoint", "during_save", "after_save",
                                   "second_ctrl_c_during_save"])
def test_kill_9_then_rerun_equals_an_uninterrupted_run(point, cli_reference, tmp_path):
    run = tmp_path / "run"
    if point == "second_ctrl_c_during_save":  # exits at once, like a kill, but says so
        res = run_cli(["-c", _CTRL_C_TWICE, *_cli(run)])
        stopped = int(res.stdout.split("second Ctrl-C at step ")[1].split()[0])
        assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith(
            "interrupted: exited at once"), res.stderr
        assert steps_on_disk(run)[-1] in (10, stopped)  # never a half-written step
    elif point == "during_save":
        res = run_cli(["-c", _KILL_DURING_SAVE, *_cli(run)])
        assert res.returncode == -signal.SIGKILL
        assert steps_on_disk(run) == [10]  # the half-written step 20 is not a checkpoint
    else:
        proc = subprocess.Popen([sys.executable, *_cli(run)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = 0 if point == "before_first_checkpoint" else 20
        deadline = time.time() + 240
        while time.time() < deadline:
            if target == 0 and (run / "metrics.jsonl").is_file():
                break
            if target and steps_on_disk(run) and steps_on_disk(run)[-1] >= target:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target == 0:
            assert steps_on_disk(run) == []
    res = run_cli(_cli(run))
    assert res.returncode == 0, res.stderr
    assert records(run) == cli_reference


def _stopped_at(config, workdir: Path, step: int, monkeypatch) -> None:
    """Train `config` until a SIGTERM stops it with a checkpoint at `step`: the signal comes
    during the hooks of step - 1, so the loop stops after `step`."""
    with monkeypatch.context() as m:
        _sigterm_at(m, Progress, "on_step", lambda info: info.step == step - 1)
        assert trainer.train(config, workdir, one())["step"] == step


def _truncate_every_chunk(workdir: Path, step: int) -> None:
    """Damage every array chunk of checkpoint `step`: parameters and optimizer state."""
    for f in (workdir / "checkpoints" / str(step) / "state").glob("**/d/*"):
        with open(f, "r+b") as chunk:
            chunk.truncate(16)


def _truncate_largest_file(workdir: Path, step: int) -> None:
    """Damage checkpoint `step`: its largest file keeps only 16 bytes."""
    files = sorted((workdir / "checkpoints" / str(step)).rglob("*"),
                   key=lambda p: p.stat().st_size if p.is_file() else -1)
    with open(files[-1], "r+b") as f:
        f.truncate(16)


def test_a_damaged_checkpoint_is_moved_aside_and_the_previous_one_resumes(
        config, reference, tmp_path, capsys, monkeypatch):
    _stopped_at(config, tmp_path / "run", 8, monkeypatch)
    _truncate_largest_file(tmp_path / "run", 8)
    second = trainer.train(config, tmp_path / "run", one())
    out = capsys.readouterr()
    assert "checkpoint step 8" in out.out and "does not restore" in out.out
    assert "Resumed from" in out.out and "at step 4" in out.out
    assert (tmp_path / "run" / "damaged_checkpoints" / "8").is_dir()
    assert second["step"] == STEPS
    assert records(tmp_path / "run") == reference


def test_when_no_checkpoint_restores_nothing_is_moved(config, tmp_path):
    config.steps = 4
    trainer.train(config, tmp_path / "run", one())
    for f in (tmp_path / "run" / "checkpoints" / "4" / "state").rglob("_METADATA"):
        f.unlink()
    with pytest.raises(RunError, match="no checkpoint in .* restores"):
        trainer.train(config, tmp_path / "run", one())
    assert steps_on_disk(tmp_path / "run") == [4]
    assert not (tmp_path / "run" / "damaged_checkpoints").exists()


def test_divergence_stops_keeps_the_good_checkpoints_and_the_next_run_continues(
        config, reference, tmp_path, monkeypatch):
    _stopped_at(config, tmp_path / "run", 8, monkeypatch)
    config.learning_rate = 1e30
    with pytest.raises(RunError, match=r"divergence at step (9|10|11|12): (loss|grad_norm) is "
                                       r"nan; nothing after it was saved, the last checkpoint "
                                       r"is step 8"):
        trainer.train(config, tmp_path / "run", one())
    assert steps_on_disk(tmp_path / "run") == [4, 8]
    config.learning_rate = 1e-3
    trainer.train(config, tmp_path / "run", one())
    assert records(tmp_path / "run") == reference


def test_skip_policy_drops_nonfinite_updates_and_stops_after_max_skipped(config, tmp_path):
    config.learning_rate, config.warmup_steps = 1e30, 0
    config.nan_policy, config.max_skipped = "skip", 3
    with pytest.raises(RunError, match="3 updates in a row had a non-finite loss or gradient "
                                       "norm and were skipped"):
        trainer.train(config, tmp_path / "run", one())
    recs = [r for r in records(tmp_path / "run") if "loss" in r]
    assert recs[-1]["skipped"] == 1 and recs[-1]["skipped_total"] >= 1
    for step in steps_on_disk(tmp_path / "run"):  # whatever was saved is finite
        assert step < recs[-1]["step"]


def test_skipped_step_keeps_the_state(config, tmp_path):
    from jaxlm.training.experiment import Experiment
    config.nan_policy, config.warmup_steps = "skip", 0  # no zero learning rate at count 0
    exp = Experiment.build(config, tmp_path, one())
    state = exp.init_state()
    before = jax.device_get(state.params)
    batch = train_source(exp)[0]
    bad = dict(batch, weights=np.full(batch["inputs"].shape, np.nan, np.float32))
    state, metrics = exp.train_step(state, exp.to_global(bad))
    assert int(metrics["skipped"]) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
    good = dict(batch, weights=np.ones(batch["inputs"].shape, np.float32))
    state, metrics = exp.train_step(state, exp.to_global(good))
    assert int(metrics["skipped"]) == 0
    assert not np.array_equal(jax.device_get(state.params)["embed"]["embedding"],
                              before["embed"]["embedding"])


def test_a_second_run_on_a_workdir_is_refused_and_a_dead_holders_lock_is_taken(config,
                                                                             tmp_path):
    with rundir.lock(tmp_path / "run"):
        with pytest.raises(ConfigError, match=r"workdir: .* is in use by another run \(host "
                                              r".*, pid \d+, since"):
            trainer.train(config, tmp_path / "run", one())
    assert not (tmp_path / "run" / "checkpoints").exists()
    # A lock file left by a process killed with -9 holds no lock: it is taken over.
    (tmp_path / "run" / rundir.LOCK_FILE).write_text("host x, pid 999999, since then")
    config.steps = 2
    assert trainer.train(config, tmp_path / "run", one())["step"] == 2


def test_resume_rules(config, tmp_path):
    config.steps = 8
    trainer.train(config, tmp_path / "run", one())
    config.steps = 4
    with pytest.raises(ConfigError, match="steps: is 4 but the run in .* is already at step 8"):
        trainer.train(config, tmp_path / "run", one())
    config.steps = 12
    with pytest.raises(ConfigError, match="steps: is 12 but the run in .* was started with 8.*"
                                          "--allow_schedule_change"):
        trainer.train(config, tmp_path / "run", one())
    # A refused resume reads no data: the tokenized corpus is not rebuilt.
    data = tmp_path / "run" / "data"
    for f in data.iterdir():
        f.unlink()
    with pytest.raises(ConfigError):
        trainer.train(config, tmp_path / "run", one())
    assert not any(data.iterdir())
    config.steps = 8
    summary = trainer.train(config, tmp_path / "run", one())  # finished: nothing to do
    assert summary["step"] == 8 and not summary["interrupted"]


def test_damaged_run_files_are_one_line_errors_or_warnings(config, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="workdir: .* is a file, not a directory"):
        trainer.train(config, tmp_path / "file", one())
    config.steps = 4
    trainer.train(config, tmp_path / "run", one())
    good = (tmp_path / "run" / "config.json").read_text()
    (tmp_path / "run" / "config.json").write_text(good[:50])
    with pytest.raises(ConfigError, match=r"config.json is damaged \(not JSON"):
        trainer.train(config, tmp_path / "run", one())
    (tmp_path / "run" / "config.json").write_text(good)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-20])  # a crash cut the last line short
    capsys.readouterr()
    config.steps = 6
    trainer.train(config, tmp_path / "run", one(), allow_schedule_change=True)
    assert f"dropped line 5 of {metrics}" in capsys.readouterr().out
    assert [r["step"] for r in records(tmp_path / "run") if "loss" in r] == list(range(1, 7))


def test_eval_results_are_strict_json():
    line = json_line({"step": 3, "eval_loss": float("nan"), "perplexity": float("inf")})
    assert json.loads(line) == {"step": 3, "eval_loss": None, "perplexity": None}


@pytest.mark.parametrize("flags, message", [
    ({"sampling": {"top_p": 0.0}}, "top_p: must be in (0, 1], got 0.0"),
    ({"sampling": {"top_p": 1.5}}, "top_p: must be in (0, 1], got 1.5"),
    ({"sampling": {"top_k": -1}}, "top_k: must be >= 0, got -1"),
    ({"sampling": {"temperature": -0.5}}, "temperature: must be >= 0, got -0.5"),
    ({"generate": {"length": -5}}, "length: must be a positive integer, got -5"),
    ({"quantize": "int2"},
     "quantize: unknown value 'int2'; choose one of ['int8', 'int4', 'int3', 'nf4']"),
])
def test_bad_sampling_flags_are_refused(flags, message):
    with pytest.raises(ConfigError) as err:
        EvalRequest.parse({"workdir": "w", **flags})
    assert str(err.value) == message


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--config.model.foo=1"], "error: model.foo: unknown config key in --config override; "
                               "did you mean"),
    (["--config=configs/nope.py"], "error: config: no such file:"),
    (["--cpu_devices=-1"], "error: cpu_devices: must be >= 0, got -1"),
    (["--config.warmup_steps=50"], "error: warmup_steps: 50 warm-up steps are more than steps"),
    (["--config.learning_rate=inf"], "error: learning_rate: must be a finite number, got inf"),
    (["--config.data.path=EMPTY"], "error: data.path: "),
])
def test_cli_bad_input_is_one_line(args, message, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    args = [a.replace("EMPTY", str(tmp_path / "empty.txt")) for a in args]
    res = run_cli(["train.py", "--config=configs/shakespeare_char.py:tiny",
                   f"--workdir={tmp_path / 'run'}", *args])
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith(message), res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command, message", [
    (["train.py", "--config.model.d_modle=64"],
     "error: model.d_modle: unknown config key in --config override; did you mean "
     "'model.d_model'?"),
    (["convert.py", "--from_hf=HF", "--workdir=RUN", "--config.mesh.dta=1"],
     "error: mesh.dta: unknown config key in --config override; did you mean 'mesh.data'?"),
])
def test_an_override_of_the_default_config_is_one_line(command, message, tmp_path):
    """Without --config, config_flags applies overrides while the flag is defined."""
    command = [a.replace("HF", str(tmp_path / "hf")).replace("RUN", str(tmp_path / "run"))
               for a in command]
    res = run_cli(command)
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [message], res.stderr


# The environment fails: a full disk, a read-only directory. Each is one line, nothing
# good is lost, and the next run works.

def test_a_full_disk_during_a_save_is_one_line_and_the_next_run_resumes(
        config, reference, tmp_path, monkeypatch):
    import errno

    import orbax.checkpoint as ocp

    from jaxlm.training.checkpoint import SaveFailed
    original = ocp.CheckpointManager.save

    def full_at_8(self, step, *args, **kwargs):
        if step == 8:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/checkpoints/8")
        return original(self, step, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, "save", full_at_8)
    with pytest.raises(SaveFailed, match=r"saving a checkpoint in .* failed: /x/checkpoints/8: "
                                         r"No space left on device; free some space and run "
                                         r"the same command again: it resumes from step 4$"):
        trainer.train(config, tmp_path / "run", one())
    assert steps_on_disk(tmp_path / "run") == [4]
    monkeypatch.undo()
    assert trainer.train(config, tmp_path / "run", one())["step"] == STEPS
    assert records(tmp_path / "run") == reference


def test_init_and_export_from_a_damaged_latest_checkpoint_use_the_one_before_unmoved(
        config, tmp_path, capsys):
    from jaxlm.checkpoints.hf_export import export_hf
    config.steps, config.model.mlp = 8, "swiglu"  # Llama's MLP: the run exports
    run = tmp_path / "run"
    trainer.train(config, run, one())
    _truncate_every_chunk(run, 8)
    capsys.readouterr()
    assert export_hf(run, tmp_path / "hf", devices=one())["step"] == 4
    warning = f"warning: checkpoint step 8 in {run / 'checkpoints'} does not restore ("
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(warning) and err[0].endswith("; using step 4")

    new = config.copy_and_resolve_references()
    new.init.from_workdir, new.steps = str(run), 4
    assert trainer.train(new, tmp_path / "new", one())["step"] == 4
    out = capsys.readouterr().out
    assert warning in out and f"Starting from the parameters of {run} (step 4)" in out
    assert steps_on_disk(run) == [4, 8]  # another run's checkpoints are never moved
    assert not (run / "damaged_checkpoints").exists()

    _truncate_every_chunk(run, 4)
    with pytest.raises(RunError, match=r"no checkpoint in .* restores .*step 8 .*step 4 "):
        trainer.train(new, tmp_path / "newer", one())
    res = run_cli(["convert.py", f"--to_hf={tmp_path / 'hf2'}", f"--workdir={run}"])
    lines = res.stderr.strip().splitlines()  # no orbax log or traceback
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: no checkpoint in {run / 'checkpoints'} restores (")
    assert steps_on_disk(run) == [4, 8]


_TRAIN = """
import json, sys
import jax
import ml_collections
from jaxlm.training import trainer
config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
trainer.train(config, sys.argv[2], jax.devices()[:1])
"""


def test_the_abandoned_reads_of_a_damaged_checkpoint_print_nothing(config, tmp_path,
                                                                    monkeypatch):
    run = tmp_path / "run"
    _stopped_at(config, run, 8, monkeypatch)
    for f in (run / "checkpoints" / "8" / "state").glob("**/d/*"):
        f.unlink()  # every array chunk of the latest step: many reads fail at once
    res = run_cli(["-c", _TRAIN, config.to_json(), str(run)])
    assert res.returncode == 0, res.stderr
    assert "checkpoint step 8" in res.stdout and "using step 4" in res.stdout
    assert "Event loop is closed" not in res.stderr, res.stderr
    assert "Exception ignored" not in res.stderr, res.stderr


def test_environment_errors_are_found_behind_other_exceptions():
    import errno

    from jaxlm.configs.errors import environment_error, environment_message
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "/run/eval")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as e:
        found = environment_error(e)
    assert environment_message(found) == ("/run/eval: Permission denied; make it writable or "
                                          "use another directory and run the same command "
                                          "again")
    store = ValueError("RESOURCE_EXHAUSTED: Failed to write: No space left on device")
    assert environment_error(store).errno == errno.ENOSPC
    assert environment_error(ValueError("a bug")) is None


def test_a_non_finite_eval_loss_is_an_error_not_a_number():
    import jax.numpy as jnp

    from jaxlm.training.evaluate import NonFiniteEval, _result
    with pytest.raises(NonFiniteEval, match="eval_loss is nan"):
        _result(jnp.float32(np.nan), jnp.float32(4.0), 10.0)
    assert _result(jnp.float32(4.0), jnp.float32(4.0), 10.0)["eval_loss"] == 1.0


def test_eval_prints_its_result_before_saving_it_and_a_failed_save_is_one_line(
        config, tmp_path, monkeypatch, capsys):
    import errno

    from jaxlm.evaluation import modes
    config.steps = 4
    trainer.train(config, tmp_path / "run", one())
    capsys.readouterr()

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
    monkeypatch.setattr(Path, "write_text", read_only)
    with pytest.raises(RunError, match=r"the result printed above was not saved: .*step_4.json: "
                                       r"Read-only file system"):
        modes.run(EvalRequest.parse({"workdir": str(tmp_path / "run")}))
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["step"] == 4 and np.isfinite(printed["eval_loss"])


def test_wandb_without_an_api_key_is_one_line_before_anything_is_built(config, tmp_path,
                                                                        monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    config.log.wandb_project = "p"
    with pytest.raises(ConfigError, match=r"log.wandb_project: wandb has no API key: run "
                                          r"`wandb login`, set WANDB_API_KEY, or set "
                                          r"WANDB_MODE=offline"):
        trainer.train(config, tmp_path / "run", one())
    assert not (tmp_path / "run" / "data").exists()
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password k\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    from jaxlm.training.metrics import has_wandb_login
    assert has_wandb_login()


@pytest.mark.parametrize("fault", ["sigterm", "ctrl_c", "disk_full"])
def test_data_prepare_stopped_or_out_of_space_is_one_line_and_leaves_no_output(
        fault, tmp_path, monkeypatch):
    import errno

    from jaxlm.data.prepare import build, is_prepared
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)))
    out = tmp_path / "out"
    original = build._write

    def failing_write(*args, **kwargs):
        if fault == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif fault == "ctrl_c":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "train_0.bin"))
    monkeypatch.setattr(build, "_write", failing_write)
    argv = ["-m", "jaxlm.data.prepare", "--input", str(corpus), "--output", str(out),
            "--workers", "0", "--quiet"]
    handler = signal.getsignal(signal.SIGTERM)
    stopped = call_cli(argv)
    message = stopped.stderr.strip()
    assert stopped.returncode == 1
    if fault == "disk_full":
        assert message == (f"error: {out / 'train_0.bin'}: No space left on device; free some "
                           "space and run the same command again")
    else:
        assert message == (f"interrupted ({'SIGTERM' if fault == 'sigterm' else 'Ctrl-C'}): "
                           f"{out} was not prepared; run the same command again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]
    assert signal.getsignal(signal.SIGTERM) is handler  # restored
    monkeypatch.setattr(build, "_write", original)
    assert call_cli(argv).returncode == 0  # the next run works
    assert is_prepared(out)


def test_a_text_field_of_another_type_is_named_as_such():
    from jaxlm.data.readers import Task, parse_task
    rows = parse_task(Task("parquet", "t.parquet", [5], [1], 1), "text")
    assert rows.error == ("--text_field", "t.parquet: row 1 has no text in column 'text' "
                                          "(int 5, not text)")
    lines = parse_task(Task("jsonl", "t.jsonl", [b'{"text": 3}'], [1], 1), "text")
    assert lines.error == ("--text_field", "t.jsonl:1: field 'text' is a JSON number, not a "
                                           "string")


# Runs record what their tokens mean (data/fingerprints.py).

def _text(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


TEXT = "To be, or not to be, that is the question: whether 'tis nobler.\n" * 60


def test_a_text_edited_since_the_run_is_refused_by_resume_and_eval(config, tmp_path):
    """The same data.path with other content: a shifted character vocabulary."""
    config.steps, config.checkpoint_every = 2, 2
    config.data.path = _text(tmp_path / "input.txt", TEXT)
    run = tmp_path / "run"
    trainer.train(config, run, one())
    record = json.loads((run / "fingerprints.json").read_text())
    assert record["tokenizer"]["kind"] == "char" and "sha256" in record["data"][0]
    meta = (run / "data" / "meta.json").read_text()
    _text(tmp_path / "input.txt", TEXT.replace("e", "\u00e9"))  # as many characters
    message = (f"data.path: {tmp_path / 'input.txt'} changed since the run in {run} "
               f"tokenized it (sha256 ")
    config.steps = 4
    with pytest.raises(ConfigError) as err:
        trainer.train(config, run, one(), allow_schedule_change=True)
    assert str(err.value).startswith(message)
    assert str(err.value).endswith("); restore it, or use a new --workdir")
    from jaxlm.evaluation.restore import restore_run
    with pytest.raises(ConfigError) as err:
        restore_run(run, devices=one())
    assert str(err.value).startswith(message)
    assert (run / "data" / "meta.json").read_text() == meta  # not tokenized again
    _text(tmp_path / "input.txt", TEXT)  # restored: the run goes on
    assert trainer.train(config, run, one(), allow_schedule_change=True)["step"] == 4


def test_a_prepared_set_rebuilt_since_the_run_is_refused(config, tmp_path):
    """--overwrite with other inputs: another vocabulary of the same size."""
    from jaxlm.data.prepare import prepare_corpus
    prepared = tmp_path / "prepared"

    def build(text: str) -> None:
        prepare_corpus([_text(tmp_path / "docs.txt", text)], prepared, tokenizer="char",
                       workers=0, progress=False, overwrite=True, split_blank_lines=True)
    docs = "".join(f"{i} {line}\n\n" for i, line in enumerate(TEXT.splitlines()))
    build(docs)
    config.steps, config.checkpoint_every = 2, 2
    config.model.mlp = "swiglu"  # a model Hugging Face can express, for the export
    config.data.path = str(prepared)
    trainer.train(config, tmp_path / "run", one())
    build(docs.replace("e", "\u00e9"))
    with pytest.raises(ConfigError) as err:
        trainer.train(config, tmp_path / "run", one())
    assert str(err.value).startswith(f"data.path: {prepared} was prepared again since the run "
                                     f"in {tmp_path / 'run'} trained on it (fingerprint ")
    from jaxlm.checkpoints.hf_export import export_hf
    with pytest.raises(ConfigError) as err:  # the export's tokenizer would be the new one
        export_hf(tmp_path / "run", tmp_path / "hf", devices=one())
    assert str(err.value).startswith(f"workdir: the tokenizer of {prepared} is not the one "
                                     f"the run in {tmp_path / 'run'} was trained with "
                                     f"(characters '\u00e9' added, 'e' missing)")
    assert not (tmp_path / "hf").exists()
    # The record is checked again where the data is read: a record of another tokenizer.
    (tmp_path / "run" / "fingerprints.json").write_text(json.dumps(
        {"tokenizer": {"kind": "char", "chars": "abc"}}))
    with pytest.raises(ConfigError, match=r"data.tokenizer: the tokenizer of .*prepared is not "
                                          r"the one the run in .* was trained with \(characters"):
        trainer.train(config, tmp_path / "run", one())


def test_a_run_without_a_record_is_accepted_and_recorded(config, tmp_path):
    config.steps, config.checkpoint_every = 2, 2
    trainer.train(config, tmp_path / "run", one())
    (tmp_path / "run" / "fingerprints.json").unlink()  # a run made before records existed
    config.steps = 4
    assert trainer.train(config, tmp_path / "run", one(), allow_schedule_change=True
                         )["step"] == 4
    record = json.loads((tmp_path / "run" / "fingerprints.json").read_text())
    assert set(record) == {"data", "tokenizer"}
