"""Data: tokenizers, preparation and split, deterministic batches, iterator state."""

import json

import numpy as np
import pytest
from ml_collections import ConfigDict

from jaxlm.configs.errors import ConfigError
from jaxlm.data.pipeline import EvalBatches, TokenData, TrainBatches, resolve_data, train_iterator
from jaxlm.data.prepare import EMBEDDED_CORPUS, prepare
from jaxlm.data.tokenizers import ByteTokenizer, CharTokenizer


def data_cfg(path="", tokenizer="char"):
    return ConfigDict(dict(path=str(path), tokenizer=tokenizer, val_fraction=0.1, prefetch=2))


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


def test_train_batches_are_deterministic_and_seed_dependent(shakespeare):
    a = TrainBatches(shakespeare.train, 64, 12, seed=0)
    b = TrainBatches(shakespeare.train, 64, 12, seed=0)
    c = TrainBatches(shakespeare.train, 64, 12, seed=1)
    np.testing.assert_array_equal(a[5]["inputs"], b[5]["inputs"])
    assert not np.array_equal(a[5]["inputs"], c[5]["inputs"])
    assert not np.array_equal(a[5]["inputs"], a[6]["inputs"])
    batch = a[3]
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_windows_come_from_the_train_split_only(shakespeare):
    src = TrainBatches(shakespeare.train, 64, 64, seed=0)
    starts = np.concatenate([src.starts(s) for s in range(200)])
    assert starts.min() >= 0 and starts.max() + 65 <= len(shakespeare.train)


def test_processes_split_the_global_batch(shakespeare):
    whole = TrainBatches(shakespeare.train, 16, 8, seed=3)[7]["inputs"]
    parts = [TrainBatches(shakespeare.train, 16, 8, seed=3, process_index=i,
                          process_count=2)[7]["inputs"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_iterator_state_round_trips(shakespeare):
    src = TrainBatches(shakespeare.train, 32, 4, seed=0)
    it = train_iterator(src)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["inputs"] for _ in range(2)]
    it2 = train_iterator(src)
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
