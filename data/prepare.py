"""Prepare text into token files: `train.bin`, `val.bin` (memory-mapped) and `meta.json`.

  python -m data.prepare --input=corpus.txt --output=/data/corpus_char [--tokenizer=byte]

The split is the first (1 - val_fraction) of the token stream for training and the rest
for validation, in file order (nanoGPT's split). A directory input is every regular,
non-hidden file under it, sorted by path, concatenated.
"""

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from configs.errors import ConfigError
from data.tokenizers import TOKENIZERS, fit_tokenizer

META = "meta.json"
EMBEDDED_CORPUS = Path(__file__).parent / "corpora" / "tinyshakespeare.txt"
FORMAT_VERSION = 1


def is_prepared(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / META).is_file()


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in
                                              p.relative_to(path).parts))
    if not files:
        raise ConfigError("data.path", f"directory {path} has no text files")
    return files


def _fingerprint(files: list[Path], tokenizer: str, val_fraction: float) -> str:
    h = hashlib.sha256(f"{FORMAT_VERSION}|{tokenizer}|{val_fraction}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def prepare(source: str | os.PathLike, out_dir: str | os.PathLike, *, tokenizer: str = "char",
            val_fraction: float = 0.1) -> Path:
    """Tokenize `source` (file or directory) into `out_dir`; reuse it if already up to date."""
    source, out_dir = Path(source), Path(out_dir)
    if not source.exists():
        raise ConfigError("data.path", f"no such file or directory: {source}")
    if tokenizer not in TOKENIZERS:
        raise ConfigError("data.tokenizer", f"unknown tokenizer {tokenizer!r}; "
                                            f"choose one of {TOKENIZERS}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError("data.val_fraction", f"must be in (0, 1), got {val_fraction}")
    files = _text_files(source)
    fingerprint = _fingerprint(files, tokenizer, val_fraction)
    if is_prepared(out_dir):
        meta = json.loads((out_dir / META).read_text())
        if meta.get("fingerprint") == fingerprint:
            return out_dir

    try:
        text = "".join(f.read_text(encoding="utf-8") for f in files)
    except UnicodeDecodeError as e:
        raise ConfigError("data.path", f"{source} is not UTF-8 text ({e})") from None
    if not text:
        raise ConfigError("data.path", f"{source} is empty: no text to train on")
    tok = fit_tokenizer(tokenizer, text)
    ids = tok.encode(text)
    n_train = int(len(ids) * (1.0 - val_fraction))
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", ids[:n_train]), ("val", ids[n_train:])):
        tmp = out_dir / f".{split}.bin.{os.getpid()}.tmp"  # processes may race here
        part.astype(dtype).tofile(tmp)
        os.replace(tmp, out_dir / f"{split}.bin")
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source": str(source.resolve()),
        "fingerprint": fingerprint,
        "tokenizer": tok.to_dict(),
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "counts": {"train": n_train, "val": len(ids) - n_train},
        "val_fraction": val_fraction,
    }
    tmp = out_dir / f".{META}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out_dir / META)
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True, help="a text file or a directory of text files")
    ap.add_argument("--output", required=True, help="directory for train.bin, val.bin, meta.json")
    ap.add_argument("--tokenizer", default="char", choices=TOKENIZERS)
    ap.add_argument("--val_fraction", type=float, default=0.1)
    args = ap.parse_args()
    try:
        out = prepare(args.input, args.output, tokenizer=args.tokenizer,
                      val_fraction=args.val_fraction)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    meta = json.loads((out / META).read_text())
    print(json.dumps({"output": str(out), "vocab_size": meta["vocab_size"], **meta["counts"]}))


if __name__ == "__main__":
    main()
