"""FlashAttention-2 forward and backward for GPUs, through Pallas's Triton lowering.

Layout: q, o, do are [B, L, H, K] and k, v are [B, S, G, K] (the model's layout; no
transposes). Each program owns one tile and walks the other axis with `fori_loop` over
pointer slices of the full-length K/V (forward, dQ) or Q/dO (dK/dV) rows, which Triton
loads straight from global memory: only [block, D] tiles live in registers/SRAM.

* forward: grid (T/bq, B, H). Online softmax over the key blocks the mask allows;
  writes O and the log-sum-exp L = m + log(l) ([B, H, L], f32).
* dK/dV: grid (S/bk, B, G). For one key block, loops over the `group` query heads that
  share the KV head and over the query blocks the mask allows, recomputing P from L.
  GQA costs no repeated K/V and no per-query-head dK/dV buffers.
* dQ: grid (T/bq, B, H), like the forward.

The same kernels run on CPU with `interpret=True` (Pallas's HLO interpreter); that is how
the tests exercise them.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxlm.kernels._common import (NEG_INF, Static, dkdv_block, dq_block, fwd_block, fwd_finish,
                                   div, kv_range, q_range, unpack_refs, visible)

SQ = pl.squeezed


def _compiler_params(st: Static):
    if st.interpret:
        return None
    # Deferred: Pallas's Triton module (0.16 s) is needed only to compile for a GPU.
    from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
    return plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)


def _block_loops(lo, ulo, uhi, hi, body, carry):
    """body(masked, j, carry) over blocks [lo, hi): [ulo, uhi) without the element mask.

    The masked blocks on both sides share one loop (so the kernel holds two copies of the
    block math, not three); the order of blocks does not matter to the online softmax.
    """
    n_low = ulo - lo

    def masked(n, c):
        return body(True, jnp.where(n < n_low, lo + n, uhi + (n - n_low)), c)

    carry = jax.lax.fori_loop(0, n_low + (hi - uhi), masked, carry)
    return jax.lax.fori_loop(ulo, uhi, functools.partial(body, False), carry)


# Forward.

def _fwd_kernel(*refs, st: Static):
    (q_ref, k_ref, v_ref), (qseg_ref, kvseg_ref), (qpos_ref, kvpos_ref), (o_ref, lse_ref) = \
        unpack_refs(refs, 3, st)
    bq, bk = st.blocks.block_q, st.blocks.block_kv
    i = pl.program_id(0)
    q = q_ref[...]
    q_idx = (i * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
    q_seg = qseg_ref[...][:, None] if st.has_segments else None
    q_pos = qpos_ref[...][:, None] if st.has_positions else None
    lo, ulo, uhi, hi = kv_range(i, bq, bk, st)

    def body(masked, j, carry):
        m, l, acc = carry
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        mask = None
        if masked:
            k_idx = (start + jnp.arange(bk, dtype=jnp.int32))[None, :]
            kv_seg = kvseg_ref[pl.ds(start, bk)][None, :] if st.has_segments else None
            k_pos = kvpos_ref[pl.ds(start, bk)][None, :] if st.has_positions else None
            mask = visible(q_idx, k_idx, st, q_seg, kv_seg, q_pos, k_pos)
        return fwd_block(q, k, v, m, l, acc, mask, st.scale)

    d = q.shape[-1]
    init = (jnp.full((bq, 1), NEG_INF, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, d), jnp.float32))
    m, l, acc = _block_loops(lo, ulo, uhi, hi, body, init)
    out, lse = fwd_finish(m, l, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def _row_specs(st: Static, q_spec, kv_spec) -> list:
    """Specs of the per-row inputs (segment ids, then positions) that the kernel takes."""
    return [q_spec, kv_spec] * (int(st.has_segments) + int(st.has_positions))


def _row_args(st: Static, q_seg, kv_seg, q_pos, kv_pos) -> list:
    return ([q_seg, kv_seg] if st.has_segments else []) + \
        ([q_pos, kv_pos] if st.has_positions else [])


def forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, st: Static):
    """q [B, Lp, H, K], k/v [B, Sp, G, K] -> (o [B, Lp, H, K], lse [B, H, Lp] f32)."""
    b, t, h, d = q.shape
    s = k.shape[1]
    r = st.group
    bq = st.blocks.block_q
    grid = (t // bq, b, h)
    in_specs = [
        pl.BlockSpec((SQ, bq, SQ, d), lambda i, b_, h_: (b_, i, h_, 0)),
        pl.BlockSpec((SQ, s, SQ, d), lambda i, b_, h_: (b_, 0, div(h_, r), 0)),
        pl.BlockSpec((SQ, s, SQ, d), lambda i, b_, h_: (b_, 0, div(h_, r), 0)),
    ]
    in_specs += _row_specs(st, pl.BlockSpec((SQ, bq), lambda i, b_, h_: (b_, i)),
                           pl.BlockSpec((SQ, s), lambda i, b_, h_: (b_, 0)))
    args = [q, k, v, *_row_args(st, q_seg, kv_seg, q_pos, kv_pos)]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=grid,
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((SQ, bq, SQ, d), lambda i, b_, h_: (b_, i, h_, 0)),
                   pl.BlockSpec((SQ, SQ, bq), lambda i, b_, h_: (b_, h_, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        interpret=st.interpret,
        compiler_params=_compiler_params(st),
        name="flash_fwd_triton",
    )(*args)


# Backward.

def _dkdv_kernel(*refs, st: Static):
    ((q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (qseg_ref, kvseg_ref),
     (qpos_ref, kvpos_ref), (dk_ref, dv_ref)) = unpack_refs(refs, 6, st)
    bq, bk = st.blocks.block_q_dkv, st.blocks.block_kv_dkv
    r = st.group
    j, g = pl.program_id(0), pl.program_id(2)
    k = k_ref[...]
    v = v_ref[...]
    k_idx = (j * bk + jnp.arange(bk, dtype=jnp.int32))[:, None]
    kv_seg = kvseg_ref[...][:, None] if st.has_segments else None
    k_pos = kvpos_ref[...][:, None] if st.has_positions else None
    lo, ulo, uhi, hi = q_range(j, bq, bk, st)

    def head(hh, carry):
        head_idx = g * r + hh

        def body(masked, i, carry):
            dk, dv = carry
            start = pl.multiple_of(i * bq, bq)
            q = q_ref[pl.ds(start, bq), head_idx, :]
            do = do_ref[pl.ds(start, bq), head_idx, :]
            lse = lse_ref[head_idx, pl.ds(start, bq)][None, :]
            delta = delta_ref[head_idx, pl.ds(start, bq)][None, :]
            mask_t = None
            if masked:
                q_idx = (start + jnp.arange(bq, dtype=jnp.int32))[None, :]
                q_seg = qseg_ref[pl.ds(start, bq)][None, :] if st.has_segments else None
                q_pos = qpos_ref[pl.ds(start, bq)][None, :] if st.has_positions else None
                mask_t = visible(q_idx, k_idx, st, q_seg, kv_seg, q_pos, k_pos)
            ddk, ddv = dkdv_block(q, k, v, do, lse, delta, mask_t, st.scale)
            return dk + ddk, dv + ddv

        return _block_loops(lo, ulo, uhi, hi, body, carry)

    d = k.shape[-1]
    zeros = jnp.zeros((bk, d), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, r, head, (zeros, zeros))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, st: Static):
    ((q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (qseg_ref, kvseg_ref),
     (qpos_ref, kvpos_ref), (dq_ref,)) = unpack_refs(refs, 6, st)
    bq, bk = st.blocks.block_q_dq, st.blocks.block_kv_dq
    i = pl.program_id(0)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]
    q_idx = (i * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
    q_seg = qseg_ref[...][:, None] if st.has_segments else None
    q_pos = qpos_ref[...][:, None] if st.has_positions else None
    lo, ulo, uhi, hi = kv_range(i, bq, bk, st)

    def body(masked, j, dq):
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        mask = None
        if masked:
            k_idx = (start + jnp.arange(bk, dtype=jnp.int32))[None, :]
            kv_seg = kvseg_ref[pl.ds(start, bk)][None, :] if st.has_segments else None
            k_pos = kvpos_ref[pl.ds(start, bk)][None, :] if st.has_positions else None
            mask = visible(q_idx, k_idx, st, q_seg, kv_seg, q_pos, k_pos)
        return dq + dq_block(q, k, v, do, lse, delta, mask, st.scale)

    dq = _block_loops(lo, ulo, uhi, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def backward(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, st: Static):
    """Gradients from the saved log-sum-exp; lse/delta are [B, H, Lp] f32."""
    b, t, h, d = q.shape
    s, g = k.shape[1], k.shape[2]
    r = st.group
    bk = st.blocks.block_kv_dkv
    full_q = pl.BlockSpec((SQ, t, h, d), lambda j, b_, g_: (b_, 0, 0, 0))
    full_row = pl.BlockSpec((SQ, h, t), lambda j, b_, g_: (b_, 0, 0))
    kv_tile = pl.BlockSpec((SQ, bk, SQ, d), lambda j, b_, g_: (b_, j, g_, 0))
    in_specs = [full_q, kv_tile, kv_tile, full_q, full_row, full_row,
                *_row_specs(st, pl.BlockSpec((SQ, t), lambda j, b_, g_: (b_, 0)),
                            pl.BlockSpec((SQ, bk), lambda j, b_, g_: (b_, j)))]
    rows = _row_args(st, q_seg, kv_seg, q_pos, kv_pos)
    args = [q, k, v, do, lse, delta, *rows]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st),
        grid=(s // bk, b, g),
        in_specs=in_specs,
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=st.interpret,
        compiler_params=_compiler_params(st),
        name="flash_dkdv_triton",
    )(*args)

    bq = st.blocks.block_q_dq
    q_tile = pl.BlockSpec((SQ, bq, SQ, d), lambda i, b_, h_: (b_, i, h_, 0))
    full_kv = pl.BlockSpec((SQ, s, SQ, d), lambda i, b_, h_: (b_, 0, div(h_, r), 0))
    row_tile = pl.BlockSpec((SQ, SQ, bq), lambda i, b_, h_: (b_, h_, i))
    in_specs = [q_tile, full_kv, full_kv, q_tile, row_tile, row_tile,
                *_row_specs(st, pl.BlockSpec((SQ, bq), lambda i, b_, h_: (b_, i)),
                            pl.BlockSpec((SQ, s), lambda i, b_, h_: (b_, 0)))]
    args = [q, k, v, do, lse, delta, *rows]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid=(t // bq, b, h),
        in_specs=in_specs,
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=st.interpret,
        compiler_params=_compiler_params(st),
        name="flash_dq_triton",
    )(*args)
    return dq, dk, dv
