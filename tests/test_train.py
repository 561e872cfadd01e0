"""The training loop end to end: metrics, checkpoints, exact resume, SIGTERM, kill -9, eval."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxlm.training.metrics import WALL_CLOCK_KEYS
from tests.helpers import ROOT, run_cli
from jaxlm.training import trainer
from jaxlm.evaluation.restore import restore_run
from jaxlm.training.evaluate import evaluate


def read_metrics(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k not in WALL_CLOCK_KEYS}
            for ln in lines]


def one_device():
    return jax.devices()[:1]


@pytest.fixture
def loop_config(tiny_config):
    c = tiny_config
    c.steps, c.log_every, c.eval_every, c.checkpoint_every = 12, 1, 6, 4
    c.mesh.data = 1
    return c


def test_train_writes_metrics_checkpoints_and_config(loop_config, tmp_path):
    summary = trainer.train(loop_config, tmp_path, one_device())
    assert summary["step"] == 12 and not summary["interrupted"]
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert all({"loss", "learning_rate", "tokens_per_sec"} <= set(r) for r in train[1:])
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[-1]["eval_loss"] == pytest.approx(summary["eval_loss"])
    assert train[-1]["loss"] < train[0]["loss"]
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 8, 12]  # keep_checkpoints=3
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 12
    assert list((tmp_path / "tensorboard").iterdir())


def test_sigterm_saves_and_resume_is_exact(loop_config, tmp_path, monkeypatch):
    ref = trainer.train(loop_config, tmp_path / "ref", one_device())
    ref_params = restore_run(tmp_path / "ref", devices=one_device())[1].params

    write = trainer.MetricWriter.write

    def write_then_sigterm(self, step, **values):
        write(self, step, **values)
        if step == 5 and "loss" in values:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer.MetricWriter, "write", write_then_sigterm)
    first = trainer.train(loop_config, tmp_path / "run", one_device())
    assert first["interrupted"] and first["step"] < 12
    assert (tmp_path / "run" / "checkpoints" / str(first["step"])).is_dir()
    monkeypatch.undo()

    second = trainer.train(loop_config, tmp_path / "run", one_device())
    assert second["step"] == 12 and not second["interrupted"]
    assert read_metrics(tmp_path / "run") == read_metrics(tmp_path / "ref")
    params = restore_run(tmp_path / "run", devices=one_device())[1].params
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
                 jax.device_get(ref_params))
    assert second["eval_loss"] == ref["eval_loss"]


def test_resume_rejects_a_changed_model(loop_config, tmp_path):
    from jaxlm.configs.errors import ConfigError
    loop_config.steps = 2
    trainer.train(loop_config, tmp_path, one_device())
    loop_config.model.d_model = 64
    with pytest.raises(ConfigError, match="model.d_model: is 64 but the run in"):
        trainer.train(loop_config, tmp_path, one_device())


@pytest.mark.slow
def test_kill_9_then_rerun_continues_from_last_checkpoint(tmp_path):
    args = ["train.py", "--config=configs/shakespeare_char.py:tiny", "--config.steps=300",
            "--config.checkpoint_every=5", "--config.log_every=10", "--config.eval_every=0",
            "--config.keep_checkpoints=2"]
    ref = run_cli(args + [f"--workdir={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *args, f"--workdir={run}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(
            p.name.isdigit() and int(p.name) >= 20 for p in (run / "checkpoints").glob("*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name) for p in (run / "checkpoints").glob("*") if p.name.isdigit())
    assert killed_at < 300, "the run finished before it could be killed"

    res = run_cli(args + [f"--workdir={run}"])
    assert res.returncode == 0, res.stderr
    assert "Resumed from" in res.stderr + res.stdout
    assert read_metrics(run) == read_metrics(tmp_path / "ref")


@pytest.mark.slow
def test_eval_cli_prints_one_json_line_and_samples(loop_config, tmp_path):
    loop_config.steps = 4
    trainer.train(loop_config, tmp_path, one_device())
    res = run_cli(["eval.py", f"--workdir={tmp_path}", "--step=4"])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == {"step", "eval_loss", "perplexity", "num_tokens", "bits_per_byte"}
    assert result["step"] == 4 and result["num_tokens"] > 0
    # Tiny Shakespeare is ASCII: one character, one byte.
    assert result["bits_per_byte"] == pytest.approx(result["eval_loss"] / np.log(2), rel=1e-6)
    assert result["perplexity"] == pytest.approx(np.exp(result["eval_loss"]), rel=1e-6)
    assert json.loads((tmp_path / "eval" / "step_4.json").read_text()) == result

    res = run_cli(["eval.py", f"--workdir={tmp_path}", "--noeval", "--sample",
                   "--prompt=ROMEO:", "--length=40", "--top_k=5"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("--- prompt 'ROMEO:'\nROMEO:")
    assert len(res.stdout.split("\n", 1)[1].rstrip("\n")) >= len("ROMEO:") + 30


def test_eval_matches_in_process_evaluation(loop_config, tmp_path):
    loop_config.steps = 3
    summary = trainer.train(loop_config, tmp_path, one_device())
    exp, state, step = restore_run(tmp_path, devices=one_device())
    assert step == 3
    assert evaluate(exp, state.params)["eval_loss"] == pytest.approx(summary["eval_loss"],
                                                                    rel=1e-6)


@pytest.mark.slow
def test_eval_cli_errors_on_workdir_without_checkpoints(tmp_path):
    res = run_cli(["eval.py", f"--workdir={tmp_path}"])
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: workdir:")
