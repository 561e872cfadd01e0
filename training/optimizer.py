"""Optimizers and learning-rate schedules from optax: global-norm clipping, then AdamW, Lion,
Adafactor, Muon (optax.contrib, AdamW for the non-matrix parameters) or SGD, with
decoupled weight decay on matrices only; warm-up, then a cosine, linear, WSD, constant or
inverse-square-root schedule."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jaxlm.configs.sections import Updates, Optimizer

# Axes that stack independent matrices: each layer's (and each expert's) own.
STACKED_AXES = ("layers", "experts")


def learning_rate_schedule(updates: Updates, steps: int, peak: float | None = None,
                           floor: float | None = None) -> optax.Schedule:
    """Linear warm-up from 0 to the peak (`learning_rate`), then `updates.schedule` down to the
    floor (`min_learning_rate`). `peak` and `floor` override the two."""
    peak = updates.learning_rate if peak is None else peak
    floor = updates.min_learning_rate if floor is None else floor
    warmup = min(updates.warmup_steps, steps)
    if updates.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup,
            decay_steps=max(steps, warmup + 1), end_value=floor)
    after = max(steps - warmup, 1)  # steps after the warm-up
    if updates.schedule == "linear":
        main = optax.linear_schedule(peak, floor, after)
    elif updates.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif updates.schedule == "wsd":
        decay = min(max(round(updates.decay_fraction * steps), 1), after)
        main = optax.join_schedules([optax.constant_schedule(peak),
                                     optax.linear_schedule(peak, floor, decay)], [after - decay])
    else:  # rsqrt: peak * sqrt(w / t) at step t >= w (w = warmup_steps, at least 1)
        scale = max(warmup, 1)

        def main(count):
            return jnp.maximum(floor, peak * jnp.sqrt(scale / jnp.maximum(count + warmup, scale)))
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def decay_mask(logical_axes: Any) -> Any:
    """True for matrices: parameters with two or more axes besides the stacked `layers` axis,
    except biases (a per-head bias is [heads, head_dim] but still a bias)."""
    def is_matrix(path: Any, spec: P) -> bool:
        is_bias = bool(path) and getattr(path[-1], "key", None) == "bias"
        return not is_bias and sum(a != "layers" for a in spec) >= 2
    return jax.tree_util.tree_map_with_path(is_matrix, logical_axes,
                                            is_leaf=lambda x: isinstance(x, P))


def muon_dimension_numbers(logical_axes: Any) -> Any:
    """Muon's view of each parameter: `MuonDimensionNumbers` for the hidden matrices (the
    `layers` and `experts` axes stack independent matrices; the input features are the
    `embed` axis, or for output projections every axis but the final `embed`), None for
    the embedding and output projection (`vocab` axis), norms and biases (AdamW)."""
    matrices = decay_mask(logical_axes)

    def dims(spec: P, is_matrix: bool) -> Any:
        if not is_matrix or "vocab" in spec:
            return None
        axes = [i for i, name in enumerate(spec) if name not in STACKED_AXES]
        if spec[axes[-1]] == "embed":  # [..., inputs..., embed]: an output projection
            return optax.contrib.MuonDimensionNumbers(tuple(axes[:-1]), (axes[-1],))
        return optax.contrib.MuonDimensionNumbers((axes[0],), tuple(axes[1:]))
    return jax.tree.map(dims, logical_axes, matrices, is_leaf=lambda x: isinstance(x, P))


def make_optimizer(updates: Updates, optimizer: Optimizer, steps: int, logical_axes: Any
                   ) -> optax.GradientTransformation:
    """Global-norm clipping, then `optimizer.name` on the schedule."""
    schedule = learning_rate_schedule(updates, steps)
    build = {"adamw": _adamw, "lion": _lion, "adafactor": _adafactor, "muon": _muon,
             "sgd": _sgd}[optimizer.name]
    return optax.chain(
        optax.clip_by_global_norm(updates.grad_clip) if updates.grad_clip > 0
        else optax.identity(),
        build(updates, optimizer, schedule, logical_axes, steps),
    )


def _adamw(updates: Updates, optimizer: Optimizer, schedule: optax.Schedule, axes: Any,
           steps: int) -> optax.GradientTransformation:
    return optax.adamw(schedule, b1=updates.beta1, b2=updates.beta2, eps=updates.adam_eps,
                       weight_decay=updates.weight_decay, mask=decay_mask(axes))


def _lion(updates: Updates, optimizer: Optimizer, schedule: optax.Schedule, axes: Any,
          steps: int) -> optax.GradientTransformation:
    lion = optimizer.lion
    return optax.lion(schedule, b1=lion.beta1, b2=lion.beta2, weight_decay=updates.weight_decay,
                      mask=decay_mask(axes))


def _adafactor(updates: Updates, optimizer: Optimizer, schedule: optax.Schedule, axes: Any,
               steps: int) -> optax.GradientTransformation:
    """optax.adafactor's transforms, chained here because its own weight decay is not
    scaled by the learning rate: this decay is AdamW's, like every optimizer's here."""
    af = optimizer.adafactor
    return optax.chain(
        optax.scale_by_factored_rms(decay_rate=af.decay_rate, epsilon=af.eps,
                                    min_dim_size_to_factor=af.min_dim_size_to_factor),
        optax.clip_by_block_rms(af.clipping_threshold) if af.clipping_threshold > 0
        else optax.identity(),
        optax.scale_by_param_block_rms() if af.multiply_by_parameter_scale
        else optax.identity(),
        optax.ema(af.momentum, debias=False) if af.momentum > 0 else optax.identity(),
        optax.add_decayed_weights(updates.weight_decay, decay_mask(axes)),
        optax.scale_by_learning_rate(schedule),
    )


def _muon(updates: Updates, optimizer: Optimizer, schedule: optax.Schedule, axes: Any,
          steps: int) -> optax.GradientTransformation:
    """Muon for the hidden matrices, AdamW (with the top-level AdamW keys, decay on the
    embedding and output projection) for the rest. optax.contrib.muon's own AdamW part has
    no decay mask, so it only ever sees the matrices here."""
    mu = optimizer.muon
    dims = muon_dimension_numbers(axes)
    labels = jax.tree.map(lambda d: "adamw" if d is None else "muon", dims,
                          is_leaf=lambda x: x is None or isinstance(
                              x, optax.contrib.MuonDimensionNumbers))
    floor = (updates.min_learning_rate / updates.learning_rate * mu.adam_learning_rate
             if updates.learning_rate else 0.0)
    adam_schedule = learning_rate_schedule(updates, steps, mu.adam_learning_rate, floor)
    muon = optax.contrib.muon(schedule, ns_steps=mu.ns_steps, beta=mu.beta,
                              weight_decay=updates.weight_decay, nesterov=mu.nesterov,
                              muon_weight_dimension_numbers=dims)
    adamw = optax.adamw(adam_schedule, b1=updates.beta1, b2=updates.beta2, eps=updates.adam_eps,
                        weight_decay=updates.weight_decay, mask=decay_mask(axes))
    return optax.partition({"muon": muon, "adamw": adamw}, labels)


def _sgd(updates: Updates, optimizer: Optimizer, schedule: optax.Schedule, axes: Any,
         steps: int) -> optax.GradientTransformation:
    sgd = optimizer.sgd
    return optax.chain(
        optax.add_decayed_weights(updates.weight_decay, decay_mask(axes)),
        optax.sgd(schedule, momentum=sgd.momentum or None, nesterov=sgd.nesterov))
