"""Streaming corpus preparation: formats, document index, split, shards, idempotence,
crash safety, bounded memory and every bad-input error."""

import gzip
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxlm.configs.errors import ConfigError
from jaxlm.storage import dirs
from jaxlm.data.pipeline import TokenData
from jaxlm.data.prepare import META, prepare, prepare_corpus, token_dtype
from jaxlm.data.shards import ShardedTokens
from tests.helpers import call_cli
from tests.test_tokenizers import sentencepiece_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def docs_of(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "délta", "東京", "fox", "a", "the", "end.", "\n"]
    return [" ".join(rng.choice(words, size=rng.integers(1, 40))) + f" #{i}"
            for i in range(n)]


def write_jsonl(path, texts, field="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t, "meta": 1}) + "\n")
    return path


def decoded_docs(data: TokenData, split: str) -> list[str]:
    tokens, offsets = data.tokens(split), data.docs(split)
    out = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        ids = np.asarray(tokens[a:b])
        assert ids[-1] == data.tokenizer.eos_id  # every document ends with EOS
        out.append(data.tokenizer.decode(ids))
    return out


def test_jsonl_documents_index_and_split_by_document(tmp_path):
    texts = docs_of(300)
    src = write_jsonl(tmp_path / "a.jsonl", texts)
    out = prepare_corpus([src], tmp_path / "out", tokenizer="byte", workers=0,
                         progress=False)
    data = TokenData.load(out)
    assert data.vocab_size == 257 and data.tokenizer.eos_id == 256
    assert data.train.dtype == np.uint16
    train, val = decoded_docs(data, "train"), decoded_docs(data, "val")
    assert sorted(train + val) == sorted(texts)
    assert 10 < len(val) < 60  # ~10% of 300 documents
    # Each split keeps the input order.
    assert train == [t for t in texts if t in set(train)]
    meta = json.loads((out / META).read_text())
    assert meta["documents"] == {"train": len(train), "val": len(val)}
    assert meta["splits"]["train"]["bytes"] == sum(len(t.encode()) for t in train)
    # The split is by content: the same documents in another order split the same way.
    src2 = write_jsonl(tmp_path / "b.jsonl", texts[::-1])
    data2 = TokenData.load(prepare_corpus([src2], tmp_path / "out2", tokenizer="byte",
                                          workers=0, progress=False))
    assert sorted(decoded_docs(data2, "val")) == sorted(val)


def test_formats_gz_zst_parquet_text_and_blank_lines(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    texts = docs_of(120, seed=1)
    write_jsonl(tmp_path / "a.jsonl.gz", texts[:30], field="body", opener=gzip.open)
    with open(tmp_path / "b.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(
            "".join(json.dumps({"body": t}) + "\n" for t in texts[30:60]).encode()))
    pq.write_table(pa.table({"body": texts[60:90]}), tmp_path / "c.parquet")
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts[90:100]):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(t)
    out = prepare_corpus([tmp_path / "*.jsonl.*", tmp_path / "c.parquet", tmp_path / "txt"],
                         tmp_path / "out", tokenizer="char", text_field="body", workers=0,
                         progress=False, val_fraction=0.3)
    data = TokenData.load(out)
    assert sorted(decoded_docs(data, "train") + decoded_docs(data, "val")) == \
        sorted(texts[:100])
    # Plain text split on blank lines.
    blocks = ["first block\nstill first", "second", "third\n\nfourth"]
    (tmp_path / "blocks.txt").write_text("\n\n\n".join(blocks * 10) + "\n")
    out = prepare_corpus([tmp_path / "blocks.txt"], tmp_path / "blocks", tokenizer="byte",
                         split_blank_lines=True, workers=0, progress=False, val_fraction=0.5)
    data = TokenData.load(out)
    got = decoded_docs(data, "train") + decoded_docs(data, "val")
    assert sorted(d.strip("\n") for d in got) == sorted(
        ["first block\nstill first", "second", "third", "fourth"] * 10)


def test_bpe_hf_and_sentencepiece_are_kept_in_the_directory(tmp_path):
    texts = docs_of(200, seed=2)
    src = write_jsonl(tmp_path / "a.jsonl", texts)
    out = prepare_corpus([src], tmp_path / "bpe", tokenizer="bpe", vocab_size=300,
                         workers=0, progress=False)
    assert (out / "tokenizer.json").is_file()
    data = TokenData.load(out)
    assert data.tokenizer.kind == "bpe" and data.vocab_size <= 300
    assert sorted(decoded_docs(data, "train") + decoded_docs(data, "val")) == sorted(texts)
    # hf: a directory holding tokenizer.json (here the BPE just trained), copied over.
    out_hf = prepare_corpus([src], tmp_path / "hf", tokenizer=f"hf:{out}", workers=0,
                            progress=False)
    hf = TokenData.load(out_hf)
    assert hf.tokenizer.kind == "hf" and (out_hf / "tokenizer.json").is_file()
    np.testing.assert_array_equal(hf.train, data.train)
    model = sentencepiece_model(tmp_path / "m.model")
    out_sp = prepare_corpus([src], tmp_path / "sp", tokenizer=f"sentencepiece:{model}",
                            workers=0, progress=False)
    model.unlink()  # the prepared directory does not need the original any more
    sp = TokenData.load(out_sp)
    assert sp.tokenizer.kind == "sentencepiece" and (out_sp / "tokenizer.model").is_file()
    first = np.asarray(sp.train[sp.train_docs[0]:sp.train_docs[1]])
    assert first[0] == sp.tokenizer.bos_id and first[-1] == sp.tokenizer.eos_id


def test_workers_give_identical_files_and_shards_split_at_documents(tmp_path):
    texts = docs_of(400, seed=3)
    src = write_jsonl(tmp_path / "a.jsonl", texts)
    one = prepare_corpus([src], tmp_path / "w0", tokenizer="byte", workers=0,
                         progress=False, shard_bytes=4096)
    two = prepare_corpus([src], tmp_path / "w2", tokenizer="byte", workers=2,
                         progress=False, shard_bytes=4096)
    meta = json.loads((one / META).read_text())
    assert len(meta["splits"]["train"]["shards"]) > 3
    for name in meta["splits"]["train"]["shards"] + meta["splits"]["val"]["shards"] + \
            ["train.idx", "val.idx"]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    data = TokenData.load(one)
    assert isinstance(data.train, ShardedTokens)
    assert sorted(decoded_docs(data, "train") + decoded_docs(data, "val")) == sorted(texts)
    # Random windows across shard boundaries read the same as the concatenation.
    flat = np.asarray(data.train)
    idx = np.random.default_rng(0).integers(0, len(flat) - 9, 50)[:, None] + np.arange(9)
    np.testing.assert_array_equal(data.train[idx], flat[idx])


def test_token_dtype():
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_rerun_is_a_no_op_and_changed_inputs_are_refused_or_rebuilt(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", docs_of(100))
    out = prepare_corpus([src], tmp_path / "out", tokenizer="byte", workers=0,
                         progress=False)
    stamp = (out / META).stat().st_mtime_ns
    prepare_corpus([src], out, tokenizer="byte", workers=0, progress=False)
    assert (out / META).stat().st_mtime_ns == stamp
    write_jsonl(src, docs_of(120))
    with pytest.raises(ConfigError, match="--output: .*made from other inputs"):
        prepare_corpus([src], out, tokenizer="byte", workers=0, progress=False)
    with pytest.raises(ConfigError, match="--output: .*made from other inputs"):
        prepare_corpus([src], out, tokenizer="char", workers=0, progress=False)
    prepare_corpus([src], out, tokenizer="byte", workers=0, progress=False, overwrite=True)
    assert sum(json.loads((out / META).read_text())["documents"].values()) == 120
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "f").write_text("x")
    with pytest.raises(ConfigError, match="--output: .*junk is not empty and is not a prepared"):
        prepare_corpus([src], tmp_path / "junk", tokenizer="byte", workers=0, progress=False)


def test_failure_leaves_no_output_and_stale_partials_are_removed(tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", docs_of(50))
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n' * 3 + b'{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=r"--input: .*b.jsonl:4: not UTF-8"):
        prepare_corpus([good, bad], tmp_path / "out", tokenizer="byte", workers=0,
                       progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]
    # A crashed run's partial directory (its process is gone) is cleaned up.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dirs.HOST}-{dead.pid}"
    stale.mkdir()
    (stale / META).write_text("{}")
    out = prepare_corpus([good, bad], tmp_path / "out", tokenizer="byte", workers=0,
                         progress=False, skip_bad=True)
    assert not stale.exists()
    assert json.loads((out / META).read_text())["skipped"]["bad"] == 1


def _error(tmp_path, match, inputs, **kwargs):
    kwargs = {"tokenizer": "byte", "workers": 0, "progress": False, **kwargs}
    with pytest.raises(ConfigError, match=match):
        prepare_corpus(inputs, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_name_the_flag_and_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = write_jsonl(tmp_path / "a.jsonl", docs_of(30))
    _error(tmp_path, r"--text_field: .*a.jsonl:1 has no string field 'body' \(has: text, meta\)",
           [src], text_field="body")
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "p.parquet")
    _error(tmp_path, r"--text_field: .*p.parquet has no column 'text' \(columns: content\)",
           [tmp_path / "p.parquet"])
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n\n')
    _error(tmp_path, "--input: empty corpus", [tmp_path / "empty.jsonl"])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    _error(tmp_path, r"--input: .*bad.jsonl:2: not valid JSON", [tmp_path / "bad.jsonl"])
    (tmp_path / "latin1.txt").write_bytes("line one\nnaïve\n".encode("latin-1"))
    _error(tmp_path, r"--input: .*latin1.txt:2: not UTF-8", [tmp_path / "latin1.txt",
                                                              src])
    _error(tmp_path, "--input: no such file or directory: .*nope", [tmp_path / "nope"])
    _error(tmp_path, "--input: .*matches no files", [tmp_path / "*.missing"])
    _error(tmp_path, "--tokenizer: unknown tokenizer 'wordpiece'", [src],
           tokenizer="wordpiece")
    _error(tmp_path, "--tokenizer: no such tokenizer file: .*tok.json", [src],
           tokenizer=f"hf:{tmp_path / 'tok.json'}")
    _error(tmp_path, "--tokenizer: no such tokenizer file: .*m.model", [src],
           tokenizer=f"sentencepiece:{tmp_path / 'm.model'}")
    _error(tmp_path, "--vocab_size: 200 is too small for a byte-level BPE", [src],
           tokenizer="bpe", vocab_size=200)
    (tmp_path / "one.jsonl").write_text('{"text": "only one document"}\n')
    _error(tmp_path, "--val_fraction: the (train|val) split is empty", [tmp_path / "one.jsonl"])
    _error(tmp_path, r"--val_fraction: must be in \(0, 1\)", [src], val_fraction=1.0)


def _run_cli(*args):
    return call_cli(["-m", "jaxlm.data.prepare", *args])


def test_a_value_out_of_range_is_the_same_line_for_every_format(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("abc\n")
    docs = write_jsonl(tmp_path / "d.jsonl", ["a", "b"])
    for args in ([f"--input={text}"], [f"--input={docs}"],
                 [f"--input={docs}", "--format=sft", "--tokenizer=byte"]):
        r = _run_cli(*args, f"--output={tmp_path / 'o'}", "--val_fraction=1")
        assert (r.returncode, r.stderr) == (
            1, "error: --val_fraction: must be in (0, 1), got 1.0\n"), args
    assert not (tmp_path / "o").exists()


def test_cli_errors_are_one_line_and_single_text_keeps_the_old_format(tmp_path):
    r = _run_cli(f"--input={tmp_path / 'missing.jsonl'}", f"--output={tmp_path / 'o'}")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: --input: no such file or directory: {tmp_path / 'missing.jsonl'}"]
    r = _run_cli(f"--input={tmp_path}", f"--output={tmp_path / 'o'}", "--tokenizer=nope")
    assert r.stderr.strip() == ("error: --tokenizer: unknown tokenizer 'nope'; choose one of "
                                "char, byte, bpe, hf:PATH, sentencepiece:PATH, from:DIR")
    text = tmp_path / "story.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 40)
    r = _run_cli(f"--input={text}", f"--output={tmp_path / 'cli'}", "--tokenizer=byte")
    assert r.returncode == 0, r.stderr
    prepare(text, tmp_path / "api", tokenizer="byte")
    for f in ("train.bin", "val.bin"):
        assert (tmp_path / "cli" / f).read_bytes() == (tmp_path / "api" / f).read_bytes()
    src = write_jsonl(tmp_path / "a.jsonl", docs_of(40))
    r = _run_cli(f"--input={src}", f"--output={tmp_path / 'docs'}", "--tokenizer=byte",
                 "--workers=0")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert sum(summary["documents"].values()) == 40
    assert "tokenize" in r.stderr and "B/s" in r.stderr  # the progress bar, on stderr


_MEMORY_CHILD = textwrap.dedent("""
    import resource, sys
    from jaxlm.data.prepare import prepare_corpus
    import jaxlm.data.readers, json, gzip, hashlib  # everything preparation imports
    vm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status")
          if l.startswith("VmSize:")][0]
    cap = vm + {headroom}
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if sys.argv[1] == "whole":  # control: holding the corpus does not fit under the cap
        try:
            data = open(sys.argv[2], "rb").read()
            text = data.decode()
        except MemoryError:
            sys.exit(3)
        sys.exit(0)
    prepare_corpus([sys.argv[2]], sys.argv[3], tokenizer="byte", workers=0, progress=False)
""")


def test_preparation_memory_stays_under_a_cap_smaller_than_the_corpus(tmp_path):
    src = tmp_path / "big.jsonl"
    text = " ".join(docs_of(1, seed=4)[0] for _ in range(4))
    with open(src, "w") as f:
        for i in range(48 * 2**20 // (len(text) + 20)):  # ~48 MiB of distinct JSON lines
            f.write(json.dumps({"text": f"{i} {text}"}) + "\n")
    headroom = 32 * 2**20  # the child may grow by 32 MiB: less than the corpus
    child = tmp_path / "child.py"
    child.write_text(_MEMORY_CHILD.format(root=ROOT, headroom=headroom))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
    ctl = subprocess.run([sys.executable, str(child), "whole", str(src)], env=env,
                         capture_output=True, text=True)
    assert ctl.returncode == 3, ctl.stderr  # reading it whole fails under the cap
    r = subprocess.run([sys.executable, str(child), "stream", str(src), str(tmp_path / "o")],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path / "o" / META).read_text())
    assert sum(meta["counts"].values()) > 40 * 2**20


def test_one_text_with_bpe_and_resolve_data_with_tokenizer_specs(tmp_path):
    from ml_collections import ConfigDict

    from jaxlm.data.pipeline import resolve_data
    text = tmp_path / "story.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 40)
    cfg = ConfigDict(dict(path=str(text), tokenizer="bpe", val_fraction=0.1, prefetch=2,
                          vocab_size=300))
    data = resolve_data(cfg, tmp_path / "wd")
    assert data.tokenizer.kind == "bpe" and (data.path / "tokenizer.json").is_file()
    assert data.train_docs is None and len(data.docs("train")) == 2  # one text
    assert data.tokenizer.decode(np.concatenate([data.train, data.val])) == text.read_text()
    # A prepared corpus is used as is; `hf:PATH` matches a set prepared with kind hf.
    src = write_jsonl(tmp_path / "a.jsonl", docs_of(60))
    out = prepare_corpus([src], tmp_path / "hf", tokenizer=f"hf:{data.path}", workers=0,
                         progress=False)
    cfg.path, cfg.tokenizer = str(out), f"hf:{data.path}"
    assert resolve_data(cfg, tmp_path / "wd2").train_docs is not None
    cfg.tokenizer = "char"
    with pytest.raises(ConfigError, match="data.tokenizer: .*prepared with the 'hf' tokenizer"):
        resolve_data(cfg, tmp_path / "wd2")
    # The file is checked too, not only the kind: another tokenizer, or none.
    from jaxlm.data.tokenizers import train_bpe
    other = train_bpe(["Another text, another merge table entirely.\n" * 40], 300,
                      tmp_path / "other.json")
    cfg.tokenizer = f"hf:{other.path}"
    with pytest.raises(ConfigError) as err:
        resolve_data(cfg, tmp_path / "wd2")
    assert str(err.value) == (
        f"data.tokenizer: {out}'s tokenizer is not {other.path}'s (another hf file: sha256 "
        f"{other.sha256[:8]} -> {data.tokenizer.sha256[:8]}, {data.vocab_size} tokens): set "
        f"data.tokenizer to the file it was prepared with, or prepare it again with "
        f"--tokenizer=hf:{other.path}")
    cfg.tokenizer = f"hf:{tmp_path / 'missing.json'}"
    with pytest.raises(ConfigError, match="data.tokenizer: no such tokenizer file: "):
        resolve_data(cfg, tmp_path / "wd2")


def test_output_inside_an_input_directory_is_not_read_back(tmp_path):
    (tmp_path / "corpus").mkdir()
    for i, t in enumerate(docs_of(40)):
        (tmp_path / "corpus" / f"{i:03d}.txt").write_text(t)
    out = tmp_path / "corpus" / "prepared"
    prepare_corpus([tmp_path / "corpus"], out, tokenizer="byte", workers=0, progress=False)
    stamp = (out / META).stat().st_mtime_ns
    prepare_corpus([tmp_path / "corpus"], out, tokenizer="byte", workers=0, progress=False)
    assert (out / META).stat().st_mtime_ns == stamp
    assert sum(json.loads((out / META).read_text())["documents"].values()) == 40


def test_bpe_can_train_on_a_prefix(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", docs_of(200, seed=6))
    out = prepare_corpus([src], tmp_path / "out", tokenizer="bpe", vocab_size=300,
                         workers=0, progress=False, bpe_train_mb=0.0005)
    data = TokenData.load(out)
    assert json.loads((out / META).read_text())["settings"]["bpe_train_chars"] == 500
    assert sum(len(d) for d in decoded_docs(data, "train")) > 500  # all documents written
    with pytest.raises(ConfigError, match="--bpe_train_mb: must be >= 0"):
        prepare_corpus([src], tmp_path / "o2", tokenizer="bpe", bpe_train_mb=-1,
                       workers=0, progress=False)
