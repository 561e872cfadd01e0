"""Sequence-level distillation data: the teacher's greedy completions, written as SFT
records that prepare reads back, with the teacher and settings recorded; sharded
generation equals one device; bad input is one line before the teacher is restored."""

import json

import jax
import numpy as np
import pytest

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Sampling
from jaxlm.configs.shakespeare_char import get_config
from jaxlm.data import fingerprints
from jaxlm.data.pipeline import TokenData
from jaxlm.data.prepare import prepare_sft
from jaxlm.evaluation.distill_data import DistillData, generate_sft, prefix_prompts
from jaxlm.evaluation.restore import restore_run
from jaxlm.inference.generate import Generator
from jaxlm.training import rundir
from tests.helpers import call_cli, step0_run

PROMPTS = [{"prompt": "ROMEO:"}, {"prompt": "First Citizen:\nBefore we"},
           {"messages": [{"role": "user", "content": "Speak."}]}, {"prompt": "KING"},
           {"prompt": "O, "}, {"prompt": "What"}]
NEW = 12


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    c = get_config("tiny")
    c.seq_len = 32
    c.model.init_std = 0.5  # logits that depend on the input: greedy text that varies
    return step0_run(c, tmp_path_factory.mktemp("distill") / "teacher", jax.devices()[:1])


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _request(teacher, tmp_path, **kw):
    values = dict(workdir=str(teacher), prompts=str(_write(tmp_path / "p.jsonl", PROMPTS)),
                  output=str(tmp_path / "gen.jsonl"), max_new_tokens=NEW, batch_size=2)
    return DistillData.parse({**values, **kw})


@pytest.fixture(scope="module")
def greedy(teacher):
    """The teacher's greedy continuations of PROMPTS (as their SFT examples begin), in one
    batch on one device."""
    exp, state, _ = restore_run(teacher, None, jax.devices()[:1])
    tok = exp.data.tokenizer
    heads = [tok.encode(p.get("prompt", "user: Speak.\nassistant: ")).tolist() for p in PROMPTS]
    gen = Generator(exp.graphdef, exp.model_cfg, exp.config.train.seq_len)
    return [tok.decode(o) for o in gen.generate(state.params, heads, NEW, Sampling())[0]]


def _records(path):
    """{prompt or conversation: completion} of a written file."""
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "prompt" in r:
            out[r["prompt"]] = r["completion"]
        else:
            *conversation, answer = r["messages"]
            assert answer["role"] == "assistant" and set(answer) == {"role", "content"}
            out[json.dumps(conversation)] = answer["content"]
    return out


def _keys():
    return [p.get("prompt") or json.dumps(p["messages"]) for p in PROMPTS]


def test_records_are_the_greedy_decode_and_prepare_reads_them(teacher, greedy, tmp_path):
    tok = TokenData.load(teacher / "data").tokenizer
    raw = greedy
    # END, where a completion stops: a character of the first continuation that does not
    # start it, so that the first completion is cut before it.
    end = next(ch for i, ch in enumerate(raw[0]) if i > 0 and ch not in raw[0][:i])
    expected = [r.split(end, 1)[0] for r in raw]
    req = _request(teacher, tmp_path, end_text=end)
    summary = generate_sft(req, jax.devices()[:1])
    lines = [json.loads(x) for x in (tmp_path / "gen.jsonl").read_text().splitlines()]
    kept = [e for e in expected if e]
    assert summary["records"] == len(kept) and summary["empty"] == len(PROMPTS) - len(kept)
    assert len(expected[0]) < len(raw[0])  # stopped at END
    assert _records(tmp_path / "gen.jsonl") == {k: e for k, e in zip(_keys(), expected) if e}

    meta = json.loads((tmp_path / "gen.jsonl.meta.json").read_text())
    assert meta["settings"]["teacher"] == {
        "workdir": str(teacher), "step": 0,
        "checkpoint_sha256": fingerprints.base_sha256(rundir.checkpoint_dir(teacher) / "0")}
    assert meta["settings"]["decoding"] == {"method": "greedy", "max_new_tokens": NEW,
                                            "batch_size": 2, "end_text": end,
                                            "chat_template": "auto"}
    assert meta["settings"]["prompts"]["sha256"] and meta["counts"]["records"] == len(kept)

    # The file is the SFT reader's input: every example is its prompt, completion and END.
    out = prepare_sft([tmp_path / "gen.jsonl"], tmp_path / "sft", tokenizer=str(teacher),
                      end_text=end, seq_len=64, val_fraction=0.5, progress=False)
    data, examples = TokenData.load(out), {}
    for split in ("train", "val"):
        docs, tokens = data.docs(split), np.asarray(data.tokens(split))
        weights = np.asarray(data.weights(split))
        examples.update({tok.decode(tokens[a:b].tolist()):
                         tok.decode(tokens[a:b][weights[a:b] > 0].tolist())
                         for a, b in zip(docs[:-1], docs[1:])})
    wanted = {}
    for line in lines:
        head = line.get("prompt") or "user: Speak.\nassistant: "
        completion = line.get("completion") or line.get("messages", [{}])[-1].get("content")
        wanted[head + completion + end] = completion + end
    assert examples == wanted

    # The same request again has nothing to do; other settings need --overwrite.
    assert generate_sft(req, jax.devices()[:1])["unchanged"] is True
    with pytest.raises(ConfigError, match="output: .*another teacher, prompts or settings"):
        generate_sft(_request(teacher, tmp_path, end_text=end, max_new_tokens=NEW - 1),
                     jax.devices()[:1])
    (tmp_path / "mine.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="output: .*was not written by this command"):
        generate_sft(_request(teacher, tmp_path, output=str(tmp_path / "mine.jsonl")))


def test_sharded_generation_equals_one_device(teacher, greedy, tmp_path):
    """data 2 x tensor 2, with a batch of 3 padded to the data axis, gives the greedy
    continuations of one device (no END: every completion is whole)."""
    req = _request(teacher, tmp_path, end_text="", batch_size=3, tensor=2)
    generate_sft(req, jax.devices()[:4])
    assert _records(tmp_path / "gen.jsonl") == dict(zip(_keys(), greedy))
    meta = json.loads((tmp_path / "gen.jsonl.meta.json").read_text())
    assert {k: v for k, v in meta["mesh"].items() if v > 1} == {"data": 2, "tensor": 2}


def test_prefixes_are_evenly_spaced_slices_of_the_split(teacher):
    data = TokenData.load(teacher / "data")
    tok = data.tokenizer
    prompts = prefix_prompts(data, tok, 5, 8, "val")
    val = np.asarray(data.tokens("val"))
    starts = np.linspace(0, len(val) - 8, 5).astype(int)
    assert [p["prompt"] for p in prompts] == [tok.decode(val[s:s + 8].tolist()) for s in starts]
    with pytest.raises(ConfigError, match="prefixes: .* do not fit"):
        prefix_prompts(data, tok, len(val) // 8 + 1, 8, "val")


@pytest.mark.parametrize("case", ["empty", "too_long", "top_p", "top_k", "temperature",
                                  "both", "not_json"])
def test_bad_input_is_one_line(teacher, tmp_path, case):
    prompts = _write(tmp_path / "p.jsonl", PROMPTS)
    flags = {"empty": [f"--prompts={_write(tmp_path / 'e.jsonl', [])}"],
             "too_long": [f"--prompts={_write(tmp_path / 'l.jsonl', [{'prompt': 'a' * 33}])}"],
             "top_p": [f"--prompts={prompts}", "--top_p=1.5"],
             "top_k": [f"--prompts={prompts}", "--top_k=-1"],
             "temperature": [f"--prompts={prompts}", "--temperature=-0.5"],
             "both": [f"--prompts={prompts}", "--prefixes=4"],
             "not_json": [f"--prompts={_write(tmp_path / 'j.jsonl', ['x'])}"]}[case]
    key = {"empty": "prompts", "too_long": "prompts", "both": "prompts",
           "not_json": "prompts"}.get(case, case)
    res = call_cli(["-m", "jaxlm.evaluation.distill_data", f"--workdir={teacher}",
                    f"--output={tmp_path / 'out.jsonl'}", *flags])
    assert res.returncode == 1
    assert res.stderr.startswith(f"error: {key}: ") and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists()
    if case == "too_long":
        assert "33 tokens, longer than the teacher's context of 32" in res.stderr
