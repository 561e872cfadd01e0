"""Prepare text into memory-mapped token files plus `meta.json`.

  python -m jaxlm.data.prepare --input=PATH_OR_GLOB [--input=...] --output=DIR --tokenizer=KIND
      [--vocab_size=N] [--text_field=text] [--workers=N] [--val_fraction=F]
      [--split_blank_lines] [--skip_bad] [--overwrite] [--bpe_train_mb=N] [--shard_mb=N]
  python -m jaxlm.data.prepare --format=sft --input=F.jsonl --output=DIR --tokenizer=BASE
      [--seq_len=N] [--val_fraction=F] [--truncate] [--strict] [--end_text=TEXT]
      [--chat_template=auto|simple|FILE] [--overwrite]

Three layouts, written by one builder (build.py):

* One text (`prepare`, used for `data.path` = a text file or a directory of text files
  concatenated, and the embedded corpus; the command uses it for a single plain-text
  file): `train.bin`, `val.bin`, the first (1 - val_fraction) of the token stream for
  training and the rest for validation (nanoGPT's split). Format version 1.
* A corpus of documents (`prepare_corpus`: JSON lines, Parquet, text files or
  blank-line-separated blocks): streamed through worker processes (pool.py), written as
  token shards `{split}-NNNNN.bin` (`{split}.bin` when one is enough) with a document
  index `{split}.idx` (int64 offsets, [documents + 1]), split train/validation by
  document by a hash of each document's text. Format version 2.
* Supervised fine-tuning examples (`prepare_sft`, `--format=sft`; records in
  data/sft.py): format 2 with one example per document, plus `{split}.weights`, a uint8
  loss weight per token (1 on completion tokens). `--tokenizer` may name a prepared
  directory or a run directory, whose tokenizer is reused exactly (runs.py). Format
  version 3.

Token files are uint16 when the vocabulary fits, else uint32. A file-backed tokenizer
(bpe, hf:, sentencepiece:) is kept in the directory, so evaluation decodes with it. The
command's flags are the `Prepare` section (options.py).
"""

from jaxlm.data.prepare.api import corpus, prepare, prepare_corpus, prepare_sft, sft
from jaxlm.data.prepare.formats import (CORPUS_FORMAT_VERSION, EMBEDDED_CORPUS,
                                        FORMAT_VERSION, FORMAT_VERSIONS, META, RUN_CONFIG,
                                        SFT_FORMAT_VERSION, SHARD_BYTES, is_prepared,
                                        text_files, token_dtype)
from jaxlm.data.prepare.options import Prepare
from jaxlm.data.prepare.runs import (prepared_directory_of, reuse_tokenizer, run_seq_len,
                                     sft_tokenizer, tokenizer_of_directory)

__all__ = ["CORPUS_FORMAT_VERSION", "EMBEDDED_CORPUS", "FORMAT_VERSION", "FORMAT_VERSIONS",
           "META", "RUN_CONFIG", "SFT_FORMAT_VERSION", "SHARD_BYTES", "Prepare", "corpus",
           "is_prepared", "prepare", "prepare_corpus", "prepare_sft", "prepared_directory_of",
           "reuse_tokenizer", "run_seq_len", "sft", "sft_tokenizer", "text_files",
           "token_dtype", "tokenizer_of_directory"]
