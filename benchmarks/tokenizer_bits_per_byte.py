"""The same text prepared three ways (char, byte, BPE), trained with the same compute
budget, compared in bits per byte on the same held-out text.

  python benchmarks/tokenizer_bits_per_byte.py --workdir=runs/tokenizers

The embedded tiny Shakespeare is cut at a paragraph boundary near 90%: the first part is
the training text (`data.path`; each run holds out its own last 10% for the evaluations
during training), the rest is the held-out text every run is finally evaluated on
(`eval.py --data`). Each tokenizer trains the default recipe (`configs/shakespeare_char.py`:
4 layers, d_model 128, 2000 steps of 12 x 64 tokens): the same tokens per step and steps,
so a BPE token, which carries several bytes, shows the model more text for the same
number of tokens. Bits per byte (summed loss in bits over the UTF-8 bytes of the targets)
make the three comparable. Runs that are done are not trained again (a run resumes).
Extra `--config.KEY=VALUE` flags go to every train.py.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from jaxlm.data.prepare import EMBEDDED_CORPUS  # noqa: E402

TOKENIZERS = {"char": [], "byte": [], "bpe": ["--config.data.vocab_size={bpe_vocab}"]}


def split_text(out: Path, fraction: float = 0.9) -> tuple[Path, Path]:
    """(training text, held-out text): the embedded corpus cut after the paragraph that
    crosses `fraction` of its characters."""
    text = EMBEDDED_CORPUS.read_text(encoding="utf-8")
    cut = text.index("\n\n", int(len(text) * fraction)) + 2
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = out / "train.txt", out / "held_out.txt"
    for path, part in ((train, text[:cut]), (held_out, text[cut:])):
        if not path.is_file() or path.read_text(encoding="utf-8") != part:
            path.write_text(part, encoding="utf-8")
    return train, held_out


def _run(args: list[str]) -> str:
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{res.stderr[-2000:]}")
    return res.stdout


def train_and_evaluate(kind: str, train: Path, held_out: Path, workdir: Path,
                       bpe_vocab: int, extra: list[str]) -> dict:
    run = workdir / kind
    flags = [f.format(bpe_vocab=bpe_vocab) for f in TOKENIZERS[kind]]
    t0 = time.time()
    _run(["train.py", f"--workdir={run}", f"--config.data.path={train}",
          f"--config.data.tokenizer={kind}", *flags, *extra])
    wall = time.time() - t0
    result = json.loads(_run(["eval.py", f"--workdir={run}", f"--data={held_out}"])
                        .strip().splitlines()[-1])
    meta = json.loads((run / "data" / "meta.json").read_text())
    tokens = result["num_tokens"] + 1
    return {"tokenizer": kind, "vocab": meta["vocab_size"],
            "held-out bytes per token": len(held_out.read_bytes()) / tokens,
            "train.py wall s": round(wall), "held-out eval_loss (nats/token)":
            result["eval_loss"], "held-out bits per byte": result["bits_per_byte"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/tokenizers")
    ap.add_argument("--bpe_vocab", type=int, default=2048)
    ap.add_argument("--tokenizers", default="char,byte,bpe")
    args, extra = ap.parse_known_args()
    workdir = Path(args.workdir).absolute()
    train, held_out = split_text(workdir / "text")
    rows = [train_and_evaluate(kind, train, held_out, workdir, args.bpe_vocab, extra)
            for kind in args.tokenizers.split(",")]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n| " + " | ".join("---" for _ in cols) + " |")
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else f"{v:,}"
                                if isinstance(v, int) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
