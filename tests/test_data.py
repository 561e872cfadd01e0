"""Data: tokenizers, preparation and split, deterministic batches, iterator state."""

import json

import numpy as np
import pytest

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Data
from jaxlm.data.mixture import Mixture
from jaxlm.data.packing import WindowPlans, train_batches, windows_source
from jaxlm.data.pipeline import EvalBatches, TokenData, resolve_data
from jaxlm.data.prepare import EMBEDDED_CORPUS, prepare
from jaxlm.data.tokenizers import ByteTokenizer, CharTokenizer


def data_cfg(path="", tokenizer="char"):
    return Data(path=str(path), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    return resolve_data(data_cfg(), tmp_path_factory.mktemp("wd"))


def test_char_tokenizer_round_trip_and_unknown_character():
    tok = CharTokenizer.fit("hello world")
    assert tok.vocab_size == 8
    assert tok.decode(tok.encode("low hello")) == "low hello"
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("zebra")


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "naïve café"
    ids = tok.encode(text)
    assert ids.max() < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text


def test_embedded_corpus_split_is_nanogpt_90_10_in_file_order(shakespeare):
    text = EMBEDDED_CORPUS.read_text()
    assert shakespeare.vocab_size == 65
    assert len(shakespeare.train) == int(len(text) * 0.9)
    assert len(shakespeare.train) + len(shakespeare.val) == len(text)
    tok = shakespeare.tokenizer
    # Train is the prefix of the file and val the suffix: no overlap.
    assert tok.decode(shakespeare.train[:100]) == text[:100]
    assert tok.decode(shakespeare.val[-100:]) == text[-100:]
    assert tok.decode(shakespeare.val[:50]) == text[len(shakespeare.train):][:50]


def test_directory_of_text_files_and_byte_tokenizer(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "b.txt").write_text("second file " * 20)
    (tmp_path / "src" / "a.txt").write_text("first file " * 20)
    (tmp_path / "src" / ".hidden").write_text("ignored")
    data = resolve_data(data_cfg(tmp_path / "src", "byte"), tmp_path / "wd")
    assert data.vocab_size == 256
    joined = data.tokenizer.decode(np.concatenate([data.train, data.val]))
    assert joined == "first file " * 20 + "second file " * 20
    # A prepared directory is accepted as data.path directly.
    again = resolve_data(data_cfg(data.path, "byte"), tmp_path / "other")
    np.testing.assert_array_equal(again.val, data.val)


def windows(data, seq_len, global_batch, seed, **kw):
    return windows_source(Mixture.of_set(data), seq_len=seq_len, global_batch=global_batch,
                          seed=seed, **kw)


def test_train_windows_are_deterministic_and_seed_dependent(shakespeare):
    a = windows(shakespeare, 64, 12, seed=0)
    b = windows(shakespeare, 64, 12, seed=0)
    c = windows(shakespeare, 64, 12, seed=1)
    np.testing.assert_array_equal(a[5]["inputs"], b[5]["inputs"])
    assert not np.array_equal(a[5]["inputs"], c[5]["inputs"])
    assert not np.array_equal(a[5]["inputs"], a[6]["inputs"])
    batch = a[3]
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert "source" not in batch and "source_tokens" not in batch  # one set: no tags


def test_windows_of_one_set_start_where_seed_and_step_draw(shakespeare):
    src = windows(shakespeare, 64, 12, seed=7)
    tokens = np.asarray(shakespeare.train)
    for step in (0, 3, 1000):
        starts = np.random.default_rng([7, step]).integers(0, len(tokens) - 64, size=12)
        np.testing.assert_array_equal(src[step]["inputs"],
                                      tokens[starts[:, None] + np.arange(64)])
        np.testing.assert_array_equal(src[step]["targets"],
                                      tokens[starts[:, None] + np.arange(1, 65)])
        assert src[step]["inputs"].dtype == np.int32


def test_windows_come_from_the_train_split_only(shakespeare):
    plans = WindowPlans(Mixture.of_set(shakespeare), 64, 64, seed=0)
    starts = np.concatenate([plans[s]["start"] for s in range(200)])
    assert starts.min() >= 0 and starts.max() + 65 <= len(shakespeare.train)


def test_processes_split_the_global_batch(shakespeare):
    whole = windows(shakespeare, 16, 8, seed=3)[7]["inputs"]
    parts = [windows(shakespeare, 16, 8, seed=3, process_index=i, process_count=2)[7]["inputs"]
             for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_iterator_state_round_trips(shakespeare):
    kw = dict(seq_len=32, global_batch=4, seed=0, packing="windows")
    it = train_batches(Mixture.of_set(shakespeare), **kw)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["inputs"] for _ in range(2)]
    it2 = train_batches(Mixture.of_set(shakespeare), **kw)
    it2.set_state(json.loads(json.dumps(state)))
    for e in expected:
        np.testing.assert_array_equal(next(it2)["inputs"], e)


def test_eval_batches_cover_every_validation_target_once(shakespeare):
    ev = EvalBatches(shakespeare.val, 64, 48)
    seen = []
    for i in range(len(ev)):
        b = ev[i]
        seen.append(b["targets"][b["weights"] > 0])
    seen = np.concatenate(seen)
    np.testing.assert_array_equal(seen, shakespeare.val[1:])
    assert ev.num_targets == len(shakespeare.val) - 1


def test_token_ids_beyond_vocab_are_rejected(tmp_path, shakespeare):
    bad = tmp_path / "bad"
    prepare(EMBEDDED_CORPUS, bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["vocab_size"] = 10
    meta["tokenizer"]["chars"] = meta["tokenizer"]["chars"][:10]
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"train.bin has token id 64 >= vocab size 10"):
        TokenData.load(bad)


def test_missing_data_file_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="data.path: no such file"):
        resolve_data(data_cfg(tmp_path / "nope.txt"), tmp_path)
