"""The top XLA ops of a profiled window (`profile.start_step`, `profile.num_steps`).

  python train.py --workdir=runs/prof --config.profile.start_step=10 --config.profile.num_steps=5
  python benchmarks/profile_ops.py runs/prof/profile             # the newest trace in it
  python benchmarks/profile_ops.py runs/prof/profile --top=30 --module=jit_train_step

Reads the trace's `perfetto_trace.json.gz` (written beside the `.xplane.pb` that
TensorBoard's profile plugin reads) and sums the duration of every event that names the
HLO op it ran (`args.hlo_op`: thunks on CPU, kernels on GPU), per op of each compiled
module, then prints the top ops as a table (control flow, `while`, `conditional` and `call`, is
left out: its time is that of the ops in its body, which are counted themselves): calls, total and per-step milliseconds (steps
are the window's `train` step markers), and the share of all op time. Op names are those
of the optimized HLO: `exp.train_step.lower(...).compile().as_text()` shows what each
fusion holds. The whole trace opens in https://ui.perfetto.dev or
`tensorboard --logdir WORKDIR/profile` (with the tensorboard-plugin-profile package).
"""

import collections
import gzip
import json
import sys
from pathlib import Path

from absl import app, flags

_TOP = flags.DEFINE_integer("top", 15, "Ops to print.")
_MODULE = flags.DEFINE_string("module", None, "Only ops of this HLO module, e.g. jit_train_step.")
CONTROL_FLOW = ("while", "conditional", "call")


def newest_trace(directory: str | Path) -> Path:
    """The newest `perfetto_trace.json.gz` under `directory`."""
    traces = sorted(Path(directory).rglob("perfetto_trace.json.gz"),
                    key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {directory}: is it a "
                                "profile directory (WORKDIR/profile)?")
    return traces[-1]


def op_table(trace: Path, module: str | None = None) -> tuple[list[dict], int]:
    """([{module, op, calls, total_ms}] by total time, descending; steps in the window)."""
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    total = collections.Counter()
    calls = collections.Counter()
    steps = set()
    for event in events:
        if event.get("ph") != "X":
            continue
        args = event.get("args") or {}
        if event.get("name") == "train" and "step_num" in args:
            steps.add(args["step_num"])
        if "hlo_op" not in args or (module and args.get("hlo_module") != module):
            continue
        if args["hlo_op"].split(".")[0] in CONTROL_FLOW:
            continue
        key = (args.get("hlo_module", ""), args["hlo_op"])
        total[key] += event.get("dur", 0.0) / 1e3
        calls[key] += 1
    rows = [{"module": m, "op": op, "calls": calls[(m, op)], "total_ms": ms}
            for (m, op), ms in total.most_common()]
    return rows, len(steps)


def format_table(rows: list[dict], steps: int, top: int) -> str:
    all_ms = sum(r["total_ms"] for r in rows) or 1.0
    per = max(steps, 1)
    lines = [f"{len(rows)} ops, {all_ms:.1f} ms of op time over {steps} profiled steps "
             f"({all_ms / per:.2f} ms per step)",
             "| op | module | calls | total ms | ms per step | share |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows[:top]:
        lines.append(f"| {r['op']} | {r['module']} | {r['calls']} | {r['total_ms']:.2f} | "
                     f"{r['total_ms'] / per:.3f} | {r['total_ms'] / all_ms:.1%} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python benchmarks/profile_ops.py WORKDIR/profile [--top=N]")
    try:
        trace = newest_trace(argv[1])
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    rows, steps = op_table(trace, _MODULE.value)
    print(f"# {trace}")
    print(format_table(rows, steps, _TOP.value))


if __name__ == "__main__":
    app.run(main)
