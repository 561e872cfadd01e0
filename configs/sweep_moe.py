"""Sweep: Mixture-of-Experts routing on tiny Shakespeare, num_experts x top_k x capacity.

  python sweep.py --config=configs/sweep_moe.py --workdir=runs/moe
  python sweep.py --config=configs/sweep_moe.py:smoke --workdir=/tmp/moe --dry_run

The base is the `moe` preset (8 experts of d_ff 256, top-2: the dense recipe's active
parameters) for 500 steps. Each expert's d_ff is 512 / top_k, so every variant keeps
the dense model's active MLP parameters per token.

Arguments after the colon:
  (none)  num_experts {4, 8} x top_k {1, 2} x capacity_factor {0 (dropless), 1.25}:
          8 variants. Capacity variants use the default capacity groups of one
          sequence (`model.moe.group_size=0`).
  smoke   num_experts {4} x top_k {1, 2} x capacity_factor {0, 1.25} on `tiny`, 20 steps.
"""

from jaxlm.configs import sweep_utils as su
from jaxlm.configs.shakespeare_char import get_config as shakespeare_config


def get_config(arg: str | None = None):
    if arg == "smoke":
        c = shakespeare_config("tiny")
        c.model.moe.num_experts = 4
        c.model.moe.top_k = 2
    elif arg is None:
        c = shakespeare_config("moe")
        c.steps = 500
        c.log_every = 10
        c.eval_every = 100
        c.checkpoint_every = 250
    else:
        raise ValueError(f"unknown argument {arg!r}; use none or 'smoke'")
    c.name = "moe_routing"
    return c


def get_sweep(arg: str | None = None):
    experts = [4] if arg == "smoke" else [4, 8]
    d_ff = 64 if arg == "smoke" else 512  # the dense model's d_ff, split over top_k
    top_k = su.zip(su.axis("model.moe.top_k", [1, 2], label="top_k"),
                   su.axis("model.moe.d_ff", [d_ff, d_ff // 2], label="expert_d_ff"))
    return su.product(su.axis("model.moe.num_experts", experts, label="experts"), top_k,
                      su.axis("model.moe.capacity_factor", [0.0, 1.25], label="capacity"))
