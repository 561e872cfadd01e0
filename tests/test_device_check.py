"""benchmarks/device_check.sh: the report of its stages, and every stage on CPU (--cpu_smoke)."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.device_check_report import collect, main
from tests.helpers import ROOT


def _write_stages(out, rcs):
    out.mkdir(exist_ok=True)
    (out / "stages.tsv").write_text("".join(f"{name}\t{rc}\t5\t60\n" for name, rc in rcs))
    (out / "device.json").write_text(json.dumps({"backend": "gpu", "device_kind": "NVIDIA H200",
                                                 "count": 1, "jax": "0.10.2"}))
    (out / "train.jsonl").write_text(json.dumps(
        {"config": "125m", "num_params": 124_000_000, "batch_size": 16, "seq_len": 1024,
         "dtype": "bfloat16", "step_ms": 100.0, "tokens_per_sec": 163_840,
         "model_tflop_per_s_per_device": 400.0, "mfu": 0.404, "compile_s": 20.0}) + "\n")


def test_report_fails_loudly_and_keeps_partial_rows(tmp_path, capsys):
    _write_stages(tmp_path, [("device", 0), ("kernels", 1), ("attention", 0), ("train", 124)])
    report = collect(tmp_path)
    assert not report["ok"]
    statuses = {name: s["status"] for name, s in report["stages"].items()}
    assert statuses == {"device": "ok", "kernels": "failed (exit 1)", "attention": "ok",
                        "train": "timed out"}
    assert report["stages"]["train"]["rows"][0]["mfu"] == 0.404  # measured before the timeout
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "stage 'kernels' failed (exit 1)" in err and "stage 'train' timed out" in err
    md = (tmp_path / "device_check.md").read_text()
    assert "**FAILED**" in md and "| 125m | 124,000,000 | 16 x 1024 | bfloat16 |" in md
    assert "40.4%" in md
    assert json.loads((tmp_path / "device_check.json").read_text())["ok"] is False


def test_report_of_a_stage_that_did_not_run(tmp_path):
    _write_stages(tmp_path, [("device", 1)])
    report = collect(tmp_path)
    assert report["stages"]["train"]["status"] == "did not run" and not report["ok"]


def _run_check(out, *args):
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(ROOT / ".pytest_cache" / "xla"))
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), str(out),
                           *args], capture_output=True, text=True, timeout=480, env=env)


def test_without_an_accelerator_the_check_fails_at_once(tmp_path):
    result = _run_check(tmp_path)
    assert result.returncode == 1
    assert "error: no GPU or TPU" in result.stdout + result.stderr
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["stages"]["kernels"]["status"] == "did not run"


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage(tmp_path):
    result = _run_check(tmp_path, "--cpu_smoke")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["ok"] and report["device"]["cpu_smoke"]
    stages = report["stages"]
    assert all(s["status"] == "ok" for s in stages.values())
    assert len(stages["kernels"]["rows"]) == 3 and all(r["ok"] for r in stages["kernels"]["rows"])
    assert {r["impl"] for r in stages["attention"]["rows"]} == {"ours", "xla"}
    assert all(r["fwd_bwd_tflops"] > 0 for r in stages["attention"]["rows"])
    assert [r["config"] for r in stages["train"]["rows"]] == ["smoke_dense", "smoke_moe"]
    assert all(r["tokens_per_sec"] > 0 for r in stages["train"]["rows"])
    assert "all stages passed" in (tmp_path / "device_check.md").read_text()
