"""Metric sinks: `metrics.jsonl`, TensorBoard event files and, optionally, Weights & Biases;
and the reader of `metrics.jsonl`.

Only process 0 writes; other processes get a writer that does nothing.
"""

import json
import math
import netrc
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

METRICS_FILE = "metrics.jsonl"
# Record fields measured on the wall clock: the only ones that differ between identical runs.
WALL_CLOCK_KEYS = ("tokens_per_sec", "flops_per_sec_per_device", "mfu")
WANDB_RUN_ID_FILE = "wandb_run_id"  # a resumed run logs to the same wandb run


def _clean(value: Any) -> Any:
    """Floats for scalars, lists for vectors (e.g. per-expert load); NaN/inf -> null."""
    if hasattr(value, "ndim") and value.ndim > 0:
        return [_clean(v) for v in value.tolist()]
    value = float(value) if hasattr(value, "__float__") else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def has_wandb_login() -> bool:
    """Whether wandb can start without asking for an API key: WANDB_API_KEY, a WANDB_MODE
    that does not log in (offline, disabled, dryrun), or an entry for its host in the
    netrc file that `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY") or \
            os.environ.get("WANDB_MODE", "") in ("offline", "disabled", "dryrun"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(str(path)).authenticators(host.hostname or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def start_wandb(workdir: str | Path, project: str, entity: str = "",
                config: dict[str, Any] | None = None) -> Any:
    """A wandb run in WORKDIR/wandb, logging `config`; its id is kept in
    WORKDIR/wandb_run_id, so a resumed run continues the same wandb run. Honours
    WANDB_MODE (e.g. `offline`, synced later with `wandb sync`)."""
    # Deferred: wandb is the optional .[wandb] extra, imported only when a run asks for it.
    import wandb  # noqa: PLC0415
    workdir = Path(workdir)
    id_file = workdir / WANDB_RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None  # None: a new id
    run = wandb.init(project=project, entity=entity or None, id=run_id, resume="allow",
                     dir=str(workdir), name=workdir.name, config=config)
    id_file.write_text(run.id + "\n")
    return run


class MetricWriter:
    """Appends one JSON object per record to `metrics.jsonl` and mirrors its scalars to
    TensorBoard and, given a wandb run (`start_wandb`), to wandb."""

    def __init__(self, workdir: str | Path, *, enabled: bool | None = None,
                 wandb_run: Any = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = Path(workdir) / METRICS_FILE
        self._tb = None
        self._wandb = wandb_run if self.enabled else None
        if self.enabled:
            # Deferred: tensorboardX pulls in protobuf (~0.5 s), which only process 0 needs.
            from tensorboardX import SummaryWriter  # noqa: PLC0415
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def truncate_after(self, step: int, warn: Callable[[str], None] = print) -> None:
        """Drop records past `step`: after a resume they are recomputed, identically. A line
        that is not a JSON record (e.g. cut short by a crash) is dropped with a warning."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                record = None
            if line.strip() and not (isinstance(record, dict) and "step" in record):
                warn(f"warning: dropped line {number} of {self.path}: not a metrics record "
                     f"({line[:60]!r})")
            elif record is not None and record["step"] <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        tmp.replace(self.path)

    def write(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {}
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                scalars[k] = v
            elif isinstance(v, list):
                scalars.update({f"{k}/{i}": x for i, x in enumerate(v)
                                if isinstance(x, (int, float))})
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Close the sinks. TensorBoard mirrors `metrics.jsonl`: events it cannot write
        (a full disk) are dropped, and its writer is marked closed so that its exit hook
        does not retry."""
        if self._tb is not None:
            try:
                self._tb.close()
            except OSError:  # stop its thread and mark it closed (tensorboardX has no API)
                for writer in (self._tb.all_writers or {}).values():
                    events = writer.event_writer
                    if events._worker is not None:  # noqa: SLF001
                        events._worker.stop()  # noqa: SLF001
                    events._closed = True  # noqa: SLF001 -- read by its exit hook
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(workdir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training records, eval records) of `WORKDIR/metrics.jsonl`; empty if there is none."""
    path = Path(workdir) / METRICS_FILE
    train, evals = [], []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # e.g. a last line cut short by a crash
                continue
            if not isinstance(rec, dict):
                continue
            if rec.get("loss") is not None:
                train.append(rec)
            if rec.get("eval_loss") is not None:
                evals.append(rec)
    return train, evals
