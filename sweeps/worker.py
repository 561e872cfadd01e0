"""Run one variant in this process: train (resuming if a checkpoint exists), then evaluate.

This is what `sweep.py --variant=NAME` does, locally in a subprocess of the sweep or as
one SLURM array task. The outcome goes to `DIR/<variant>/sweep_result.json`; an
exception marks the variant failed with the first line of its error instead of raising.
"""

import time
import traceback
from typing import Any

import jax

from jaxlm.evaluation.modes import write_eval_result
from jaxlm.evaluation.restore import restore_run
from jaxlm.sweeps.results import (check_recorded_config, first_line, is_finished, read_result,
                                  summarise_metrics, variant_dir, write_result)
from jaxlm.sweeps.spec import Sweep
from jaxlm.training.evaluate import evaluate
from jaxlm.training.trainer import train


def run_variant(sweep: Sweep, name: str, workdir: str, log=print,
                devices: list[Any] | None = None) -> dict[str, Any]:
    """Train and evaluate variant `name` into WORKDIR/<name> (on `devices`, default all)."""
    variant = sweep.variant(name)
    vdir = variant_dir(workdir, name)
    config_json = variant.config_json()
    if is_finished(vdir, config_json):
        log(f"[{name}] already finished; skipping.")
        return read_result(vdir)

    previous = read_result(vdir) or {}
    # Wall time adds up over attempts of the same config (a resumed variant).
    same = previous.get("config") == config_json
    earlier_seconds = (previous.get("wall_seconds") or 0.0) if same else 0.0
    result: dict[str, Any] = {"name": name, "overrides": variant.overrides,
                              "config": config_json, "status": "failed", "error": None}
    t0 = time.time()
    try:
        check_recorded_config(vdir, name, variant.config)
        summary = train(variant.config, vdir, devices)
        result["num_params"] = summary["num_params"]
        if summary["interrupted"]:
            result.update(status="interrupted", error=f"interrupted at step {summary['step']}")
        else:
            if "eval_loss" in summary and summary["step"] == variant.config.steps:
                # The loop's final evaluation is eval.py's, on the same checkpointed params.
                final = {"step": summary["step"], "eval_loss": summary["eval_loss"],
                         "perplexity": summary["perplexity"],
                         "num_tokens": summary["num_tokens"],
                         "bits_per_byte": summary["bits_per_byte"]}
            else:  # trained earlier, results not written: evaluate the last checkpoint
                exp, state, step = restore_run(vdir, devices=devices)
                final = {"step": step, **evaluate(exp, state.params)}
            write_eval_result(vdir, final)
            result.update(status="ok", **summarise_metrics(vdir, final))
    except Exception as e:  # noqa: BLE001 -- one failing variant must not stop the sweep
        result["error"] = first_line(e)
        log(f"[{name}] failed: {result['error']}")
        log(traceback.format_exc())
    result["wall_seconds"] = round(earlier_seconds + time.time() - t0, 1)
    if jax.process_index() == 0:
        write_result(vdir, result)
    return result
