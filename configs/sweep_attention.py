"""Sweep: attention implementation, `xla` (einsum + softmax) vs `pallas_interpret`.

  python sweep.py --config=configs/sweep_attention.py --workdir=runs/attention

Same model, data and seed, so the two losses should agree to float tolerance and the
table compares tokens/s. `pallas_interpret` is the Pallas flash-attention kernel run by
the Pallas interpreter (slow on CPU; it checks the kernel, not its speed). On a GPU or
TPU, add `pallas` (and `cudnn` on GPU) to compare real kernels.

Arguments after the colon: (none) the `tiny` preset for 100 steps; `default` the default
recipe for 500 steps.
"""

from jaxlm.configs import sweep_utils as su
from jaxlm.configs.shakespeare_char import get_config as shakespeare_config


def get_config(arg: str | None = None):
    if arg not in (None, "default"):
        raise ValueError(f"unknown argument {arg!r}; use none or 'default'")
    c = shakespeare_config("tiny" if arg is None else None)
    c.name = "attention"
    c.steps = 100 if arg is None else 500
    c.eval_every = c.steps // 2
    c.checkpoint_every = c.steps // 2
    return c


def get_sweep(arg: str | None = None):
    del arg
    return su.axis("model.attention_impl", ["xla", "pallas_interpret"], label="attention")
