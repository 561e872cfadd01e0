"""`python -m jaxlm.data.prepare`: the flags of the `Prepare` section (options.py); what
they do is in docs/data.md and docs/finetuning.md."""

import sys

from absl import app, flags

from jaxlm.configs.cli import flags_parser
from jaxlm.configs.errors import ConfigError
from jaxlm.data.prepare.cli import run
from jaxlm.data.prepare.formats import SHARD_BYTES
from jaxlm.data.prepare.options import Prepare
from jaxlm.data.sft import DEFAULT_END_TEXT
from jaxlm.data.tokenizers import DEFAULT_BPE_VOCAB

flags.DEFINE_multi_string("input", None, "A file, directory or glob (repeatable).",
                          required=True)
flags.DEFINE_string("output", None, "The prepared directory.", required=True)
flags.DEFINE_string("tokenizer", "char", "char | byte | bpe | hf:PATH | sentencepiece:PATH; "
                    "sft: a run or prepared directory, byte, hf:PATH, sentencepiece:PATH.")
flags.DEFINE_integer("vocab_size", DEFAULT_BPE_VOCAB, "bpe only.")
flags.DEFINE_float("bpe_train_mb", 0.0, "bpe only: train on the first N million characters "
                   "of the training documents (0: all).")
flags.DEFINE_string("text_field", "text", "JSON / Parquet field of the text.")
flags.DEFINE_integer("workers", 1, "Tokenizer processes (0: tokenize in this process).")
flags.DEFINE_float("val_fraction", 0.1, "The validation split's share.")
flags.DEFINE_bool("split_blank_lines", False, "Plain text: one document per "
                  "blank-line-separated block.")
flags.DEFINE_bool("skip_bad", False, "Count and skip non-UTF-8 documents and invalid JSON "
                  "lines.")
flags.DEFINE_bool("overwrite", False, "Rebuild an output prepared from other inputs or "
                  "settings.")
flags.DEFINE_float("shard_mb", SHARD_BYTES / 2**20, "Token shard size in MiB.")
flags.DEFINE_bool("quiet", False, "No progress bar.")
flags.DEFINE_string("format", "auto", "auto: text or a corpus of documents, by the inputs; "
                    "sft: prompt/completion or chat records with per-token loss weights.")
flags.DEFINE_integer("seq_len", None, "sft: the training seq_len; longer examples are bad "
                     "records (default: the seq_len of a run directory given as --tokenizer; "
                     "else no limit here, and training refuses a shorter seq_len).")
flags.DEFINE_bool("truncate", False, "sft: cut examples longer than seq_len + 1 tokens "
                  "instead.")
flags.DEFINE_bool("strict", False, "sft: refuse the input at its first bad record.")
flags.DEFINE_string("end_text", DEFAULT_END_TEXT, "sft: appended to every completion when "
                    "the tokenizer has no EOS.")
flags.DEFINE_string("chat_template", "auto", "sft: auto | simple | a Jinja template file.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    values = {name: flags.FLAGS[name].value for name in Prepare.model_fields}
    try:
        options = Prepare.of(**{**values, "input": tuple(values["input"])})
    except ConfigError as e:
        sys.exit(f"error: {e}")
    run(options)


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser())
