"""A multi-document JSON-lines corpus from the embedded tiny Shakespeare: one document per
passage of consecutive speeches.

  python benchmarks/passages_corpus.py --output=/tmp/passages.jsonl

The text marks no acts or scenes, so passages stand in for them: the speeches
(blank-line-separated blocks) are cut, in order and without overlap, into runs of
`--min_speeches` to `--max_speeches` (seeded), one `{"text": ...}` line each. Every
character of the text is in exactly one document, so documents hashed into the
validation split are text the model never trains on.
"""

import argparse
import json
from pathlib import Path

import numpy as np


from jaxlm.data.prepare import EMBEDDED_CORPUS  # noqa: E402


def passages(min_speeches: int = 4, max_speeches: int = 16, seed: int = 0) -> list[str]:
    speeches = [s for s in EMBEDDED_CORPUS.read_text(encoding="utf-8").split("\n\n")
                if s.strip()]
    rng = np.random.default_rng(seed)
    out, start = [], 0
    while start < len(speeches):
        n = int(rng.integers(min_speeches, max_speeches + 1))
        out.append("\n\n".join(speeches[start:start + n]))
        start += n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True)
    ap.add_argument("--min_speeches", type=int, default=4)
    ap.add_argument("--max_speeches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    docs = passages(args.min_speeches, args.max_speeches, args.seed)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    sizes = [len(d.encode()) for d in docs]
    print(json.dumps({"output": str(out), "documents": len(docs), "bytes": sum(sizes),
                      "mean_document_bytes": round(float(np.mean(sizes)))}))


if __name__ == "__main__":
    main()
