"""What the Triton and Mosaic flash-attention kernels share.

* `Static`: every compile-time choice of one kernel launch (hashable: it is the
  `nondiff_argnums` of the custom VJP and part of the jit cache key).
* Block ranges: which key blocks a query block needs (forward and dq) and which query
  blocks a key block needs (dk/dv), split into the part that needs an element mask and
  the part that is fully visible, so the common case skips the mask.
* The per-block FlashAttention-2 math (`fwd_block`, `dkdv_block`, `dq_block`), written
  with jnp ops that both Pallas lowerings (and the interpreters) accept.

Masking convention: query position p and key position s (both counted from 0, or given
as position arrays) see each other iff the key's index is below kv_len (padding) and
  causal:          s <= p
  window w:        p - w < s            (and, when not causal, also s < p + w)
  segment ids:     q_segment[p] == kv_segment[s].
With position arrays (e.g. the chunks of a context-parallel shard, which are not
consecutive) any element may be masked, so no block is skipped and every block is masked.
Masked logits are -inf. A row with no visible key gets output 0 and log-sum-exp -inf;
the guards below keep every intermediate finite, so no NaN is ever produced.
"""

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes along the query (q) and key/value (kv) axes for the three kernels.

    `None` in a backward field means "same as the forward block along that axis".
    """
    block_q: int = 128
    block_kv: int = 64
    block_q_dkv: int | None = None
    block_kv_dkv: int | None = None
    block_q_dq: int | None = None
    block_kv_dq: int | None = None

    def resolved(self) -> "BlockSizes":
        return BlockSizes(
            self.block_q, self.block_kv,
            self.block_q_dkv or self.block_q, self.block_kv_dkv or self.block_kv,
            self.block_q_dq or self.block_q, self.block_kv_dq or self.block_kv)

    @property
    def q_blocks(self) -> tuple[int, ...]:
        r = self.resolved()
        return (r.block_q, r.block_q_dkv, r.block_q_dq)

    @property
    def kv_blocks(self) -> tuple[int, ...]:
        r = self.resolved()
        return (r.block_kv, r.block_kv_dkv, r.block_kv_dq)


@dataclasses.dataclass(frozen=True)
class Static:
    """Compile-time description of one attention call (after padding)."""
    causal: bool
    window: int | None
    scale: float
    q_len: int  # real lengths, before padding
    kv_len: int
    q_pad: int  # padded lengths: multiples of every q (kv) block size
    kv_pad: int
    group: int  # query heads per KV head
    has_segments: bool
    blocks: BlockSizes  # resolved
    backend: str  # "triton" | "mosaic"
    interpret: bool
    num_warps: int | None = None  # Triton only
    num_stages: int | None = None
    has_positions: bool = False  # position arrays decide the causal and window masks


def unpack_refs(refs, n: int, st: Static):
    """(the first n refs, the (query, key) segment-id refs, the (query, key) position
    refs, the remaining refs); absent segment or position refs are (None, None)."""
    refs = list(refs)
    head, rest = refs[:n], refs[n:]
    segs = (rest.pop(0), rest.pop(0)) if st.has_segments else (None, None)
    pos = (rest.pop(0), rest.pop(0)) if st.has_positions else (None, None)
    return head, segs, pos, rest


def div(a, b):
    """a // b for non-negative a and positive static b (no sign fix-ups in the kernel)."""
    if isinstance(a, int):
        return a // b
    return jax.lax.div(a, jnp.int32(b))


def rem(a, b):
    """a % b for non-negative a and positive static b."""
    if isinstance(a, int):
        return a % b
    return jax.lax.rem(a, jnp.int32(b))


def cdiv(a, b):
    return div(a + (b - 1), b)


def _max(a, b):
    return jnp.maximum(a, b)


def _min(a, b):
    return jnp.minimum(a, b)


def kv_range(i, bq: int, bk: int, st: Static):
    """Key blocks for query block `i`: [lo, hi), of which [ulo, uhi) need no mask.

    All values are int32 scalars (traced from the program id). lo <= ulo <= uhi <= hi.
    """
    if st.has_positions:  # any block may hold visible keys, none is known to be unmasked
        zero = jnp.int32(0)
        return zero, zero, zero, jnp.int32(cdiv(st.kv_len, bk))
    i = jnp.asarray(i, jnp.int32)
    first_q = i * bq
    last_q = first_q + (bq - 1)
    lo = jnp.int32(0)
    hi = jnp.int32(cdiv(st.kv_len, bk))  # blocks made only of padding are skipped
    uhi = jnp.int32(st.kv_len // bk)  # blocks with padding need the mask
    ulo = lo
    if st.causal:
        hi = _min(hi, div(last_q, bk) + 1)
        uhi = _min(uhi, div(first_q + 1, bk))  # (j+1)*bk - 1 <= first_q
    if st.window is not None:
        w = st.window
        lo = div(_max(first_q - (w - 1), 0), bk)
        ulo = cdiv(_max(last_q - (w - 1), 0), bk)  # j*bk > last_q - w
        if not st.causal:
            hi = _min(hi, div(last_q + w - 1, bk) + 1)
            uhi = _min(uhi, div(first_q + w, bk))  # (j+1)*bk - 1 < first_q + w
    if st.has_segments:
        uhi = ulo  # segment ids can mask any element: always apply the mask
    lo = _min(lo, hi)
    ulo = _min(_max(ulo, lo), hi)
    uhi = _min(_max(uhi, ulo), hi)
    return lo, ulo, uhi, hi


def q_range(j, bq: int, bk: int, st: Static):
    """Query blocks for key block `j`: [lo, hi), of which [ulo, uhi) need no mask."""
    if st.has_positions:
        zero = jnp.int32(0)
        return zero, zero, zero, jnp.int32(cdiv(st.q_len, bq))
    j = jnp.asarray(j, jnp.int32)
    first_k = j * bk
    last_k = first_k + (bk - 1)
    lo = jnp.int32(0)
    hi = jnp.int32(cdiv(st.q_len, bq))  # query blocks made only of padding are skipped
    ulo = lo
    uhi = hi
    if st.causal:
        lo = div(first_k, bq)
        ulo = cdiv(last_k, bq)  # i*bq >= last_k
    if st.window is not None:
        w = st.window
        hi = _min(hi, div(last_k + w - 1, bq) + 1)
        uhi = _min(uhi, div(first_k + w, bq))  # (i+1)*bq - 1 < first_k + w
        if not st.causal:
            lo = div(_max(first_k - (w - 1), 0), bq)
            ulo = _max(ulo, cdiv(_max(last_k - (w - 1), 0), bq))  # i*bq > last_k - w
    # A key block that contains padding always needs the mask.
    has_padding = last_k >= st.kv_len
    uhi = jnp.where(has_padding, ulo, uhi)
    if st.has_segments:
        uhi = ulo
    lo = _min(lo, hi)
    ulo = _min(_max(ulo, lo), hi)
    uhi = _min(_max(uhi, ulo), hi)
    return lo, ulo, uhi, hi


def visible(q_idx, k_idx, st: Static, q_seg=None, kv_seg=None, q_pos=None, k_pos=None):
    """Boolean mask from broadcastable query and key indices (and segment ids); the
    causal and window masks compare `q_pos`/`k_pos` when given, else the indices."""
    mask = None

    def both(m):
        return m if mask is None else mask & m

    if st.kv_len < st.kv_pad:
        mask = both(k_idx < st.kv_len)
    if q_pos is None:
        q_pos, k_pos = q_idx, k_idx
    if st.causal:
        mask = both(k_pos <= q_pos)
    if st.window is not None:
        mask = both(k_pos > q_pos - st.window)
        if not st.causal:
            mask = both(k_pos < q_pos + st.window)
    if q_seg is not None:
        mask = both(q_seg == kv_seg)
    return mask


def dot_nt(a, b):
    """a @ b.T with float32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def dot_nn(a, b):
    """a @ b with float32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def fwd_block(q, k, v, m, l, acc, mask, scale: float):
    """One online-softmax step. m, l: [bq, 1] running max and sum; acc: [bq, D] (f32)."""
    s = dot_nt(q, k) * scale
    if mask is not None:
        s = jnp.where(mask, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_use = jnp.where(m_new == NEG_INF, 0.0, m_new)  # rows with nothing visible yet
    p = jnp.exp(s - m_use)
    alpha = jnp.exp(m - m_use)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + dot_nn(p.astype(v.dtype), v)
    return m_new, l, acc


def fwd_finish(m, l, acc):
    """(output in f32, log-sum-exp): rows that saw no key give 0 and -inf."""
    empty = l == 0.0
    out = acc / jnp.where(empty, 1.0, l)
    lse = jnp.where(empty, NEG_INF, m + jnp.log(jnp.where(empty, 1.0, l)))
    return out, lse


def _finite(lse):
    return jnp.where(lse == NEG_INF, 0.0, lse)


def dkdv_block(q, k, v, do, lse_row, delta_row, mask_t, scale: float):
    """Contributions of one query block to dK (unscaled) and dV of one key block.

    Transposed formulation: s^T = k q^T is [bk, bq], so lse and delta enter as [1, bq]
    rows and every matmul is a plain or an rhs-transposed one.
    """
    s_t = dot_nt(k, q) * scale
    p_t = jnp.exp(s_t - _finite(lse_row))
    if mask_t is not None:
        p_t = jnp.where(mask_t, p_t, 0.0)
    dv = dot_nn(p_t.astype(do.dtype), do)
    dp_t = dot_nt(v, do)
    ds_t = p_t * (dp_t - delta_row)
    dk = dot_nn(ds_t.astype(q.dtype), q)
    return dk, dv


def dq_block(q, k, v, do, lse_col, delta_col, mask, scale: float):
    """Contribution of one key block to dQ (unscaled) of one query block."""
    s = dot_nt(q, k) * scale
    p = jnp.exp(s - _finite(lse_col))
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dp = dot_nt(do, v)
    ds = p * (dp - delta_col)
    return dot_nn(ds.astype(k.dtype), k)
