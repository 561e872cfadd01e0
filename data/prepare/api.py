"""The library's entry points: `prepare` (one text, format 1), `prepare_corpus` (a corpus
of documents, format 2) and `prepare_sft` (SFT examples, format 3). Each checks its
settings, finds its inputs and tokenizer, and hands a `Source` to the one builder."""

import json
import os
from collections.abc import Sequence
from pathlib import Path

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Data
from jaxlm.data.prepare.build import CorpusSource, SftSource, TextSource, build
from jaxlm.data.prepare.formats import (CORPUS_FORMAT_VERSION, FORMAT_VERSION, SHARD_BYTES,
                                        SFT_FORMAT_VERSION, text_files)
from jaxlm.data.prepare.options import Prepare
from jaxlm.data.prepare.runs import run_seq_len, sft_tokenizer, tokenizer_of_directory
from jaxlm.data.readers import expand_inputs, file_format
from jaxlm.data.sft import DEFAULT_END_TEXT
from jaxlm.data.tokenizers import (DEFAULT_BPE_VOCAB, HF_FILE, Tokenizer, file_sha256,
                                   load_hf_tokenizer, load_sentencepiece, parse_tokenizer_spec,
                                   vocabulary)
from jaxlm.storage import dirs


def prepare(source: str | os.PathLike, out_dir: str | os.PathLike, *, tokenizer: str = "char",
            val_fraction: float = 0.1, vocab_size: int = DEFAULT_BPE_VOCAB,
            overwrite: bool = False, wait: bool = False, key: str = "--output") -> Path:
    """Tokenize `source` (file or directory, concatenated) into `out_dir` as one text;
    reuse it if already up to date. The settings are the `data` section's (errors name
    `data.*`); `vocab_size` is used by bpe only. Another prepared set is replaced only with
    `overwrite`; `wait` waits for a concurrent preparation of `out_dir` instead of refusing
    it (the processes of one run); `key` names `out_dir` in errors."""
    source, out_dir = Path(source), Path(out_dir).absolute()
    if not source.exists():
        raise ConfigError("data.path", f"no such file or directory: {source}")
    Data.parse({"tokenizer": tokenizer, "val_fraction": val_fraction,
                "vocab_size": vocab_size})
    kind, path = parse_tokenizer_spec(tokenizer)
    given = tokenizer_of_directory(path, "data.tokenizer") if kind == "from" else None
    extra = (json.dumps(vocabulary(given), sort_keys=True) if given is not None
             else _tokenizer_extra(tokenizer, vocab_size))
    settings = {"format_version": FORMAT_VERSION, "tokenizer": tokenizer,
                "val_fraction": val_fraction, "vocab_size": vocab_size}
    text = TextSource(text_files(source), source, tokenizer, given, settings, extra)
    return build(text, out_dir, overwrite=overwrite, wait=wait, key=key)


def _tokenizer_extra(tokenizer: str, vocab_size: int) -> str:
    """What a one text's fingerprint covers of a tokenizer beyond its spec (nothing for
    char and byte): bpe's size, an hf: or sentencepiece: file's sha256."""
    kind, path = parse_tokenizer_spec(tokenizer)
    if kind == "bpe":
        return f"|vocab={vocab_size}"
    if path is not None:
        file = Path(path) / HF_FILE if kind == "hf" and Path(path).is_dir() else Path(path)
        return f"|{file_sha256(file)}" if file.is_file() else ""
    return ""


def _inputs(inputs: Sequence[str], output: Path) -> list[Path]:
    """The input files, never the output (or its staging directories) read back."""
    files = [f for f in expand_inputs(inputs, "--input")
             if output not in f.parents and not dirs.is_staging(f, output)]
    if not files:
        raise ConfigError("--input", f"no input files outside --output {output}")
    return files


def prepare_corpus(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *,
                   tokenizer: str = "bpe", vocab_size: int = DEFAULT_BPE_VOCAB,
                   text_field: str = "text", workers: int = 1, val_fraction: float = 0.1,
                   split_blank_lines: bool = False, skip_bad: bool = False,
                   overwrite: bool = False, shard_bytes: int = SHARD_BYTES,
                   progress: bool = True, bpe_train_mb: float = 0.0) -> Path:
    """Stream a corpus of documents into `output` (format 2); returns `output`.

    Idempotent: the same inputs (paths, sizes, mtimes) and settings reuse `output`; an
    `output` prepared from anything else is refused unless `overwrite`. Everything is
    written into a hidden sibling directory renamed into place at the end, so a crash
    never leaves an `output` that looks prepared. `workers=0` tokenizes in this process.
    Char and byte reserve an end-of-document id (the corpus has several documents);
    bpe trains on the training documents (streamed) with `vocab_size` ids, or on their
    first `bpe_train_mb` million characters when > 0: the trainer's memory is its table
    of distinct pre-tokenized words, which grows with the text it sees.
    """
    options = Prepare.of(input=tuple(str(i) for i in inputs), output=str(output),
                         tokenizer=tokenizer, vocab_size=vocab_size, text_field=text_field,
                         workers=workers, val_fraction=val_fraction,
                         split_blank_lines=split_blank_lines, skip_bad=skip_bad,
                         overwrite=overwrite, shard_mb=shard_bytes / 2**20,
                         quiet=not progress, bpe_train_mb=float(bpe_train_mb))
    return corpus(options)


def corpus(options: Prepare) -> Path:
    """`prepare_corpus` of checked settings."""
    output = Path(options.output).absolute()
    kind, tok_path = parse_tokenizer_spec(options.tokenizer, "--tokenizer")
    given: Tokenizer | None = None
    if kind == "hf":
        given = load_hf_tokenizer(tok_path, "--tokenizer")
    elif kind == "sentencepiece":
        given = load_sentencepiece(tok_path, "--tokenizer")
    files = _inputs(options.input, output)
    bpe = kind == "bpe"
    settings = {"format_version": CORPUS_FORMAT_VERSION, "tokenizer": kind,
                "tokenizer_file": None if given is None else
                {k: v for k, v in given.to_dict().items() if k != "file"},
                "vocab_size": options.vocab_size if bpe else None,
                "bpe_train_chars": options.bpe_train_chars if bpe else 0,
                "text_field": options.text_field, "val_fraction": options.val_fraction,
                "split_blank_lines": options.split_blank_lines, "skip_bad": options.skip_bad}
    return build(CorpusSource(files, kind, given, settings, options), output,
                 overwrite=options.overwrite, progress=options.progress)


def prepare_sft(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *,
                tokenizer: str, seq_len: int | None = None, val_fraction: float = 0.1,
                truncate: bool = False, strict: bool = False,
                end_text: str = DEFAULT_END_TEXT, chat_template: str = "auto",
                overwrite: bool = False, shard_bytes: int = SHARD_BYTES,
                progress: bool = True, record_format: str = "sft") -> Path:
    """JSON-lines SFT records (data/sft.py) -> `output` (format 3); returns `output`.
    `record_format="preference"`: preference records, two examples each (data/preference.py).

    Like a corpus of documents (one document per example, split by a hash of the
    record), plus `{split}.weights`: one uint8 per token, 1 where the token is a
    completion target. Bad records are counted by reason (with the first file and line)
    in the meta and skipped, or, with `strict`, refused. Examples longer than
    seq_len + 1 tokens are bad unless `truncate` (cut at seq_len + 1). Without `seq_len`,
    a run directory as `tokenizer` gives its seq_len; otherwise examples of any length
    are kept, and a training run refuses, before compiling, a seq_len shorter than the
    longest. Idempotent and atomic as `prepare_corpus`."""
    return sft(Prepare.of(input=tuple(str(i) for i in inputs), output=str(output),
                          format=record_format, tokenizer=tokenizer, seq_len=seq_len,
                          val_fraction=val_fraction, truncate=truncate, strict=strict,
                          end_text=end_text, chat_template=chat_template,
                          overwrite=overwrite, shard_mb=shard_bytes / 2**20,
                          quiet=not progress))


def sft(options: Prepare) -> Path:
    """`prepare_sft` of checked settings."""
    output = Path(options.output).absolute()
    seq_len = options.seq_len if options.seq_len is not None else run_seq_len(options.tokenizer)
    if seq_len is None and options.truncate:
        raise ConfigError("--truncate", "needs --seq_len (or a run directory as "
                                        "--tokenizer, whose seq_len is used): the length "
                                        "to cut examples at")
    tok, template = sft_tokenizer(options.tokenizer, options.chat_template)
    if tok.eos_id is None and options.end_text:
        try:
            tok.encode(options.end_text)
        except ValueError as e:
            raise ConfigError("--end_text", f"{options.end_text!r}: {e}") from None
    files = _inputs(options.input, output)
    for f in files:
        if file_format(f) != "jsonl":
            raise ConfigError("--input", f"{f} is not JSON lines (.jsonl, .json or .ndjson, "
                                         f"optionally .gz or .zst): SFT records are JSON "
                                         f"lines")
    settings = {"format_version": SFT_FORMAT_VERSION, "format": options.format,
                "tokenizer": tok.to_dict(), "seq_len": seq_len, "truncate": options.truncate,
                "strict": options.strict, "val_fraction": options.val_fraction,
                "end_text": options.end_text,
                "chat_template": None if template is None else template.source}
    return build(SftSource(files, tok, template, settings, options.shard_bytes), output,
                 overwrite=options.overwrite, progress=options.progress)
