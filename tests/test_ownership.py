"""Commands that write a directory own it: its lock, its kind, staging, clean-up on failure;
config.json only when the run trains; a sweep variant keeps its recorded config."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import jax
import pytest

from jaxlm.checkpoints import hf_import
from jaxlm.checkpoints.hf_export import export_hf
from jaxlm.configs.errors import ConfigError
from jaxlm.data.prepare import META, prepare
from jaxlm.storage import dirs
from jaxlm.sweeps.results import check_recorded_config
from jaxlm.training import rundir, trainer
from tests.helpers import ROOT, call_cli


def one():
    return jax.devices()[:1]


def _text(tmp_path, name="story.txt", n=40):
    path = tmp_path / name
    path.write_text("To be, or not to be, that is the question.\n" * n)
    return path


def test_export_into_a_run_directory_is_refused_and_the_run_still_resumes(tiny_config,
                                                                          tmp_path):
    tiny_config.model.mlp, tiny_config.steps = "swiglu", 2
    trainer.train(tiny_config, tmp_path / "run", one())
    saved = (tmp_path / "run" / "config.json").read_text()
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="to_hf: .*run's directory, which is never "
                                              "replaced"):
            export_hf(tmp_path / "run", tmp_path / "run", devices=one(), overwrite=overwrite)
    assert (tmp_path / "run" / "config.json").read_text() == saved
    tiny_config.steps = 3
    assert trainer.train(tiny_config, tmp_path / "run", one(),
                         allow_schedule_change=True)["step"] == 3
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="to_hf: .*junk is not empty and is not a Hugging"):
        export_hf(tmp_path / "run", tmp_path / "junk", devices=one())
    export_hf(tmp_path / "run", tmp_path / "out", devices=one())
    with pytest.raises(ConfigError, match="to_hf: .*pass --overwrite"):
        export_hf(tmp_path / "run", tmp_path / "out", devices=one())
    export_hf(tmp_path / "run", tmp_path / "out", devices=one(), overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_import_into_a_locked_workdir_is_refused(tmp_path):
    with dirs.lock(tmp_path / "run"):
        with pytest.raises(ConfigError, match=r"workdir: .* is in use by another run \(host"):
            with dirs.new_run(tmp_path / "run"):
                pass
    assert [p.name for p in (tmp_path / "run").iterdir()] == [dirs.LOCK_FILE]


def test_a_failed_import_leaves_nothing_that_blocks_the_rerun(tmp_path, monkeypatch):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100,
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}))
    (hf / "tokenizer_config.json").write_text("{}")
    monkeypatch.setattr(hf_import, "SafetensorsReader", lambda d: None)

    def fail(*args):
        raise ConfigError("from_hf", "the checkpoint has no tensor x")
    monkeypatch.setattr(hf_import, "place_params", fail)
    from jaxlm.configs.base import get_base_config
    for _ in range(2):  # the rerun fails the same way, not on the first one's leftovers
        with pytest.raises(ConfigError, match="from_hf: the checkpoint has no tensor x"):
            hf_import.import_hf(hf, tmp_path / "run", get_base_config(), one())
        assert not (tmp_path / "run").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f").write_text("x")
    with pytest.raises(ConfigError, match="workdir: .*other is not empty"):
        hf_import.import_hf(hf, tmp_path / "other", get_base_config(), one())
    # A killed import leaves its marker: train.py refuses, the next import clears it.
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / dirs.INCOMPLETE).write_text("host h, pid 1")
    (tmp_path / "killed" / "hf").mkdir()
    with pytest.raises(ConfigError, match="workdir: .*half-written by an import"):
        dirs.check_complete(tmp_path / "killed")
    with dirs.new_run(tmp_path / "killed"):
        assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == [
            dirs.INCOMPLETE, dirs.LOCK_FILE]


def prepare_main(*args: str):
    return call_cli(["-m", "jaxlm.data.prepare", *args])


def test_prepare_refuses_unrelated_other_settings_and_concurrent_outputs(tmp_path, capsys):
    text = _text(tmp_path)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("mine")
    refused = prepare_main(f"--input={text}", f"--output={tmp_path / 'home'}")
    assert re.fullmatch(r"error: --output: .*home is not empty and is not a prepared data "
                        r"directory.*\n", refused.stderr)
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["thesis.tex"]
    assert prepare_main(f"--input={text}", f"--output={tmp_path / 'out'}",
                        "--tokenizer=char").returncode == 0
    before = (tmp_path / "out" / META).read_text()
    refused = prepare_main(f"--input={text}", f"--output={tmp_path / 'out'}", "--tokenizer=byte")
    assert re.fullmatch(r"error: --output: .*made from other inputs or settings; pass "
                        r"--overwrite.*\n", refused.stderr)
    assert (tmp_path / "out" / META).read_text() == before
    with dirs.output_lock(tmp_path / "new"):  # what a concurrent data.prepare holds
        with pytest.raises(ConfigError, match=r"--output: .*new is in use by another process"
                                              r".*; wait for it to finish or use another "
                                              r"--output$"):
            prepare(text, tmp_path / "new", tokenizer="byte")
    assert not (tmp_path / "new").exists()
    assert prepare_main(f"--input={text}", f"--output={tmp_path / 'out'}", "--tokenizer=byte",
                        "--overwrite").returncode == 0
    assert json.loads((tmp_path / "out" / META).read_text())["tokenizer"]["kind"] == "byte"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


_KILLED_CHILD = textwrap.dedent("""
    import os, signal, sys
    from jaxlm.data import prepare as p
    from jaxlm.data.prepare import build
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    build.train_bpe = die  # mid-way: after the staging directory exists
    p.prepare(sys.argv[1], sys.argv[2], tokenizer="bpe", vocab_size=300, overwrite=True)
""")


def test_kill_9_mid_prepare_leaves_the_old_output_intact(tmp_path):
    text = _text(tmp_path)
    out = prepare(text, tmp_path / "out", tokenizer="char")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    r = subprocess.run([sys.executable, "-c", _KILLED_CHILD, str(text), str(out)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert r.returncode == -signal.SIGKILL
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()
                  if p.name.startswith(".")) == [".out.lock", ".out.partial"]
    prepare(text, out, tokenizer="byte", overwrite=True)  # cleans up the dead one's
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_finished_run_rerun_with_another_rate_keeps_its_config(tiny_config, tmp_path):
    tiny_config.steps = 2
    trainer.train(tiny_config, tmp_path / "run", one())
    saved = (tmp_path / "run" / "config.json").read_text()
    tiny_config.learning_rate = tiny_config.learning_rate * 3
    assert trainer.train(tiny_config, tmp_path / "run", one())["step"] == 2
    assert (tmp_path / "run" / "config.json").read_text() == saved


def test_a_sweep_variant_of_another_recorded_config_is_an_error(tiny_config, tmp_path):
    from jaxlm.configs.sections import Config
    vdir = tmp_path / "lr"
    vdir.mkdir()
    rundir.save_config(Config.from_dict(tiny_config), vdir)
    check_recorded_config(vdir, "lr", tiny_config)  # its own config: resumed
    tiny_config.learning_rate = 0.5
    with pytest.raises(ConfigError, match=r"learning_rate: is 0.5 for variant lr, but .*lr "
                                          r"holds its run with"):
        check_recorded_config(vdir, "lr", tiny_config)
