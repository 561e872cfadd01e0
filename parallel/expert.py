"""Expert parallelism: run a Mixture-of-Experts layer per device with `shard_map`.

Tokens stay on the devices that hold them (the batch axes); expert weights are split
over the mesh axes of the `experts` logical axis and, inside each expert, over those of
`mlp` (tensor parallelism: column-parallel up, row-parallel down, then a psum). FSDP
shards of the expert weights are gathered by GSPMD before the layer. Dispatch buffers
[E, C, D] go to the devices owning their experts with an all-to-all and come back the
same way: with P capacity groups per device, [E, P*C, D]. The batch is split over devices
by rows (sequences) and, with context parallelism, each sequence over the devices of its
length axis: a device routes the tokens it holds, like any others. Capacity groups are
runs within one sequence or whole sequences; the config checks make each device hold
whole groups (with the sequence split: runs within one zig-zag chunk, whose tokens are
consecutive), so every layout forms the same groups and drops the same tokens as one
device. Routing statistics are averaged over all tokens of the global batch, so the
auxiliary losses equal those of one device.
"""

from collections.abc import Callable
import math
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from jaxlm.parallel.sharding import current_mesh, current_rules, mesh_axes_of


def _spec(*axes: tuple[str, ...]) -> P:
    return P(*[(a if len(a) > 1 else a[0]) if a else None for a in axes])


def expert_parallel(fn: Callable[..., Any], x_BxLxD: jax.Array, router_DxE: jax.Array,
                    w: dict[str, jax.Array], cfg: Any, key: jax.Array | None):
    """fn(tokens_TxD, router, w, cfg, key, exchange=..., ep_size=..., length=L) on each
    device, where the tokens are the device's block of `x_BxLxD` (its rows, and its part
    of each row when the sequence is split), row-major, and L the tokens per row there."""
    b, length, d = x_BxLxD.shape
    mesh, rules = current_mesh(), current_rules()
    if mesh is None or mesh.devices.size == 1:
        y, aux = fn(x_BxLxD.reshape(-1, d), router_DxE, w, cfg, key, length=length)
        return y.reshape(b, length, d), aux

    batch = mesh_axes_of("act_batch", rules)
    seq = tuple(a for a in mesh_axes_of("act_len", rules) if a not in batch)
    experts = mesh_axes_of("experts", rules)
    mlp = mesh_axes_of("mlp", rules)
    ep = math.prod(mesh.shape[a] for a in experts)
    token_axes = batch + seq  # every device holds different tokens along these
    token_sharded = tuple(a for a in token_axes if mesh.shape[a] > 1)

    def exchange(buf_ExCxD, compute):
        """Send each expert's buffer to its owner, compute there, and send results back."""
        # buf: [E, P*C, D] (each of the device's P groups has C slots per expert).
        recv = jax.lax.all_to_all(buf_ExCxD, experts, 0, 1, tiled=True)  # [E/ep, ep*P*C, D]
        out = compute(recv)
        return jax.lax.all_to_all(out, experts, 1, 0, tiled=True)  # [E, P*C, D]

    def body(x, router, w, key):
        if key is not None and token_sharded:
            key = jax.random.fold_in(key, jax.lax.axis_index(token_sharded))
        y, aux = fn(x.reshape(-1, d), router, w, cfg, key,
                    exchange=exchange if ep > 1 else None, ep_size=ep, length=x.shape[1])
        if mlp:
            y = jax.lax.psum(y, mlp)  # the down projection was split over d_ff
        if token_axes:
            aux = jax.tree.map(lambda a: jax.lax.pmean(a, token_axes), aux)
        return y.reshape(x.shape), aux

    w_specs = {name: _spec(experts, (), mlp) if name != "down" else _spec(experts, mlp, ())
               for name in w}
    x_spec = _spec(batch, seq, ())
    # Every mesh axis is manual; inside a pipeline stage (a vmap over the stage axis)
    # the pipeline axis must be manual too for the batching rule to place the stages.
    manual = set(mesh.axis_names)
    if key is None:
        run = jax.shard_map(lambda x, r, w: body(x, r, w, None), mesh=mesh, axis_names=manual,
                            in_specs=(x_spec, P(), w_specs), out_specs=(x_spec, P()))
        return run(x_BxLxD, router_DxE, w)
    run = jax.shard_map(body, mesh=mesh, axis_names=manual,
                        in_specs=(x_spec, P(), w_specs, P()), out_specs=(x_spec, P()))
    return run(x_BxLxD, router_DxE, w, key)
