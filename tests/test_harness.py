"""The lm-evaluation-harness adapter: local tasks (multiple choice by log-likelihood,
generation by exact match, rolling log-likelihood) score the same through `jaxlm` on a run
as through the harness's own `hf` model on its `convert.py --to_hf` export."""

import json
from pathlib import Path

import jax
import pytest

from jaxlm.configs.sections import Config
from jaxlm.training import rundir
from tests.helpers import call_cli

lm_eval = pytest.importorskip("lm_eval")
TASKS = ["tiny_mc", "tiny_gen", "tiny_text"]

QUESTIONS = [("The sky is", [" blue", " green", " loud"], 0),
             ("Two plus two is", [" four", " five", " fish"], 0),
             ("Fire is", [" hot", " cold", " wet"], 0),
             ("Ice is", [" warm", " cold", " loud"], 1),
             ("Grass is", [" red", " green", " blue"], 1),
             ("The sun rises in the", [" west", " east", " sea"], 1)]
GEN = [("Q: Say yes.\nA:", " yes"), ("Q: Say no.\nA:", " no"), ("Q: Say hi.\nA:", " hi"),
       ("Q: Say ok.\nA:", " ok"), ("Q: Say go.\nA:", " go")]
TEXTS = ["ROMEO: But soft, what light through yonder window breaks?",
         "It is the east, and Juliet is the sun. " * 4,
         "Arise, fair sun, and kill the envious moon."]


def write_tasks(root: Path, max_gen_toks: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    def jsonl(name, records):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    mc = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    jsonl("mc_train.jsonl", mc[:3]); jsonl("mc_test.jsonl", mc[3:] + mc[:2])
    gen = [{"question": q, "answer": a} for q, a in GEN]
    jsonl("gen_train.jsonl", gen[:2]); jsonl("gen_test.jsonl", gen)
    jsonl("text_test.jsonl", [{"text": t} for t in TEXTS])
    data = lambda stem: ("dataset_path: json\ndataset_kwargs:\n  data_files:\n"
                         f"    train: {root / (stem + '_train.jsonl')}\n"
                         f"    test: {root / (stem + '_test.jsonl')}\n"
                         "training_split: train\ntest_split: test\nfewshot_split: train\n")
    (root / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + data("mc") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + data("gen") + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\ntarget_delimiter: ""\n'
        f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: {max_gen_toks}\n"
        "  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (root / "tiny_text.yaml").write_text(
        "task: tiny_text\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'text_test.jsonl'}\ntest_split: test\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n")
    return root


def _config_only_run(tiny_config, workdir: Path) -> Path:
    """A run directory with only its config: enough for the checks before restoring."""
    workdir.mkdir()
    rundir.save_config(Config.from_dict(tiny_config), workdir)
    return workdir


def test_the_adapter_is_registered():
    from lm_eval.api.registry import get_model
    from jaxlm.evaluation.harness import JaxlmLM
    assert get_model("jaxlm") is JaxlmLM


@pytest.mark.parametrize("flags, message", [
    pytest.param(["--lm_eval=tiny_mcq"],  # scans lm-eval's built-in tasks: slow
                 "error: lm_eval: unknown task 'tiny_mcq'; close: tiny_mc",
                 marks=pytest.mark.slow),
    (["--lm_eval=tiny_gen"], "error: lm_eval: task 'tiny_gen' generates up to 64 tokens, "
                             "but the model's context is 32 tokens (seq_len)"),
    (["--lm_eval=tiny_mc", "--num_fewshot=-1"], "error: num_fewshot: must be 0 or more"),
])
def test_bad_harness_requests_are_one_line_errors(flags, message, tiny_config, tmp_path):
    run = _config_only_run(tiny_config, tmp_path / "run")  # no checkpoint: nothing restores
    tasks = write_tasks(tmp_path / "tasks", max_gen_toks=64)
    res = call_cli(["eval.py", f"--workdir={run}", f"--lm_eval_include={tasks}", *flags])
    assert res.returncode == 1 and res.stderr.startswith(message), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    if "unknown" in message:
        assert "tasks in --lm_eval_include: tiny_gen, tiny_mc, tiny_text" in res.stderr


@pytest.mark.slow
def test_scores_equal_the_hf_backend_on_the_export(tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from jaxlm.checkpoints.hf_export import export_hf
    from jaxlm.checkpoints.hf_import import import_hf
    from jaxlm.configs.base import get_base_config
    from tests.test_hf_convert import _gpt2_with_tokenizer
    _gpt2_with_tokenizer(tmp_path / "hf")  # a BPE tokenizer with an EOS, context 64
    run = tmp_path / "run"
    c = get_base_config()
    c.batch_size = c.eval_batch_size = 8  # eval.py restores on the 8 test devices
    import_hf(tmp_path / "hf", run, c, jax.devices()[:1])
    export_hf(run, tmp_path / "export", devices=jax.devices()[:1])
    tasks = write_tasks(tmp_path / "tasks")
    res = call_cli(["eval.py", f"--workdir={run}", "--noeval", f"--lm_eval={','.join(TASKS)}",
                    f"--lm_eval_include={tasks}", "--num_fewshot=1", "--limit=4",
                    "--batch_size=4", "--bootstrap_iters=0"])
    assert res.returncode == 0, res.stderr
    assert "|tiny_mc " in res.stdout and "bits_per_byte" in res.stdout
    out = run / "eval" / "lm_eval"
    ours = json.loads((out / "step_0.json").read_text())
    samples = {t: [json.loads(line) for line in
                   (out / f"step_0_samples_{t}.jsonl").read_text().splitlines()]
               for t in TASKS}
    theirs = simple_evaluate(model=HFLM(pretrained=str(tmp_path / "export"), batch_size=4,
                                        device="cpu"),
                             tasks=TASKS, num_fewshot=1, limit=4, bootstrap_iters=0,
                             task_manager=TaskManager(include_path=str(tasks)),
                             log_samples=True)
    for task in TASKS:
        assert [s["arguments"] for s in samples[task]] == \
            json.loads(json.dumps([s["arguments"] for s in theirs["samples"][task]]))
        for a, b in zip(samples[task], theirs["samples"][task], strict=True):
            if task == "tiny_gen":
                assert a["resps"] == b["resps"]
                continue
            flat_a = [r[0] if isinstance(r[0], (int, float)) else r[0][0] for r in a["resps"]]
            flat_b = [r[0] if isinstance(r[0], (int, float)) else r[0][0] for r in b["resps"]]
            assert flat_a == pytest.approx(flat_b, abs=1e-4)
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float):
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4), metric
    assert ours["results"]["tiny_mc"]["acc,none"] == theirs["results"]["tiny_mc"]["acc,none"]
