"""Tokenizers: round trips for every kind, special ids, per-token byte lengths, specs."""

import io

import numpy as np
import pytest

from jaxlm.configs.errors import ConfigError
from jaxlm.data.tokenizers import (ByteTokenizer, CharTokenizer, encode_document,
                                   encode_documents, load_hf_tokenizer, load_sentencepiece,
                                   parse_tokenizer_spec, tokenizer_from_dict, train_bpe)

TEXT = "The quick brown fox — naïve café, 東京 ☃.\nSecond line!"
CORPUS = [TEXT, "hello world " * 20, "Über straße, 東京タワー", "plain ascii text here"] * 5


def sentencepiece_model(path):
    import sentencepiece as spm
    buf = io.BytesIO()
    lines = [line for doc in CORPUS for line in doc.split("\n")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf,
                                   vocab_size=300, model_type="bpe", byte_fallback=True,
                                   # Keep newlines and spaces as they are, so text round-trips.
                                   normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_bpe(iter(CORPUS), 400, tmp_path_factory.mktemp("bpe") / "tokenizer.json")


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return load_sentencepiece(sentencepiece_model(tmp_path_factory.mktemp("sp") / "m.model"))


def _all(bpe, sp, tmp_path):
    hf = load_hf_tokenizer(bpe.path)
    return {"char": CharTokenizer.fit("".join(CORPUS), eos=True),
            "byte": ByteTokenizer(eos=True), "bpe": bpe, "hf": hf, "sentencepiece": sp}


def test_round_trip_every_kind(bpe, sp, tmp_path):
    for kind, tok in _all(bpe, sp, tmp_path).items():
        for text in (TEXT, "", "東京"):
            ids = tok.encode(text)
            assert ids.dtype == np.int32 and (ids.size == 0 or ids.max() < tok.vocab_size)
            assert tok.decode(ids) == text, kind
        batch = tok.encode_batch([TEXT, "hello"])
        np.testing.assert_array_equal(batch[0], tok.encode(TEXT))
        # Rebuilt from its dict (file-backed kinds from the directory holding the file).
        root = getattr(tok, "path", tmp_path).parent if hasattr(tok, "path") else None
        again = tokenizer_from_dict(tok.to_dict(), root)
        assert again.to_dict() == tok.to_dict()
        np.testing.assert_array_equal(again.encode(TEXT), tok.encode(TEXT))
        assert tok.token_bytes.shape == (tok.vocab_size,)


def test_token_bytes_sum_to_the_utf8_length(bpe, sp, tmp_path):
    n = len(TEXT.encode())
    for kind, tok in _all(bpe, sp, tmp_path).items():
        got = int(tok.token_bytes[tok.encode(TEXT)].sum())
        # SentencePiece adds a dummy-prefix space ("▁") that decoding drops: one byte more.
        assert got == n + (kind == "sentencepiece"), kind
        if tok.eos_id is not None:
            assert tok.token_bytes[tok.eos_id] == 0


def test_special_ids(bpe, sp):
    assert bpe.eos_id is not None and bpe.bos_id is None
    assert bpe.decode([bpe.eos_id]) == ""
    assert (sp.bos_id, sp.eos_id) == (1, 2)
    doc = encode_document(sp, "hello")
    assert doc[0] == 1 and doc[-1] == 2
    np.testing.assert_array_equal(encode_documents(sp, ["hello"])[0], doc)
    char = CharTokenizer.fit("ab", eos=True)
    assert (char.vocab_size, char.eos_id) == (3, 2)
    np.testing.assert_array_equal(encode_document(char, "ba"), [1, 0, 2])
    assert char.decode([1, 0, 2]) == "ba"
    plain = CharTokenizer.fit("ab")
    assert plain.eos_id is None and plain.to_dict() == {"kind": "char", "chars": "ab"}
    assert ByteTokenizer().to_dict() == {"kind": "byte"} and ByteTokenizer().vocab_size == 256
    np.testing.assert_array_equal(encode_document(ByteTokenizer(eos=True), "a"), [97, 256])


def test_hf_directory_reads_bos_and_eos_from_tokenizer_config(bpe, tmp_path):
    import json
    import shutil
    shutil.copyfile(bpe.path, tmp_path / "tokenizer.json")
    assert load_hf_tokenizer(tmp_path).eos_id == bpe.eos_id
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|endoftext|>"}, "eos_token": "Ġhello"}))
    tok = load_hf_tokenizer(tmp_path)
    assert tok.bos_id == bpe.eos_id and tok.eos_id == tok.tok.token_to_id("Ġhello")


def test_specs_and_errors(tmp_path):
    assert parse_tokenizer_spec("hf:/x/y") == ("hf", "/x/y")
    assert parse_tokenizer_spec("byte") == ("byte", None)
    assert parse_tokenizer_spec("from:/runs/a") == ("from", "/runs/a")
    for spec in ("wordpiece", "hf", "hf: ", "sentencepiece:"):
        with pytest.raises(ConfigError, match=f"data.tokenizer: unknown tokenizer '{spec}'"):
            parse_tokenizer_spec(spec)
    with pytest.raises(ConfigError, match="--tokenizer: unknown tokenizer 'x'; choose one of "
                                          "char, byte, bpe, hf:PATH"):
        parse_tokenizer_spec("x", "--tokenizer")
    with pytest.raises(ConfigError, match="no such tokenizer file: .*nope.json"):
        load_hf_tokenizer(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="no tokenizer file .*tokenizer.json"):
        load_hf_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match="no such tokenizer file: .*x.model"):
        load_sentencepiece(tmp_path / "x.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="bad.model is not a SentencePiece model"):
        load_sentencepiece(tmp_path / "bad.model")
    with pytest.raises(ConfigError, match="data.vocab_size: 100 is too small"):
        train_bpe(iter(["abc"]), 100, tmp_path / "t.json")


def test_flat_document_encoding_matches_per_document(bpe, sp, tmp_path):
    from jaxlm.data.tokenizers import encode_documents_flat
    for kind, tok in _all(bpe, sp, tmp_path).items():
        texts = [TEXT, "hello", "東京"]
        flat, lengths = encode_documents_flat(tok, texts, np.uint16)
        assert flat.dtype == np.uint16
        want = encode_documents(tok, texts)
        np.testing.assert_array_equal(lengths, [len(w) for w in want])
        np.testing.assert_array_equal(flat, np.concatenate(want))
        empty, none = encode_documents_flat(tok, [])
        assert empty.size == 0 and none.size == 0
