"""Supervised fine-tuning data: records -> weighted tokens, bad records, templates, the
base model's tokenizer reused exactly, packing, zero gradient on prompt tokens, and the
completion-only evaluation loss."""

import itertools
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config
from jaxlm.data.mixture import Mixture
from jaxlm.data.packing import eval_batches, train_batches
from jaxlm.data.pipeline import TokenData, resolve_data
from jaxlm.data.prepare import META, SFT_FORMAT_VERSION, prepare, prepare_corpus, prepare_sft
from jaxlm.data.sft import ChatTemplate, make_example, simple_pieces
from jaxlm.data.tokenizers import HFTokenizer, train_bpe
from jaxlm.losses.cross_entropy import cross_entropy
from jaxlm.losses.objectives import split_objective_params
from tests.helpers import call_cli, run_cli
from jaxlm.data import fingerprints
from jaxlm.training import rundir
from jaxlm.training.evaluate import evaluate
from jaxlm.training.experiment import Experiment
from jaxlm.training.steps import make_loss_fn

L = 64
NAMES = ["ROMEO", "JULIET", "MERCUTIO", "TYBALT", "NURSE", "FRIAR", "CAPULET", "BENVOLIO"]
LINES = ["What light through yonder window breaks", "A plague on both your houses",
         "Parting is such sweet sorrow", "O Romeo, Romeo, wherefore art thou Romeo",
         "These violent delights have violent ends", "My bounty is as boundless as the sea"]


def _records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        name, line = NAMES[i % len(NAMES)], LINES[i % len(LINES)]
        words = line.split()
        k = 1 + i % (len(words) - 1)
        out.append({"prompt": f"{name}:\n{' '.join(words[:k])}",
                    "completion": " " + " ".join(words[k:])})
    return out


def _write(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return str(path)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A run directory of the embedded default as `python train.py` makes it: config.json
    and the embedded corpus prepared into its data/ (char tokenizer, 65 ids)."""
    workdir = tmp_path_factory.mktemp("base")
    config = Config()
    rundir.save_config(config, workdir)
    resolve_data(config.data, workdir)
    return workdir


@pytest.fixture(scope="module")
def sft_dir(base_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    src = _write(tmp / "lines.jsonl", _records(120))
    return prepare_sft([src], tmp / "sft", tokenizer=str(base_run), seq_len=L,
                       val_fraction=0.2, progress=False)


# Records -> tokens and weights.

def test_prompt_completion_weights_and_char_end(base_run):
    tok = TokenData.load(base_run / "data").tokenizer
    line = json.dumps({"prompt": "ROMEO:\n", "completion": "Good night"}).encode()
    ex = make_example(line, tok, None, seq_len=L)
    assert tok.eos_id is None  # the embedded corpus's vocabulary has no end token
    assert tok.decode(ex.tokens) == "ROMEO:\nGood night\n"  # "\n" ends the completion
    assert ex.weights.tolist() == [0] * 7 + [1] * 11
    assert ex.tokens.tolist() == tok.encode("ROMEO:\nGood night\n").tolist()


def test_eos_and_bos_come_from_the_tokenizer(tmp_path):
    text = "ROMEO: good night, good night! parting is such sweet sorrow.\n" * 20
    tok = train_bpe([text], 300, tmp_path / "tokenizer.json")
    tok = HFTokenizer(tok.path, bos_id=tok.eos_id, eos_id=tok.eos_id)  # a BOS for the test
    line = json.dumps({"prompt": "ROMEO:", "completion": " good night"}).encode()
    ex = make_example(line, tok, None, seq_len=L)
    prompt, completion = tok.encode("ROMEO:"), tok.encode(" good night")
    assert ex.tokens.tolist() == [tok.eos_id, *prompt, *completion, tok.eos_id]
    assert ex.weights.tolist() == [0] * (1 + len(prompt)) + [1] * (len(completion) + 1)


def test_simple_chat_template():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Farewell"}]
    pieces = simple_pieces(messages, "\n")
    text = "".join(p for p, _ in pieces)
    assert text == ("system: Be brief.\nuser: Hi\nassistant: Hello\nuser: Bye\n"
                    "assistant: Farewell\n")
    assert "".join(p for p, w in pieces if w) == "Hello\nFarewell\n"


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _hf_chat_tokenizer(directory):
    """A tiny byte-level BPE with ChatML special tokens and a chat template, offline."""
    from tokenizers import Tokenizer as HF
    directory.mkdir()
    text = "user assistant system hello how are you fine thanks good night\n" * 30
    train_bpe([text], 300, directory / "tokenizer.json")
    hf = HF.from_file(str(directory / "tokenizer.json"))
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    hf.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    return directory


def test_hf_chat_template_weights_only_assistant_turns(tmp_path):
    directory = _hf_chat_tokenizer(tmp_path / "tok")
    words = ["hello", "how", "are", "you", "fine", "thanks", "good", "night"]
    records, expected = [], {}
    template = ChatTemplate(CHATML, {})
    for i in range(12):
        messages = [{"role": "user", "content": " ".join(words[i % 8:i % 8 + 3])},
                    {"role": "assistant", "content": " ".join(words[(i + 2) % 8:])}]
        if i % 2:
            messages += [{"role": "user", "content": "good night"},
                         {"role": "assistant", "content": words[i % 8]}]
        records.append({"messages": messages})
        rendered = template.render(messages, add_generation_prompt=False)
        expected[rendered] = "".join(m["content"] + "<|im_end|>\n" for m in messages
                                     if m["role"] == "assistant")
    src = _write(tmp_path / "chat.jsonl", records)
    out = prepare_sft([src], tmp_path / "out", tokenizer=f"hf:{directory}", seq_len=128,
                      val_fraction=0.3, progress=False)
    meta = json.loads((out / META).read_text())
    assert meta["template"] == "chat_template" and meta["chat_template"]["source"] == CHATML
    data = TokenData.load(out)
    tok, seen = data.tokenizer, 0
    for split in ("train", "val"):
        docs, toks, w = data.docs(split), np.asarray(data.tokens(split)), data.weights(split)
        for a, b in itertools.pairwise(docs):
            ids, weights = toks[a:b], np.asarray(w[a:b])
            text = tok.tok.decode(ids.tolist(), skip_special_tokens=False)
            weighted = tok.tok.decode(ids[weights == 1].tolist(), skip_special_tokens=False)
            assert weighted == expected[text]  # the whole rendering, assistant turns weighted
            seen += 1
    assert seen == 12


def test_chat_template_renders_as_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    directory = _hf_chat_tokenizer(tmp_path / "tok")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"),
                                               eos_token="<|im_end|>")
    ref.chat_template = CHATML
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"}]
    ours = ChatTemplate(CHATML, {"eos_token": "<|im_end|>"})
    for gen in (False, True):
        assert ours.render(messages, gen) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen)


# Bad records.

BAD = ['{"prompt": "A", "completion": "B"',  # invalid JSON
       '["ROMEO", "JULIET"]',  # not an object
       '{"prompt": "ROMEO:\\n"}',  # missing completion
       '{"prompt": "ROMEO:\\n", "completion": 7}',  # not a string
       '{"prompt": "ROMEO:\\n", "completion": ""}',  # empty completion
       '{"prompt": "ROMEO:\\n", "completion": "caf\\u00e9"}',  # not in the char vocabulary
       json.dumps({"prompt": "ROMEO:\n" * 20, "completion": " yes"}),  # too long
       '{"messages": [{"role": "user"}]}',  # bad messages
       '{"messages": [{"role": "user", "content": "hi"}]}']  # no assistant turn


def test_bad_records_are_counted_by_reason_with_their_first_line(base_run, tmp_path):
    good = _records(40)
    lines = good[:10] + BAD + good[10:] + BAD[:2]
    src = _write(tmp_path / "mixed.jsonl", lines)
    out = prepare_sft([src], tmp_path / "out", tokenizer=str(base_run), seq_len=L,
                      val_fraction=0.2, progress=False)
    meta = json.loads((out / META).read_text())
    assert meta["format_version"] == SFT_FORMAT_VERSION
    assert {r: (b["count"], b["line"]) for r, b in meta["bad"].items()} == {
        "invalid_json": (2, 11), "not_an_object": (2, 12), "missing_field": (1, 13),
        "not_a_string": (1, 14), "empty_completion": (2, 15), "unencodable": (1, 16),
        "too_long": (1, 17), "bad_messages": (1, 18)}
    assert meta["records"] == len(lines) and meta["skipped"]["bad"] == 11
    assert sum(meta["examples"].values()) == 40
    # The CLI prints each reason with its count and first line, and the summary.
    r = call_cli(["-m", "jaxlm.data.prepare", "--format=sft", f"--input={src}",
                  f"--output={tmp_path / 'cli'}", f"--tokenizer={base_run}", f"--seq_len={L}",
                  "--val_fraction=0.2", "--quiet"])
    assert r.returncode == 0, r.stderr
    assert f"skipped 1 bad record(s): too_long (first at {src}:17: 145 tokens" in r.stderr
    summary = json.loads(r.stdout)
    assert summary["bad"]["invalid_json"] == 2 and sum(summary["examples"].values()) == 40


def test_strict_refuses_the_file_at_its_first_bad_record(base_run, tmp_path):
    src = _write(tmp_path / "a.jsonl", _records(5) + BAD[2:])
    with pytest.raises(ConfigError, match=r"--input: .*a\.jsonl:6: missing_field: no "
                                          r"'completion' field \(has: prompt\)"):
        prepare_sft([src], tmp_path / "out", tokenizer=str(base_run), seq_len=L,
                    strict=True, progress=False)
    assert not (tmp_path / "out").exists()
    r = call_cli(["-m", "jaxlm.data.prepare", "--format=sft", f"--input={src}",
                  f"--output={tmp_path / 'out'}", f"--tokenizer={base_run}", f"--seq_len={L}",
                  "--strict", "--quiet"])
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        (f"error: --input: {src}:6: missing_field: no 'completion' field (has: prompt) "
        f"(--strict refuses the file at its first bad record)")]


def test_long_examples_are_dropped_or_truncated(base_run, tmp_path):
    tok = TokenData.load(base_run / "data").tokenizer
    long = {"prompt": "ROMEO:\n", "completion": "a" * 100}
    prompt_only = {"prompt": "b" * 100, "completion": "c"}
    src = _write(tmp_path / "long.jsonl", _records(30) + [long, prompt_only])
    kw = {"tokenizer": str(base_run), "seq_len": L, "val_fraction": 0.2, "progress": False}
    meta = json.loads((prepare_sft([src], tmp_path / "drop", **kw) / META).read_text())
    assert meta["bad"]["too_long"]["count"] == 2 and meta["truncated"] == 0
    out = prepare_sft([src], tmp_path / "cut", truncate=True, **kw)
    meta = json.loads((out / META).read_text())
    assert meta["truncated"] == 1 and meta["bad"]["prompt_too_long"]["line"] == 32
    data = TokenData.load(out)
    for split in ("train", "val"):
        docs = data.docs(split)
        assert np.diff(docs).max() <= L + 1
        cut = [i for i in range(len(docs) - 1) if docs[i + 1] - docs[i] == L + 1]
        for i in cut:
            ids = np.asarray(data.tokens(split)[docs[i]:docs[i + 1]])
            assert tok.decode(ids) == ("ROMEO:\n" + "a" * 100)[:L + 1]



def test_seq_len_defaults_to_the_base_runs_or_to_no_limit(base_run, tmp_path):
    long = {"prompt": "ROMEO:\n", "completion": "a" * 100}
    src = _write(tmp_path / "long.jsonl", _records(30) + [long])
    # A run directory as --tokenizer: its seq_len (64 here) bounds the examples.
    meta = json.loads((prepare_sft([src], tmp_path / "run", tokenizer=str(base_run),
                                   val_fraction=0.2, progress=False) / META).read_text())
    assert meta["seq_len"] == Config().train.seq_len == L
    assert meta["bad"]["too_long"]["count"] == 1
    # A prepared directory: no limit; the longest example is kept whole.
    out = prepare_sft([src], tmp_path / "any", tokenizer=str(base_run / "data"),
                      val_fraction=0.2, progress=False)
    meta = json.loads((out / META).read_text())
    assert meta["seq_len"] is None and not meta["bad"]
    assert max(meta["longest"].values()) == len("ROMEO:\n" + "a" * 100 + "\n")
    with pytest.raises(ConfigError, match=r"^--truncate: needs --seq_len"):
        prepare_sft([src], tmp_path / "cut", tokenizer=str(base_run / "data"), truncate=True,
                    progress=False)


# The base model's tokenizer.

def test_tokenizer_is_reused_exactly_from_a_run_or_its_data(base_run, sft_dir, tmp_path):
    base = TokenData.load(base_run / "data")
    sft = TokenData.load(sft_dir)
    assert base.vocab_size == 65 and sft.vocab_size == base.vocab_size
    assert sft.tokenizer.to_dict() == base.tokenizer.to_dict()
    src = _write(tmp_path / "r.jsonl", _records(30))
    again = prepare_sft([src], tmp_path / "again", tokenizer=str(base_run / "data"), seq_len=L,
                        val_fraction=0.2, progress=False)
    assert TokenData.load(again).tokenizer.to_dict() == base.tokenizer.to_dict()
    # Every stored id is the base tokenizer's id of the same text.
    docs, toks = sft.docs("train"), np.asarray(sft.train)
    text = sft.tokenizer.decode(toks[docs[0]:docs[1]])
    assert toks[docs[0]:docs[1]].tolist() == base.tokenizer.encode(text).tolist()
    with pytest.raises(ConfigError, match="--tokenizer: char would fit a new vocabulary"):
        prepare_sft([src], tmp_path / "x", tokenizer="char", seq_len=L, progress=False)


def test_a_run_whose_data_was_prepared_again_is_refused_as_the_base(tmp_path):
    """The tokenizer taken from a run directory must be the one its fingerprints.json
    recorded: its data prepared again with another vocabulary is one error line."""
    text = tmp_path / "a.txt"
    text.write_text("ab ab\n" * 50)
    data = prepare(text, tmp_path / "data", tokenizer="char")
    run = tmp_path / "run"
    run.mkdir()
    config = Config().replace(**{"data.path": str(data)})
    rundir.save_config(config, run)
    fingerprints.write(run, config, TokenData.load(data).tokenizer)
    src = _write(tmp_path / "r.jsonl", [{"prompt": "a" * (i + 1), "completion": " b"}
                                        for i in range(40)])
    assert prepare_sft([src], tmp_path / "ok", tokenizer=str(run), progress=False)
    text.write_text("ab ba\nc\n" * 50)  # another vocabulary: a, b, c, space, newline
    prepare(text, data, tokenizer="char", overwrite=True)
    with pytest.raises(ConfigError, match=rf"^--tokenizer: the tokenizer of {data} is not the "
                                          rf"one the run in {run} was trained with \(.*\): the "
                                          rf"data changed since; restore it, or pass as "
                                          rf"--tokenizer the prepared directory the run was "
                                          rf"trained on$"):
        prepare_sft([src], tmp_path / "refused", tokenizer=str(run), progress=False)
    assert not (tmp_path / "refused").exists()


def test_format_versions_old_sets_load_and_unknown_ones_are_refused(base_run, sft_dir, tmp_path):
    assert TokenData.load(base_run / "data").train_weights is None  # format 1
    src = _write(tmp_path / "docs.jsonl", [{"text": t * 3} for t in LINES] * 3)
    corpus = TokenData.load(prepare_corpus([src], tmp_path / "c", tokenizer="byte", workers=0,
                                           progress=False, val_fraction=0.3))
    assert corpus.meta["format_version"] == 2 and not corpus.is_sft
    copy = tmp_path / "future"
    shutil.copytree(sft_dir, copy)
    meta = json.loads((copy / META).read_text())
    (copy / META).write_text(json.dumps({**meta, "format_version": 9}))
    with pytest.raises(ConfigError, match=r"data.path: .*future was prepared in format 9; "
                                          r"this version reads formats 1, 2, 3"):
        TokenData.load(copy)


# Batches.

def test_packed_batches_keep_examples_whole_with_shifted_weights(sft_dir):
    data = TokenData.load(sft_dir)
    toks, docs, w = np.asarray(data.train), data.docs("train"), np.asarray(data.train_weights)
    examples: dict[tuple, set] = {}  # the same text may split prompt/completion elsewhere
    for a, b in itertools.pairwise(docs):
        examples.setdefault(tuple(toks[a:b].tolist()), set()).add(tuple(w[a + 1:b].tolist()))
    it = train_batches(Mixture.of_set(data), seq_len=2 * L, global_batch=8, seed=0,
                       packing="windows")
    seen = 0
    for _ in range(3):
        b = next(it)
        for r in range(8):
            for s in range(1, b["segment_ids"][r].max() + 1):
                at = b["segment_ids"][r] == s
                assert b["positions"][r][at].tolist() == list(range(at.sum()))
                inputs, targets = b["inputs"][r][at], b["targets"][r][at]
                example = (*inputs.tolist(), int(targets[-1]))
                assert example in examples  # a whole example, never a piece
                assert tuple(b["weights"][r][at].astype(int).tolist()) in examples[example]
                seen += 1
            assert np.all(b["weights"][r][b["segment_ids"][r] == 0] == 0)
    assert seen > 48  # several examples per row


def test_seq_len_shorter_than_an_example_is_refused(sft_dir, tiny_config, tmp_path):
    c = _config(tiny_config, sft_dir)
    c.seq_len = 16
    with pytest.raises(ConfigError, match=r"seq_len: 16 is shorter than the longest example "
                                          r"of .*sft \(train split: \d+ targets\); examples "
                                          r"are never split"):
        Experiment.build(c, tmp_path, jax.devices()[:1])


# The loss.

def _config(c, path):
    c.seq_len, c.batch_size, c.eval_batch_size, c.eval_max_batches = L, 8, 8, 0
    c.mesh.data = 1
    c.data.path = str(path)
    return c


@pytest.fixture(scope="module")
def sft_exp(sft_dir, tmp_path_factory):
    from jaxlm.configs.shakespeare_char import get_config
    c = _config(get_config("tiny"), sft_dir)
    exp = Experiment.build(c, tmp_path_factory.mktemp("wd"), jax.devices()[:1])
    return exp, split_objective_params(exp.init_state().params)[0]


def test_prompt_targets_get_exactly_zero_gradient(sft_exp):
    exp, params = sft_exp
    assert exp.packing == "documents"  # SFT data packs as documents with no flag
    batch, _ = exp.to_device(next(exp.train_batches()), train=True)
    weights = np.asarray(batch["weights"])
    prompt = (np.asarray(batch["segment_ids"]) > 0) & (weights == 0)
    assert prompt.sum() > 100 and (weights == 1).sum() > 100
    loss_fn = make_loss_fn(exp.graphdef, exp.model_cfg)
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, None)[0]))
    changed = dict(batch)
    rng = np.random.default_rng(0)
    changed["targets"] = np.where(prompt, rng.integers(0, 65, prompt.shape),
                                  np.asarray(batch["targets"])).astype(np.int32)
    assert np.any(changed["targets"] != np.asarray(batch["targets"]))
    g1, g2 = grad(params, batch), grad(params, changed)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The loss's gradient at each prompt target's logits is exactly zero.
    logits = jax.jit(lambda p, b: nnx.merge(exp.graphdef, p)(
        b["inputs"], positions_BxL=b["positions"], segment_ids_BxL=b["segment_ids"]).logits)(
        params, batch)
    g = jax.jit(jax.grad(lambda x, b: cross_entropy(x, b["targets"], b["weights"],
                                                    exp.model_cfg.vocab_size)[0]))(logits, batch)
    assert np.all(np.asarray(g)[prompt] == 0) and np.any(np.asarray(g)[weights == 1] != 0)


def test_evaluation_reports_the_completion_only_loss(sft_exp, sft_dir):
    exp, params = sft_exp
    result = evaluate(exp, params)
    data = TokenData.load(sft_dir)
    meta = json.loads((sft_dir / META).read_text())
    assert result["num_tokens"] == meta["completion_tokens"]["val"]
    # Each validation example alone, from position 0: mean loss on its completion targets.
    # One row per example from position 0, padded at the end (causal: padding is unseen).
    docs, toks = data.docs("val"), np.asarray(data.val)
    ids_NxL1 = np.zeros((len(docs) - 1, L + 1), np.int32)
    w_NxL = np.zeros((len(docs) - 1, L), np.float32)
    for i, (a, b) in enumerate(itertools.pairwise(docs)):
        ids_NxL1[i, :b - a] = toks[a:b]
        w_NxL[i, :b - a - 1] = data.val_weights[a + 1:b]

    @jax.jit
    def loss_sum(params, ids, w):
        logits = nnx.merge(exp.graphdef, params)(ids[:, :-1]).logits
        return cross_entropy(logits, ids[:, 1:], w, exp.model_cfg.vocab_size)[0]

    count = int(w_NxL.sum())
    assert result["eval_loss"] == pytest.approx(float(loss_sum(params, ids_NxL1, w_NxL)) /
                                                count, rel=1e-5)
    batches = eval_batches(data, seq_len=L, global_batch=8)
    assert sum(float(batches[i]["weights"].sum()) for i in range(len(batches))) == count


@pytest.mark.slow  # trains a base model and fine-tunes it through the command line
def test_prepare_train_and_eval_from_the_command_line(tmp_path):
    base = tmp_path / "base"
    tiny = "--config=configs/shakespeare_char.py:tiny"
    r = run_cli(["train.py", tiny, f"--workdir={base}", "--config.steps=2", f"--config.seq_len={L}",
                 "--config.eval_every=0", "--config.checkpoint_every=2", "--cpu_devices=1"])
    assert r.returncode == 0, r.stderr
    src = _write(tmp_path / "lines.jsonl", _records(80))
    r = run_cli(["-m", "jaxlm.data.prepare", "--format=sft", f"--input={src}",
                 f"--output={tmp_path / 'sft'}", f"--tokenizer={base}", f"--seq_len={L}",
                 "--val_fraction=0.2", "--quiet"])
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "sft" / META).read_text())
    run = tmp_path / "run"
    r = run_cli(["train.py", tiny, f"--workdir={run}", f"--config.data.path={tmp_path / 'sft'}",
                 f"--config.init.from_workdir={base}", f"--config.seq_len={L}",
                 "--config.steps=4",
                 "--config.eval_every=4", "--config.checkpoint_every=4",
                 "--config.eval_max_batches=0", "--cpu_devices=1"])
    assert r.returncode == 0, r.stderr
    assert "SFT: loss on completion tokens only" in r.stdout + r.stderr
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in x]
    r = run_cli(["eval.py", f"--workdir={run}", "--cpu_devices=1"])
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["num_tokens"] == meta["completion_tokens"]["val"]
    assert line["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    # The base model on the fine-tuning set's validation split: the same completion tokens.
    r = run_cli(["eval.py", f"--workdir={base}", f"--data={tmp_path / 'sft'}",
                 "--cpu_devices=1"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["num_tokens"] == \
        meta["completion_tokens"]["val"]
