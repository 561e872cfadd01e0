"""Run an ablation sweep defined next to a base config: train and evaluate every variant.

  python sweep.py --config=configs/sweep_width_depth.py --workdir=runs/width_depth
  python sweep.py --config=configs/sweep_width_depth.py --workdir=runs/width_depth --parallel=2
  python sweep.py --config=configs/sweep_lr_warmup.py --dry_run        # list, run nothing
  python sweep.py --config=configs/sweep_lr_warmup.py --workdir=DIR --emit=slurm
  python sweep.py --config=configs/sweep_width_depth.py --workdir=DIR --config.steps=200

`--config.KEY=VALUE` overrides the base config, for every variant (a key the variants set
stays theirs).

The config file defines `get_config(arg)` and `get_sweep(arg)` (see configs/sweep_utils.py).
Each variant trains, then evaluates, into DIR/<variant>; running the command again skips
finished variants and resumes the others from their checkpoints. At the end DIR holds
results.csv, results.md and loss_curves.png. A failing variant is recorded as failed
with the first line of its error; the others still run (the exit status is then 1).
"""

import os
import sys

from absl import app, flags, logging

from jaxlm.configs.cli import Launch, flags_parser
from jaxlm.configs.errors import ConfigError
from jaxlm.sweeps.report import collect_rows, dry_run_text, write_reports
from jaxlm.sweeps.runner import run_sweep
from jaxlm.sweeps.slurm import emit_slurm
from jaxlm.sweeps.spec import load_sweep, split_cli_overrides

_CONFIG = flags.DEFINE_string("config", None, "Config file with get_config and get_sweep, "
                              "optionally with an argument after a colon.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (default: runs/<file stem>).")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Variants run at once, each on a disjoint "
                                 "share of the devices (CPU cores or GPUs).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Fake CPU devices, split between the "
                                    "--parallel variants.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the variants and resolved configs only.")
_EMIT = flags.DEFINE_enum("emit", None, ["slurm"], "Write DIR/sweep.sbatch (a job array, "
                          "one task per variant) instead of running.")
_SBATCH = flags.DEFINE_multi_string("sbatch", [], "Extra #SBATCH option for --emit=slurm, "
                                    "e.g. --sbatch=--gres=gpu:1.")
_REPORT = flags.DEFINE_bool("report", False, "Only write the tables and plot from the "
                            "results so far (e.g. after a SLURM array).")
_CPU_AFFINITY = flags.DEFINE_list("cpu_affinity", None, "With --variant: pin this process "
                                  "to these CPU cores (set by --parallel).")
_VARIANT = flags.DEFINE_string("variant", None, "Run only this variant, in this process "
                               "(what the sweep's subprocesses and SLURM tasks run).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if logging.get_verbosity() == logging.INFO:  # orbax logs every save step at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        Launch.parse({"cpu_devices": _CPU_DEVICES.value})
        if _VARIANT.value:
            sys.exit(run_one())
        sweep = load_sweep(_CONFIG.value, _OVERRIDES)
        workdir = _WORKDIR.value or os.path.join("runs", sweep.name)
        if _DRY_RUN.value:
            print(dry_run_text(sweep, workdir))
            return
        if _EMIT.value == "slurm":
            path = emit_slurm(sweep, workdir, sbatch_options=_SBATCH.value)
            print(f"Wrote {path} ({len(sweep.variants)} array tasks). Submit: sbatch {path}")
            return
        if not _REPORT.value:
            run_sweep(sweep, workdir, parallel=_PARALLEL.value, cpu_devices=_CPU_DEVICES.value)
        paths = write_reports(sweep, workdir)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: running variants saved a checkpoint; run the same command "
                 "to resume")
    print(paths["md"].read_text())
    print(f"Wrote {paths['csv']}, {paths['md']} and {paths['png']}")
    failed = [r["name"] for r in collect_rows(sweep, workdir) if r["status"] != "ok"]
    if failed:
        sys.exit(f"{len(failed)} of {len(sweep.variants)} variants did not finish: "
                 f"{', '.join(failed)}")


def run_one() -> int:
    """Worker mode: one variant in this process. Returns the exit status."""
    if _CPU_AFFINITY.value:  # before JAX starts its thread pools
        os.sched_setaffinity(0, {int(c) for c in _CPU_AFFINITY.value})
    # Deferred: the sweep's parent process never loads the training stack, only workers do.
    from jaxlm.parallel.distributed import initialize  # noqa: PLC0415
    from jaxlm.sweeps.worker import run_variant  # noqa: PLC0415
    from jaxlm.training.hooks import log  # noqa: PLC0415
    initialize(_CPU_DEVICES.value)

    sweep = load_sweep(_CONFIG.value, _OVERRIDES)
    workdir = _WORKDIR.value or os.path.join("runs", sweep.name)
    result = run_variant(sweep, _VARIANT.value, workdir, log=log)
    if result["status"] != "ok":
        print(f"error: {result['error']}", file=sys.stderr)
        return 1
    return 0


_OVERRIDES: tuple[str, ...] = ()


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flags, after taking out the `--config.KEY=VALUE` overrides of the base."""
    global _OVERRIDES
    try:
        argv, _OVERRIDES = split_cli_overrides(argv)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    return flags_parser()(argv)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
