"""Collect the stages of `benchmarks/device_check.sh` into OUT_DIR/device_check.json and
OUT_DIR/device_check.md; exit 1 if any stage failed or ran out of its time budget.

  python benchmarks/device_check_report.py OUT_DIR

Reads OUT_DIR/stages.tsv (stage, exit status, seconds, budget; one line per stage, written
by the shell script), OUT_DIR/device.json, and each stage's JSON lines: kernels.jsonl
(benchmarks/kernel_check.py), attention.jsonl (benchmarks/attention.py) and
train.jsonl (benchmarks/train_throughput.py). A stage's rows are reported even when it
failed or timed out: what it measured before that is kept.
"""

import json
import sys
from pathlib import Path

STAGES = {"kernels": "kernels.jsonl", "attention": "attention.jsonl", "train": "train.jsonl"}
TIMEOUT = 124  # `timeout`'s exit status


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect(out: Path) -> dict:
    """The report as one dict: device, stages with status and rows, ok."""
    stages = {}
    lines = (out / "stages.tsv").read_text().splitlines() if (out / "stages.tsv").is_file() \
        else []
    for line in lines:
        name, rc, seconds, budget = line.split("\t")
        rc = int(rc)
        status = "ok" if rc == 0 else "timed out" if rc == TIMEOUT else f"failed (exit {rc})"
        stages[name] = {"status": status, "seconds": float(seconds), "budget_s": int(budget),
                        "rows": _rows(out / STAGES.get(name, f"{name}.jsonl"))}
    for name in STAGES:
        stages.setdefault(name, {"status": "did not run", "seconds": 0.0, "budget_s": 0,
                                 "rows": []})
    device = json.loads((out / "device.json").read_text()) if (out / "device.json").is_file() \
        else {}
    return {"device": device, "stages": stages,
            "ok": all(s["status"] == "ok" for s in stages.values())}


def _fmt(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _tflops(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def markdown(report: dict) -> str:
    dev = report["device"]
    lines = [f"# Device check: {dev.get('device_kind', '?')} x {dev.get('count', '?')} "
             f"({dev.get('backend', '?')}), jax {dev.get('jax', '?')}, {dev.get('date', '')}",
             "", f"Result: **{'all stages passed' if report['ok'] else 'FAILED'}**", "",
             "| stage | status | seconds | budget |", "| --- | --- | --- | --- |"]
    for name, s in report["stages"].items():
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.0f} | {s['budget_s']} |")
    kernels = report["stages"]["kernels"]["rows"]
    lines += ["", "## Flash-attention kernels against the reference (max relative error)", "",
              "| case | ok | o | lse | dq | dk | dv |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in kernels:
        e = r.get("errors") or {}
        cells = [f"{e[k]:.1e}" if k in e else r.get("error", "")[:60] if k == "o" else ""
                 for k in ("o", "lse", "dq", "dk", "dv")]
        lines.append(f"| {r['case']} | {'yes' if r['ok'] else 'NO'} | " + " | ".join(cells) + " |")
    lines += ["", "## Attention speed (bf16; TFLOP/s counts causal attention as half)", "",
              "| impl | causal | head_dim | seq | fwd ms | fwd TFLOP/s | fwd+bwd ms | "
              "fwd+bwd TFLOP/s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["stages"]["attention"]["rows"]:
        lines.append(f"| {r['impl']} | {r['causal']} | {r['head_dim']} | {r['seq']} | "
                     f"{_fmt(r.get('fwd_ms'), 3)} | {_tflops(r.get('fwd_tflops'))} | "
                     f"{_fmt(r.get('fwd_bwd_ms'), 3)} | {_tflops(r.get('fwd_bwd_tflops'))} |"
                     + (f" {r['error'][:80]}" if "error" in r else ""))
    lines += ["", "## Train step (synthetic data)", "",
              "| config | parameters | batch x seq | dtype | step ms | tokens/s | "
              "model TFLOP/s per device | MFU | compile s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["stages"]["train"]["rows"]:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "- (no peak)"
        lines.append(f"| {r['config']} | {r['num_params']:,} | {r['batch_size']} x "
                     f"{r['seq_len']} | {r['dtype']} | {r['step_ms']:.1f} | "
                     f"{r['tokens_per_sec']:,} | {r['model_tflop_per_s_per_device']:.3g} | "
                     f"{mfu} | {r['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python benchmarks/device_check_report.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[1])
    report = collect(out)
    (out / "device_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "device_check.md").write_text(markdown(report))
    print(markdown(report))
    for name, s in report["stages"].items():
        if s["status"] == "did not run":
            print(f"error: device check stage {name!r} did not run", file=sys.stderr)
        elif s["status"] != "ok":
            print(f"error: device check stage {name!r} {s['status']}; see "
                  f"{out / (name + '.log')}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
