"""Checkpoint evaluation: every kept step, other data with bits per character, errors."""

import csv
import json
import math

import jax
import numpy as np
import pytest

from jaxlm.configs.errors import ConfigError
from jaxlm.data.prepare import prepare
from tests.helpers import call_cli, run_cli
from jaxlm.training import trainer
from jaxlm.evaluation.restore import restore_run
from jaxlm.evaluation.suite import evaluate_checkpoints, load_eval_data
from jaxlm.training.evaluate import evaluate


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run with checkpoints at steps 2, 4 and 6."""
    from jaxlm.configs.shakespeare_char import get_config
    c = get_config("tiny")
    c.steps, c.checkpoint_every, c.eval_every, c.log_every = 6, 2, 3, 1
    c.mesh.data = 1
    workdir = tmp_path_factory.mktemp("run")
    trainer.train(c, workdir, jax.devices()[:1])
    return workdir


@pytest.mark.slow
def test_all_steps_cli_writes_summary_and_plot(run_dir):
    res = run_cli(["eval.py", f"--workdir={run_dir}", "--all_steps"])
    assert res.returncode == 0, res.stderr
    lines = [json.loads(ln) for ln in res.stdout.strip().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert all(set(r) == {"step", "eval_loss", "perplexity", "num_tokens", "bits_per_byte",
                          "bits_per_char"} for r in lines)
    rows = list(csv.DictReader((run_dir / "eval" / "summary.csv").open()))
    assert list(rows[0]) == ["step", "eval_loss", "perplexity", "bits_per_byte",
                             "bits_per_char", "num_tokens"]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    for row, line in zip(rows, lines):
        assert float(row["eval_loss"]) == pytest.approx(line["eval_loss"])
        assert float(row["bits_per_char"]) == pytest.approx(line["eval_loss"] / math.log(2))
        # ASCII text: a byte per character.
        assert float(row["bits_per_byte"]) == pytest.approx(float(row["bits_per_char"]))
        assert json.loads((run_dir / "eval" / f"step_{line['step']}.json").read_text()) == line
    assert lines[-1]["eval_loss"] < lines[0]["eval_loss"]
    assert (run_dir / "eval" / "eval_loss.png").read_bytes()[:4] == b"\x89PNG"
    # The same numbers as evaluating each checkpoint in-process.
    exp, state, _ = restore_run(run_dir, 4, jax.devices()[:1])
    assert lines[1]["eval_loss"] == pytest.approx(evaluate(exp, state.params)["eval_loss"],
                                                  rel=1e-5)


def test_other_text_and_prepared_data_with_bits_per_byte(run_dir, tmp_path):
    one = jax.devices()[:1]
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
    text_bytes = len(text.encode()) - 1  # every target once: all but the first character
    (tmp_path / "other.txt").write_text(text)
    results, out = evaluate_checkpoints(run_dir, "latest", str(tmp_path / "other.txt"), one)
    (r,) = results
    assert r["step"] == 6 and r["num_tokens"] == len(text) - 1  # every target, once
    assert r["bits_per_char"] == pytest.approx(r["eval_loss"] / math.log(2))
    assert r["bits_per_byte"] == pytest.approx(r["eval_loss"] * r["num_tokens"] / math.log(2)
                                               / text_bytes, rel=1e-6)
    assert r["perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
    assert out == run_dir / "eval" / "other"
    assert json.loads((out / "step_6.json").read_text()) == r

    # The same text, prepared into token files with the run's tokenizer: same loss.
    exp = restore_run(run_dir, devices=one)[0]
    assert load_eval_data(exp, tmp_path / "other.txt")[0].tolist() == \
        exp.data.tokenizer.encode(text).tolist()
    # A byte-level prepared set is another vocabulary.
    prepare(tmp_path / "other.txt", tmp_path / "bytes", tokenizer="byte")
    with pytest.raises(ConfigError, match="data: .*bytes was prepared with another tokenizer "
                                          r"than the run's \(a byte tokenizer, not char\)"):
        load_eval_data(exp, tmp_path / "bytes")
    # The run's own prepared directory: its whole validation split.
    results, out = evaluate_checkpoints(run_dir, [2], str(run_dir / "data"), one)
    assert results[0]["num_tokens"] == len(np.fromfile(run_dir / "data" / "val.bin",
                                                        np.uint16)) - 1
    assert out == run_dir / "eval" / "data_val"
    # The same split by its file; the training split by its file.
    by_file, _ = evaluate_checkpoints(run_dir, [2], str(run_dir / "data" / "val.bin"), one)
    assert by_file[0]["eval_loss"] == results[0]["eval_loss"]
    train, out = evaluate_checkpoints(run_dir, [2], str(run_dir / "data" / "train.bin"), one)
    assert train[0]["num_tokens"] == len(np.fromfile(run_dir / "data" / "train.bin",
                                                      np.uint16)) - 1
    assert out == run_dir / "eval" / "data_train"
    # Any other file of a prepared directory is not a split.
    with pytest.raises(ConfigError, match=r"data: .*meta.json is not a split of .*data: pass "
                                          r"the directory \(its validation split\), or its "
                                          r"train.bin or val.bin where a split is one file"):
        evaluate_checkpoints(run_dir, [2], str(run_dir / "data" / "meta.json"), one)


@pytest.mark.parametrize("content, message", [
    ("caf\u00e9 \u00e0 la cr\u00e8me", "data: {path}: character '\u00e9' is not in the "
                                       "tokenizer's vocabulary (the run's char tokenizer)"),
    ("a", "data: {path} has 1 tokens; at least 2 are needed"),
])
def test_bad_data_is_an_error(run_dir, tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        evaluate_checkpoints(run_dir, "latest", str(path), jax.devices()[:1])
    assert str(err.value) == message.format(path=path)


def test_workdir_without_checkpoints_is_an_error(tmp_path, run_dir):
    (tmp_path / "config.json").write_text((run_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match="workdir: .* has no checkpoints"):
        evaluate_checkpoints(tmp_path, "all", None, jax.devices()[:1])
    with pytest.raises(ConfigError, match="step: no checkpoint for step 5 in .*; have "
                                          r"\[2, 4, 6\]"):
        evaluate_checkpoints(run_dir, [5], None, jax.devices()[:1])
    res = call_cli(["eval.py", f"--workdir={tmp_path / 'nothing'}", "--all_steps"])
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (f"error: workdir: {tmp_path / 'nothing'} "
                                                   "has no config.json: not a training run")
