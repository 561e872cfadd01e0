"""Real corpora in training and evaluation: packed documents through the model and the
real steps (no attention, gradient or loss across documents), exact resume, mixtures with
tokens per source, bits per byte, generation with a BPE, and the data config errors."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config, Data, Sampling
from jaxlm.data.prepare import EMBEDDED_CORPUS, prepare_corpus
from jaxlm.evaluation.restore import restore_run
from jaxlm.evaluation.sampling import sample
from jaxlm.losses.cross_entropy import cross_entropy
from jaxlm.losses.objectives import split_objective_params
import jaxlm.models.attention
from jaxlm.models.model import create_model, split_params
from tests.helpers import ROOT, run_cli
from tests.test_faults import _sigterm_at, records
from jaxlm.training import trainer
from jaxlm.training.evaluate import evaluate
from jaxlm.training.experiment import Experiment
from jaxlm.training.hooks import Progress
from jaxlm.training.steps import make_eval_step, make_train_step

L, ROWS = 32, 8


def _documents(n: int, seed: int) -> list[str]:
    """`n` runs of 1-4 consecutive paragraphs of the embedded text (short and long ones)."""
    paragraphs = [p for p in EMBEDDED_CORPUS.read_text().split("\n\n") if p.strip()]
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(paragraphs) - 4, n)
    return ["\n\n".join(paragraphs[s:s + k]) for s, k in zip(starts, rng.integers(1, 5, n))]


def _prepare(directory, name, tokenizer, n=90, seed=0, **kw):
    src = directory / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _documents(n, seed)))
    return prepare_corpus([src], directory / name, tokenizer=tokenizer, workers=0,
                          progress=False, **kw)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpora")
    return {"bpe": _prepare(tmp, "bpe", "bpe", vocab_size=300),
            "plays": _prepare(tmp, "plays", "byte", seed=1),
            "poems": _prepare(tmp, "poems", "byte", n=60, seed=2)}


def _config(tiny_config, **data):
    c = tiny_config
    c.seq_len, c.batch_size, c.eval_batch_size, c.eval_max_batches = L, ROWS, ROWS, 0
    c.mesh.data = 1
    for key, value in {"packing": "documents", **data}.items():
        c.data[key] = value
    return c


def one():
    return jax.devices()[:1]


# Packed rows through the model.

@pytest.fixture(scope="module")
def packed(corpora, tmp_path_factory):
    """(experiment, params, a packed training batch with rows of 2+ documents)."""
    from jaxlm.configs.shakespeare_char import get_config
    c = _config(get_config("tiny"), path=str(corpora["bpe"]), tokenizer="bpe")
    exp = Experiment.build(c, tmp_path_factory.mktemp("wd"), one())
    batches = exp.train_batches()
    batch = next(b for b in batches if (b["segment_ids"].max(axis=1) >= 3).sum() >= 2)
    return exp, split_objective_params(exp.init_state().params)[0], batch


class _GivenEmbeddings(nnx.Module):
    """Stands in for the token embedding so that gradients w.r.t. inputs can be taken."""

    def __init__(self, embed, x):
        self.embed, self.x = embed, nnx.Variable(x)

    def __call__(self, tokens):
        return self.x[...]

    def attend(self, h):
        return self.embed.attend(h)


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_no_gradient_crosses_documents_in_a_packed_row(packed, impl):
    exp, params, batch = packed
    cfg = exp.model_cfg.replace_model(attention_impl=impl)
    graphdef, _ = split_params(create_model(cfg, 0))
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    x = nnx.merge(graphdef, params).embed(b["inputs"])

    def segment_loss(x, segment):
        model = nnx.merge(graphdef, params)
        model.embed = _GivenEmbeddings(model.embed, x)
        logits = model(b["inputs"], positions_BxL=b["positions"],
                       segment_ids_BxL=b["segment_ids"]).logits
        weights = b["weights"] * (b["segment_ids"] == segment)
        return cross_entropy(logits, b["targets"], weights, cfg.vocab_size)[0]

    for segment in (1, 2):
        g = np.abs(np.asarray(jax.grad(segment_loss)(x, segment))).sum(-1)
        own = np.asarray(batch["segment_ids"]) == segment
        assert np.all(g[~own] == 0.0), f"{impl}: gradient crosses into another document"
        assert np.all(g[own.any(axis=1)][own[own.any(axis=1)]] > 0)


def _alone(batch, row, segment):
    """One piece of a packed row as a batch of its own: positions from 0, padding after."""
    keep = batch["segment_ids"][row] == segment
    n = int(keep.sum())
    out = {k: np.zeros((1, L), v.dtype) for k, v in batch.items() if v.ndim == 2}
    for k in ("inputs", "targets"):
        out[k][0, :n] = batch[k][row][keep]
    out["segment_ids"][0, :n], out["positions"][0, :n] = 1, np.arange(n)
    out["weights"][0, :n] = 1.0
    return out


def _absolute_rope(monkeypatch):
    """RoPE is relative: inside an isolated document a shift of every position cancels.
    This probe adds the absolute position to the rotated queries and keys, so a step
    gives the same loss for a packed piece and the piece alone only if the positions
    reach the model and restart at 0 for each piece."""
    relative = jaxlm.models.attention.rope

    def absolute(x_BxLxHxK, positions_BxL, theta, scaling=None):
        shift = positions_BxL[:, :, None, None].astype(jnp.float32)
        return (relative(x_BxLxHxK, positions_BxL, theta, scaling) + shift
                ).astype(x_BxLxHxK.dtype)
    monkeypatch.setattr(jaxlm.models.attention, "rope", absolute)


def test_eval_and_train_steps_equal_the_documents_one_by_one(packed, monkeypatch):
    """The real steps on a packed batch give the losses of its pieces run alone from
    position 0: positions restart, attention stays inside a document, padding and the
    token before a document (which is never a target) add nothing."""
    exp, params, batch = packed
    params = jax.tree.map(lambda p: 4 * p, params)  # sharper: attention matters at init
    _absolute_rope(monkeypatch)
    step = jax.jit(make_eval_step(exp.graphdef, exp.model_cfg, exp.mesh, exp.rules))
    full = {k: v for k, v in batch.items() if v.ndim == 2}
    loss, count = step(params, exp.to_global(full))
    assert float(count) == batch["weights"].sum() == (batch["segment_ids"] > 0).sum()
    pieces = [(r, s) for r in range(ROWS) for s in np.unique(batch["segment_ids"][r]) if s]
    losses = [float(step(params, exp.to_global(_alone(batch, r, s)))[0]) for r, s in pieces]
    assert float(loss) == pytest.approx(sum(losses), rel=1e-6)  # 2e-3 without positions
    # Padding: whatever its inputs and targets hold, the loss does not move.
    noisy = dict(full, inputs=np.where(full["weights"] > 0, full["inputs"], 7),
                 targets=np.where(full["weights"] > 0, full["targets"], 9))
    assert float(step(params, exp.to_global(noisy))[0]) == pytest.approx(float(loss), rel=1e-6)
    # The train step divides the same sum by the same count (its first update's loss).
    train_step = jax.jit(make_train_step(exp.graphdef, exp.model_cfg, exp.optimizer,
                                         exp.schedule, exp.mesh, exp.rules))
    state = exp.init_state()
    state = state.replace(params=jax.tree.map(lambda p: 4 * p, state.params))
    _, metrics = train_step(state, exp.to_device(batch, train=True)[0])
    assert float(metrics["loss"]) == pytest.approx(float(loss) / float(count), rel=1e-5)


# End to end: documents, resume, mixtures, evaluation, generation.

STEPS, EVERY = 12, 4


def test_documents_resume_exactly_mid_epoch_after_sigterm(corpora, tiny_config, tmp_path,
                                                          monkeypatch):
    c = _config(tiny_config, path=str(corpora["bpe"]), tokenizer="bpe")
    c.steps, c.log_every, c.eval_every, c.checkpoint_every = STEPS, 1, 6, EVERY
    exp = Experiment.build(c, tmp_path / "probe", one())
    per_epoch = (np.diff(exp.data.sources[0].docs("train")) - 1).sum() / (L * ROWS)
    assert STEPS < per_epoch  # the stop and the end are both mid-epoch
    summary = trainer.train(c, tmp_path / "ref", one())
    reference = records(tmp_path / "ref")
    evals = [r for r in reference if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(0 < r["bits_per_byte"] < 10 for r in evals)
    assert summary["bits_per_byte"] == pytest.approx(evals[-1]["bits_per_byte"])
    with monkeypatch.context() as m:  # SIGTERM during step 5's hooks: stops after step 6
        _sigterm_at(m, Progress, "on_step", lambda info: info.step == 5)
        assert trainer.train(c, tmp_path / "run", one())["step"] == 6
    trainer.train(c, tmp_path / "run", one())
    assert records(tmp_path / "run") == reference
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert saved["tokenizer"] == "bpe" and saved["packing"] == "documents"


def test_bpe_run_evaluates_in_bits_per_byte_and_samples_decoded_text(corpora, tiny_config,
                                                                     tmp_path):
    c = _config(tiny_config, path=str(corpora["bpe"]), tokenizer="bpe")
    c.steps, c.eval_every, c.checkpoint_every = 4, 0, 4
    trainer.train(c, tmp_path, one())
    exp, state, _ = restore_run(tmp_path, devices=one())
    result = evaluate(exp, state.params)
    val = exp.data.sources[0].val
    docs = exp.data.sources[0].docs("val")
    targets = np.concatenate([np.asarray(val[a + 1:b]) for a, b in zip(docs[:-1], docs[1:])])
    assert result["num_tokens"] == len(targets)
    num_bytes = exp.data.token_bytes[targets].sum()  # the document ends (EOS) have no bytes
    assert result["bits_per_byte"] == pytest.approx(
        result["eval_loss"] * len(targets) / np.log(2) / num_bytes, rel=1e-5)
    texts, _ = sample(exp, state.params, ["ROMEO:", "\n"], 20, Sampling(temperature=1.0))
    tok = exp.data.tokenizer
    for text in texts:
        ids = tok.encode(text)
        assert isinstance(text, str) and text and tok.decode(ids) == text


def test_mixture_logs_tokens_per_source_and_evaluates_each(corpora, tiny_config, tmp_path,
                                                           monkeypatch):
    mix = f"{corpora['plays']}:0.75,{corpora['poems']}:0.25"
    c = _config(tiny_config, mixture=mix, tokenizer="byte")
    c.steps, c.log_every, c.eval_every, c.checkpoint_every = STEPS, 1, 12, EVERY
    trainer.train(c, tmp_path / "ref", one())
    reference = records(tmp_path / "ref")
    train = [r for r in reference if "loss" in r]
    seen = np.array([[r["tokens/plays"], r["tokens/poems"]] for r in train])
    assert np.all(np.diff(seen, axis=0) >= 0) and seen[0].sum() > 0
    assert seen[-1].sum() <= STEPS * ROWS * L
    share = seen[-1, 0] / seen[-1].sum()  # rows are drawn 3:1
    assert abs(share - 0.75) < 0.1
    (last,) = [r for r in reference if "eval_loss" in r]
    for name in ("plays", "poems"):
        assert last[f"eval_loss/{name}"] > 0 and last[f"bits_per_byte/{name}"] > 0
    with monkeypatch.context() as m:
        _sigterm_at(m, Progress, "on_step", lambda info: info.step == 5)
        trainer.train(c, tmp_path / "run", one())
    trainer.train(c, tmp_path / "run", one())
    assert records(tmp_path / "run") == reference  # the counts resume with the data


# Errors.

@pytest.mark.parametrize("data, message", [
    (dict(tokenizer="wordpiece"), "data.tokenizer: unknown tokenizer 'wordpiece'; choose one "
                                  "of char, byte, bpe, hf:PATH, sentencepiece:PATH, from:DIR"),
    (dict(tokenizer="sentencepiece:"), "data.tokenizer: unknown tokenizer 'sentencepiece:'; "
                                       "choose one of char, byte, bpe, hf:PATH, "
                                       "sentencepiece:PATH, from:DIR"),
    (dict(vocab_size=200), "data.vocab_size: 200 is too small for a byte-level BPE: it needs "
                           "at least 257 ids (256 bytes + end-of-document)"),
    (dict(packing="rows"), "data.packing: unknown value 'rows'; choose one of ['windows', "
                           "'documents']"),
    (dict(mixture="a:0.5,b:-0.5"), "data.mixture: weight of b must be a finite number >= 0, "
                                   "got -0.5"),
    (dict(mixture="a:0,b:0"), "data.mixture: the weights sum to zero (a:0,b:0)"),
    (dict(mixture="a"), "data.mixture: 'a' is not DIR:WEIGHT"),
    (dict(mixture="a:1", path="x.txt"), "data.mixture: set data.path or data.mixture, not both"),
])
def test_data_keys_are_checked_when_the_config_is_read(data, message):
    with pytest.raises(ConfigError) as err:
        Data.parse(data)
    assert str(err.value) == message


def test_documents_need_two_tokens_of_context():
    with pytest.raises(ConfigError, match="seq_len: packing=documents needs seq_len >= 2, "
                                          "got 1"):
        Config.from_dict({"seq_len": 1, "data": {"packing": "documents"}})


def test_data_checks_name_the_file_or_key(corpora, tiny_config, tmp_path):
    c = _config(tiny_config, path=str(corpora["plays"]), tokenizer="hf:/no/such/tokenizer.json")
    text = tmp_path / "t.txt"
    text.write_text("some text to train on\n" * 50)
    c.data.path = str(text)
    with pytest.raises(ConfigError, match="data.tokenizer: no such tokenizer file: "
                                          "/no/such/tokenizer.json"):
        Experiment.build(c, tmp_path / "a", one())
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "a document"}\n')
    c.data.path, c.data.tokenizer = str(jsonl), "bpe"
    with pytest.raises(ConfigError, match="data.path: .*docs.jsonl is a corpus file, not "
                                          "text: prepare it once with "
                                          "python -m jaxlm.data.prepare"):
        Experiment.build(c, tmp_path / "j", one())
    c.data.path = str(corpora["plays"])
    with pytest.raises(ConfigError, match="data.tokenizer: .*plays was prepared with the "
                                          "'byte' tokenizer, not 'bpe'"):
        Experiment.build(c, tmp_path / "b", one())
    c.data.path, c.data.mixture = "", f"{corpora['plays']}:1,{corpora['bpe']}:1"
    with pytest.raises(ConfigError, match="data.mixture: .*bpe was prepared with another "
                                          "tokenizer .*mixture sources must share"):
        Experiment.build(c, tmp_path / "c", one())
    c.data.mixture, c.data.tokenizer, c.data.path = "", "byte", str(corpora["plays"])
    c.seq_len, c.data.packing = 100_000, "windows"
    with pytest.raises(ConfigError, match="seq_len: seq_len 100000 is longer than the train"):
        Experiment.build(c, tmp_path / "d", one())


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--config.data.tokenizer=wordpiece"], "error: data.tokenizer: unknown tokenizer "
                                            "'wordpiece'; choose one of char, byte, bpe, "
                                            "hf:PATH, sentencepiece:PATH, from:DIR"),
    (["--config.data.packing=documents", "--config.seq_len=1"],
     "error: seq_len: packing=documents needs seq_len >= 2, got 1: a row of one token has no "
     "context inside a document"),
    (["--config.data.mixture=a:1,b:-2"], "error: data.mixture: weight of b must be a finite "
                                         "number >= 0, got -2"),
    (["--config.data.tokenizer=sentencepiece:/no/m.model"],
     "error: data.tokenizer: no such tokenizer file: /no/m.model"),
    (["--config.data.vocab_size=100", "--config.data.tokenizer=bpe"],
     "error: data.vocab_size: 100 is too small for a byte-level BPE: it needs at least 257 "
     "ids (256 bytes + end-of-document)"),
])
def test_cli_data_errors_are_one_line(args, message, tmp_path):
    res = run_cli(["train.py", "--config=configs/shakespeare_char.py:tiny",
                   f"--workdir={tmp_path}", *args])
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1] == message
    assert not (tmp_path / "checkpoints").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_the_same_packed_mixture_as_one(corpora, tmp_path):
    """Two processes read their halves of the same global batches: the same losses, token
    counts per source and bits per byte (bytes summed over both processes)."""
    args = ["train.py", "--config=configs/shakespeare_char.py:tiny", "--config.steps=4",
            "--config.batch_size=8", "--config.eval_batch_size=8", "--config.log_every=1",
            "--config.eval_every=4", "--config.checkpoint_every=4", "--config.mesh.data=2",
            "--config.data.packing=documents", "--config.data.tokenizer=byte",
            f"--config.data.mixture={corpora['plays']}:0.75,{corpora['poems']}:0.25"]
    single = run_cli(args + ["--cpu_devices=2", f"--workdir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        [sys.executable, *args, "--cpu_devices=1", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}", f"--workdir={tmp_path / 'two'}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    one_records, two_records = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r.keys() for r in one_records] == [r.keys() for r in two_records]
    for a, b in zip(one_records, two_records):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5), k
    assert "tokens/plays" in one_records[0] and "bits_per_byte/poems" in one_records[-1]
