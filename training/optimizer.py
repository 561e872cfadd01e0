"""AdamW with warm-up + cosine decay, global-norm clipping, and decay on matrices only."""

from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec as P

from configs.sections import Optim


def learning_rate_schedule(optim: Optim, steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate`, then cosine decay to `min_learning_rate`."""
    warmup = min(optim.warmup_steps, steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.learning_rate, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=optim.min_learning_rate)


def decay_mask(logical_axes: Any) -> Any:
    """True for matrices: parameters with two or more axes besides the stacked `layers` axis,
    except biases (a per-head bias is [heads, head_dim] but still a bias)."""
    def is_matrix(path: Any, spec: P) -> bool:
        is_bias = bool(path) and getattr(path[-1], "key", None) == "bias"
        return not is_bias and sum(a != "layers" for a in spec) >= 2
    return jax.tree_util.tree_map_with_path(is_matrix, logical_axes,
                                            is_leaf=lambda x: isinstance(x, P))


def make_optimizer(optim: Optim, steps: int, logical_axes: Any) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW."""
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0
        else optax.identity(),
        optax.adamw(learning_rate_schedule(optim, steps), b1=optim.beta1, b2=optim.beta2,
                    eps=optim.adam_eps, weight_decay=optim.weight_decay,
                    mask=decay_mask(logical_axes)),
    )
