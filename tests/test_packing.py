"""Packed-document and window batches: invariants, epochs, processes, exact resume,
evaluation coverage and bits per byte."""

import collections
import dataclasses
import json

import grain
import jax
import numpy as np
import pytest

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config, Mesh
from jaxlm.data.mixture import Mixture
from jaxlm.data.packing import (PackedEvalBatches, bits_per_byte, eval_batches, split_row_info,
                                train_batches, train_dataset)
from jaxlm.parallel.mesh import make_mesh
from jaxlm.training.layout import check_layout, resolve_mesh_shape
from jaxlm.data.pipeline import TokenData
from jaxlm.data.prepare import EMBEDDED_CORPUS, prepare, prepare_corpus

L = 16


def corpus_texts(n=160, seed=0):
    """Documents of 1 to ~60 bytes, several longer than a row of L."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz é"))
    return ["".join(rng.choice(letters, size=rng.integers(1, 60))) + f"{i}"
            for i in range(n)]


@pytest.fixture(scope="module")
def docs_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packing")
    with open(tmp / "a.jsonl", "w") as f:
        for t in corpus_texts():
            f.write(json.dumps({"text": t}) + "\n")
    out = prepare_corpus([tmp / "a.jsonl"], tmp / "out", tokenizer="byte", workers=0,
                         progress=False, shard_bytes=512, val_fraction=0.2)
    return TokenData.load(out)


def documents(data, split="train"):
    tokens, offsets = np.asarray(data.tokens(split)), data.docs(split)
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def take(it, n):
    return [next(it) for _ in range(n)]


def test_batch_keys_dtypes_and_row_invariants(docs_data):
    it = train_batches(Mixture.of_set(docs_data), seq_len=L, global_batch=8, seed=0,
                       packing="documents")
    for b in take(it, 20):
        assert set(b) == {"inputs", "targets", "segment_ids", "positions", "weights"}
        for k in ("inputs", "targets", "segment_ids", "positions"):
            assert b[k].dtype == np.int32 and b[k].shape == (8, L)
        assert b["weights"].dtype == np.float32 and b["weights"].shape == (8, L)
        for row in range(8):
            seg, pos = b["segment_ids"][row], b["positions"][row]
            w, inp, tgt = b["weights"][row], b["inputs"][row], b["targets"][row]
            real = seg > 0
            np.testing.assert_array_equal(w, real.astype(np.float32))
            n = int(real.sum())
            assert real[:n].all() and not real[n:].any()  # padding only at the end
            assert seg[0] == 1 and np.all(np.diff(seg[:n]) >= 0) and np.all(
                np.diff(seg[:n]) <= 1)
            starts = np.r_[True, seg[1:n] != seg[:n - 1]]
            # Positions restart at every segment and count up within it.
            np.testing.assert_array_equal(pos[:n][starts], 0)
            np.testing.assert_array_equal(pos[1:n][~starts[1:]], pos[:n - 1][~starts[1:]] + 1)
            # Inside a segment the next input is this target (shifted in the document).
            same = ~starts[1:]
            np.testing.assert_array_equal(inp[1:n][same], tgt[:n - 1][same])
            assert not inp[n:].any() and not tgt[n:].any() and not pos[n:].any()


def test_every_document_token_once_per_epoch(docs_data):
    docs = documents(docs_data)
    ds = train_dataset(Mixture.of_set(docs_data), seq_len=L, global_batch=8, seed=3,
                       packing="documents", num_epochs=1)
    targets, inputs = collections.Counter(), collections.Counter()
    for b in ds:
        w = b["weights"] > 0
        targets.update(b["targets"][w].tolist())
        inputs.update(b["inputs"][w].tolist())
    # Every token of every document is a target exactly once, except its first token
    # (never predicted across a document boundary); as inputs, all but the last (EOS).
    assert targets == collections.Counter(np.concatenate([d[1:] for d in docs]).tolist())
    assert inputs == collections.Counter(np.concatenate([d[:-1] for d in docs]).tolist())


def test_epoch_order_is_a_seeded_shuffle_per_epoch(docs_data):
    def first_rows(seed, n=200):
        it = train_batches(Mixture.of_set(docs_data), seq_len=L, global_batch=4, seed=seed,
                           packing="documents")
        return np.concatenate([b["inputs"] for b in take(it, n)])
    a, b, c = first_rows(0), first_rows(0), first_rows(1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Epoch 2 is ordered differently from epoch 1: compare each epoch's first rows.
    ds = train_dataset(Mixture.of_set(docs_data), seq_len=L, global_batch=4, seed=0,
                       packing="documents", num_epochs=1)
    per_epoch = sum(1 for _ in ds)
    rows = first_rows(0, 2 * per_epoch + 2)
    first, second = rows[:4 * per_epoch], rows[4 * per_epoch:8 * per_epoch]
    assert not np.array_equal(first[:8], second[:8])


@pytest.mark.parametrize("packing", ["documents", "windows"])
def test_global_batch_is_the_same_for_any_number_of_processes(docs_data, packing):
    whole = take(train_batches(Mixture.of_set(docs_data), seq_len=L, global_batch=8, seed=5,
                               packing=packing), 12)
    for count in (2, 4):
        parts = [take(train_batches(Mixture.of_set(docs_data), seq_len=L, global_batch=8, seed=5,
                                    packing=packing, process_index=i, process_count=count), 12)
                 for i in range(count)]
        for step in range(12):
            for k in whole[step]:
                np.testing.assert_array_equal(
                    np.concatenate([p[step][k] for p in parts]), whole[step][k])


def _orbax_round_trip(it_a, it_b, path):
    import orbax.checkpoint as ocp
    ckptr = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
    ckptr.save(path, args=grain.checkpoint.CheckpointSave(it_a))
    ckptr.restore(path, args=grain.checkpoint.CheckpointRestore(it_b))


@pytest.mark.parametrize("packing", ["documents", "windows"])
def test_resume_mid_epoch_is_exact_through_grain_checkpoints(docs_data, packing, tmp_path):
    kw = dict(seq_len=L, global_batch=4, seed=1, packing=packing)
    it = train_batches(Mixture.of_set(docs_data), **kw)
    take(it, 37)  # mid-epoch, mid packed batch
    state = it.get_state()
    expected = take(it, 10)
    it2 = train_batches(Mixture.of_set(docs_data), **kw)
    it2.set_state(json.loads(json.dumps(state)))
    for e, g in zip(expected, take(it2, 10)):
        for k in e:
            np.testing.assert_array_equal(g[k], e[k])
    it3 = train_batches(Mixture.of_set(docs_data), **kw)
    take(it3, 37)
    it4 = train_batches(Mixture.of_set(docs_data), **kw)
    _orbax_round_trip(it3, it4, tmp_path / "data_state")
    for e, g in zip(expected, take(it4, 10)):
        for k in e:
            np.testing.assert_array_equal(g[k], e[k])


def test_windows_for_one_set_draw_their_starts_from_seed_and_step(tmp_path):
    data = TokenData.load(prepare(EMBEDDED_CORPUS, tmp_path / "d"))
    it = train_batches(Mixture.of_set(data), seq_len=64, global_batch=12, seed=0,
                       packing="windows")
    tokens = np.asarray(data.train)
    for step, b in enumerate(take(it, 5)):
        starts = np.random.default_rng([0, step]).integers(0, len(tokens) - 64, size=12)
        np.testing.assert_array_equal(b["inputs"], tokens[starts[:, None] + np.arange(64)])
        np.testing.assert_array_equal(b["targets"], tokens[starts[:, None] + np.arange(1, 65)])
        assert (b["segment_ids"] == 1).all() and (b["weights"] == 1).all()
        np.testing.assert_array_equal(b["positions"][3], np.arange(64))
        assert "source" not in b and "tokens_seen" not in b
    # A one-text set packs as one long document.
    b = next(train_batches(Mixture.of_set(data), seq_len=64, global_batch=12, seed=0,
                           packing="documents"))
    assert b["weights"].sum() == 12 * 64


def test_eval_batches_cover_every_target_once_with_bytes(docs_data):
    docs = documents(docs_data, "val")
    tb = docs_data.token_bytes
    ev = eval_batches(docs_data, seq_len=L, global_batch=6, packing="documents")
    assert isinstance(ev, PackedEvalBatches)
    got, nbytes = [], 0.0
    for i in range(len(ev)):
        b = ev[i]
        w = b["weights"] > 0
        got.append(b["targets"][w])
        assert b["target_bytes"].shape == (6,)
        np.testing.assert_allclose(b["target_bytes"], (tb[b["targets"]] * w).sum(1))
        nbytes += b["target_bytes"].sum()
        for row in range(6):  # the same row invariants as training
            seg = b["segment_ids"][row]
            n = int((seg > 0).sum())
            assert (seg[:n] > 0).all() and not seg[n:].any()
    want = np.concatenate([d[1:] for d in docs])
    np.testing.assert_array_equal(np.concatenate(got), want)  # in file order
    assert ev.num_targets == len(want)
    # Bytes of the targets: every byte of every document but its first (EOS has none).
    texts = [docs_data.tokenizer.decode(d) for d in docs]
    assert nbytes == sum(len(t.encode()) - 1 for t in texts)
    # Processes split each eval batch's rows.
    parts = [eval_batches(docs_data, seq_len=L, global_batch=6, packing="documents",
                          process_index=i, process_count=3)[1] for i in range(3)]
    for k in ev[1]:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), ev[1][k])
    # Windows evaluation carries the bytes too.
    ew = eval_batches(docs_data, seq_len=L, global_batch=6, packing="windows")
    total = sum(ew[i]["target_bytes"].sum() for i in range(len(ew)))
    assert total == tb[np.asarray(docs_data.val)[1:]].sum()


def test_bits_per_byte_and_row_info(docs_data):
    assert bits_per_byte(np.log(2.0) * 10, 5) == pytest.approx(2.0)
    b = eval_batches(docs_data, seq_len=L, global_batch=6, packing="documents")[0]
    model, rows = split_row_info(b)
    assert set(rows) == {"target_bytes"} and "target_bytes" not in model


def _check_layout(config: dict, data: TokenData, process_count: int = 1) -> None:
    """check_layout's data and batch checks on one CPU device (no parameters)."""
    mesh = make_mesh(resolve_mesh_shape(Mesh(), 1), jax.devices()[:1])
    check_layout(Config.from_dict(config), mesh, Mixture.of_set(data), None, {}, {},
                 process_count=process_count)


def test_the_layout_check_refuses_batches_the_data_cannot_fill(docs_data):
    documents = {"seq_len": L, "batch_size": 6, "eval_batch_size": 6,
                 "data": {"packing": "documents"}}
    _check_layout(documents, docs_data, process_count=3)
    with pytest.raises(ConfigError, match="^batch_size: 6 is not divisible by the 4 processes$"):
        _check_layout(documents, docs_data, process_count=4)
    one_token_docs = dataclasses.replace(docs_data, val_docs=np.arange(len(docs_data.val) + 1))
    with pytest.raises(ConfigError, match=r"^data.path: the val split of .* has no document of "
                                          r"2 or more tokens$"):
        _check_layout(documents, one_token_docs)
    with pytest.raises(ConfigError, match=r"^seq_len: seq_len 100000 is longer than the train "
                                          r"split \(\d+ tokens\) of "):
        _check_layout({**documents, "seq_len": 100_000, "data": {}}, docs_data)
