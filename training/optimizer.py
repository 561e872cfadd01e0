"""AdamW with warm-up + cosine decay, global-norm clipping, and decay on matrices only."""

from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec as P


def learning_rate_schedule(config: Any) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate`, then cosine decay to `min_learning_rate`."""
    warmup = min(config.warmup_steps, config.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(config.steps, warmup + 1), end_value=config.min_learning_rate)


def decay_mask(logical_axes: Any) -> Any:
    """True for matrices: parameters with two or more axes besides the stacked `layers` axis."""
    return jax.tree.map(lambda spec: sum(a != "layers" for a in spec) >= 2, logical_axes,
                        is_leaf=lambda x: isinstance(x, P))


def make_optimizer(config: Any, logical_axes: Any) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0
        else optax.identity(),
        optax.adamw(learning_rate_schedule(config), b1=config.beta1, b2=config.beta2,
                     eps=config.adam_eps, weight_decay=config.weight_decay,
                     mask=decay_mask(logical_axes)),
    )
