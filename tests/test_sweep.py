"""Sweeps: expansion, errors, device slots, the SLURM script, and a tiny sweep that trains."""

import csv
import json
import math
import os
import signal
import subprocess
import textwrap

import jax
import pytest

from jaxlm.configs import sweep_utils as su
from jaxlm.configs.errors import ConfigError
from jaxlm.sweeps.report import columns, dry_run_text
from jaxlm.sweeps.runner import make_slots, run_sweep, worker_command
from jaxlm.sweeps.slurm import emit_slurm
from jaxlm.sweeps.spec import load_sweep, split_cli_overrides
from tests.helpers import ROOT, call_cli, run_cli

TINY_SWEEP = '''
from jaxlm.configs import sweep_utils as su
from jaxlm.configs.shakespeare_char import get_config as base

def get_config(arg=None):
    c = base("tiny")
    c.steps, c.eval_every, c.checkpoint_every, c.log_every = 6, 3, 3, 1
    c.eval_max_batches = 1
    return c

def get_sweep(arg=None):
    return su.axis("model.num_layers", [1, 2]) + [su.named("broken", {{"data.path": "{bad}"}})]
'''


def write_sweep(tmp_path, body: str, name: str = "my_sweep.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


# Expansion.

def test_axis_product_and_zip_give_names_and_overrides():
    width = su.zip(su.axis("model.d_model", [64, 128]), su.axis("model.d_ff", [256, 512]))
    assert width == [("d_model=64,d_ff=256", {"model.d_model": 64, "model.d_ff": 256}),
                     ("d_model=128,d_ff=512", {"model.d_model": 128, "model.d_ff": 512})]
    grid = su.product(su.axis("learning_rate", [3e-4, 1e-3], label="lr"),
                      su.axis("warmup_steps", [0, 100], label="warmup"))
    assert [v.name for v in grid] == ["lr=0.0003,warmup=0", "lr=0.0003,warmup=100",
                                      "lr=0.001,warmup=0", "lr=0.001,warmup=100"]
    assert grid[1].overrides == {"learning_rate": 3e-4, "warmup_steps": 100}
    three = su.product(width, su.axis("model.num_layers", [1, 2]), [su.named("", {})])
    assert len(three) == 4 and three[3].name == "d_model=128,d_ff=512,num_layers=2"
    assert su.axis("model.tie_embeddings", [True])[0].name == "tie_embeddings=true"
    with pytest.raises(ValueError, match="different lengths"):
        su.zip(su.axis("a", [1, 2]), su.axis("b", [1]))
    with pytest.raises(ValueError, match="'seed' is set by two combined axes"):
        su.product(su.axis("seed", [1]), su.axis("seed", [2]))


def test_load_sweep_resolves_every_variant(tmp_path):
    path = write_sweep(tmp_path, TINY_SWEEP.format(bad="/no/such/corpus.txt"))
    sweep = load_sweep(f"{path}")
    assert [v.name for v in sweep.variants] == ["num_layers=1", "num_layers=2", "broken"]
    assert [v.config.model.num_layers for v in sweep.variants] == [1, 2, 2]
    assert sweep.variants[2].config.data.path == "/no/such/corpus.txt"
    assert sweep.base.model.num_layers == 2  # the base is not modified
    assert sweep.override_keys() == ["model.num_layers", "data.path"]
    assert columns(sweep) == ["name", "status", "model.num_layers", "data.path", "step",
                              "final_train_loss", "best_eval_loss", "best_eval_step",
                              "final_eval_loss", "tokens_per_sec", "num_params",
                              "wall_seconds", "error"]
    text = dry_run_text(sweep, tmp_path / "out")
    assert "num_layers=2  model.num_layers=2  [new]" in text
    assert '"num_layers": 1' in text and not (tmp_path / "out").exists()


def test_command_line_overrides_change_the_base_of_every_variant(tmp_path):
    path = write_sweep(tmp_path, TINY_SWEEP.format(bad="/no/such/corpus.txt"))
    argv, overrides = split_cli_overrides(["sweep.py", f"--config={path}", "--config.steps=2",
                                           "--config.model.num_layers=3",
                                           "--config.model.tie_embeddings=false"])
    assert argv == ["sweep.py", f"--config={path}"]
    sweep = load_sweep(f"{path}:arg", overrides)
    assert sweep.arg == "arg" and sweep.name == "my_sweep_arg"
    assert [v.config.steps for v in sweep.variants] == [2, 2, 2]
    assert [v.config.model.num_layers for v in sweep.variants] == [1, 2, 3]  # the axis wins
    assert not any(v.config.model.tie_embeddings for v in sweep.variants)
    slot = make_slots(1, "cpu", 1, cores=[0])[0]
    command = worker_command(sweep, tmp_path / "out", "broken", slot)
    assert command[command.index("--variant=broken") + 1:][:3] == list(overrides)


@pytest.mark.parametrize("arg, message", [
    ("--config.stesp=2", "stesp: unknown config key in --config override; did you mean "
                         "'steps'?"),
    ("--config.steps=two", "steps: expected an int (--config override), got 'two'"),
    ("--config.steps", "steps: an override needs a value: --config.KEY=VALUE"),
])
def test_bad_command_line_overrides_are_one_line(tmp_path, arg, message):
    path = write_sweep(tmp_path, TINY_SWEEP.format(bad="/no/such/corpus.txt"))
    with pytest.raises(ConfigError) as err:
        load_sweep(str(path), split_cli_overrides(["sweep.py", arg])[1])
    assert str(err.value) == message


def test_shipped_sweeps_expand():
    wd = load_sweep(str(ROOT / "configs/sweep_width_depth.py"))
    assert len(wd.variants) == 6 and wd.variants[0].name == "d_model=32,d_ff=128,num_layers=1"
    assert all(v.config.model.d_ff == 4 * v.config.model.d_model for v in wd.variants)
    assert len(load_sweep(str(ROOT / "configs/sweep_width_depth.py:smoke")).variants) == 4
    lr = load_sweep(str(ROOT / "configs/sweep_lr_warmup.py"))
    assert len(lr.variants) == 9
    assert all(v.config.min_learning_rate <= v.config.learning_rate for v in lr.variants)
    # The Pallas kernel lands on another branch: only the expansion is checked here.
    from jaxlm.configs import sweep_attention
    assert [v.name for v in sweep_attention.get_sweep()] == ["attention=xla",
                                                             "attention=pallas_interpret"]


@pytest.mark.parametrize("body, message", [
    ("su.axis('model.d_modle', [1])", "model.d_modle: unknown config key in sweep variant "
                                      "'d_modle=1' of bad.py; did you mean 'model.d_model'?"),
    ("su.axis('model.d_model', ['wide'])", "model.d_model: cannot set 'wide'"),
    ("su.axis('model', [1])", "model: is a section, not a value"),
    ("su.axis('model.num_kv_heads', [3])", "model.num_kv_heads: num_heads 4 is not divisible "
                                           "by num_kv_heads 3 (sweep variant"),
    ("[su.named('a'), su.named('a')]", "sweep: two variants are named 'a'"),
    ("[su.named('a b')]", "sweep: variant name 'a b' may only use"),
    ("[]", "sweep: get_sweep in"),
    ("su.zip(su.axis('seed', [1, 2]), su.axis('steps', [1]))", "config: "),
])
def test_bad_sweeps_raise_config_errors(tmp_path, body, message):
    path = write_sweep(tmp_path, f"""
        from jaxlm.configs import sweep_utils as su
        from jaxlm.configs.base import get_base_config
        def get_config(arg=None):
            return get_base_config()
        def get_sweep(arg=None):
            return {body}
        """, "bad.py")
    with pytest.raises(ConfigError) as err:
        load_sweep(str(path))
    assert message in str(err.value)


def test_config_file_with_an_undeclared_key_is_an_error(tmp_path):
    path = write_sweep(tmp_path, """
        from jaxlm.configs import sweep_utils as su
        from jaxlm.configs.base import get_base_config
        def get_config(arg=None):
            c = get_base_config()
            c.model.widht = 64
            return c
        def get_sweep(arg=None):
            return su.axis("seed", [1])
        """, "extra.py")
    with pytest.raises(ConfigError, match="model.widht: unknown config key"):
        load_sweep(str(path))


def test_config_without_get_sweep_is_an_error():
    with pytest.raises(ConfigError, match="config: .*shakespeare_char.py defines no "
                                          r"get_sweep\(arg\)"):
        load_sweep(str(ROOT / "configs/shakespeare_char.py"))


def test_cli_unknown_override_key_is_one_error_line(tmp_path):
    path = write_sweep(tmp_path, """
        from jaxlm.configs import sweep_utils as su
        from jaxlm.configs.shakespeare_char import get_config
        def get_sweep(arg=None):
            return su.axis("model.d_modle", [32, 64])
        """)
    res = call_cli(["sweep.py", f"--config={path}:tiny", f"--workdir={tmp_path / 'out'}"])
    assert res.returncode == 1 and "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1] == ("error: model.d_modle: unknown config key in sweep variant "
                         "'d_modle=32' of my_sweep.py; did you mean 'model.d_model'?")
    assert not (tmp_path / "out").exists()


# Running.

def test_device_slots_are_disjoint():
    slots = make_slots(2, "cpu", 1, cores=[0, 1, 2, 3])
    assert [s.cpus for s in slots] == [[0, 1], [2, 3]] and slots[0].flags == []
    slots = make_slots(2, "cpu", 8, cpu_devices=8, cores=[0, 1])
    assert [s.cpus for s in slots] == [[0], [1]]
    assert all(s.flags == ["--cpu_devices=4"] for s in slots)
    sweep = load_sweep(str(ROOT / "configs/sweep_width_depth.py:smoke"))
    cmd = worker_command(sweep, ROOT / "w", "x", slots[1], python="py")
    assert cmd[-3:] == ["--variant=x", "--cpu_devices=4", "--cpu_affinity=1"]
    assert all(s.cpus is None for s in make_slots(3, "cpu", 1, cores=[0, 1]))  # shared
    slots = make_slots(2, "gpu", 4, visible=["0", "1", "2", "3"])
    assert [s.env for s in slots] == [{"CUDA_VISIBLE_DEVICES": "0,1"},
                                      {"CUDA_VISIBLE_DEVICES": "2,3"}]
    with pytest.raises(ConfigError, match="parallel: 4 GPUs cannot be split into 3"):
        make_slots(3, "gpu", 4)
    with pytest.raises(ConfigError, match="cpu_devices: 8 fake CPU devices cannot be split"):
        make_slots(3, "cpu", 8, cpu_devices=8)
    with pytest.raises(ConfigError, match="parallel: splitting tpu devices"):
        make_slots(2, "tpu", 8)


def test_slurm_script_is_well_formed(tmp_path):
    sweep = load_sweep(str(ROOT / "configs/sweep_width_depth.py:smoke"))
    path = emit_slurm(sweep, tmp_path / "sweep", sbatch_options=["--gres=gpu:1"])
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash" and os.access(path, os.X_OK)
    # sbatch reads #SBATCH lines only before the first command.
    first_command = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert all(i < first_command for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))
    assert "#SBATCH --array=0-3" in lines and "#SBATCH --gres=gpu:1" in lines
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    # Task 2 runs variant 2 through `sweep.py --variant` (PYTHON replaced by a recorder).
    recorder = tmp_path / "python"
    recorder.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$RECORD"\n')
    recorder.chmod(0o755)
    env = dict(os.environ, PYTHON=str(recorder), SLURM_ARRAY_TASK_ID="2",
               RECORD=str(tmp_path / "args"))
    assert subprocess.run(["bash", str(path)], env=env).returncode == 0
    args = (tmp_path / "args").read_text().splitlines()
    assert args == [str(ROOT / "sweep.py"), f"--config={ROOT / 'configs/sweep_width_depth.py'}"
                    ":smoke", f"--workdir={tmp_path / 'sweep'}",
                    f"--variant={sweep.variants[2].name}"]


def test_a_worker_that_dies_is_recorded_as_failed(tmp_path):
    sweep = load_sweep(str(ROOT / "configs/sweep_width_depth.py:smoke"))
    sweep.variants = sweep.variants[:2]
    crash = tmp_path / "crash.sh"
    crash.write_text("#!/bin/bash\necho 'some output'\necho 'Killed' >&2\nexit 137\n")
    crash.chmod(0o755)
    status = run_sweep(sweep, tmp_path / "out", parallel=2, cpu_devices=2, python=str(crash),
                       log=lambda m: 0)
    assert status == {v.name: "failed" for v in sweep.variants}
    result = json.loads((tmp_path / "out" / sweep.variants[0].name /
                         "sweep_result.json").read_text())
    assert result["error"] == "exit code 137: Killed"


def _read_jsonl(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


@pytest.mark.slow
def test_tiny_sweep_resumes_skips_records_failures_and_reports(tmp_path, monkeypatch):
    """Variant 1 finished, variant 2 half-trained, variant 3 broken: one more run of the
    sweep trains only what is missing, records the failure, and writes the tables."""
    from jaxlm.sweeps.worker import run_variant
    from jaxlm.training.experiment import Experiment
    from jaxlm.training.hooks import Progress
    from jaxlm.training.trainer import train
    from jaxlm.models.model import count_params

    path = write_sweep(tmp_path, TINY_SWEEP.format(bad="/no/such/corpus.txt"))
    sweep = load_sweep(str(path))
    out = tmp_path / "out"
    one = jax.devices()[:1]
    assert run_variant(sweep, "num_layers=1", str(out), log=lambda m: 0,
                       devices=one)["status"] == "ok"
    done_metrics = (out / "num_layers=1" / "metrics.jsonl").read_text()
    with monkeypatch.context() as m:  # a SIGTERM during step 2: stops after step 3
        advance = Progress.on_step

        def advance_then_sigterm(self, info):
            advance(self, info)
            if info.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        m.setattr(Progress, "on_step", advance_then_sigterm)
        assert train(sweep.variant("num_layers=2").config, out / "num_layers=2", one)[
            "step"] == 3

    res = run_cli(["sweep.py", f"--config={path}", f"--workdir={out}", "--parallel=2"])
    assert res.returncode == 1, res.stdout + res.stderr
    assert "[num_layers=1] finished earlier; skipping." in res.stdout
    assert "[num_layers=2] resuming" in res.stdout
    assert res.stderr.strip().splitlines()[-1] == "1 of 3 variants did not finish: broken"
    assert (out / "num_layers=1" / "metrics.jsonl").read_text() == done_metrics
    assert "Resumed from" in (out / "num_layers=2" / "sweep.log").read_text()

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert list(rows[0]) == columns(sweep)
    assert [r["name"] for r in rows] == ["num_layers=1", "num_layers=2", "broken"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert rows[2]["error"] == "data.path: no such file or directory: /no/such/corpus.txt"
    assert rows[2]["final_eval_loss"] == "" and rows[2]["data.path"] == "/no/such/corpus.txt"
    for row, layers in zip(rows[:2], (1, 2)):
        records = _read_jsonl(out / row["name"] / "metrics.jsonl")
        train_losses = [r["loss"] for r in records if "loss" in r]
        evals = [r["eval_loss"] for r in records if "eval_loss" in r]
        final = json.loads((out / row["name"] / "eval" / "step_6.json").read_text())
        assert row["model.num_layers"] == str(layers) and row["step"] == "6"
        assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
        assert float(row["final_train_loss"]) == pytest.approx(train_losses[-1])
        assert float(row["final_eval_loss"]) == pytest.approx(final["eval_loss"])
        assert float(row["best_eval_loss"]) == pytest.approx(min(evals + [final["eval_loss"]]))
        assert float(row["tokens_per_sec"]) > 0 and float(row["wall_seconds"]) > 0
        config = sweep.variant(row["name"]).config
        expected = count_params(Experiment.build(config, out / row["name"],
                                                 one).abstract_state.params)
        assert int(row["num_params"]) == expected
        assert math.isfinite(float(row["final_eval_loss"]))
    md = (out / "results.md").read_text()
    assert "| name | status | model.num_layers | data.path | step | final_train_loss |" in md
    assert "| broken | failed |" in md and "no such file or directory" in md
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "out" / "broken" / "checkpoints").exists()
