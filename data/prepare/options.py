"""`Prepare`: the settings of one preparation, as `python -m jaxlm.data.prepare` takes them.

The value checks are the types of the run config's `data` section (configs/sections.py):
a range or a minimum is written once, there. Errors name the flag (`--val_fraction`).
"""

from typing import Annotated, Any, ClassVar, Literal

from pydantic import model_validator

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import (Data, NonNegativeFloat, NonNegativeInt, PositiveFloat,
                                    PositiveInt, Section)
from jaxlm.data.prepare.formats import SHARD_BYTES
from jaxlm.data.sft import DEFAULT_END_TEXT
from jaxlm.data.tokenizers import DEFAULT_BPE_VOCAB

ValFraction = Annotated[float, *Data.model_fields["val_fraction"].metadata]  # (0, 1)
VocabSize = Annotated[int, *Data.model_fields["vocab_size"].metadata]


class Prepare(Section):
    """One preparation: the inputs and the output, the tokenizer, how documents are read
    and split, and (`format="sft"`) how SFT records become examples."""

    FLAT_KEYS: ClassVar[bool] = True
    input: tuple[str, ...]  # files, directories or globs
    output: str  # the prepared directory
    format: Literal["auto", "sft"] = "auto"  # auto: text or a corpus, by the inputs
    tokenizer: str = "char"  # char | byte | bpe | hf:PATH | sentencepiece:PATH; sft: a run
    vocab_size: VocabSize = DEFAULT_BPE_VOCAB  # bpe only
    bpe_train_mb: NonNegativeFloat = 0.0  # bpe: train on the first N million characters
    text_field: str = "text"  # JSON / Parquet field of the text
    workers: NonNegativeInt = 1  # tokenizer processes (0: in this process)
    val_fraction: ValFraction = 0.1
    split_blank_lines: bool = False  # plain text: one document per blank-line block
    skip_bad: bool = False  # count and skip non-UTF-8 documents and invalid JSON lines
    overwrite: bool = False  # rebuild an output prepared from other inputs or settings
    shard_mb: PositiveFloat = SHARD_BYTES / 2**20  # token shard size in MiB
    quiet: bool = False  # no progress bar
    seq_len: PositiveInt | None = None  # sft: longer examples are bad records
    truncate: bool = False  # sft: cut examples longer than seq_len + 1 tokens instead
    strict: bool = False  # sft: refuse the input at its first bad record
    end_text: str = DEFAULT_END_TEXT  # sft: appended to completions without an EOS
    chat_template: str = "auto"  # sft: auto | simple | a Jinja template file

    @classmethod
    def of(cls, **values: Any) -> "Prepare":
        """The checked settings; a ConfigError naming the flag (`--KEY`) of a bad one."""
        try:
            return cls.parse(values, prefix="")
        except ConfigError as e:
            raise ConfigError(f"--{e.key.removeprefix('--')}", e.message) from None

    @model_validator(mode="after")
    def _bpe_holds_the_bytes(self) -> "Prepare":
        if self.tokenizer == "bpe":  # the data section's minimum for a byte-level BPE
            Data.parse({"vocab_size": self.vocab_size}, prefix="")
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
