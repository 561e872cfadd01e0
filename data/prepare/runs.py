"""Tokenizers taken from elsewhere: a prepared directory's, a training run's (through the
data it trained on, checked against its fingerprints.json), and SFT's base tokenizer."""

import os
from pathlib import Path
from typing import Any

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.specs import parse_mixture
from jaxlm.data.prepare.formats import META, RUN_CONFIG, is_prepared, read_json_file
from jaxlm.data.sft import ChatTemplate, choose_template, find_chat_template, saved_template, \
    template_directory
from jaxlm.data.tokenizers import (ByteTokenizer, Tokenizer, load_hf_tokenizer,
                                   load_sentencepiece, parse_tokenizer_spec, tokenizer_from_dict)
from jaxlm.data import fingerprints


def is_run(path: Path) -> bool:
    return (Path(path) / RUN_CONFIG).is_file()


def prepared_directory_of(path: str | os.PathLike, key: str = "--tokenizer") -> Path | None:
    """The prepared data directory behind `path`: `path` itself when prepared, or, for a
    training run's directory (it has config.json), its `data.path` when that is prepared,
    its mixture's first source, else the run's own `data/` (the embedded corpus and text
    files are prepared there on the run's first start). None when `path` is neither."""
    path = Path(path)
    if is_prepared(path):
        return path
    if not is_run(path):
        return None
    data = read_json_file(path / RUN_CONFIG, key).get("data", {})
    source = Path(data["path"]) if data.get("path") else None
    if str(data.get("mixture", "")).strip():
        source = Path(parse_mixture(data["mixture"], key)[0][0])
    directory = source if source is not None and is_prepared(source) else path / "data"
    if not is_prepared(directory):
        raise ConfigError(key, f"the run {path} has no prepared data at {directory} (it is "
                               f"written on the run's first start): nothing to take its "
                               f"tokenizer from")
    return directory


def reuse_tokenizer(directory: Path, key: str = "--tokenizer"
                    ) -> tuple[Tokenizer, dict[str, Any]]:
    """(the tokenizer, meta) of a prepared directory: exactly its vocabulary and ids."""
    meta = read_json_file(directory / META, key)
    try:
        return tokenizer_from_dict(meta["tokenizer"], directory), meta
    except (KeyError, ValueError, TypeError, OSError) as e:
        raise ConfigError(key, f"cannot load the tokenizer of {directory}: {e}") from None


def tokenizer_of_directory(path: str | os.PathLike, key: str = "data.tokenizer") -> Tokenizer:
    """`from:DIR`: exactly the tokenizer of a run directory or a prepared data directory."""
    directory = prepared_directory_of(path, key) if Path(path).is_dir() else None
    if directory is None:
        raise ConfigError(key, f"from:{path}: not a run directory or a prepared data "
                               f"directory")
    return reuse_tokenizer(directory, key)[0]


def run_seq_len(path: str | os.PathLike) -> int | None:
    """The training seq_len of a run directory (from its config.json); None for anything
    else."""
    if not is_run(Path(path)):
        return None
    seq_len = read_json_file(Path(path) / RUN_CONFIG, "--tokenizer").get("seq_len")
    return int(seq_len) if isinstance(seq_len, int) else None


def sft_tokenizer(spec: str, chat_template: str = "auto"
                  ) -> tuple[Tokenizer, ChatTemplate | None]:
    """`--tokenizer` and `--chat_template` of SFT preparation -> (tokenizer, template).

    `spec` is a prepared data directory or a run directory (its tokenizer is reused
    exactly; a run's must be the one its fingerprints.json recorded), `byte`, `hf:PATH`
    or `sentencepiece:PATH`; char and bpe would fit a new vocabulary to the fine-tuning
    data, which no base model shares. `chat_template`: `auto` (the tokenizer's Hugging
    Face template when it has one, else the simple one), `simple`, or a Jinja file."""
    spec = spec.removeprefix("from:")
    directory = prepared_directory_of(spec) if Path(spec).is_dir() else None
    found: ChatTemplate | None = None
    if directory is not None:
        tok, meta = reuse_tokenizer(directory)
        if directory != Path(spec):  # a run's: the one it trained with
            fingerprints.check_tokenizer(spec, tok, directory, key="--tokenizer",
                                         fix="pass as --tokenizer the prepared directory "
                                             "the run was trained on")
        found = saved_template(meta, directory / META)
    else:
        kind, path = parse_tokenizer_spec(spec, "--tokenizer")
        if kind in ("char", "bpe"):
            raise ConfigError("--tokenizer", f"{kind} would fit a new vocabulary to the "
                                             f"fine-tuning data; pass the base model's "
                                             f"tokenizer: its run directory, its prepared "
                                             f"data directory, or byte, hf:PATH, "
                                             f"sentencepiece:PATH")
        if kind == "byte":
            tok = ByteTokenizer()
        elif kind == "hf":
            tok = load_hf_tokenizer(path, "--tokenizer")
            found = find_chat_template(tok, template_directory(path))
        else:
            tok = load_sentencepiece(path, "--tokenizer")
    return tok, choose_template(chat_template, tok, found)
