"""Context parallelism: the sequence split over devices, attention by a ring or an all-gather.

Layout. When the logical axis `act_len` is split over N > 1 devices (the rule
`act_len -> context` with `mesh.context = N`), a sequence of L tokens is cut into 2N
chunks of c = L / 2N tokens and device r holds chunks r and 2N-1-r ("zig-zag", as in the
published load-balanced ring attention). A query at position p sees p + 1 keys, so under a
contiguous split the last device would do most of the causal work; with the zig-zag order
every device's queries see c^2 (2N - 1) + c (c + 1) keys in all, the same on every device.

Every [B, L] array of a batch (tokens, targets, weights, segment ids, positions) is put in
this order before the model (`to_context_order`, which also adds the positions the model
needs), the model's outputs stay in it and `from_context_order` undoes it. Losses are sums
over tokens, so they need no undoing. The attention mask follows the tokens' places in the
sequence (as on one device), not their `positions`, which only feed RoPE or the position
embeddings.

Attention (`context_attention`) runs per shard (`shard_map` over the batch, head and length
axes). Each device keeps its queries; it attends to its own two chunks, then to every other
device's key/value block, and merges the partial outputs by their log-sum-exp:

* `ring`: blocks travel around the devices with `ppermute`, N-1 steps; the next block is
  sent while the current one is computed, so no device ever holds more than two blocks.
* `allgather`: every device gathers all blocks at once (simpler; K/V of the whole sequence
  per layer), then runs the same block loop.

Off the diagonal a device needs half of each block: from a device s < r the first key chunk
(visible to both its query chunks), from s > r its second query chunk only (which sees
both key chunks); the rest is masked by causality. So every device computes (2c)^2 on the
diagonal and 2c^2 per other block: the same work everywhere (`training/planner.py` reports
it). The backward is a custom VJP that runs the same loop again: each block's gradients
come from the merged rows' log-sum-exp and delta = rowsum(dO * O) (FlashAttention-2's
backward, one block at a time); in the ring, dK/dV accumulators travel with their block
and arrive home after N steps; with the all-gather they are reduce-scattered. Blocks are
attended by `kernels.reference.attention_block` (gradients by autodiff, `block_grads`) or
by the Pallas kernel (`kernels.flash_attention` and `flash_attention_backward`); sliding
windows pass each block's global positions to the mask.
"""

from collections.abc import Callable
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.kernels.flash_attention import flash_attention, flash_attention_backward
from jaxlm.kernels.reference import attention_block, attention_mask, block_grads, merge_blocks
from jaxlm.parallel.sharding import (constrain, current_mesh, current_rules, logical_to_spec,
                                     shard_map_logical)

_Q_AXES = ("act_batch", "act_len", "act_heads", None)
_KV_AXES = ("act_batch", "act_len", "act_kv_heads", None)
_ROW_AXES = ("act_batch", "act_len")


# ----------------------------------------------------------------------------------------
# The zig-zag order.

def sequence_axes() -> tuple[str, ...]:
    """The mesh axes that split the length of a [B, L] array (empty outside `use_rules`)."""
    rules = current_rules()
    if rules is None:
        return ()
    axes = logical_to_spec(_ROW_AXES, rules)[1]
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def context_shards() -> int:
    """N: how many devices share each sequence while tracing (1 outside `use_rules`)."""
    mesh = current_mesh()
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in sequence_axes())


def chunk_order(n: int) -> np.ndarray:
    """The chunks of a sequence (2n of them) in zig-zag order: r, 2n-1-r for r < n."""
    return np.array([c for r in range(n) for c in (r, 2 * n - 1 - r)])


def zigzag_order(length: int, n: int) -> np.ndarray:
    """order[i] = the sequence position held at place i of the zig-zag layout."""
    if length % (2 * n):
        raise ValueError(f"a sequence of {length} tokens does not split into 2 x {n} chunks")
    c = length // (2 * n)
    return (chunk_order(n)[:, None] * c + np.arange(c)).reshape(-1)


def _reorder_chunks(x: jax.Array, order: np.ndarray, axis: int) -> jax.Array:
    """x with its `axis` cut into len(order) chunks, taken in `order`."""
    n = len(order)
    shape = x.shape
    chunks = x.reshape(*shape[:axis], n, shape[axis] // n, *shape[axis + 1:])
    return jnp.take(chunks, jnp.asarray(order), axis=axis).reshape(shape)


def to_context_order(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Every [B, L, ...] array of `batch` in the zig-zag order of the current layout, plus
    `positions` (0..L-1 in that order) unless the batch has its own; unchanged when the
    sequence is not split."""
    n = context_shards()
    if n == 1:
        return batch
    b, length = batch["inputs"].shape
    zigzag_order(length, n)  # a length that does not split is an error
    out = dict(batch)
    if "positions" not in out:
        out["positions"] = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    order = chunk_order(n)
    for name, x in out.items():
        if x.ndim >= 2 and x.shape[:2] == (b, length):
            x = _reorder_chunks(x, order, axis=1)
            out[name] = constrain(x, _ROW_AXES) if x.ndim == 2 else x
    return out


def from_context_order(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """Undo the zig-zag order of `n` shards along `axis` (e.g. logits [B, L, V])."""
    if n == 1:
        return x
    return _reorder_chunks(x, np.argsort(chunk_order(n)), axis)


def default_positions(b: int, length: int) -> jax.Array:
    """[B, L] positions of a batch in the current layout's order (0..L-1 when unsplit)."""
    n = context_shards()
    pos = np.arange(length) if n == 1 else zigzag_order(length, n)
    return jnp.broadcast_to(jnp.asarray(pos, jnp.int32)[None], (b, length))


# ----------------------------------------------------------------------------------------
# One block of attention: (output, log-sum-exp) forward, gradients from the merged rows'.

@dataclasses.dataclass(frozen=True)
class RingSpec:
    """Static description of one context-parallel attention (hashable: a custom-VJP
    argument)."""
    axes: tuple[str, ...]  # mesh axes of the sequence split
    n: int  # shards
    chunk: int  # c = L / 2n tokens
    mode: str  # ring | allgather
    impl: str  # xla | pallas | pallas_interpret
    window: int | None
    scale: float


def _xla_attend(q, k, v, q_seg, kv_seg, q_pos, kv_pos, causal, st: RingSpec):
    """(o [B, Lq, H, K] float32, lse [B, H, Lq]) of q against one key/value block by
    `attention_block`; positions default to the block's local order."""
    if q_pos is None:
        q_pos, kv_pos = jnp.arange(q.shape[1]), jnp.arange(k.shape[1])
    mask = attention_mask(q_pos[None], kv_pos[None], causal=causal, window=st.window,
                          q_segment=q_seg, kv_segment=kv_seg)
    return attention_block(q, k, v, mask, scale=st.scale, out_dtype=jnp.float32)


def _xla_grads(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, causal, st: RingSpec):
    """(dq, dk, dv) float32 of one block, by autodiff of `_xla_attend` in float32."""
    def block(q, k, v):
        return _xla_attend(q, k, v, q_seg, kv_seg, q_pos, kv_pos, causal, st)

    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    return block_grads(block, *f32, do, lse, delta)


def _kernel_args(q, q_seg, kv_seg, q_pos, kv_pos, causal, st: RingSpec) -> dict[str, Any]:
    b = q.shape[0]
    kwargs: dict[str, Any] = dict(causal=causal, segment_ids=q_seg, kv_segment_ids=kv_seg,
                                  window_size=st.window, softmax_scale=st.scale,
                                  interpret=st.impl == "pallas_interpret")
    if q_pos is not None:
        kwargs.update(q_positions=jnp.broadcast_to(q_pos[None], (b, q_pos.shape[0])),
                      kv_positions=jnp.broadcast_to(kv_pos[None], (b, kv_pos.shape[0])))
    return kwargs


def _flash_attend(q, k, v, q_seg, kv_seg, q_pos, kv_pos, causal, st: RingSpec):
    """(o float32, lse) of one block by the Pallas kernel."""
    o, lse = flash_attention(q, k, v, return_lse=True,
                             **_kernel_args(q, q_seg, kv_seg, q_pos, kv_pos, causal, st))
    return o.astype(jnp.float32), lse


def _flash_grads(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, causal,
                 st: RingSpec):
    """(dq, dk, dv) float32 of one block by the kernel's backward, which takes the merged
    rows' lse and delta itself (no forward pass again)."""
    grads = flash_attention_backward(
        q, k, v, do.astype(q.dtype), lse, delta,
        **_kernel_args(q, q_seg, kv_seg, q_pos, kv_pos, causal, st))
    return tuple(x.astype(jnp.float32) for x in grads)


# Per attention implementation: one block's (o, lse) and its gradients from the merged
# rows' lse and delta.
_BLOCKS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "xla": (_xla_attend, _xla_grads),
    "pallas": (_flash_attend, _flash_grads),
    "pallas_interpret": (_flash_attend, _flash_grads),
}
# Attention implementations that can attend one block at a time (the others cannot run
# with the sequence split: `training/layout.py` rejects them).
BLOCK_IMPLS = tuple(_BLOCKS)


def _attend(q, k, v, q_seg, kv_seg, q_pos, kv_pos, causal, st: RingSpec):
    """(o float32, lse) of one block, by the configured implementation."""
    return _BLOCKS[st.impl][0](q, k, v, q_seg, kv_seg, q_pos, kv_pos, causal, st)


def _grads(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, causal, st: RingSpec):
    """(dq, dk, dv) float32 of one block, by the configured implementation."""
    return _BLOCKS[st.impl][1](q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos,
                               causal, st)


# ----------------------------------------------------------------------------------------
# The zig-zag blocks of one device: its diagonal and the half of another device's block
# that causality leaves visible.

def _places(r: jax.Array, st: RingSpec) -> jax.Array:
    """[2c] sequence positions of shard r's tokens (its two chunks)."""
    c = st.chunk
    return jnp.concatenate([r * c + jnp.arange(c), (2 * st.n - 1 - r) * c + jnp.arange(c)])


def _block_places(r, s, st: RingSpec):
    """Query and key positions for the mask: needed only by a sliding window (causality
    alone is decided by the block's case)."""
    if st.window is None:
        return None, None
    return _places(r, st), _places(s, st)


def _seg(x, rows):
    return None if x is None else x[:, rows]


def _diagonal(q, k, v, seg, r, st: RingSpec):
    """Shard r's queries against its own keys: causal in local order (the second chunk
    follows the first), or by position with a window."""
    q_pos, kv_pos = _block_places(r, r, st)
    return _attend(q, k, v, seg, seg, q_pos, kv_pos, True, st)


def _off_diagonal(q, k, v, q_seg, kv_seg, r, s, st: RingSpec):
    """Shard r's queries against shard s's block (s != r): (o, lse) for all 2c queries,
    lse -inf (and o 0) where a query sees nothing of the block."""
    c = st.chunk
    q_pos, kv_pos = _block_places(r, s, st)
    causal = st.window is not None  # else every pair below is visible
    first, second = slice(0, c), slice(c, 2 * c)

    def earlier():  # s < r: both query chunks see s's first chunk, not its second
        return _attend(q, k[:, first], v[:, first], q_seg, _seg(kv_seg, first), q_pos,
                       None if kv_pos is None else kv_pos[first], causal, st)

    def later():  # s > r: only r's second chunk sees s's chunks, both of them
        o, lse = _attend(q[:, second], k, v, _seg(q_seg, second), kv_seg,
                         None if q_pos is None else q_pos[second], kv_pos, causal, st)
        o = jnp.concatenate([jnp.zeros_like(o), o], axis=1)
        lse = jnp.concatenate([jnp.full_like(lse, -jnp.inf), lse], axis=2)
        return o, lse

    return jax.lax.cond(s < r, earlier, later)


def _off_diagonal_grads(q, k, v, do, lse, delta, q_seg, kv_seg, r, s, st: RingSpec):
    """(dq [2c], dk [2c], dv [2c]) float32 of `_off_diagonal`'s block."""
    c = st.chunk
    q_pos, kv_pos = _block_places(r, s, st)
    causal = st.window is not None
    first, second = slice(0, c), slice(c, 2 * c)

    def earlier():
        dq, dk, dv = _grads(q, k[:, first], v[:, first], do, lse, delta, q_seg,
                            _seg(kv_seg, first), q_pos,
                            None if kv_pos is None else kv_pos[first], causal, st)
        return (dq, jnp.concatenate([dk, jnp.zeros_like(dk)], 1),
                jnp.concatenate([dv, jnp.zeros_like(dv)], 1))

    def later():
        dq, dk, dv = _grads(q[:, second], k, v, do[:, second], lse[..., second],
                            delta[..., second], _seg(q_seg, second), kv_seg,
                            None if q_pos is None else q_pos[second], kv_pos, causal, st)
        return jnp.concatenate([jnp.zeros_like(dq), dq], 1), dk, dv

    return jax.lax.cond(s < r, earlier, later)


# ----------------------------------------------------------------------------------------
# The block loop and its custom VJP.

def _shift(x: Any, st: RingSpec) -> Any:
    """Every array of `x` to the next device of the ring (r -> r + 1)."""
    perm = [(i, (i + 1) % st.n) for i in range(st.n)]
    return jax.tree.map(lambda a: jax.lax.ppermute(a, st.axes, perm), x)


def _gather(x: Any, st: RingSpec) -> Any:
    """Every array of `x` gathered along the length axis from all shards, in shard order."""
    return jax.tree.map(lambda a: jax.lax.all_gather(a, st.axes, axis=1, tiled=True), x)


def _gathered_block(kv: Any, s: jax.Array, st: RingSpec) -> Any:
    """Shard s's block of all-gathered arrays."""
    size = 2 * st.chunk
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, s * size, size, 1), kv)


def _other_block(q, seg, o, lse, kv, r, s, st: RingSpec):
    """(o, lse) merged with those of shard s's block kv = (k, v, segment ids)."""
    return merge_blocks(o, lse, *_off_diagonal(q, kv[0], kv[1], seg, kv[2], r, s, st))


def _ring_forward(q, k, v, seg, st: RingSpec):
    """(o float32, lse) of shard r's queries against every shard's keys, the blocks passed
    around the ring; the next block is on its way while this one is computed."""
    r = jax.lax.axis_index(st.axes)

    def step(j, carry):
        o, lse, kv = carry
        return (*_other_block(q, seg, o, lse, kv, r, (r - j) % st.n, st), _shift(kv, st))

    o, lse = _diagonal(q, k, v, seg, r, st)
    o, lse, kv = jax.lax.fori_loop(1, st.n - 1, step, (o, lse, _shift((k, v, seg), st)))
    return _other_block(q, seg, o, lse, kv, r, (r + 1) % st.n, st)


def _allgather_forward(q, k, v, seg, st: RingSpec):
    """(o float32, lse) of shard r's queries against every shard's keys, all gathered."""
    r = jax.lax.axis_index(st.axes)
    kv_all = _gather((k, v, seg), st)

    def step(j, carry):
        s = (r - j) % st.n
        return _other_block(q, seg, *carry, _gathered_block(kv_all, s, st), r, s, st)

    return jax.lax.fori_loop(1, st.n, step, _diagonal(q, k, v, seg, r, st))


def _backward_start(q, k, v, seg, o, lse, do, st: RingSpec):
    """(r, delta [B, H, Lq] = rowsum(dO * O), the diagonal block's (dq, dk, dv))."""
    r = jax.lax.axis_index(st.axes)
    delta = jnp.swapaxes(jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), -1), 1, 2)
    q_pos, kv_pos = _block_places(r, r, st)
    return r, delta, _grads(q, k, v, do, lse, delta, seg, seg, q_pos, kv_pos, True, st)


def _ring_backward(q, k, v, seg, o, lse, do, st: RingSpec):
    """(dq, dk, dv) float32 from every block's gradients: dK/dV of a block travel with it
    and collect every shard's share; the next block is sent while this one's gradients
    are computed."""
    r, delta, (dq, dk, dv) = _backward_start(q, k, v, seg, o, lse, do, st)

    def grads(j, kv):
        s = (r - j) % st.n
        return _off_diagonal_grads(q, kv[0], kv[1], do, lse, delta, seg, kv[2], r, s, st)

    def step(j, carry):
        dq, kv, dkv = carry
        dq_j, dk_j, dv_j = grads(j, kv)
        return dq + dq_j, _shift(kv, st), _shift((dkv[0] + dk_j, dkv[1] + dv_j), st)

    dq, kv, dkv = jax.lax.fori_loop(1, st.n - 1, step,
                                    (dq, _shift((k, v, seg), st), _shift((dk, dv), st)))
    dq_j, dk_j, dv_j = grads(st.n - 1, kv)
    dk, dv = _shift((dkv[0] + dk_j, dkv[1] + dv_j), st)  # home: each block's owner
    return dq + dq_j, dk, dv


def _allgather_backward(q, k, v, seg, o, lse, do, st: RingSpec):
    """(dq, dk, dv) float32 from every block's gradients: dK/dV of the whole sequence
    accumulate per shard, then are reduce-scattered to the blocks' owners."""
    r, delta, (dq, dk, dv) = _backward_start(q, k, v, seg, o, lse, do, st)
    kv_all = _gather((k, v, seg), st)
    size = 2 * st.chunk
    full = jnp.zeros((k.shape[0], size * st.n, *k.shape[2:]), jnp.float32)
    place = lambda a, x, s: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        a, jax.lax.dynamic_slice_in_dim(a, s * size, size, 1) + x, s * size, 1)

    def step(j, carry):
        dq, dk_all, dv_all = carry
        s = (r - j) % st.n
        kv = _gathered_block(kv_all, s, st)
        dq_j, dk_j, dv_j = _off_diagonal_grads(q, kv[0], kv[1], do, lse, delta, seg, kv[2],
                                               r, s, st)
        return dq + dq_j, place(dk_all, dk_j, s), place(dv_all, dv_j, s)

    dq, dk_all, dv_all = jax.lax.fori_loop(1, st.n, step,
                                           (dq, place(full, dk, r), place(full, dv, r)))
    scatter = functools.partial(jax.lax.psum_scatter, axis_name=st.axes,
                                scatter_dimension=1, tiled=True)
    return dq, scatter(dk_all), scatter(dv_all)


# The two ways across the split (`model.context_attention`): (forward, backward).
LOOPS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "ring": (_ring_forward, _ring_backward),
    "allgather": (_allgather_forward, _allgather_backward),
}


# A custom VJP for memory: autodiff of the block loop would keep every block's [2c, 2c]
# probabilities until the backward (O(L^2 / N) per device); this backward recomputes
# them one block at a time from the merged rows' lse, and in the ring the dK/dV of a
# block travel home with it.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blockwise_attention(q, k, v, seg, st: RingSpec):
    o, _ = LOOPS[st.mode][0](q, k, v, seg, st)
    return o.astype(q.dtype)


def _blockwise_attention_fwd(q, k, v, seg, st: RingSpec):
    o, lse = LOOPS[st.mode][0](q, k, v, seg, st)
    o = o.astype(q.dtype)
    return o, (q, k, v, seg, o, lse)


def _blockwise_attention_bwd(st: RingSpec, res, do):
    q, k, v, seg, o, lse = res
    dq, dk, dv = LOOPS[st.mode][1](q, k, v, seg, o, lse, do, st)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_blockwise_attention.defvjp(_blockwise_attention_fwd, _blockwise_attention_bwd)


def context_attention(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, *,
                      impl: str, mode: str, segment_ids_BxL: jax.Array | None = None,
                      window: int | None = None) -> jax.Array:
    """Causal self-attention of sequences in the zig-zag order of the current layout, split
    over `context_shards()` devices: `mode` ring or allgather, blocks by `impl` (one of
    BLOCK_IMPLS). Segment ids are in the same order as the tokens."""
    n = context_shards()
    length = q_BxLxHxK.shape[1]
    if impl not in BLOCK_IMPLS or mode not in LOOPS:
        raise ValueError(f"context attention: impl {impl!r} / mode {mode!r} is not one of "
                         f"{BLOCK_IMPLS} / {tuple(LOOPS)}")
    zigzag_order(length, n)  # a length that does not split is an error
    st = RingSpec(axes=sequence_axes(), n=n, chunk=length // (2 * n), mode=mode, impl=impl,
                  window=window, scale=q_BxLxHxK.shape[-1] ** -0.5)
    args = [q_BxLxHxK, k_BxSxGxK, v_BxSxGxK]
    axes = [_Q_AXES, _KV_AXES, _KV_AXES]
    if segment_ids_BxL is not None:
        args.append(segment_ids_BxL)
        axes.append(_ROW_AXES)
    local: Callable[..., jax.Array] = lambda q, k, v, seg=None: _blockwise_attention(  # noqa: E731
        q, k, v, seg, st)
    return shard_map_logical(local, args, axes, _Q_AXES, tied=[("act_heads", "act_kv_heads")])
