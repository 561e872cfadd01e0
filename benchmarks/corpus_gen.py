"""Synthetic JSON-lines corpora for the data benchmarks, from the embedded Shakespeare.

  python benchmarks/corpus_gen.py --size_mb=100 --output=/tmp/corpus_100mb.jsonl

Each document is a run of 1 to 8 (`max_paragraphs`) consecutive paragraphs starting at a random paragraph,
prefixed by its number (so no two documents are identical and the split by document
hash stays ~val_fraction). Written streaming: generating 1 GB holds only one document.
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np


from jaxlm.data.prepare import EMBEDDED_CORPUS  # noqa: E402


def make_jsonl(path: str | os.PathLike, size_bytes: int, seed: int = 0,
               max_paragraphs: int = 8) -> Path:
    """Write ~size_bytes of JSON lines ({"text": ...}) to `path`; reuse it if present."""
    path = Path(path)
    if path.is_file() and path.stat().st_size >= size_bytes:
        return path
    paragraphs = [p for p in EMBEDDED_CORPUS.read_text().split("\n\n") if p.strip()]
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    written, doc = 0, 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size_bytes:
            starts = rng.integers(0, len(paragraphs), 1024)
            counts = rng.integers(1, max_paragraphs + 1, 1024)
            lines = []
            for s, c in zip(starts, counts):
                text = f"{doc}\n" + "\n\n".join(paragraphs[s:s + c])
                lines.append(json.dumps({"text": text}) + "\n")
                doc += 1
            chunk = "".join(lines)
            f.write(chunk)
            written += len(chunk.encode())
    os.replace(tmp, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size_mb", type=float, default=100)
    ap.add_argument("--output", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max_paragraphs", type=int, default=8)
    args = ap.parse_args()
    out = make_jsonl(args.output, int(args.size_mb * 1e6), args.seed, args.max_paragraphs)
    print(json.dumps({"output": str(out), "bytes": out.stat().st_size}))


if __name__ == "__main__":
    main()
