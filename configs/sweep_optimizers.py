"""Sweep: optimizers and learning-rate schedules on tiny Shakespeare (the default recipe).

  python sweep.py --config=configs/sweep_optimizers.py --workdir=runs/optimizers
  python sweep.py --config=configs/sweep_optimizers.py:lr --workdir=runs/optimizers_lr
  python sweep.py --config=configs/sweep_optimizers.py:smoke --workdir=/tmp/opt --dry_run

Arguments after the colon:
  (none)  the default recipe shortened to 300 steps (100 warm-up steps, then cosine to
          lr / 10 unless stated): AdamW at its default 1e-3 and at 3e-3; Lion, Adafactor,
          Muon and SGD each at 3-4 peak learning rates around their authors'
          recommendations; AdamW under the wsd (decay over the last 20%), linear, constant
          and rsqrt schedules. 20 variants.
  lr      only the 15 learning-rate variants besides AdamW at 1e-3.
  full    the full default recipe (2000 steps) with each optimizer at the peak learning
          rate that did best in the 300-step comparison, and AdamW also at the recipe's
          1e-3: 6 variants.
  smoke   every optimizer for 20 steps of the `tiny` preset.

Weight decay stays AdamW's 0.1 except where the optimizer's authors scale it: Lion keeps
learning rate x decay equal to AdamW's (decay 0.1 x 1e-3 / lr); Muon and SGD run without
decay (modded-nanogpt's Muon has none; SGD's decay is lr x 0.1 per step, too strong at its
learning rates). Muon's AdamW part (embedding, output projection, norms) runs at
`optimizer.muon.adam_learning_rate` = 1e-3.
"""

from jaxlm.configs import sweep_utils as su
from jaxlm.configs.shakespeare_char import get_config as shakespeare_config

# Peak learning rates per optimizer (the floor of the decay is a tenth of each): the best of
# the 300-step comparison (configs/README.md), for `full` and `smoke`.
BEST = {"adamw": 3e-3, "lion": 1e-3, "adafactor": 3e-3, "muon": 0.05, "sgd": 0.3}
SCAN = {"adamw": (3e-3,), "lion": (1e-4, 3e-4, 1e-3, 3e-3), "adafactor": (1e-3, 3e-3, 1e-2),
        "muon": (0.01, 0.02, 0.05, 0.1), "sgd": (0.1, 0.3, 1.0)}


def get_config(arg: str | None = None):
    if arg not in (None, "lr", "full", "smoke"):
        raise ValueError(f"unknown argument {arg!r}; use none, 'lr', 'full' or 'smoke'")
    c = shakespeare_config("tiny" if arg == "smoke" else None)
    c.name = "optimizers"
    if arg == "full":
        c.eval_every = 500
        c.checkpoint_every = 1000
    elif arg != "smoke":
        c.steps = 300
        c.eval_every = 300
        c.checkpoint_every = 300
    c.log_every = 10
    return c


def optimizer(name: str, lr: float, label: str | None = None) -> su.Variant:
    """One optimizer at peak `lr` (floor lr / 10), with the decay its authors use."""
    overrides = {"optimizer.name": name, "learning_rate": lr, "min_learning_rate": lr / 10}
    if name == "lion":
        overrides["weight_decay"] = round(0.1 * 1e-3 / lr, 6)
    elif name in ("muon", "sgd"):
        overrides["weight_decay"] = 0.0
    return su.named(label or f"{name},lr={su.format_value(lr)}", overrides)


def get_sweep(arg: str | None = None):
    if arg == "smoke":
        return [optimizer(name, lr, name) for name, lr in BEST.items()]
    if arg == "full":
        return [optimizer("adamw", 1e-3)] + [optimizer(name, lr) for name, lr in BEST.items()]
    scan = [optimizer(name, lr) for name, lrs in SCAN.items() for lr in lrs]
    if arg == "lr":
        return scan
    schedules = [su.named(f"adamw,schedule={s}", {"schedule": s})
                 for s in ("wsd", "linear", "constant", "rsqrt")]
    return [optimizer("adamw", 1e-3)] + scan + schedules
