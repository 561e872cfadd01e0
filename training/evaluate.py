"""Mean token loss over a whole split: the loop's eval hook and every eval mode use it."""

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from training.experiment import Experiment


def evaluate(exp: Experiment, params: Any, tokens: np.ndarray | None = None,
             eval_step: Any = None) -> dict[str, float]:
    """Mean token loss over every target of `tokens` (default: the validation split)."""
    source = exp.eval_source(tokens)
    eval_step = eval_step or exp.eval_step
    loss_sum = jnp.zeros((), jnp.float32)
    count = jnp.zeros((), jnp.float32)
    for i in range(len(source)):
        l, c = eval_step(params, exp.to_global(source[i]))
        loss_sum, count = loss_sum + l, count + c  # stays on device: no sync per batch
    loss = float(loss_sum / count)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "num_tokens": int(count)}
