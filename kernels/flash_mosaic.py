"""FlashAttention-2 forward and backward for TPUs, through Pallas's Mosaic lowering.

Layout: q, o, do are [B, H, L, K] and k, v are [B, G, S, D] (the caller transposes), so
every tile is a [block, D] slab whose two minor dimensions map onto TPU vregs.
The loop over the reduction axis is the innermost ("arbitrary") grid axis: Pallas
double-buffers the HBM->VMEM copies of the next tile while the MXU works on this one, and
the running statistics live in VMEM scratch across those grid steps.

* forward: grid (B, H, T/bq, S/bk). Writes O and L ([B, H, T, 1], f32) at the last key step.
* dK/dV: grid (B, G, S/bk, group * T/bq): the innermost axis walks the query blocks of
  every query head that shares this KV head (no repeated K/V, no per-head dK/dV).
* dQ: grid (B, H, T/bq, S/bk).

Blocks the mask excludes are skipped twice over: the index maps clamp the block index
into the needed range (the pipeline sees the same block again and issues no copy) and the
body is guarded by `pl.when`. Fully visible blocks skip the element mask.
Per-row vectors (L, delta, segment ids, positions) are [.., 1] columns or [1, ..] rows so that they
broadcast against [bq, bk] (forward, dQ) or [bk, bq] (dK/dV) tiles without a transpose.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxlm.kernels._common import (NEG_INF, Static, dkdv_block, dq_block, fwd_block, fwd_finish,
                                   div, kv_range, q_range, rem, unpack_refs, visible)

SQ = pl.squeezed
_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _tile_mask(i, j, bq: int, bk: int, st: Static, seg_refs, pos_refs,
               transposed: bool = False):
    """Visibility of query tile i x key tile j: [bq, bk], or [bk, bq] if `transposed`.

    `seg_refs`, `pos_refs`: the (query, key) segment-id and position refs shaped to match
    ([bq, 1] and [1, bk], or the transposes), or (None, None).
    """
    shape, q_dim = ((bk, bq), 1) if transposed else ((bq, bk), 0)
    q_idx = i * bq + jax.lax.broadcasted_iota(jnp.int32, shape, q_dim)
    k_idx = j * bk + jax.lax.broadcasted_iota(jnp.int32, shape, 1 - q_dim)
    q_seg, kv_seg = (None if r is None else r[...] for r in seg_refs)
    q_pos, k_pos = (None if r is None else r[...] for r in pos_refs)
    return visible(q_idx, k_idx, st, q_seg, kv_seg, q_pos, k_pos)


def _row_specs(st: Static, q_spec, kv_spec) -> list:
    """Specs of the per-row inputs (segment ids, then positions) that the kernel takes."""
    return [q_spec, kv_spec] * (int(st.has_segments) + int(st.has_positions))


def _row_args(st: Static, q_seg, kv_seg, q_pos, kv_pos, q_axis: int, kv_axis: int) -> list:
    """Segment ids, then positions, as columns or rows: `q_axis`/`kv_axis` is where the
    unit axis goes ([B, L, 1] is 2, [B, 1, L] is 1)."""
    pairs = ([(q_seg, kv_seg)] if st.has_segments else []) + \
        ([(q_pos, kv_pos)] if st.has_positions else [])
    return [x for qa, ka in pairs
            for x in (jnp.expand_dims(qa, q_axis), jnp.expand_dims(ka, kv_axis))]


def _call(kernel, st: Static, **kwargs):
    return pl.pallas_call(
        kernel,
        interpret=pltpu.InterpretParams() if st.interpret else False,
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        **kwargs)


def _clamp(x, lo, hi):
    """x clamped into [lo, hi - 1] (or lo when the range is empty)."""
    return jnp.maximum(lo, jnp.minimum(x, hi - 1))


def _when_in_range(idx, lo, ulo, uhi, hi, compute):
    """compute(masked) for an index inside [lo, hi); the mask is skipped in [ulo, uhi)."""
    unmasked = (idx >= ulo) & (idx < uhi)
    needed = (idx >= lo) & (idx < hi)

    @pl.when(needed & unmasked)
    def _():
        compute(False)

    @pl.when(needed & jnp.logical_not(unmasked))
    def _():
        compute(True)


# Forward.

def _fwd_kernel(*refs, st: Static):
    (q_ref, k_ref, v_ref), seg_refs, pos_refs, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = \
        unpack_refs(refs, 3, st)
    bq, bk = st.blocks.block_q, st.blocks.block_kv
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def compute(masked):
        mask = _tile_mask(i, j, bq, bk, st, seg_refs, pos_refs) if masked else None
        m, l, acc = fwd_block(q_ref[...], k_ref[...], v_ref[...], m_sc[...], l_sc[...],
                              acc_sc[...], mask, st.scale)
        m_sc[...] = m
        l_sc[...] = l
        acc_sc[...] = acc

    _when_in_range(j, *kv_range(i, bq, bk, st), compute)

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        out, lse = fwd_finish(m_sc[...], l_sc[...], acc_sc[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, st: Static):
    """q [B, H, Tp, D], k/v [B, G, Sp, D] -> (o [B, H, Tp, D], lse [B, H, Lp] f32).

    q_seg, q_pos are [B, Lp] and kv_seg, kv_pos [B, Sp] (int32) or None.
    """
    b, h, t, d = q.shape
    s = k.shape[2]
    r = st.group
    bq, bk = st.blocks.block_q, st.blocks.block_kv

    def kv_index(b_, h_, i, j):
        lo, _, _, hi = kv_range(i, bq, bk, st)
        return (b_, div(h_, r), _clamp(j, lo, hi), 0)

    def kv_seg_index(b_, h_, i, j):
        lo, _, _, hi = kv_range(i, bq, bk, st)
        return (b_, 0, _clamp(j, lo, hi))

    q_spec = pl.BlockSpec((SQ, SQ, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0))
    kv_spec = pl.BlockSpec((SQ, SQ, bk, d), kv_index)
    in_specs = [q_spec, kv_spec, kv_spec,
                *_row_specs(st, pl.BlockSpec((SQ, bq, 1), lambda b_, h_, i, j: (b_, i, 0)),
                            pl.BlockSpec((SQ, 1, bk), kv_seg_index))]
    args = [q, k, v, *_row_args(st, q_seg, kv_seg, q_pos, kv_pos, 2, 1)]
    o, lse = _call(
        functools.partial(_fwd_kernel, st=st), st,
        grid=(b, h, t // bq, s // bk),
        in_specs=in_specs,
        out_specs=[q_spec,
                   pl.BlockSpec((SQ, SQ, bq, 1), lambda b_, h_, i, j: (b_, h_, i, 0))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, t, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
        name="flash_fwd_mosaic",
    )(*args)
    return o, lse[..., 0]


# Backward.

def _dkdv_kernel(*refs, st: Static):
    ((q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), seg_refs, pos_refs,
     (dk_ref, dv_ref, dk_sc, dv_sc)) = unpack_refs(refs, 6, st)
    bq, bk = st.blocks.block_q_dkv, st.blocks.block_kv_dkv
    j, step = pl.program_id(2), pl.program_id(3)
    nq = st.q_pad // bq
    i = rem(step, nq)

    @pl.when(step == 0)
    def _():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def compute(masked):
        mask_t = None
        if masked:
            mask_t = _tile_mask(i, j, bq, bk, st, seg_refs, pos_refs, transposed=True)
        dk, dv = dkdv_block(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...],
                            delta_ref[...], mask_t, st.scale)
        dk_sc[...] += dk
        dv_sc[...] += dv

    _when_in_range(i, *q_range(j, bq, bk, st), compute)

    @pl.when(step == pl.num_programs(3) - 1)
    def _():
        dk_ref[...] = (dk_sc[...] * st.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, st: Static):
    ((q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), seg_refs, pos_refs,
     (dq_ref, dq_sc)) = unpack_refs(refs, 6, st)
    bq, bk = st.blocks.block_q_dq, st.blocks.block_kv_dq
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def compute(masked):
        mask = _tile_mask(i, j, bq, bk, st, seg_refs, pos_refs) if masked else None
        dq_sc[...] += dq_block(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...],
                               delta_ref[...], mask, st.scale)

    _when_in_range(j, *kv_range(i, bq, bk, st), compute)

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        dq_ref[...] = (dq_sc[...] * st.scale).astype(dq_ref.dtype)


def backward(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, st: Static):
    """Gradients from the saved log-sum-exp; lse/delta are [B, H, Lp] f32."""
    b, h, t, d = q.shape
    g, s = k.shape[1], k.shape[2]
    r = st.group
    lse_col, delta_col = lse[..., None], delta[..., None]  # [B, H, Tp, 1]
    lse_row, delta_row = lse[:, :, None, :], delta[:, :, None, :]  # [B, H, 1, Tp]

    # dK, dV: grid (B, G, S/bk, group * T/bq).
    bq, bk = st.blocks.block_q_dkv, st.blocks.block_kv_dkv
    nq = t // bq

    def q_block(b_, g_, j, step):
        lo, _, _, hi = q_range(j, bq, bk, st)
        return _clamp(rem(step, nq), lo, hi)

    def q_index(b_, g_, j, step):
        return (b_, g_ * r + div(step, nq), q_block(b_, g_, j, step), 0)

    def row_index(b_, g_, j, step):
        return (b_, g_ * r + div(step, nq), 0, q_block(b_, g_, j, step))

    q_spec = pl.BlockSpec((SQ, SQ, bq, d), q_index)
    row_spec = pl.BlockSpec((SQ, SQ, 1, bq), row_index)
    kv_spec = pl.BlockSpec((SQ, SQ, bk, d), lambda b_, g_, j, step: (b_, g_, j, 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *_row_specs(
        st, pl.BlockSpec((SQ, 1, bq), lambda b_, g_, j, step: (b_, 0, q_block(b_, g_, j, step))),
        pl.BlockSpec((SQ, bk, 1), lambda b_, g_, j, step: (b_, j, 0)))]
    args = [q, k, v, do, lse_row, delta_row,
            *_row_args(st, q_seg, kv_seg, q_pos, kv_pos, 1, 2)]
    dk, dv = _call(
        functools.partial(_dkdv_kernel, st=st), st,
        grid=(b, g, s // bk, r * nq),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        name="flash_dkdv_mosaic",
    )(*args)

    # dQ: grid (B, H, T/bq, S/bk).
    bq, bk = st.blocks.block_q_dq, st.blocks.block_kv_dq

    def kv_block(b_, h_, i, j):
        lo, _, _, hi = kv_range(i, bq, bk, st)
        return _clamp(j, lo, hi)

    q_spec = pl.BlockSpec((SQ, SQ, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0))
    col_spec = pl.BlockSpec((SQ, SQ, bq, 1), lambda b_, h_, i, j: (b_, h_, i, 0))
    kv_spec = pl.BlockSpec((SQ, SQ, bk, d),
                           lambda b_, h_, i, j: (b_, div(h_, r), kv_block(b_, h_, i, j), 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, col_spec, col_spec, *_row_specs(
        st, pl.BlockSpec((SQ, bq, 1), lambda b_, h_, i, j: (b_, i, 0)),
        pl.BlockSpec((SQ, 1, bk), lambda b_, h_, i, j: (b_, 0, kv_block(b_, h_, i, j))))]
    args = [q, k, v, do, lse_col, delta_col,
            *_row_args(st, q_seg, kv_seg, q_pos, kv_pos, 2, 1)]
    dq = _call(
        functools.partial(_dq_kernel, st=st), st,
        grid=(b, h, t // bq, s // bk),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        name="flash_dq_mosaic",
    )(*args)
    return dq, dk, dv
