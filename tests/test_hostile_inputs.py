"""Hostile and damaged inputs: every parser checks what it reads. A damaged safetensors
file or index, a damaged corpus file, a bad JSON line, a bad chat template or a damaged
tokenizer is one ConfigError (one `error:` line from the CLIs) naming the file and what
to do, or, for a record with --skip_bad / in SFT, a counted bad record."""

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from jaxlm.checkpoints.architectures import Tensor
from jaxlm.checkpoints.hf_import import fill_layer, tensor_names
from jaxlm.checkpoints.safetensors_io import SafetensorsReader, write_safetensors
from jaxlm.configs.errors import ConfigError
from jaxlm.data.prepare import META, prepare_corpus, prepare_sft
from jaxlm.data.readers import Task, parse_task
from jaxlm.data.sft import BadRecord, ChatTemplate, parse_record
from tests.helpers import call_cli


def _one_error_line(r, start: str) -> str:
    """The CLI failed with exactly one `error:` line, starting with `start`, and no
    traceback."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(start), r.stderr
    return errors[0]


# ----------------------------------------------------------------------------------------
# safetensors files and indexes.

def _raw_safetensors(path: Path, header, data: bytes, length: int | None = None) -> Path:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
DAMAGED = {
    "overlapping": ({"a": F32x2, "b": F32x2}, b"\0" * 8, "share bytes"),
    "negative": ({"a": {**F32x2, "data_offsets": [-8, 0]}}, b"\0" * 8, "byte range"),
    "relabelled_dtype": ({"a": {**F32x2, "dtype": "F16"}}, b"\0" * 8, r"F16 \[2\] takes 4"),
    "past_the_end": ({"a": {**F32x2, "data_offsets": [0, 64]}}, b"\0" * 8,
                     "not within the 8-byte data section"),
    "truncated": ({"a": F32x2}, b"\0" * 3, "not within the 3-byte data section"),
    "not_an_object": ([1, 2], b"", "not a JSON object"),
    "gap": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8,
            "invalid offset"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_safetensors_file_is_refused(case, tmp_path):
    header, data, message = DAMAGED[case]
    _raw_safetensors(tmp_path / "model.safetensors", header, data)
    with pytest.raises(ConfigError, match=f"model.safetensors is not a valid safetensors "
                                          f"file .*{message}.*; re-download or re-export"):
        SafetensorsReader(tmp_path)


def test_a_huge_header_length_or_a_tiny_file_is_refused(tmp_path):
    _raw_safetensors(tmp_path / "a" / "model.safetensors", {}, b"", length=2**62)
    with pytest.raises(ConfigError, match="header length 4611686018427387904 in a file"):
        SafetensorsReader(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.safetensors").write_bytes(b"\1\2")
    with pytest.raises(ConfigError, match="shorter than the 8-byte header length"):
        SafetensorsReader(tmp_path / "b")


def _good_shard(path: Path, name: str = "w") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, [(name, np.float32, (2,), lambda: np.ones(2, np.float32))])


def test_an_index_may_name_only_files_inside_the_model_directory(tmp_path):
    _good_shard(tmp_path / "x.safetensors")  # a real file, outside the model directory
    model = tmp_path / "a" / "b" / "model"
    model.mkdir(parents=True)
    for name in ("../../../x.safetensors", str(tmp_path / "x.safetensors")):
        (model / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"w": name}}))
        with pytest.raises(ConfigError, match="must lie inside"):
            SafetensorsReader(model)
    _good_shard(model / "sub" / "s.safetensors")  # inside, in a folder: fine
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "sub/s.safetensors"}}))
    np.testing.assert_array_equal(SafetensorsReader(model).view("w"), np.ones(2))


@pytest.mark.parametrize("index, message", [
    ("{not json", "is damaged \\(not JSON"),
    ("[1, 2]", "no 'weight_map' object"),
    ('{"weight_map": {"w": 3}}', "maps to 3, not a file name"),
    ('{"weight_map": {"w": "s.safetensors", "v": "s.safetensors"}}', "does not hold it"),
])
def test_a_damaged_index_is_refused(index, message, tmp_path):
    _good_shard(tmp_path / "s.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ConfigError, match=message):
        SafetensorsReader(tmp_path)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    _good_shard(tmp_path / "s1.safetensors")
    _good_shard(tmp_path / "s2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "s1.safetensors"}}))
    SafetensorsReader(tmp_path)  # s2 is not listed: not read
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "s1.safetensors", "v": "s2.safetensors"}}))
    with pytest.raises(ConfigError, match="tensor w is in both"):
        SafetensorsReader(tmp_path)


def test_integer_or_non_finite_weights_are_refused_on_import(tmp_path):
    t = Tensor(("w",), "w", in_ndim=1)
    write_safetensors(tmp_path / "model.safetensors",
                      [("w", np.int32, (4, 3), lambda: np.ones((4, 3), np.int32))])
    with pytest.raises(ConfigError, match="dtype int32, but model weights are floating"):
        tensor_names(SafetensorsReader(tmp_path), t, (4, 3), 1, 10)
    bad = np.ones((4, 3), np.float32)
    bad[2, 1] = np.nan
    write_safetensors(tmp_path / "model.safetensors",
                      [("w", np.float32, (4, 3), lambda: bad)])
    reader = SafetensorsReader(tmp_path)
    assert tensor_names(reader, t, (4, 3), 1, 10) == ["w"]
    out = np.zeros((4, 3), np.float32)
    fill_layer(reader, "w", t, (4, 3), ((0, 2), (0, 3)), out[:2])  # rows without the NaN
    with pytest.raises(ConfigError, match="tensor w in .* holds NaN or infinite values"):
        fill_layer(reader, "w", t, (4, 3), ((0, 4), (0, 3)), out)


def test_cli_import_of_a_damaged_checkpoint_is_one_line(tmp_path):
    hf = tmp_path / "hf"
    _raw_safetensors(hf / "model.safetensors", {"a": F32x2, "b": F32x2}, b"\0" * 8)
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100,
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4}))
    r = call_cli(["convert.py", f"--from_hf={hf}", f"--workdir={tmp_path / 'run'}"])
    _one_error_line(r, f"error: from_hf: {hf / 'model.safetensors'} is not a valid "
                       f"safetensors file (tensors a and b share bytes)")


# ----------------------------------------------------------------------------------------
# Corpus files and JSON lines.

def _jsonl_task(*lines: bytes) -> Task:
    return Task("jsonl", "a.jsonl", list(lines), list(range(1, len(lines) + 1)), 0)


HOSTILE_LINES = {
    "lone_surrogate": (b'{"text": "a\\ud800b"}', "lone UTF-16 surrogate \\(\\\\ud800\\)"),
    "deep_nesting": (b'{"text": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                     "nested too deeply"),
    "not_an_object": (b'["text"]', "a JSON array, not an object"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LINES))
def test_a_hostile_json_line_is_a_bad_line_and_skip_bad_counts_it(case):
    line, message = HOSTILE_LINES[case]
    good = b'{"text": "ok \\ud83d\\ude00"}'  # a surrogate pair is one character: text
    out = parse_task(_jsonl_task(good, line))
    assert out.error is not None and out.error[0] == "--input"
    assert out.error[1].startswith("a.jsonl:2: ") and "--skip_bad" in out.error[1]
    import re
    assert re.search(message, out.error[1]), out.error[1]
    out = parse_task(_jsonl_task(good, line, good), skip_bad=True)
    assert out.error is None and out.bad == 1 and out.texts == ["ok \U0001F600"] * 2


def test_a_text_field_that_is_not_a_string_says_so():
    out = parse_task(_jsonl_task(b'{"text": 7, "id": 1}'))
    assert out.error == ("--text_field", "a.jsonl:1: field 'text' is a JSON number, not a "
                                         "string")
    out = parse_task(_jsonl_task(b'{"body": "x"}'))
    assert out.error == ("--text_field", "a.jsonl:1 has no string field 'text' (has: body)")


def test_a_parquet_column_that_is_not_text_says_so(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "a.parquet")
    with pytest.raises(ConfigError, match=r"--text_field: .*a.parquet: column 'text' holds "
                                          r"int64, not text"):
        prepare_corpus([tmp_path / "a.parquet"], tmp_path / "out", tokenizer="byte",
                       workers=0, progress=False)


def _damaged_parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = [f"document number {i} " * 20 for i in range(4000)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=1000,
                   compression="snappy")
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4000):  # pages; the footer is intact
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def _truncated_gz(path: Path) -> Path:
    data = gzip.compress(b"".join(json.dumps({"text": f"doc {i} " * 10}).encode() + b"\n"
                                  for i in range(3000)))
    path.write_bytes(data[:len(data) // 2])
    return path


def _corrupt_zst(path: Path, truncate: bool) -> Path:
    import zstandard
    data = zstandard.ZstdCompressor().compress(
        b"".join(json.dumps({"text": f"doc {i} " * 10}).encode() + b"\n" for i in range(3000)))
    if truncate:
        data = data[:len(data) // 2]
    else:
        data = data[:40] + bytes(b ^ 0x5A for b in data[40:80]) + data[80:]
    path.write_bytes(data)
    return path


DAMAGED_FILES = {
    "parquet_page": (lambda d: _damaged_parquet(d / "a.parquet"), "row"),
    "truncated_gz": (lambda d: _truncated_gz(d / "a.jsonl.gz"), "line"),
    "corrupt_zst": (lambda d: _corrupt_zst(d / "a.jsonl.zst", truncate=False), "line"),
    "truncated_zst": (lambda d: _corrupt_zst(d / "a.jsonl.zst", truncate=True), "line"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_FILES))
@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_damaged_corpus_file_is_refused_even_with_skip_bad(case, skip_bad, tmp_path):
    make, where = DAMAGED_FILES[case]
    src = make(tmp_path)
    with pytest.raises(ConfigError, match=rf"--input: {src} is damaged or truncated after "
                                          rf"{where} \d+ .*leave it out of --input"):
        prepare_corpus([src], tmp_path / "out", tokenizer="byte", workers=0,
                       progress=False, skip_bad=skip_bad)
    assert not (tmp_path / "out").exists()


def test_sft_reads_damaged_files_and_hostile_records_alike(tmp_path):
    src = _truncated_gz(tmp_path / "a.jsonl.gz")
    with pytest.raises(ConfigError, match="is damaged or truncated after line"):
        prepare_sft([src], tmp_path / "o1", tokenizer="byte", progress=False)
    for line, _ in HOSTILE_LINES.values():
        with pytest.raises(BadRecord) as e:
            parse_record(line)
        assert e.value.reason in ("invalid_json", "not_an_object")
    good = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(40)]
    lines = good + [HOSTILE_LINES["lone_surrogate"][0].decode(),
                    HOSTILE_LINES["deep_nesting"][0].decode()]
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    out = prepare_sft([tmp_path / "s.jsonl"], tmp_path / "o2", tokenizer="byte",
                      progress=False)
    meta = json.loads((out / META).read_text())
    assert meta["bad"]["invalid_json"]["count"] == 2 and meta["records"] == 42
    assert sum(meta["examples"].values()) == 40


def test_cli_prepare_damaged_input_and_non_finite_sizes_are_one_line(tmp_path):
    src = _truncated_gz(tmp_path / "a.jsonl.gz")
    r = call_cli(["-m", "jaxlm.data.prepare", f"--input={src}", f"--output={tmp_path / 'o'}",
                  "--tokenizer=byte", "--workers=0", "--quiet", "--skip_bad"])
    _one_error_line(r, f"error: --input: {src} is damaged or truncated after line ")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"d{i}"}) + "\n" for i in range(50)))
    for flag in ("--shard_mb=nan", "--shard_mb=inf", "--bpe_train_mb=nan"):
        r = call_cli(["-m", "jaxlm.data.prepare", f"--input={good}",
                      f"--output={tmp_path / 'o'}", "--tokenizer=byte", "--quiet", flag])
        name, value = flag.split("=")
        _one_error_line(r, f"error: {name}: must be a finite number, got {value}")
        assert value in r.stderr


# ----------------------------------------------------------------------------------------
# Chat templates.

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
HOSTILE_TEMPLATES = {
    "repeat": "{{ 'x' * 4000000000 }}",
    "repeat_a_built_string": "{% set s = 'x' * 100000 %}{{ s * 100000 }}",
    "doubling_with_tilde": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                           "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "doubling_with_plus": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                          "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "center_filter": "{{ 'x'|center(4000000000) }}",
    "str_method": "{{ 'x'.ljust(4000000000) }}",
    "format_filter": "{{ '%4000000000s'|format('x') }}",
    "str_format": "{{ '{:>4000000000}'.format('x') }}",
    "percent": "{{ '%4000000000s' % 'x' }}",
    "nested_ranges": "{% for i in range(100000) %}{% for j in range(100000) %}"
                     "{% endfor %}{% endfor %}",
    "set_block": "{% set s = 'x' * 100000 %}{% set y %}{% for i in range(100000) %}"
                 "{{ s }}{% endfor %}{% endset %}",
    "self_recursive_macro": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "power": "{{ (10 ** 100000000) % 7 }}",
    "batch_filter": "{{ [1]|batch(4000000000, 'x')|list|length }}",
    "replace_filter": "{% set s = 'x' * 100000 %}{{ s|replace('x', s) }}",
    "join": "{% set s = 'x' * 100000 %}{{ s.join([s] * 100) }}",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TEMPLATES))
def test_what_a_chat_template_may_produce_is_bounded(case):
    """A hostile template is a bad record; a usual one renders as Jinja renders it."""
    _usual_template_renders_unchanged()
    template = ChatTemplate(HOSTILE_TEMPLATES[case], {})
    with pytest.raises(BadRecord) as e:
        template.render(MESSAGES, add_generation_prompt=False)
    assert e.value.reason == "template_error"


def _usual_template_renders_unchanged():
    source = ("{{ bos_token }}{% for m in messages %}{% if loop.first %}[{{ loop.length }}]"
              "{% endif %}<|{{ m['role'] }}|>{{ m['content'] | trim }}{{ eos_token }}\n"
              "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
              "{{ messages[0]|tojson }}{{ '%3s'|format('x') }}{{ ', '.join(['a', 'b']) }}"
              "{{ 'ab'|replace('a', 'c') }}{{ 'x' * 3 }}{{ range(3)|list|join }}")
    out = ChatTemplate(source, {"bos_token": "<s>", "eos_token": "</s>"}).render(MESSAGES, True)
    assert out == ('<s>[2]<|user|>hi</s>\n<|assistant|>hello</s>\n<|assistant|>'
                   '{"role": "user", "content": "hi"}  xa, bcbxxx012')


@pytest.mark.parametrize("source", ["{% for m in messages %}", "{{ x ", "{% endfor %}"])
def test_a_chat_template_that_does_not_parse_names_its_file(source, tmp_path):
    with pytest.raises(ConfigError, match=r"--chat_template: t.jinja is not a valid Jinja "
                                          r"template \(.*line 1\); fix it"):
        ChatTemplate(source, {}, "t.jinja")


def test_cli_sft_template_errors_are_one_line(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text("".join(json.dumps({"messages": MESSAGES}) + "\n" for _ in range(20)))
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }}")
    args = ["-m", "jaxlm.data.prepare", "--format=sft", f"--input={src}",
            "--tokenizer=byte", "--quiet"]
    r = call_cli([*args, f"--output={tmp_path / 'o1'}", f"--chat_template={bad}"])
    _one_error_line(r, f"error: --chat_template: {bad} is not a valid Jinja template")
    huge = tmp_path / "huge.jinja"
    huge.write_text("{% for m in messages %}{{ m.content * 4000000000 }}{% endfor %}")
    r = call_cli([*args, f"--output={tmp_path / 'o2'}", f"--chat_template={huge}"])
    line = _one_error_line(r, "error: --input: no usable SFT records")
    assert "template_error 20" in line


# ----------------------------------------------------------------------------------------
# Tokenizers in a prepared directory.

def _prepared_bpe(tmp_path: Path) -> Path:
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} of the corpus"}) + "\n"
                           for i in range(200)))
    return prepare_corpus([src], tmp_path / "data", tokenizer="bpe", vocab_size=300,
                          workers=0, progress=False)


@pytest.mark.parametrize("damage", ["truncated", "replaced"])
def test_a_damaged_tokenizer_json_in_a_prepared_directory_is_one_error(damage, tmp_path):
    from jaxlm.data.pipeline import TokenData
    from jaxlm.data.tokenizers import train_bpe
    data = _prepared_bpe(tmp_path)
    file = data / "tokenizer.json"
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[:100])
    else:  # another valid tokenizer: the ids would silently mean other text
        train_bpe(["some other text entirely"] * 10, 280, tmp_path / "other.json")
        file.write_bytes((tmp_path / "other.json").read_bytes())
    with pytest.raises(ConfigError, match=r"data.path: .*cannot load its tokenizer: .*"
                                          r"tokenizer.json is not the tokenizer file this "
                                          r"data was prepared with"):
        TokenData.load(data)
    r = call_cli(["-m", "jaxlm.data.prepare", "--format=sft", f"--input={tmp_path / 'a.jsonl'}",
                  f"--output={tmp_path / 'sft'}", f"--tokenizer={data}", "--quiet"])
    _one_error_line(r, f"error: --tokenizer: cannot load the tokenizer of {data}")


def test_a_tokenizer_json_that_does_not_parse_is_one_error(tmp_path):
    from jaxlm.data.tokenizers import HFTokenizer
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="is not a Hugging Face tokenizer.json"):
        HFTokenizer(tmp_path / "tokenizer.json")
