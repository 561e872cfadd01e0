"""Peak memory of preparation as the corpus grows (it should stay flat).

  python benchmarks/prepare_memory.py [--sizes_mb=10,100,1000] [--tokenizers=byte,bpe] \
      [--bpe_max_mb=100] [--workers=1] [--workdir=/tmp/jaxlm_bench]

For each size, generates JSON lines from the embedded Shakespeare
(benchmarks/corpus_gen.py) and runs `python -m jaxlm.data.prepare` in a subprocess, sampling
the resident memory (VmRSS) of it and its worker processes every 20 ms. Reports the
peak of the main process, the peak of the whole process tree (main + workers, summed
per sample) and ru_maxrss from wait4 (the largest single process). The BPE is trained
on the corpus (streamed) and then tokenizes it, so its row includes training memory.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.corpus_gen import make_jsonl  # noqa: E402


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def run_measured(cmd: list[str], log: Path) -> dict[str, float]:
    """Run `cmd`, sampling its process tree's RSS; MiB peaks and wall seconds."""
    t = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    peak_main = peak_tree = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        sizes = [_rss_kb(p) for p in _tree(proc.pid)]
        peak_main = max(peak_main, sizes[0])
        peak_tree = max(peak_tree, sum(sizes))
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text()[-2000:]}")
    return {"seconds": time.perf_counter() - t, "peak_main_mib": peak_main / 1024,
            "peak_tree_mib": peak_tree / 1024, "ru_maxrss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes_mb", default="10,100,1000")
    ap.add_argument("--tokenizers", default="byte,bpe")
    ap.add_argument("--bpe_max_mb", type=float, default=100,
                    help="skip BPE above this size (it tokenizes at a few MB/s here)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--bpe_train_mb", type=float, default=0,
                    help="passed to data.prepare: train the BPE on a prefix (0: all)")
    ap.add_argument("--vocab_size", type=int, default=4096)
    ap.add_argument("--workdir", default="/tmp/jaxlm_bench")
    ap.add_argument("--keep", action="store_true", help="keep the prepared outputs")
    args = ap.parse_args()
    work = Path(args.workdir)
    rows = []
    for size in [float(s) for s in args.sizes_mb.split(",")]:
        corpus = make_jsonl(work / f"corpus_{size:g}mb.jsonl", int(size * 1e6))
        for kind in args.tokenizers.split(","):
            if kind == "bpe" and size > args.bpe_max_mb:
                continue
            out = work / f"memory_{kind}_{size:g}mb"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "jaxlm.data.prepare", f"--input={corpus}",
                   f"--output={out}", f"--tokenizer={kind}", f"--workers={args.workers}",
                   f"--vocab_size={args.vocab_size}", f"--bpe_train_mb={args.bpe_train_mb}",
                   "--quiet"]
            r = run_measured(cmd, work / f"memory_{kind}_{size:g}mb.log")
            mb = corpus.stat().st_size / 1e6
            if kind == "bpe" and args.bpe_train_mb:
                kind = f"bpe (trained on {args.bpe_train_mb:g}M chars)"
            rows.append({"size_mb": round(mb, 1), "tokenizer": kind, "workers": args.workers,
                         **{k: round(v, 1) for k, v in r.items()}})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    print(f"{args.workers} worker process(es); {os.cpu_count()} CPUs.\n")
    print("| corpus (MB of JSON lines) | tokenizer | wall s | MB/s | peak RSS main (MiB) "
          "| peak RSS main + workers (MiB) | ru_maxrss (MiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['size_mb']:,.0f} | {r['tokenizer']} | {r['seconds']:.1f} | "
              f"{r['size_mb'] / r['seconds']:.1f} | {r['peak_main_mib']:.0f} | "
              f"{r['peak_tree_mib']:.0f} | {r['ru_maxrss_mib']:.0f} |")
    print(json.dumps({"results": rows}))


if __name__ == "__main__":
    main()
