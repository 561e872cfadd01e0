"""Sweep: model width x depth on tiny Shakespeare (character level).

  python sweep.py --config=configs/sweep_width_depth.py --workdir=runs/width_depth
  python sweep.py --config=configs/sweep_width_depth.py --workdir=runs/width_depth --parallel=2
  python sweep.py --config=configs/sweep_width_depth.py:smoke --workdir=/tmp/wd --dry_run

The base is the default Shakespeare recipe (seq 64, batch 12, AdamW 1e-3) for 500 steps.
Width is d_model with d_ff = 4 x d_model (zipped); depth is the number of layers.

Arguments after the colon:
  (none)  d_model {32, 64, 128} x layers {1, 4}: 6 variants, ~4 min on 2 CPU cores.
  smoke   d_model {16, 32} x layers {1, 2} on the `tiny` preset, 20 steps: seconds.
"""

from jaxlm.configs import sweep_utils as su
from jaxlm.configs.shakespeare_char import get_config as shakespeare_config


def get_config(arg: str | None = None):
    if arg == "smoke":
        c = shakespeare_config("tiny")
    elif arg is None:
        c = shakespeare_config()
        c.steps = 500
        c.log_every = 10
        c.eval_every = 100
        c.checkpoint_every = 250
    else:
        raise ValueError(f"unknown argument {arg!r}; use none or 'smoke'")
    c.name = "width_depth"
    return c


def get_sweep(arg: str | None = None):
    widths = [16, 32] if arg == "smoke" else [32, 64, 128]
    depths = [1, 2] if arg == "smoke" else [1, 4]
    width = su.zip(su.axis("model.d_model", widths),
                   su.axis("model.d_ff", [4 * w for w in widths]))
    return su.product(width, su.axis("model.num_layers", depths))
