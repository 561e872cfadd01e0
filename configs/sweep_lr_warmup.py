"""Sweep: peak learning rate x warm-up steps on tiny Shakespeare (the default recipe).

  python sweep.py --config=configs/sweep_lr_warmup.py --workdir=runs/lr_warmup
  python sweep.py --config=configs/sweep_lr_warmup.py --workdir=runs/lr_warmup --emit=slurm

Learning rate {3e-4, 1e-3, 3e-3} x warm-up {0, 100, 300}: 9 variants of the default
model (4 layers, d_model 128) for 1000 steps, cosine decay to lr / 10.
The argument `short` runs 200 steps with warm-up {0, 20, 60} instead.
"""

from jaxlm.configs import sweep_utils as su
from jaxlm.configs.shakespeare_char import get_config as shakespeare_config

LEARNING_RATES = (3e-4, 1e-3, 3e-3)


def get_config(arg: str | None = None):
    if arg not in (None, "short"):
        raise ValueError(f"unknown argument {arg!r}; use none or 'short'")
    c = shakespeare_config()
    c.name = "lr_warmup"
    c.steps = 200 if arg == "short" else 1000
    c.eval_every = c.steps // 4
    c.checkpoint_every = c.steps // 2
    c.log_every = 10
    return c


def get_sweep(arg: str | None = None):
    # The floor of the cosine decay follows the peak (zipped), so it never exceeds it.
    lr = su.zip(su.axis("learning_rate", LEARNING_RATES, label="lr"),
                su.axis("min_learning_rate", [3e-5, 1e-4, 3e-4], label="min_lr"))
    warmups = [0, 20, 60] if arg == "short" else [0, 100, 300]
    return su.product(lr, su.axis("warmup_steps", warmups, label="warmup"))
