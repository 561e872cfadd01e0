"""The jitted train and eval steps."""

from collections.abc import Callable
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxlm.losses.objectives import Objective, cross_entropy_objective, split_objective_params
from jaxlm.models.config import ModelConfig
from jaxlm.models.lora import join_trees
from jaxlm.models.prune import Pruning, apply_masks
from jaxlm.parallel.context import to_context_order
from jaxlm.parallel.sharding import Rules, constrain, use_rules
from jaxlm.training.state import Split, TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def split_microbatches(batch: Batch, k: int, block: int = 1) -> Batch:
    """[B, ...] -> [k, B/k, ...], micro-batch i = blocks i, i+k, i+2k, ... of `block` rows.

    Strided rather than contiguous, so each micro-batch is spread evenly over the
    data-parallel devices that hold the batch rows, and splitting moves no data. `block`
    (`ModelConfig.moe_group_rows`) keeps MoE capacity groups of several sequences whole.
    """
    def split(x):
        if block == 1:
            return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
        blocks = x.reshape(x.shape[0] // (k * block), k, block, *x.shape[1:])
        return jnp.swapaxes(blocks, 0, 1).reshape(k, x.shape[0] // k, *x.shape[1:])
    return jax.tree.map(split, batch)


def make_loss_fn(graphdef: nnx.GraphDef, model_cfg: ModelConfig,
                 objective: Objective | None = None) -> Callable[..., Any]:
    """loss_fn(params, batch, dropout_key, teacher=None, step=0) -> (objective sum, stats).

    The objective is the weighted sum of the terms of `objective` (default: cross-entropy
    alone; see losses/objectives.py), `teacher` the teacher's Output for terms that need
    one, and `params` may carry the objective's own parameters. The objective and every
    stat except `weight_sum` are sums over target tokens (means such as MoE statistics are
    multiplied by the token count), so micro-batches add up and dividing by the total
    `weight_sum` gives token-weighted means. Stats: `loss/<term>` for every term and the
    model's MoE diagnostics `moe_*`, and the terms' own metrics (e.g. `dpo/...`). For a
    per-pair objective (DPO) `weight_sum` counts pairs instead of tokens. The batch's optional `positions` and `segment_ids`
    go to the model; with the sequence split, every [B, L] array is in the layout's order
    (`parallel.context.to_context_order`).
    """
    objective = objective or cross_entropy_objective(model_cfg)
    return_hidden = objective.needs_hidden

    def loss_fn(params, batch: Batch, dropout_key: jax.Array | None, teacher: Any = None,
                step: jax.Array | int = 0):
        model_params, objective_params = split_objective_params(params)
        model = nnx.merge(graphdef, model_params)
        tokens = constrain(batch["inputs"], ("act_batch", "act_len"))
        out = model(tokens, positions_BxL=batch.get("positions"),
                    segment_ids_BxL=batch.get("segment_ids"), dropout_key=dropout_key,
                    return_hidden=return_hidden)
        total, (weight_sum, terms, metrics) = objective(out, batch, teacher, objective_params,
                                                        step)
        stats = {"weight_sum": weight_sum, **{f"loss/{k}": v for k, v in terms.items()},
                 **metrics}
        if out.aux:
            for name in ("load_balance", "z_loss", "router_entropy", "drop_fraction", "load"):
                stats[f"moe_{name}"] = out.aux[name] * weight_sum
        return total, stats
    return loss_fn


def make_train_step(graphdef: nnx.GraphDef, model_cfg: ModelConfig,
                    optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, rules: Rules, *, grad_accum_steps: int = 1,
                    seed: int = 0, objective: Objective | None = None,
                    teacher: Any = None, skip_nonfinite: bool = False,
                    trainable: Split | None = None) -> Callable[..., tuple[TrainState, Metrics]]:
    """train_step(state, batch[, teacher_params]) -> (state, metrics); one optimizer update.

    Gradient accumulation runs inside the step (a scan over micro-batches) instead of
    optax.MultiSteps: one call is one optimizer update, the step counter, schedule and
    checkpoints count updates, and no gradient buffer lives in the optimizer state.
    With a `teacher` (a `training.teacher.Teacher`), its parameters are the third argument
    and its forward pass runs here, per micro-batch, without gradients. With
    `skip_nonfinite`, a step whose loss or gradient norm is not finite keeps the old
    parameters and optimizer state (metric `skipped` = 1). Metrics: `loss` (the weighted
    objective), `loss/<term>` for every term, the objective's scheduled values, MoE
    diagnostics. With the sequence split over devices (context parallelism) the batch is
    put in the zig-zag order first, so the student, the teacher and the loss see one order.
    With `trainable` (LoRA: params -> (adapters, frozen base)), only the trainable part
    gets gradients and updates; the frozen part passes through unchanged."""
    objective = objective or cross_entropy_objective(model_cfg)
    split, grad_fn = _partial_grad(make_loss_fn(graphdef, model_cfg, objective), trainable)
    use_key, hidden = model_cfg.stochastic, objective.needs_hidden

    def train_step(state: TrainState, batch: Batch, teacher_params: Any = None
                   ) -> tuple[TrainState, Metrics]:
        with use_rules(mesh, rules):
            batch = to_context_order(batch)
            step_key = jax.random.fold_in(jax.random.key(seed), state.step)
            trained, frozen = split(state.params)

            def micro(i, mb):
                key = jax.random.fold_in(step_key, i) if use_key else None
                t_out = _teacher_outputs(teacher, state, teacher_params, mb, hidden)
                (total, stats), grads = grad_fn(trained, frozen, mb, key, t_out, state.step)
                return {**stats, "loss": total}, grads

            block = math.lcm(model_cfg.moe_group_rows(batch["inputs"].shape[1]),
                             objective.row_block)  # rows that stay in one micro-batch
            stats, grads = _accumulate(micro, batch, grad_accum_steps, block)
            weight_sum = stats.pop("weight_sum")
            grads = jax.tree.map(lambda g: g / weight_sum, grads)
            updates, opt_state = optimizer.update(grads, state.opt_state, trained)
            params = optax.apply_updates(trained, updates)
            metrics = {k: v / weight_sum for k, v in stats.items()}
            metrics.update(grad_norm=optax.global_norm(grads),
                           learning_rate=schedule(state.step), **objective.scalars(state.step))
            if skip_nonfinite:
                # Written here rather than with optax.apply_if_finite, which adds counters to
                # the optimizer state: checkpoints keep one structure under either policy.
                finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
                params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                                 (params, opt_state),
                                                 (trained, state.opt_state))
                metrics["skipped"] = jnp.logical_not(finite).astype(jnp.int32)
            params = params if frozen is None else join_trees(params, frozen)
            new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
            return new_state, metrics

    return train_step


def with_pruning(train_step: Callable[..., tuple[TrainState, Metrics]], pruning: Pruning
                 ) -> Callable[..., tuple[TrainState, Metrics]]:
    """`train_step` on a PrunedTrainState: at a pruning step the masks are computed again
    (and the weights they prune zeroed) before the gradients; after the update, the
    weights the masks prune are set to exactly zero again."""
    def pruned_step(state: TrainState, batch: Batch, *teacher_params: Any
                    ) -> tuple[TrainState, Metrics]:
        params, masks = pruning.before_update(state.params, state.masks, state.step)
        new, metrics = train_step(state.replace(params=params, masks=masks), batch,
                                  *teacher_params)
        return new.replace(params=apply_masks(new.params, masks)), metrics
    return pruned_step


def _teacher_outputs(teacher: Any, state: TrainState, teacher_params: Any, batch: Batch,
                     hidden: bool) -> Any:
    """The teacher's outputs (None without one). A teacher with `from_state` (a LoRA run's
    own base as its DPO reference) reads the state's parameters instead of its own."""
    if teacher is None:
        return None
    params = state.params if teacher.from_state else teacher_params
    return teacher.forward(params, batch, return_hidden=hidden)


def _partial_grad(loss_fn: Callable[..., Any], trainable: Split | None
                  ) -> tuple[Split, Callable[..., Any]]:
    """(split, grad_fn): `split(params)` -> (trained, frozen or None) and
    `grad_fn(trained, frozen, *args)` -> ((loss, stats), gradients of the trained part)."""
    if trainable is None:
        def split(params):
            return params, None

        def partial_loss(trained, frozen, *args):
            return loss_fn(trained, *args)
    else:
        split = trainable

        def partial_loss(trained, frozen, *args):
            return loss_fn(join_trees(trained, frozen), *args)
    return split, jax.value_and_grad(partial_loss, has_aux=True)


def _accumulate(micro: Callable[[Any, Batch], tuple[Metrics, Any]], batch: Batch,
                steps: int, block: int = 1) -> tuple[Metrics, Any]:
    """Sums of `micro(i, micro_batch)`'s (stats, grads) over `steps` micro-batches (a scan);
    micro-batches take whole blocks of `block` rows (MoE capacity groups)."""
    if steps == 1:
        return micro(0, batch)

    def body(carry, xs):
        i, mb = xs
        return jax.tree.map(jnp.add, carry, micro(i, mb)), None

    mbs = split_microbatches(batch, steps, block)
    shapes = jax.eval_shape(micro, 0, jax.tree.map(lambda x: x[0], mbs))
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    return jax.lax.scan(body, zeros, (jnp.arange(steps), mbs))[0]


def make_eval_step(graphdef: nnx.GraphDef, model_cfg: ModelConfig, mesh: Mesh,
                   rules: Rules) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
    """eval_step(params, batch) -> (sum of token losses, number of target tokens)."""
    loss_fn = make_loss_fn(graphdef, model_cfg)

    def eval_step(params, batch: Batch):
        with use_rules(mesh, rules):
            _, stats = loss_fn(params, to_context_order(batch), None)
            return stats["loss/ce"], stats["weight_sum"]

    return eval_step


def make_pair_eval_step(graphdef: nnx.GraphDef, model_cfg: ModelConfig, mesh: Mesh,
                        rules: Rules, objective: Objective, teacher: Any = None
                        ) -> Callable[..., Metrics]:
    """eval_step(params, batch[, teacher_params]) -> the per-pair objective's sums: its
    loss (`loss/<term>`), metrics and `weight_sum` (the pairs)."""
    loss_fn = make_loss_fn(graphdef, model_cfg, objective)

    def eval_step(params, batch: Batch, teacher_params: Any = None):
        with use_rules(mesh, rules):
            batch = to_context_order(batch)
            ref = None
            if teacher is not None:
                ref = teacher.forward(params if teacher.from_state else teacher_params, batch,
                                      return_hidden=objective.needs_hidden)
            return loss_fn(params, batch, None, ref)[1]

    return eval_step
