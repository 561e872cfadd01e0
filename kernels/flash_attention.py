"""FlashAttention-2 in Pallas: public entry point, padding, backend choice, custom VJP.

    o = flash_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, causal=True)
    o, lse_BxHxL = flash_attention(..., return_lse=True)
    dq, dk, dv = flash_attention_backward(q, k, v, do, lse, delta)  # one block of a ring

Forward and backward are Pallas kernels tied together with `jax.custom_vjp`; the backward
recomputes the attention probabilities block by block from the saved log-sum-exp
(FlashAttention-2), so no [L, S] matrix exists in either pass. Two lowerings share this
wrapper, the masking rules and the block math (`kernels/_common.py`):

* "triton" (GPU): `kernels/flash_triton.py`, Pallas's Triton lowering, [B, L, H, K] layout;
* "mosaic" (TPU): `kernels/flash_mosaic.py`, Pallas's Mosaic lowering, [B, H, L, K] layout.

`interpret=True` runs either kernel on CPU: the Triton kernel in Pallas's HLO interpreter,
the Mosaic kernel in the TPU interpreter (`pltpu.InterpretParams`). That is for tests.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.kernels._common import BlockSizes, Static

# Per-backend defaults: starting points from the FlashAttention literature, not tuned
# by measurement on a GPU or TPU.
DEFAULT_BLOCK_SIZES = {
    "triton": BlockSizes(block_q=128, block_kv=64, block_q_dkv=64, block_kv_dkv=64,
                         block_q_dq=64, block_kv_dq=64),
    "mosaic": BlockSizes(block_q=512, block_kv=512, block_q_dkv=256, block_kv_dkv=256,
                         block_q_dq=256, block_kv_dq=256),
}
_MIN_BLOCK = 16  # smallest tile: Triton's tl.dot needs >= 16, bf16 packs 16 sublanes on TPU
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def default_backend() -> str | None:
    """The kernel for the default JAX backend: "triton" (GPU), "mosaic" (TPU) or None."""
    return {"gpu": "triton", "tpu": "mosaic"}.get(jax.default_backend())


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def padded_head_dim(d: int, backend: str) -> int:
    """Head dims 64 and 128 run as they are; others are zero-padded up.

    Triton tiles must be powers of two (>= 16); TPU tiles want 128 lanes (64 also works as a
    full-dimension block).
    """
    if backend == "triton":
        return max(_MIN_BLOCK, _next_pow2(d))
    return 64 if d <= 64 else _round_up(d, 128)


def _fit_blocks(blocks: BlockSizes, q_len: int, kv_len: int) -> tuple[BlockSizes, int, int]:
    """Shrink blocks to the (power-of-two rounded) lengths; pad lengths to the blocks."""
    blocks = blocks.resolved()
    for name, value in vars(blocks).items():
        if value < _MIN_BLOCK or value & (value - 1):
            raise ValueError(f"flash_attention: {name}={value} must be a power of two "
                             f">= {_MIN_BLOCK}")

    def fit(block: int, length: int) -> int:
        return min(block, max(_MIN_BLOCK, _next_pow2(length)))

    fitted = BlockSizes(
        fit(blocks.block_q, q_len), fit(blocks.block_kv, kv_len),
        fit(blocks.block_q_dkv, q_len), fit(blocks.block_kv_dkv, kv_len),
        fit(blocks.block_q_dq, q_len), fit(blocks.block_kv_dq, kv_len))
    # Powers of two: the largest block along an axis is a multiple of the others.
    q_pad = _round_up(q_len, max(fitted.q_blocks))
    kv_pad = _round_up(kv_len, max(fitted.kv_blocks))
    return fitted, q_pad, kv_pad


def _module(backend: str):
    # Deferred: the Pallas Triton and TPU lowerings take 0.2-0.3 s to import and a run needs
    # at most one of them (none with attention_impl="xla").
    if backend == "triton":
        from jaxlm.kernels import flash_triton  # noqa: PLC0415
        return flash_triton
    from jaxlm.kernels import flash_mosaic  # noqa: PLC0415
    return flash_mosaic


# The custom VJP works on padded arrays in the backend's layout: Triton [B, L, H, K],
# Mosaic [B, H, L, K]. lse is [B, H, L] (f32) for both. `rows` holds the per-row int32
# inputs (segment ids and positions, for queries and keys; None where absent).

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, rows, st: Static):
    return _module(st.backend).forward(q, k, v, *rows, st)


def _flash_fwd(q, k, v, rows, st: Static):
    o, lse = _module(st.backend).forward(q, k, v, *rows, st)
    return (o, lse), (q, k, v, rows, o, lse)


def _flash_bwd(st: Static, res, cotangents):
    q, k, v, rows, o, lse = res
    do, dlse = cotangents
    # delta_i = sum_j P_ij dP_ij = rowsum(dO * O); a cotangent on lse adds P_ij * dlse_i to
    # dS_ij, i.e. it enters as delta - dlse.
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    if st.backend == "triton":
        delta = jnp.swapaxes(delta, 1, 2)  # [B, L, H] -> [B, H, L]
    delta = delta - dlse
    dq, dk, dv = _module(st.backend).backward(q, k, v, do.astype(q.dtype), lse, delta, *rows,
                                              st)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _prepare(q, k, v, *, causal, segment_ids, kv_segment_ids, q_positions, kv_positions,
             window_size, softmax_scale, block_sizes, backend, interpret, num_warps,
             num_stages):
    """Check the arguments; return (Static, padded q, k, v in the backend's layout, rows)."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"flash_attention: want q [B,T,H,D] and k, v [B,S,G,D]; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    b, t, h, d = q.shape
    _, s, g, _ = k.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"flash_attention: batch/head_dim of q {q.shape} and k {k.shape} "
                         "differ")
    if h % g:
        raise ValueError(f"flash_attention: {h} query heads are not a multiple of {g} KV heads")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise ValueError(f"flash_attention: q, k, v must share one of float32/bfloat16/"
                         f"float16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if window_size is not None and window_size < 1:
        raise ValueError(f"flash_attention: window_size must be >= 1, got {window_size}")
    if backend is None:
        backend = default_backend() or ("triton" if interpret else None)
        if backend is None:
            raise ValueError(f"flash_attention: no GPU or TPU (default backend is "
                             f"{jax.default_backend()!r}); pass interpret=True to run in "
                             "Pallas interpret mode on CPU")
    if backend not in ("triton", "mosaic"):
        raise ValueError(f"flash_attention: backend must be 'triton' or 'mosaic', got "
                         f"{backend!r}")
    if kv_segment_ids is None:
        kv_segment_ids = segment_ids
    for name, pair in (("segment_ids", (segment_ids, kv_segment_ids)),
                       ("positions", (q_positions, kv_positions))):
        if (pair[0] is None) != (pair[1] is None):
            raise ValueError(f"flash_attention: give query and key {name} together")
        if pair[0] is not None and (pair[0].shape != (b, t) or pair[1].shape != (b, s)):
            raise ValueError(f"flash_attention: {name} must be [B, L] = {(b, t)} and "
                             f"[B, S] = {(b, s)}; got {pair[0].shape}, {pair[1].shape}")

    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    blocks, t_pad, s_pad = _fit_blocks(block_sizes or DEFAULT_BLOCK_SIZES[backend], t, s)
    if backend == "mosaic" and not interpret:
        # Tiles map onto (8 sublanes, 128 lanes); q blocks are also lanes in dK/dV.
        for name, block in vars(blocks).items():
            full = t_pad if name.startswith("block_q") else s_pad
            if block % 128 and block != full:
                raise ValueError(f"flash_attention: on TPU {name}={block} must be a multiple "
                                 f"of 128 (or cover the whole padded length {full})")
    d_pad = padded_head_dim(d, backend)
    if backend == "triton" and not interpret:
        num_warps = num_warps or (4 if d_pad <= 64 else 8)
        num_stages = num_stages or 2
    st = Static(causal=bool(causal), window=None if window_size is None else int(window_size),
                scale=scale, q_len=t, kv_len=s, q_pad=t_pad, kv_pad=s_pad, group=h // g,
                has_segments=segment_ids is not None, blocks=blocks, backend=backend,
                interpret=bool(interpret), num_warps=num_warps, num_stages=num_stages,
                has_positions=q_positions is not None)

    def pad_rows(x, length, pad):
        return None if x is None else jnp.pad(x.astype(jnp.int32), ((0, 0), (0, pad - length)))

    rows = (pad_rows(segment_ids, t, t_pad), pad_rows(kv_segment_ids, s, s_pad),
            pad_rows(q_positions, t, t_pad), pad_rows(kv_positions, s, s_pad))
    q, k, v = (_to_kernel_layout(x, n, pad, d_pad, backend)
               for x, n, pad in ((q, t, t_pad), (k, s, s_pad), (v, s, s_pad)))
    return st, q, k, v, rows


def _to_kernel_layout(x, length, pad, d_pad, backend):
    x = jnp.pad(x, ((0, 0), (0, pad - length), (0, 0), (0, d_pad - x.shape[3])))
    return jnp.swapaxes(x, 1, 2) if backend == "mosaic" else x


def _from_kernel_layout(x, length, d, backend):
    x = jnp.swapaxes(x, 1, 2) if backend == "mosaic" else x
    return x[:, :length, :, :d]


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    segment_ids: jax.Array | None = None,
                    kv_segment_ids: jax.Array | None = None,
                    q_positions: jax.Array | None = None,
                    kv_positions: jax.Array | None = None,
                    window_size: int | None = None,
                    softmax_scale: float | None = None,
                    block_sizes: BlockSizes | None = None,
                    backend: str | None = None,
                    interpret: bool = False,
                    num_warps: int | None = None,
                    num_stages: int | None = None,
                    return_lse: bool = False):
    """softmax(q k^T * scale + mask) v without materialising the [L, S] scores.

    Args:
      q: [B, L, H, K]; k, v: [B, S, G, K] with H a multiple of G (GQA/MQA: query head h
        reads KV head h // (H // G); K/V are never repeated). float32, bfloat16 or float16;
        matmuls accumulate in float32.
      causal: key s is visible from query p only if s <= p (positions counted from 0 in
        both sequences).
      segment_ids: [B, L] int, query segment ids; kv_segment_ids ([B, S]) defaults to them.
        A query sees only keys of its own segment (packed documents).
      q_positions, kv_positions: [B, L] and [B, S] int (both or neither): the positions the
        causal and window masks compare, instead of 0, 1, 2, ... (e.g. the two chunks of a
        zig-zag context-parallel shard). Every block is then computed with the mask.
      window_size: sliding window w: key s is visible from p only if p - w < s (and, when
        not causal, s < p + w). None = unlimited.
      softmax_scale: defaults to 1/sqrt(D).
      block_sizes: tile sizes (powers of two >= 16); default per backend. Blocks larger
        than the (rounded-up) sequence are shrunk; lengths are padded to the blocks and the
        padding is masked. Head dims other than 64/128 are zero-padded.
      backend: "triton" (GPU) or "mosaic" (TPU); None picks the default JAX backend's.
      interpret: run on CPU in Pallas interpret mode (the backend defaults to "triton").
      num_warps, num_stages: Triton launch parameters (default by head dim).
      return_lse: also return the log-sum-exp [B, H, L] (float32; -inf for rows that see
        no key, whose output is 0). It is differentiable too.
    """
    st, qp, kp, vp, rows = _prepare(
        q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        q_positions=q_positions, kv_positions=kv_positions, window_size=window_size,
        softmax_scale=softmax_scale, block_sizes=block_sizes, backend=backend,
        interpret=interpret, num_warps=num_warps, num_stages=num_stages)
    o, lse = _flash(qp, kp, vp, rows, st)
    o = _from_kernel_layout(o, q.shape[1], q.shape[3], st.backend)
    lse = lse[:, :, :q.shape[1]]
    return (o, lse) if return_lse else o


def flash_attention_backward(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array,
                             lse: jax.Array, delta: jax.Array, **kwargs: Any
                             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) of `flash_attention(q, k, v, **kwargs)` for the output cotangent `do`,
    given a log-sum-exp `lse` and `delta` = rowsum(dO * O), both [B, H, L] float32.

    The backward kernels recompute P = exp(S - lse) block by block, so `lse` and `delta`
    may belong to a larger attention that this call is one block of: ring attention passes
    the log-sum-exp and output of the whole merged row and gets this block's share of the
    gradients. `kwargs` are `flash_attention`'s (without `return_lse`).
    """
    defaults = dict(causal=True, segment_ids=None, kv_segment_ids=None, q_positions=None,
                    kv_positions=None, window_size=None, softmax_scale=None,
                    block_sizes=None, backend=None, interpret=False, num_warps=None,
                    num_stages=None)
    st, qp, kp, vp, rows = _prepare(q, k, v, **{**defaults, **kwargs})
    t, d = q.shape[1], q.shape[3]
    dop = _to_kernel_layout(do.astype(q.dtype), t, st.q_pad, qp.shape[-1], st.backend)
    # Padded query rows are zero vectors with zero cotangents: lse 0 keeps P finite there.
    pad = ((0, 0), (0, 0), (0, st.q_pad - t))
    lse_p = jnp.pad(lse.astype(jnp.float32), pad)
    delta_p = jnp.pad(delta.astype(jnp.float32), pad)
    dq, dk, dv = _module(st.backend).backward(qp, kp, vp, dop, lse_p, delta_p, *rows, st)
    s = k.shape[1]
    return (_from_kernel_layout(dq, t, d, st.backend), _from_kernel_layout(dk, s, d, st.backend),
            _from_kernel_layout(dv, s, d, st.backend))
