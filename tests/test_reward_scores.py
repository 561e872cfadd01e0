"""Scoring responses with a reward model: `eval.py --score_rewards` (evaluation/rewards.py)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config
from jaxlm.data.preference import make_pair, make_scored
from jaxlm.data.sft import BadRecord, make_example
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.evaluation.rewards import load_scoring_set
from jaxlm.training import rundir
from tests.helpers import call_cli

SEQ_LEN = 16


def _line(record) -> bytes:
    return json.dumps(record).encode()


def _pairs(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"{i}+{i % 7}=", "chosen": str(i + i % 7),
             "rejected": str(i + i % 7 + 1)} for i in range(n)]


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


# ----------------------------------------------------------------------------------------
# Fast: records, the scoring set, refusals before anything compiles.

def test_scored_records_are_the_sft_and_preference_examples():
    tok = ByteTokenizer()
    kw = dict(seq_len=None)
    [one] = make_scored(_line({"prompt": "1+2=", "response": "3"}), tok, None, **kw)
    [sft] = [make_example(_line({"prompt": "1+2=", "completion": "3"}), tok, None, **kw)]
    np.testing.assert_array_equal(one.tokens, sft.tokens)
    np.testing.assert_array_equal(one.weights, sft.weights)
    chat = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]
    [msgs] = make_scored(_line({"messages": chat}), tok, None, **kw)
    [with_response] = make_scored(_line({"prompt": chat[:1], "response": "3"}), tok, None, **kw)
    expected = make_example(_line({"messages": chat}), tok, None, **kw)
    for ex in (msgs, with_response):
        np.testing.assert_array_equal(ex.tokens, expected.tokens)
        np.testing.assert_array_equal(ex.weights, expected.weights)
    pair = {"prompt": "1+2=", "chosen": "3", "rejected": "4"}
    for ours, theirs in zip(make_scored(_line(pair), tok, None, **kw),
                            make_pair(_line(pair), tok, None, **kw), strict=True):
        np.testing.assert_array_equal(ours.tokens, theirs.tokens)
    for record, reason in (({"prompt": "a", "response": "b", "completion": "c"},
                            "ambiguous_fields"),
                           ({"prompt": "a"}, "missing_field"),
                           ({"prompt": "a", "response": ""}, "empty_completion"),
                           ({"prompt": "a", "chosen": "b", "rejected": "b"},
                            "identical_responses")):
        with pytest.raises(BadRecord) as e:
            make_scored(_line(record), tok, None, **kw)
        assert e.value.reason == reason


def test_the_scoring_set_skips_long_records_and_refuses_bad_ones(tmp_path):
    tok = ByteTokenizer()
    records = [{"prompt": "1+2=", "response": "3"}, {"prompt": "9" * 30, "response": "1"},
               {"prompt": "1+2=", "chosen": "3", "rejected": "4" * 20}, *_pairs(2)]
    s = load_scoring_set(_write(tmp_path / "a.jsonl", records), tok, None, SEQ_LEN)
    assert s.lines == [1, 2, 3, 4, 5] and s.records == records
    assert [len(e) for e in s.examples] == [1, 0, 0, 2, 2]
    assert s.skipped == {"too_long": {"count": 2, "line": 2, "detail": "32 tokens, more "
                                      "than the run's seq_len + 1 = 17"}}
    for lines, message in (
            ([records[0], "{not json"], "b.jsonl:2: invalid_json: "),
            ([{"prompt": "a", "answer": "b"}], "b.jsonl:1: missing_field: "),
            (["", " "], "b.jsonl holds no records"),
            ([records[1]], "no record of ")):
        with pytest.raises(ConfigError) as e:
            load_scoring_set(_write(tmp_path / "b.jsonl", lines), tok, None, SEQ_LEN)
        assert str(e.value).startswith("score_rewards: ") and message in str(e.value)
        assert "\n" not in str(e.value)


def _prepared(tmp_path: Path) -> Path:
    from jaxlm.data.prepare import prepare_sft
    src = _write(tmp_path / "pairs.jsonl", _pairs(24))
    return prepare_sft([src], tmp_path / "prepared", tokenizer="byte", seq_len=SEQ_LEN,
                       record_format="preference", progress=False, val_fraction=0.25)


def _reward_config(tiny_config, data: Path, reward: float = 1.0):
    c = tiny_config.copy_and_resolve_references()
    c.data.path, c.data.tokenizer = str(data), "byte"
    c.loss.weights.ce, c.loss.weights.reward = 0.0, reward
    c.loss.weights.dpo, c.loss.dpo.loss_type = (0.0, "simpo") if reward else (1.0, "simpo")
    c.seq_len, c.batch_size, c.eval_batch_size = SEQ_LEN, 8, 8
    return c


def test_a_run_without_a_reward_head_and_a_foreign_output_are_refused(tiny_config, tmp_path):
    scores = _write(tmp_path / "scores.jsonl", [{"prompt": "1+2=", "response": "3"}])
    data = _prepared(tmp_path)
    for name, reward, extra, message in (
            ("dpo", 0.0, [], "error: workdir: the run {run} has no reward head "
                             "(loss.weights.reward is 0); train a reward model on a "
                             "preference set with --config.loss.weights.reward=1"),
            ("rm", 1.0, [f"--output={tmp_path / 'pairs.jsonl'}"],
             f"error: output: {tmp_path / 'pairs.jsonl'} exists and is not a scores file"),
            ("rm2", 1.0, [f"--output={scores}"], f"error: output: {scores} is the "
                                                  "--score_rewards input")):
        run = tmp_path / name
        run.mkdir()
        rundir.save_config(Config.from_dict(_reward_config(tiny_config, data, reward)), run)
        res = call_cli(["eval.py", f"--workdir={run}", "--noeval",
                        f"--score_rewards={scores}", *extra])
        assert res.returncode == 1 and res.stderr.strip().startswith(message.format(run=run))
        assert len(res.stderr.strip().splitlines()) == 1
        assert not (run / "eval").exists()


# ----------------------------------------------------------------------------------------
# Slow: the scores of a reward-model checkpoint equal the objective's read-out.

@pytest.mark.slow
def test_scores_equal_the_objectives_rewards_on_another_mesh(tiny_config, tmp_path):
    from jaxlm.data.preference import pair_rows
    from jaxlm.evaluation.restore import restore_run
    from tests.helpers import step0_run
    c = _reward_config(tiny_config, _prepared(tmp_path))
    (tmp_path / "rm").mkdir()
    run = step0_run(c, tmp_path / "rm")  # a random value head: rewards differ by record
    records = [*_pairs(24), {"prompt": "9" * 30, "response": "1"},
               *({"prompt": p["prompt"], "response": p["chosen"]} for p in _pairs(3))]
    file = _write(tmp_path / "score.jsonl", records)
    res = call_cli(["eval.py", f"--workdir={run}", "--noeval", f"--score_rewards={file}"])
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    out = run / "eval" / "rewards" / "score_step_0.jsonl"
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert summary["output"] == str(out) and summary["records"] == len(records) == len(lines)
    assert [x["line"] for x in lines] == list(range(1, len(records) + 1))
    assert [x["record"] for x in lines] == records
    assert lines[24]["skipped"] == "too_long" and summary["skipped"] == 1
    assert summary["pairs"] == 24 and summary["responses"] == 51
    # A response alone scores what it scores as the chosen side of its pair.
    for single, pair in zip(lines[25:], lines[:3]):
        np.testing.assert_allclose(single["reward"], pair["reward/chosen"], rtol=1e-5)
    # On one device, the training objective's sums over the same pairs (both splits).
    exp, state, _ = restore_run(run, devices=jax.devices()[:1])
    data = exp.data.sources[0]
    n = {s: (len(data.docs(s)) - 1) // 2 for s in ("train", "val")}
    sums = {}
    for split in n:
        batch = pair_rows(data, split, seq_len=SEQ_LEN, global_batch=2 * max(n.values()),
                          seed=0, rows=slice(None), num_epochs=1)[0]
        stats = exp.pair_eval_step(state.params, exp.to_global(batch))
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    assert sums["weight_sum"] == 24
    for key in ("reward/accuracy", "reward/margin", "reward/chosen", "reward/rejected"):
        np.testing.assert_allclose(summary[key], sums[key] / 24, rtol=1e-5, atol=1e-6)
    margins = [x["reward/chosen"] - x["reward/rejected"] for x in lines[:24]]
    np.testing.assert_allclose([x["reward/margin"] for x in lines[:24]], margins, rtol=1e-6)
    # The scores file is its own kind: scoring again may replace it.
    again = call_cli(["eval.py", f"--workdir={run}", "--noeval", f"--score_rewards={file}",
                      f"--output={out}"])
    assert again.returncode == 0, again.stderr
    assert out.read_text().splitlines() == [json.dumps(x, ensure_ascii=False) for x in lines]
