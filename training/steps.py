"""The jitted train and eval steps."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from losses import cross_entropy
from models import ModelConfig
from parallel.sharding import Rules, constrain, use_rules
from training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def split_microbatches(batch: Batch, k: int) -> Batch:
    """[B, ...] -> [k, B/k, ...], micro-batch i = rows i, i+k, i+2k, ...

    Strided rather than contiguous, so each micro-batch is spread evenly over the
    data-parallel devices that hold the batch rows, and splitting moves no data.
    """
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def make_loss_fn(graphdef: nnx.GraphDef, model_cfg: ModelConfig,
                 moe_weights: tuple[float, float] = (0.0, 0.0)) -> Callable[..., Any]:
    """loss_fn(params, batch, dropout_key) -> (objective sum, stats).

    The objective and every stat except `weight_sum` are sums over target tokens (means
    such as MoE statistics are multiplied by the token count), so micro-batches add up
    and dividing by the total `weight_sum` gives token-weighted means. `moe_weights` are
    the (load-balance, z-loss) weights of the MoE auxiliary losses.
    """
    lb_weight, z_weight = moe_weights

    def loss_fn(params, batch: Batch, dropout_key: jax.Array | None):
        model = nnx.merge(graphdef, params)
        tokens = constrain(batch["inputs"], ("act_batch", "act_len"))
        out = model(tokens, segment_ids_BxL=batch.get("segment_ids"),
                    dropout_key=dropout_key)
        loss_sum, weight_sum = cross_entropy(out.logits, batch["targets"],
                                             batch.get("weights"), model_cfg.vocab_size)
        objective = loss_sum
        stats = {"weight_sum": weight_sum, "loss": loss_sum}
        if out.aux:
            aux = out.aux
            objective = objective + (lb_weight * aux["load_balance"]
                                     + z_weight * aux["z_loss"]) * weight_sum
            for name in ("load_balance", "z_loss", "router_entropy", "drop_fraction", "load"):
                stats[f"moe_{name}"] = aux[name] * weight_sum
        return objective, stats
    return loss_fn


def make_train_step(graphdef: nnx.GraphDef, model_cfg: ModelConfig,
                    optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, rules: Rules, *, grad_accum_steps: int = 1,
                    seed: int = 0, moe_weights: tuple[float, float] = (0.0, 0.0)
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """train_step(state, batch) -> (state, metrics); one optimizer update per call.

    Gradient accumulation runs inside the step (a scan over micro-batches) instead of
    optax.MultiSteps: one call is one optimizer update, the step counter, schedule and
    checkpoints count updates, and no gradient buffer lives in the optimizer state.
    """
    loss_fn = make_loss_fn(graphdef, model_cfg, moe_weights)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    use_key = model_cfg.dropout > 0 or model_cfg.moe_jitter > 0

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        with use_rules(mesh, rules):
            step_key = jax.random.fold_in(jax.random.key(seed), state.step)

            def micro(i, mb):
                key = jax.random.fold_in(step_key, i) if use_key else None
                (_, stats), grads = grad_fn(state.params, mb, key)
                return stats, grads

            if grad_accum_steps == 1:
                stats, grads = micro(0, batch)
            else:
                def body(carry, xs):
                    i, mb = xs
                    stats, grads = micro(i, mb)
                    return jax.tree.map(jnp.add, carry, (stats, grads)), None

                mbs = split_microbatches(batch, grad_accum_steps)
                shapes = jax.eval_shape(micro, 0, jax.tree.map(lambda x: x[0], mbs))
                zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
                (stats, grads), _ = jax.lax.scan(
                    body, zeros, (jnp.arange(grad_accum_steps), mbs))

            weight_sum = stats.pop("weight_sum")
            grads = jax.tree.map(lambda g: g / weight_sum, grads)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = {k: v / weight_sum for k, v in stats.items()}
            metrics.update(grad_norm=optax.global_norm(grads),
                           learning_rate=schedule(state.step))
            new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
            return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, model_cfg: ModelConfig, mesh: Mesh,
                   rules: Rules) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
    """eval_step(params, batch) -> (sum of token losses, number of target tokens)."""
    loss_fn = make_loss_fn(graphdef, model_cfg)

    def eval_step(params, batch: Batch):
        with use_rules(mesh, rules):
            _, stats = loss_fn(params, batch, None)
            return stats["loss"], stats["weight_sum"]

    return eval_step
