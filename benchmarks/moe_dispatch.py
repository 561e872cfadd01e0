"""Train-step time of MoE dispatch modes: dropless grouped matmuls vs capacity factors.

  python benchmarks/moe_dispatch.py                      # the shakespeare_char:moe preset
  python benchmarks/moe_dispatch.py --capacity_factors=0,1,1.25,2 --steps=50
  python benchmarks/moe_dispatch.py --cpu_devices=8 --config.mesh.expert=8 --config.batch_size=16

Prints one row per mode: step time, tokens/s, and the fraction of assignments dropped.
The first row is the dense model with the same active parameters (`model.d_ff`); each
dropless row (capacity factor 0) is repeated for every `--grouped_matmuls` value.
"""

import os
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_ROOT, "configs", "shakespeare_char.py:moe"), "Config file.")
_FACTORS = flags.DEFINE_list("capacity_factors", ["0", "1.0", "1.25", "2.0"],
                             "Capacity factors; 0 = dropless.")
_GROUPED = flags.DEFINE_list("grouped_matmuls", ["blocks", "ragged_dot"],
                             "Dropless grouped-matmul implementations to time.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; the best is reported.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Use N fake CPU devices.")


def main(argv):
    del argv
    from jaxlm.parallel.distributed import initialize
    initialize(_CPU_DEVICES.value)
    import jax
    from jaxlm.training.experiment import Experiment

    print("| dispatch | capacity factor | step (ms) | tokens/s | dropped |")
    print("|---|---|---|---|---|")
    modes = [("dense", 0.0, "")]
    for factor in map(float, _FACTORS.value):
        if factor > 0:
            modes.append(("capacity", factor, ""))
        else:
            modes += [(f"dropless ({impl})", 0.0, impl) for impl in _GROUPED.value]
    for mode, factor, impl in modes:
        config = _CONFIG.value.copy_and_resolve_references()
        if mode == "dense":
            config.model.moe.num_experts = 0
        config.model.moe.capacity_factor = factor
        if impl:
            config.model.moe.grouped_matmul = impl
        best, metrics = _time_train_step(Experiment.build(config, tempfile.mkdtemp()), jax)
        tokens = config.batch_size * config.seq_len
        dropped = max(0.0, float(metrics.get("moe_drop_fraction", 0.0)))
        print(f"| {mode} | {factor:g} | {best * 1e3:.1f} | {tokens / best:,.0f} | "
              f"{dropped:.1%} |", flush=True)


def _time_train_step(exp, jax):
    """Best mean seconds per step over the repeats, and the last step's metrics."""
    state = exp.init_state()
    it = exp.train_batches()
    batches = [exp.to_device(next(it), train=True)[0] for _ in range(4)]
    step = exp.train_step.lower(state, batches[0]).compile()
    for i in range(5):
        state, metrics = step(state, batches[i % 4])
    jax.block_until_ready(metrics)
    best = float("inf")
    for _ in range(_REPEATS.value):
        t0 = time.perf_counter()
        for i in range(_STEPS.value):
            state, metrics = step(state, batches[i % 4])
        jax.block_until_ready(metrics)
        best = min(best, (time.perf_counter() - t0) / _STEPS.value)
    return best, metrics

if __name__ == "__main__":
    app.run(main)
