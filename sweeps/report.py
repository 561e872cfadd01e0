"""The sweep's tables (`results.csv`, `results.md`) and plot (`loss_curves.png`)."""

import csv
import json
from pathlib import Path
from typing import Any

from jaxlm.sweeps.results import METRIC_COLUMNS, is_finished, read_result, variant_dir
from jaxlm.sweeps.spec import Sweep
from jaxlm.training.metrics import read_metrics


def collect_rows(sweep: Sweep, workdir: str | Path) -> list[dict[str, Any]]:
    """One row per variant, in sweep order; variants without a result are `pending`."""
    rows = []
    for v in sweep.variants:
        result = read_result(variant_dir(workdir, v.name)) or {}
        status = result.get("status", "pending")
        if status == "ok" and result.get("config") != v.config_json():
            status = "stale"  # finished under another config: will rerun
        row: dict[str, Any] = {"name": v.name, "status": status}
        for key in sweep.override_keys():
            row[key] = v.overrides.get(key, "")
        for col in METRIC_COLUMNS:
            row[col] = result.get(col)
        row["best_eval_step"] = result.get("best_eval_step")
        row["error"] = result.get("error") or ""
        rows.append(row)
    return rows


def columns(sweep: Sweep) -> list[str]:
    metric_cols = list(METRIC_COLUMNS)
    metric_cols.insert(metric_cols.index("best_eval_loss") + 1, "best_eval_step")
    return ["name", "status", *sweep.override_keys(), *metric_cols, "error"]


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return v


def _md_value(col: str, v: Any) -> str:
    if v is None or v == "":
        return ""
    if col.endswith("_loss") and isinstance(v, (int, float)):
        return f"{v:.4f}"
    if col == "tokens_per_sec":
        return f"{v:,.0f}"
    if col == "num_params":
        return f"{v:,}"
    if col == "wall_seconds":
        return f"{v:.1f}"
    text = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return text.replace("|", "\\|")


def write_reports(sweep: Sweep, workdir: str | Path) -> dict[str, Path]:
    """Write results.csv, results.md and loss_curves.png into `workdir`; returns their paths."""
    workdir = Path(workdir)
    rows = collect_rows(sweep, workdir)
    cols = columns(sweep)

    csv_path = workdir / "results.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for row in rows:
            w.writerow({c: _csv_value(row.get(c)) for c in cols})

    md_path = workdir / "results.md"
    md_cols = [c for c in cols if c != "best_eval_step"]
    lines = [f"# Sweep `{sweep.file.name}{':' + sweep.arg if sweep.arg else ''}`", "",
             "| " + " | ".join(md_cols) + " |",
             "|" + "|".join(" --- " for _ in md_cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_md_value(c, row.get(c)) for c in md_cols) + " |")
    md_path.write_text("\n".join(lines) + "\n")

    png_path = workdir / "loss_curves.png"
    plot_loss_curves(sweep, workdir, png_path)
    return {"csv": csv_path, "md": md_path, "png": png_path}


def plot_loss_curves(sweep: Sweep, workdir: Path, out: Path) -> Path:
    # Deferred: matplotlib takes ~0.5 s to import and only the report draws.
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, v in enumerate(sweep.variants):
        train, evals = read_metrics(variant_dir(workdir, v.name))
        color = f"C{i % 10}"
        if train:
            ax_train.plot([r["step"] for r in train], [r["loss"] for r in train], color=color,
                          lw=1.0, label=v.name)
        if evals:
            ax_eval.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals],
                         color=color, marker="o", ms=3, lw=1.2, label=v.name)
    ax_train.set(title="train loss", xlabel="step", ylabel="loss (nats / token)")
    ax_eval.set(title="eval loss", xlabel="step")
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
    handles, labels = ax_train.get_legend_handles_labels()
    if not handles:
        handles, labels = ax_eval.get_legend_handles_labels()
    if handles:
        ax_eval.legend(handles, labels, fontsize=8, loc="upper right")
    fig.suptitle(f"{sweep.file.name}{':' + sweep.arg if sweep.arg else ''}")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def dry_run_text(sweep: Sweep, workdir: str | Path) -> str:
    """What a run would do: each variant's overrides, status and full resolved config."""
    workdir = Path(workdir).absolute()
    out = [f"Sweep {sweep.spec}: {len(sweep.variants)} variants -> {workdir}"]
    width = max(len(v.name) for v in sweep.variants)
    for v in sweep.variants:
        vdir = variant_dir(workdir, v.name)
        ckpts = vdir / "checkpoints"
        steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) \
            if ckpts.is_dir() else []
        if is_finished(vdir, v.config_json()):
            state = "finished (skip)"
        elif steps:
            state = f"resume from step {steps[-1]}"
        else:
            state = "new"
        overrides = " ".join(f"{k}={v!r}" for k, v in v.overrides.items()) or "(base config)"
        out.append(f"  {v.name:<{width}}  {overrides}  [{state}]")
    for v in sweep.variants:
        out.append(f"\n--- {v.name}: resolved config")
        out.append(json.dumps(v.config_json(), indent=2, sort_keys=True))
    return "\n".join(out)
