"""`Prepare`: the settings of one preparation, as `python -m jaxlm.data.prepare` takes them
(each field is a flag: its type, default and help).

The value checks are those of the run config's `data` keys (configs/specs.py): a range or
a minimum is written once, there. Errors name the flag (`--val_fraction`).
"""

import types
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import Field, model_validator

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import (NonNegativeFloat, NonNegativeInt, PositiveFloat,
                                    PositiveInt, Section)
from jaxlm.configs.specs import ValFraction, bpe_vocab_size
from jaxlm.data.prepare.formats import SHARD_BYTES
from jaxlm.data.sft import DEFAULT_END_TEXT
from jaxlm.data.tokenizers import DEFAULT_BPE_VOCAB


class Prepare(Section):
    """One preparation: the inputs and the output, the tokenizer, how documents are read
    and split, and (`format="sft"`) how SFT records become examples."""

    FLAT_KEYS: ClassVar[bool] = True
    input: tuple[str, ...] = Field(description="A file, directory or glob (repeatable).")
    output: str = Field(description="The prepared directory.")
    format: Literal["auto", "sft", "preference"] = Field(
        "auto", description="auto: text or a corpus of documents, by the inputs; sft: "
                            "prompt/completion or chat records with per-token loss weights; "
                            "preference: prompt/chosen/rejected records, as sft "
                            "(docs/alignment.md).")
    tokenizer: str = Field(
        "char", description="char | byte | bpe | hf:PATH | sentencepiece:PATH; sft: a run "
                            "or prepared directory, byte, hf:PATH or sentencepiece:PATH.")
    vocab_size: int = Field(DEFAULT_BPE_VOCAB, description="bpe only: its ids.")
    bpe_train_mb: NonNegativeFloat = Field(
        0.0, description="bpe only: train on the first N million characters of the training "
                         "documents (0: all).")
    text_field: str = Field("text", description="JSON / Parquet field of the text.")
    workers: NonNegativeInt = Field(
        1, description="Tokenizer processes (0: tokenize in this process).")
    val_fraction: ValFraction = Field(0.1, description="The validation split's share.")
    split_blank_lines: bool = Field(
        False, description="Plain text: one document per blank-line-separated block.")
    skip_bad: bool = Field(
        False, description="Count and skip non-UTF-8 documents and invalid JSON lines.")
    overwrite: bool = Field(
        False, description="Rebuild an output prepared from other inputs or settings.")
    shard_mb: PositiveFloat = Field(SHARD_BYTES / 2**20, description="Token shard size in MiB.")
    quiet: bool = Field(False, description="No progress bar.")
    seq_len: PositiveInt | None = Field(
        None, description="sft: the training seq_len; longer examples are bad records "
                          "(default: the seq_len of a run directory given as --tokenizer; "
                          "else no limit here, and training refuses a shorter seq_len).")
    truncate: bool = Field(
        False, description="sft: cut examples longer than seq_len + 1 tokens instead.")
    strict: bool = Field(False, description="sft: refuse the input at its first bad record.")
    end_text: str = Field(
        DEFAULT_END_TEXT, description="sft: appended to every completion when the tokenizer "
                                      "has no EOS.")
    chat_template: str = Field(
        "auto", description="sft: auto | simple | a Jinja template file.")

    @classmethod
    def of(cls, **values: Any) -> "Prepare":
        """The checked settings; a ConfigError naming the flag (`--KEY`) of a bad one."""
        try:
            return cls.parse(values, prefix="")
        except ConfigError as e:
            raise ConfigError(f"--{e.key.removeprefix('--')}", e.message) from None

    @model_validator(mode="after")
    def _bpe_holds_the_bytes(self) -> "Prepare":
        if self.tokenizer == "bpe":  # vocab_size is read by bpe only
            bpe_vocab_size(self.vocab_size, "vocab_size")
        return self

    @property
    def bpe_train_chars(self) -> int:
        return int(self.bpe_train_mb * 1e6)

    @property
    def shard_bytes(self) -> int:
        return int(self.shard_mb * 2**20)

    @property
    def progress(self) -> bool:
        return not self.quiet


def base_type(annotation: Any) -> type:
    """str, int, float, bool or tuple: a field's annotation with Optional, Annotated and
    Literal unwrapped (the kind of flag that sets it)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return type(get_args(annotation)[0])
    if origin is Annotated:
        return base_type(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return base_type(next(a for a in get_args(annotation) if a is not type(None)))
    return tuple if origin is tuple else annotation
