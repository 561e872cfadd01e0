"""Generation metrics: BLEU, chrF and ROUGE are the libraries' own numbers on the generated
strings; bad sets are one-line errors before anything compiles."""

import json

import jax
import pytest

from jaxlm.configs.errors import ConfigError
from jaxlm.evaluation.generation_set import load_generation_set, score_generations
from tests.helpers import call_cli, step0_run

sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

HYPS = ["the cat sat on the mat", "a quick brown fox", "nothing in common here"]
REFS = ["the cat is on the mat", "the quick brown fox jumps", "entirely different words"]


def test_scores_equal_the_libraries_on_the_same_strings():
    per_example, overall = score_generations(HYPS, REFS)
    assert overall["bleu"] == sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert overall["chrf"] == sacrebleu.corpus_chrf(HYPS, [REFS]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for hyp, ref, ours in zip(HYPS, REFS, per_example):
        theirs = scorer.score(ref, hyp)
        assert ours["bleu"] == sacrebleu.sentence_bleu(hyp, [ref]).score
        assert ours["chrf"] == sacrebleu.sentence_chrf(hyp, [ref]).score
        assert {t: ours[t] for t in theirs} == {t: s.fmeasure for t, s in theirs.items()}
    assert overall["rougeL"] == pytest.approx(sum(e["rougeL"] for e in per_example) / 3)
    assert 0 < overall["bleu"] < 100 and per_example[2]["rouge1"] == 0.0


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_bad_generation_sets_are_one_line_errors(tmp_path):
    good = _write(tmp_path / "good.jsonl", [{"q": "a", "a": "b"}, {"q": "c", "a": "d"}])
    assert load_generation_set(good, "q", "a") == [{"prompt": "a", "reference": "b"},
                                                   {"prompt": "c", "reference": "d"}]
    with pytest.raises(ConfigError, match=r"reference_field: .*line 1 has no field "
                                          r"'reference' \(it has \['a', 'q'\]\)"):
        load_generation_set(good, "q", "reference")
    with pytest.raises(ConfigError, match="prompt_field: .*line 2: field 'q' is int"):
        load_generation_set(_write(tmp_path / "n.jsonl", [{"q": "a", "a": "b"},
                                                          {"q": 3, "a": "d"}]), "q", "a")
    (tmp_path / "bad.jsonl").write_text('{"q": "a", "a": "b"}\n{oops\n')
    with pytest.raises(ConfigError, match="generation_set: .*line 2 is not JSON"):
        load_generation_set(tmp_path / "bad.jsonl", "q", "a")
    with pytest.raises(ConfigError, match="generation_set: cannot read"):
        load_generation_set(tmp_path / "missing.jsonl", "q", "a")


def test_cli_names_the_missing_field_before_restoring(tmp_path):
    path = _write(tmp_path / "set.jsonl", [{"prompt": "a", "answer": "b"}])
    res = call_cli(["eval.py", f"--workdir={tmp_path / 'no_run'}", f"--generation_set={path}"])
    assert res.returncode == 1
    assert res.stderr.startswith("error: reference_field: ") and "--reference_field" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_scores_the_generations_it_saves(tiny_config, tmp_path):
    from jaxlm.configs.sections import Sampling
    from jaxlm.evaluation.request import Generate
    from jaxlm.evaluation.restore import restore_run
    from jaxlm.evaluation.sampling import continue_prompts
    run = step0_run(tiny_config, tmp_path / "run")
    prompts = ["ROMEO:", "JULIET: O", "First Citizen:\nBefore we"]
    path = _write(tmp_path / "held.jsonl", [{"prompt": p, "reference": r}
                                            for p, r in zip(prompts, REFS)])
    res = call_cli(["eval.py", f"--workdir={run}", "--noeval", f"--generation_set={path}",
                    "--length=10", "--temperature=0", "--batch_size=2"])
    assert res.returncode == 0, res.stderr
    line = json.loads(res.stdout)
    saved = json.loads((run / "eval" / "generation" / "held_step_0.json").read_text())
    assert line == {k: v for k, v in saved.items() if k != "examples"}
    assert saved["decoding"] == {"method": "greedy", "max_new_tokens": 10, "stop": None,
                                 "batch_size": 2}
    exp, state, _ = restore_run(run, devices=jax.devices()[:1])
    texts = continue_prompts(exp, state.params, prompts, Generate(length=10),
                             Sampling(temperature=0.0), 2)
    assert [e["generation"] for e in saved["examples"]] == texts
    per_example, overall = score_generations(texts, REFS)
    assert {k: saved[k] for k in overall} == overall
    assert [{k: e[k] for k in per_example[0]} for e in saved["examples"]] == per_example
