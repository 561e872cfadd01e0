"""Pipeline parallelism over the stacked layers: GPipe and circular (interleaved) schedules.

The layers' parameters keep their scanned layout [L, ...]; the `layers` axis is split
over the `pipeline` mesh axis by the sharding rules, so stage s holds a contiguous block
of L / S layers. Each iteration, every stage runs its layers on the activation it holds
(a `vmap` over stages that GSPMD partitions by stage), then activations move one stage
on (a roll over the stage axis: a collective permute).

Schedules, with S stages, M micro-batches and R repeats (layers per chunk Lc = L/(S*R)):
  * GPipe (R = 1): M + S - 1 iterations.
  * Circular (R > 1): stage s runs chunks s, s + S, s + 2S, ... so a micro-batch visits
    every stage R times; M*R + S - 1 iterations, bubble (S-1)/(M*R + S - 1); needs M >= S.

Stage s's block of layers is stored in "stage-major" order: position s*R*Lc + r*Lc + j
holds model layer r*S*Lc + s*Lc + j. For R = 1 this is the natural order. For R > 1 the
experiment converts to the natural order when it saves a checkpoint and back when it
restores, so checkpoints do not depend on the mesh.

Work items outside [0, M*R) ("bubbles") get zero inputs and their outputs are never
stored, so no garbage (and no NaN) can reach the loss or the gradients.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.parallel.sharding import constrain, current_rules, mesh_axes_of

STAGE_ACT = ("act_stages", "act_batch", "act_len", "act_embed")


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """Idle fraction of the schedule: (S-1) / (M*R + S - 1)."""
    return (stages - 1) / (microbatches * repeats + stages - 1)


def stage_major_permutation(num_layers: int, stages: int, repeats: int) -> np.ndarray:
    """perm[i] = the model layer stored at position i (identity unless repeats > 1)."""
    lc = num_layers // (stages * repeats)
    s, r, j = np.meshgrid(np.arange(stages), np.arange(repeats), np.arange(lc), indexing="ij")
    return (r * stages * lc + s * lc + j).reshape(-1)


def _split_microbatches(x: jax.Array, m: int, block: int = 1) -> jax.Array:
    """[B, ...] -> [M, B/M, ...]; micro-batch i = blocks i, i+M, ... of `block` rows (no
    data movement; blocks keep MoE capacity groups of several sequences whole)."""
    if block == 1:
        return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)
    blocks = x.reshape(x.shape[0] // (m * block), m, block, *x.shape[1:])
    return jnp.swapaxes(blocks, 0, 1).reshape(m, x.shape[0] // m, *x.shape[1:])


def _merge_microbatches(x: jax.Array, block: int = 1) -> jax.Array:
    """The inverse of `_split_microbatches`."""
    if block == 1:
        return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])
    m, rows = x.shape[:2]
    blocks = x.reshape(m, rows // block, block, *x.shape[2:])
    return jnp.swapaxes(blocks, 0, 1).reshape(m * rows, *x.shape[2:])


def pipeline_layers(layer: Callable[..., Any], state: Any, x_BxLxD: jax.Array,
                    rows: dict[str, jax.Array], key: jax.Array | None, cfg: Any
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Run `layer(x, unit_state, None, unit_index, rows, key)` for every scanned unit.

    Returns the output and the units' aux statistics, averaged over units and
    micro-batches (each micro-batch's statistics are its own means).
    """
    S, M, R = cfg.pipeline_stages, cfg.pipeline_microbatches, cfg.pipeline_repeats
    L = cfg.num_units
    lc = L // (S * R)
    iters = M * R + S - 1

    # [L, ...] -> [S, R, Lc, ...]: splits the layers axis where the pipeline mesh axis does.
    staged = jax.tree.map(lambda a: a.reshape(S, R, lc, *a.shape[1:]), state)
    # Model layer index of each stored layer, for dropout keys.
    layer_ids = jnp.asarray(stage_major_permutation(L, S, R).reshape(S, R, lc))

    block = cfg.moe_group_rows(x_BxLxD.shape[1])
    mb_x = _split_microbatches(x_BxLxD, M, block)  # [M, mb, L, D]
    mb_rows = jax.tree.map(lambda a: _split_microbatches(a, M, block), rows)

    def run_stage(stage_params, stage_layer_ids, x, stage_rows, repeat, micro, valid):
        """One stage's chunk of layers for one work item (a micro-batch at a repeat)."""
        params = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, repeat, 0, False),
                              stage_params)
        ids = jax.lax.dynamic_index_in_dim(stage_layer_ids, repeat, 0, False)
        item_key = None if key is None else jax.random.fold_in(key, micro)
        x = jnp.where(valid, x, jnp.zeros_like(x))

        def body(x, xs):
            block_state, layer_id = xs
            x, _, aux = layer(x, block_state, None, layer_id, stage_rows, item_key)
            return x, aux

        x, aux = jax.lax.scan(body, x, (params, ids))
        aux = jax.tree.map(lambda a: jnp.where(valid, jnp.sum(a, axis=0), 0.0), aux)
        return jnp.where(valid, x, jnp.zeros_like(x)), aux

    stages = jnp.arange(S)
    # Constraints inside the stage function keep the stage axis on its mesh axes.
    rules = current_rules()
    spmd_axes = (mesh_axes_of("act_stages", rules) or None) if rules else None

    def iteration(carry, t):
        held, circ, aux_sum = carry  # held: [S, mb, L, D] stage inputs; circ: [M, mb, L, D]
        first = jnp.where(t < M, jax.lax.dynamic_index_in_dim(mb_x, t % M, 0, False),
                          jax.lax.dynamic_index_in_dim(circ, t % M, 0, False))
        held = held.at[0].set(first)
        held = constrain(held, STAGE_ACT)
        item = t - stages  # work item of each stage
        valid = (item >= 0) & (item < M * R)
        micro = jnp.mod(item, M)
        repeat = jnp.clip(item // M, 0, R - 1)
        stage_rows = jax.tree.map(lambda a: jnp.take(a, micro, axis=0), mb_rows)
        out, aux = jax.vmap(run_stage, spmd_axis_name=spmd_axes)(
            staged, layer_ids, held, stage_rows, repeat, micro, valid)
        aux_sum = jax.tree.map(lambda acc, a: acc + jnp.sum(a, axis=0), aux_sum, aux)
        out = constrain(out, STAGE_ACT)
        last = out[S - 1]
        slot = micro[S - 1]
        circ = jnp.where(valid[S - 1],
                         jax.lax.dynamic_update_index_in_dim(circ, last, slot, 0), circ)
        held = jnp.roll(out, 1, axis=0)  # stage s's output becomes stage s+1's input
        return (held, circ, aux_sum), None

    held = jnp.zeros((S, *mb_x.shape[1:]), x_BxLxD.dtype)
    circ = jnp.zeros_like(mb_x)
    # The aux structure of one unit, to start the running sums at zero.
    aux_shape = jax.eval_shape(
        lambda: layer(mb_x[0], jax.tree.map(lambda a: a[0], state), None, 0,
                      jax.tree.map(lambda a: a[0], mb_rows), key)[2])
    aux_sum = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape)
    (_, circ, aux_sum), _ = jax.lax.scan(iteration, (held, circ, aux_sum), jnp.arange(iters))
    aux = jax.tree.map(lambda a: a / (M * L), aux_sum)
    return constrain(_merge_microbatches(circ, block), ("act_batch", "act_len", "act_embed")), aux
