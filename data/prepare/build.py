"""The one builder of prepared directories: fit (or take) a tokenizer, encode documents,
split them, write the splits' token files, then meta.json, staged and renamed into place.

What the three formats differ in is their `Source`: where documents come from, how the
tokenizer is found, how documents are split, and what meta.json says about them.

* `TextSource` (format 1): one text, one document, split by token position (nanoGPT's
  split): the first (1 - val_fraction) of its tokens train, the rest validate.
* `CorpusSource` (format 2): documents read and tokenized in worker processes, each split
  by a hash of its text, written in shards with a document index.
* `SftSource` (format 3): one example per JSON-lines record (data/sft.py), split by a hash
  of the record, plus a loss weight per token.
"""

import dataclasses
import functools
import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jaxlm.configs.errors import ConfigError
from jaxlm.data.prepare.formats import (CORPUS_FORMAT_VERSION, FORMAT_VERSION, META, PREPARED,
                                        SFT_FORMAT_VERSION, fingerprint, is_prepared,
                                        saved_fingerprint, token_dtype)
from jaxlm.data.prepare.options import Prepare
from jaxlm.data.prepare.pool import WorkerSettings, is_val, map_ordered
from jaxlm.data.prepare.writer import SplitWriter
from jaxlm.data.readers import COMPRESSED, file_format, read_tasks
from jaxlm.data.preference import make_pair
from jaxlm.data.sft import BadRecord, ChatTemplate, Example, make_example
from jaxlm.data.tokenizers import (HF_FILE, SENTENCEPIECE_FILE, ByteTokenizer, CharTokenizer,
                                   HFTokenizer, Tokenizer, describe_tokenizer, fit_tokenizer,
                                   tokenizer_from_dict, train_bpe)
from jaxlm.storage import dirs

SPLITS = ("train", "val")
ONE_FILE = 1 << 62  # shard size of a one-text split: it is always one file


@dataclasses.dataclass
class Encoded:
    """A batch of documents, tokenized, each assigned to a split."""

    tokens: np.ndarray  # [sum of lengths], the storage dtype
    lengths: np.ndarray  # int64 [documents]
    text_bytes: np.ndarray  # int64 [documents]: UTF-8 bytes each document stands for
    is_val: np.ndarray  # bool [documents]
    weights: np.ndarray | None = None  # uint8 [sum of lengths]: SFT's loss weights

    def part(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                              np.ndarray | None]:
        """(tokens, lengths, text_bytes, weights) of the documents in `mask`."""
        if mask.all():
            return self.tokens, self.lengths, self.text_bytes, self.weights
        ends = np.cumsum(self.lengths)
        spans = list(zip(ends[mask] - self.lengths[mask], ends[mask]))
        tokens = np.concatenate([self.tokens[a:b] for a, b in spans])
        weights = (None if self.weights is None else
                   np.concatenate([self.weights[a:b] for a, b in spans]))
        return tokens, self.lengths[mask], self.text_bytes[mask], weights


class Source(Protocol):
    """What a format contributes to the builder."""

    files: list[Path]
    settings: dict[str, Any]  # recorded in meta.json; with the files, the fingerprint
    weights: bool  # SFT's loss weight stream
    index: bool  # a document index per split
    shard_bytes: int

    def fingerprint(self) -> str: ...

    def tokenizer(self, tmp: Path, bar: Callable[[str], Any]) -> Tokenizer: ...

    def documents(self, tok: Tokenizer, dtype: np.dtype, tmp: Path,
                  bar: Callable[[str], Any]) -> Iterator[Encoded]: ...

    def meta(self, tok: Tokenizer, dtype: np.dtype, splits: dict[str, Any]
             ) -> dict[str, Any]: ...


def build(source: Source, output: Path, *, overwrite: bool, progress: bool = False,
          wait: bool = False, key: str = "--output") -> Path:
    """Prepare `source` into `output`, or reuse `output` when it holds the same
    fingerprint. Under `output`'s lock (refused while another preparation holds it, or
    awaited with `wait`), the directory is built in a hidden sibling and renamed into
    place (replacing an older `output`, only with `overwrite`); a failure or a kill
    leaves `output` as it was. `key` names `output` in errors."""
    expected = source.fingerprint()
    if not _needs_build(output, expected, overwrite, key):
        return output
    with dirs.output_lock(output, key, wait=wait):
        if not _needs_build(output, expected, overwrite, key):  # built meanwhile
            return output
        with dirs.staged(output) as tmp:
            meta = _write(source, tmp, lambda desc: _progress(progress, source, desc))
            meta.update(fingerprint=expected, inputs=[str(f) for f in source.files],
                        settings=source.settings)
            (tmp / META).write_text(json.dumps(meta, indent=2))
    return output


def _needs_build(output: Path, expected: str, overwrite: bool, key: str) -> bool:
    """False when `output` is already prepared with this fingerprint; an error when it
    holds anything else (another prepared set unless `overwrite`; `storage/dirs.py`)."""
    return dirs.check_output(output, key, PREPARED, is_prepared, overwrite,
                             same=lambda p: saved_fingerprint(p) == expected)


def _write(source: Source, tmp: Path, bar: Callable[[str], Any]) -> dict[str, Any]:
    """The tokenizer, then every document into the splits' files; returns the meta."""
    tok = source.tokenizer(tmp, bar)
    dtype = token_dtype(tok.vocab_size)
    writers = {s: SplitWriter(tmp, s, dtype, source.shard_bytes, weights=source.weights,
                              index=source.index) for s in SPLITS}
    try:
        for batch in source.documents(tok, dtype, tmp, bar):
            for split, mask in (("train", ~batch.is_val), ("val", batch.is_val)):
                if mask.any():
                    writers[split].add(*batch.part(mask))
    finally:
        splits = {s: w.close() for s, w in writers.items()}
    return source.meta(tok, dtype, splits)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool, source: Source, desc: str) -> Any:
    """A progress bar over the input bytes (of unknown total for compressed inputs)."""
    if not enabled:
        return _NoProgress()
    # Deferred: only the command line draws progress bars.
    from tqdm import tqdm
    compressed = any(f.name.lower().endswith(COMPRESSED) or file_format(f) == "parquet"
                     for f in source.files)
    total = None if compressed else sum(f.stat().st_size for f in source.files)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def keep_tokenizer(tok: Tokenizer, out_dir: Path) -> Tokenizer:
    """Copy a file-backed tokenizer into `out_dir` and return it loaded from the copy."""
    if isinstance(tok, HFTokenizer):
        dst = out_dir / HF_FILE
        if tok.path.resolve() != dst.resolve():
            shutil.copyfile(tok.path, dst)
        return HFTokenizer(dst, kind=tok.kind, bos_id=tok.bos_id, eos_id=tok.eos_id,
                           sha256=tok.sha256)
    if tok.kind == "sentencepiece":
        dst = out_dir / SENTENCEPIECE_FILE
        shutil.copyfile(tok.path, dst)
        return tokenizer_from_dict({**tok.to_dict(), "file": SENTENCEPIECE_FILE}, out_dir)
    return tok


def require_both_splits(splits: dict[str, Any], val_fraction: float, unit: str,
                        what: str) -> None:
    """ConfigError naming --val_fraction when the train or the validation split is empty."""
    total = splits["train"]["documents"] + splits["val"]["documents"]
    for split in SPLITS:
        if splits[split]["documents"] == 0:
            raise ConfigError("--val_fraction", f"the {split} split is empty ({total} {unit}, "
                                                f"val_fraction {val_fraction}); {what} needs "
                                                f"{unit} in both splits")


# One text (format 1).

@dataclasses.dataclass
class TextSource:
    """A text (files concatenated) tokenized as one document, split by token position."""

    files: list[Path]
    source: Path
    spec: str  # the tokenizer spec
    given: Tokenizer | None  # from:DIR's tokenizer
    settings: dict[str, Any]
    extra: str  # what else the fingerprint covers: the tokenizer's file or vocabulary
    weights = False
    index = False
    shard_bytes = ONE_FILE

    @functools.cached_property
    def text(self) -> str:
        try:
            text = "".join(f.read_text(encoding="utf-8") for f in self.files)
        except UnicodeDecodeError as e:
            raise ConfigError("data.path", f"{self.source} is not UTF-8 text ({e})") from None
        if not text:
            raise ConfigError("data.path", f"{self.source} is empty: no text to train on")
        return text

    def fingerprint(self) -> str:
        head = f"{FORMAT_VERSION}|{self.spec}|{self.settings['val_fraction']}{self.extra}"
        return fingerprint(head, [f.resolve() for f in self.files])

    def tokenizer(self, tmp: Path, bar: Callable[[str], Any]) -> Tokenizer:
        if self.given is not None:
            return keep_tokenizer(self.given, tmp)
        if self.spec == "bpe":
            trained = train_bpe([self.text], self.settings["vocab_size"], tmp / HF_FILE)
            return HFTokenizer(tmp / HF_FILE, kind="bpe", eos_id=trained.eos_id)
        return keep_tokenizer(fit_tokenizer(self.spec, self.text,
                                            self.settings["vocab_size"]), tmp)

    def documents(self, tok: Tokenizer, dtype: np.dtype, tmp: Path,
                  bar: Callable[[str], Any]) -> Iterator[Encoded]:
        try:
            ids = tok.encode(self.text)
        except ValueError as e:  # a character that a reused (from:DIR) char vocabulary lacks
            raise ConfigError("data.path", f"{self.source}: {e} ({self.spec}: "
                                           f"{describe_tokenizer(tok)}); the model cannot "
                                           f"represent it: remove or replace it in the text"
                              ) from None
        n_train = int(len(ids) * (1.0 - self.settings["val_fraction"]))
        # Two documents: the training part and the validation part (format 1 records no
        # text bytes per document).
        yield Encoded(ids.astype(dtype), np.array([n_train, len(ids) - n_train], np.int64),
                      np.zeros(2, np.int64), np.array([False, True]))

    def meta(self, tok: Tokenizer, dtype: np.dtype, splits: dict[str, Any]) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "source": str(self.source.resolve()),
                "tokenizer": tok.to_dict(), "vocab_size": tok.vocab_size,
                "dtype": np.dtype(dtype).name,
                "counts": {s: splits[s]["tokens"] for s in SPLITS},
                "val_fraction": self.settings["val_fraction"]}


# A corpus of documents (format 2).

@dataclasses.dataclass
class CorpusSource:
    """Documents streamed through worker processes, each split by a hash of its text."""

    files: list[Path]
    kind: str  # the tokenizer kind
    given: Tokenizer | None  # an hf: or sentencepiece: tokenizer
    settings: dict[str, Any]
    options: Prepare
    bad: int = 0
    empty: int = 0
    weights = False
    index = True

    @property
    def shard_bytes(self) -> int:
        return self.options.shard_bytes

    def fingerprint(self) -> str:
        return fingerprint(json.dumps(self.settings, sort_keys=True), self.files)

    def _tasks(self):
        return read_tasks(self.files, text_field=self.settings["text_field"],
                          split_blank_lines=self.settings["split_blank_lines"])

    def _map(self, op: str, bar: Any, tok: Tokenizer | None = None, root: Path | None = None,
             dtype: np.dtype | None = None) -> Iterator[Any]:
        s = self.settings
        worker = WorkerSettings(s["text_field"], s["skip_bad"], s["val_fraction"],
                                None if tok is None else tok.to_dict(), str(root or ""),
                                "uint16" if dtype is None else dtype.name)
        return map_ordered(self._tasks(), op, worker, self.options.workers, bar)

    def tokenizer(self, tmp: Path, bar: Callable[[str], Any]) -> Tokenizer:
        """char: the characters of the corpus; bpe: trained on the training documents."""
        if self.kind == "byte":
            return ByteTokenizer(eos=True)
        if self.given is not None:
            return keep_tokenizer(self.given, tmp)
        progress = bar("characters" if self.kind == "char" else "train bpe")
        try:
            if self.kind == "char":
                chars: set[str] = set()
                for found, error in self._map("chars", progress):
                    _raise(error)
                    chars |= found
                return CharTokenizer(sorted(chars), eos=True)
            return train_bpe(self._train_texts(progress), self.settings["vocab_size"],
                             tmp / HF_FILE, "--vocab_size")
        finally:
            progress.close()

    def _train_texts(self, progress: Any) -> Iterator[str]:
        """The training documents, or their first `bpe_train_chars` characters when > 0."""
        seen = 0
        for batch, error in self._map("train_texts", progress):
            _raise(error)
            yield from batch
            seen += sum(len(t) for t in batch)
            if 0 < self.settings["bpe_train_chars"] <= seen:
                return

    def documents(self, tok: Tokenizer, dtype: np.dtype, tmp: Path,
                  bar: Callable[[str], Any]) -> Iterator[Encoded]:
        progress = bar("tokenize")
        try:
            for r in self._map("tokenize", progress, tok, tmp, dtype):
                _raise(r.error)
                self.bad, self.empty = self.bad + r.bad, self.empty + r.empty
                yield Encoded(r.tokens, r.lengths, r.text_bytes, r.is_val)
        finally:
            progress.close()

    def meta(self, tok: Tokenizer, dtype: np.dtype, splits: dict[str, Any]) -> dict[str, Any]:
        if splits["train"]["documents"] + splits["val"]["documents"] == 0:
            raise ConfigError("--input", f"empty corpus: no non-empty documents in "
                                         f"{len(self.files)} file(s)" +
                              (f" ({self.bad} bad ones skipped)" if self.bad else ""))
        require_both_splits(splits, self.settings["val_fraction"], "documents", "a corpus")
        return {"format_version": CORPUS_FORMAT_VERSION, "tokenizer": tok.to_dict(),
                "vocab_size": tok.vocab_size, "dtype": dtype.name, "splits": splits,
                "counts": {s: splits[s]["tokens"] for s in splits},
                "documents": {s: splits[s]["documents"] for s in splits},
                "skipped": {"bad": self.bad, "empty": self.empty},
                "val_fraction": self.settings["val_fraction"]}


def _raise(error: tuple[str, str] | None) -> None:
    if error is not None:
        raise ConfigError(*error)


# Supervised fine-tuning examples (format 3).

@dataclasses.dataclass
class SftSource:
    """One example per record (in this process: SFT sets are small next to pretraining
    corpora, and the per-record checks are cheap), split by a hash of the record."""

    files: list[Path]
    tok: Tokenizer
    template: ChatTemplate | None
    settings: dict[str, Any]
    shard_bytes: int
    records: int = 0
    truncated: int = 0
    bad: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    longest: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    weights = True
    index = True

    def fingerprint(self) -> str:
        return fingerprint(json.dumps(self.settings, sort_keys=True), self.files)

    def tokenizer(self, tmp: Path, bar: Callable[[str], Any]) -> Tokenizer:
        return keep_tokenizer(self.tok, tmp)

    def _examples(self, item: bytes, file: str, line: int, tok: Tokenizer) -> list[Example]:
        """The record's examples (a preference record's are [chosen, rejected]); none for
        a bad record (counted by reason)."""
        s = self.settings
        try:
            if s["format"] == "preference":
                return make_pair(item, tok, self.template, seq_len=s["seq_len"],
                                 truncate=s["truncate"], end_text=s["end_text"])
            return [make_example(item, tok, self.template, seq_len=s["seq_len"],
                                 truncate=s["truncate"], end_text=s["end_text"])]
        except BadRecord as e:
            if s["strict"]:
                raise ConfigError("--input", f"{file}:{line}: {e.reason}: {e.detail} "
                                             f"(--strict refuses the file at its first bad "
                                             f"record)") from None
            entry = self.bad.setdefault(e.reason, {"count": 0, "file": file, "line": line,
                                                   "detail": e.detail})
            entry["count"] += 1
            return []

    def documents(self, tok: Tokenizer, dtype: np.dtype, tmp: Path,
                  bar: Callable[[str], Any]) -> Iterator[Encoded]:
        progress = bar("sft")
        try:
            for task in read_tasks(self.files):
                kept = []
                for item, line in zip(task.items, task.lines):
                    self.records += 1
                    examples = self._examples(item, task.file, line, tok)
                    if examples:  # a pair stays in the split of its first example
                        self.truncated += any(ex.truncated for ex in examples)
                        val = is_val(examples[0].key, self.settings["val_fraction"])
                        kept += [(ex, val) for ex in examples]
                if kept:
                    yield self._encoded(kept, dtype)
                progress.update(task.nbytes)
        finally:
            progress.close()

    def _encoded(self, kept: list[tuple[Example, bool]], dtype: np.dtype) -> Encoded:
        for ex, val in kept:
            split = "val" if val else "train"
            self.longest[split] = max(self.longest[split], len(ex.tokens))
        return Encoded(np.concatenate([x.tokens for x, _ in kept]).astype(dtype),
                       np.array([len(x.tokens) for x, _ in kept], np.int64),
                       np.array([x.text_bytes for x, _ in kept], np.int64),
                       np.array([v for _, v in kept], bool),
                       np.concatenate([x.weights for x, _ in kept]))

    def meta(self, tok: Tokenizer, dtype: np.dtype, splits: dict[str, Any]) -> dict[str, Any]:
        self._check(splits)
        s, template = self.settings, self.template
        return {"format_version": SFT_FORMAT_VERSION, "format": s["format"],
                "tokenizer": tok.to_dict(), "vocab_size": tok.vocab_size, "dtype": dtype.name,
                "splits": splits, "counts": {s: splits[s]["tokens"] for s in splits},
                "documents": {s: splits[s]["documents"] for s in splits},
                "examples": {s: splits[s]["documents"] for s in splits},
                "completion_tokens": {s: splits[s]["completion_tokens"] for s in splits},
                "longest": self.longest, "records": self.records, "truncated": self.truncated,
                "bad": dict(sorted(self.bad.items())),
                "skipped": {"bad": sum(b["count"] for b in self.bad.values()), "empty": 0},
                "seq_len": s["seq_len"], "truncate": s["truncate"],
                "template": "simple" if template is None else "chat_template",
                "chat_template": None if template is None else
                {"source": template.source, "special_tokens": template.special_tokens},
                "end": "eos" if tok.eos_id is not None else s["end_text"],
                "val_fraction": s["val_fraction"]}

    def _check(self, splits: dict[str, Any]) -> None:
        if splits["train"]["documents"] + splits["val"]["documents"] == 0:
            reasons = ", ".join(f"{r} {b['count']} (first {b['file']}:{b['line']})"
                                for r, b in sorted(self.bad.items()))
            raise ConfigError("--input", f"no usable SFT records in {len(self.files)} "
                                         f"file(s): {self.records} record(s)" +
                              (f", all bad: {reasons}" if reasons else ""))
        require_both_splits(splits, self.settings["val_fraction"], "examples", "SFT data")
