"""Mean token loss and bits per byte over whole splits: the loop's eval hook and every eval
mode use it."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxlm.configs.errors import RunError
from jaxlm.data.packing import bits_per_byte
from jaxlm.data.pipeline import TokenData
from jaxlm.training.experiment import Experiment


class NonFiniteEval(RunError):
    """The parameters give a non-finite validation loss: there is no result to report."""


def evaluate(exp: Experiment, params: Any, data: TokenData | np.ndarray | None = None,
             eval_step: Any = None) -> dict[str, float]:
    """Mean token loss and bits per byte over every target of the run's validation split
    (default), another prepared set's (`data`: TokenData) or a text's tokens (ndarray).

    `bits_per_byte` is the summed loss in bits over the UTF-8 bytes of the evaluated
    targets, comparable across tokenizers. A mixture adds `eval_loss/<source>` and
    `bits_per_byte/<source>` for each source; the totals cover all of them. A non-finite
    loss is NonFiniteEval, never a number. A per-pair objective (DPO, a reward model) on
    the run's own preference set adds its loss and metrics on the validation pairs:
    `eval_<term>` and `eval_<metric>` (e.g. `eval_reward/accuracy`).
    """
    sums = {name: _sums(exp, params, batches, eval_step or exp.eval_step)
            for name, batches in exp.eval_sources(data).items()}
    result = _result(*(sum(s[i] for s in sums.values()) for i in range(3)))
    if len(sums) > 1:
        for name, (l, c, b) in sums.items():
            result[f"eval_loss/{name}"] = float(l / c)
            result[f"bits_per_byte/{name}"] = bits_per_byte(float(l), b)
    if data is None and exp.objective is not None and exp.objective.per_pair:
        result.update(pair_metrics(exp, params))
    return result


def pair_metrics(exp: Experiment, params: Any) -> dict[str, float]:
    """The per-pair objective's means over the validation pairs."""
    batches = exp.pair_eval_batches()
    sums = None
    for i in range(len(batches)):
        stats = exp.pair_eval_step(params, exp.to_global(batches[i]))
        sums = stats if sums is None else jax.tree.map(jnp.add, sums, stats)
    count = float(sums.pop("weight_sum"))
    return {f"eval_{k.removeprefix('loss/')}": float(v) / max(count, 1.0)
            for k, v in sums.items()}


def _sums(exp: Experiment, params: Any, batches: Any, eval_step: Any
          ) -> tuple[jax.Array, jax.Array, float]:
    """(summed token loss, weighted targets) on the device, and the UTF-8 bytes of those
    targets (all processes') of one source."""
    loss_sum = jnp.zeros((), jnp.float32)
    count = jnp.zeros((), jnp.float32)
    num_bytes = 0.0
    for i in range(len(batches)):
        batch, host = exp.to_device(batches[i])
        l, c = eval_step(params, batch)
        loss_sum, count = loss_sum + l, count + c  # stays on device: no sync per batch
        num_bytes += float(host["target_bytes"].sum())  # this process's rows
    if jax.process_count() > 1:
        num_bytes = float(np.sum(multihost_utils.process_allgather(np.float64(num_bytes))))
    return loss_sum, count, num_bytes


def _result(loss_sum: jax.Array, count: jax.Array, num_bytes: float) -> dict[str, float]:
    loss = float(loss_sum / count)
    if not math.isfinite(loss):
        raise NonFiniteEval(f"eval_loss is {loss} (the parameters are not finite)")
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "num_tokens": int(count), "bits_per_byte": bits_per_byte(float(loss_sum), num_bytes)}
