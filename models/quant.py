"""Integer quantization: fake quantization with a straight-through estimator (QAT), and
real integer weights plus scales (post-training quantization, low-precision evaluation).

A weight matrix is handled in its 2-D `[I, O]` form (I = the contracted input features,
O = the outputs). Its scales are computed over I: one per output channel
(`per_channel`), one per matrix (`per_tensor`), or one per group of `g` consecutive
inputs and output channel (granularity `"g"`, e.g. `"32"`: sub-channel). Activations
(the inputs of every weight matmul) are quantized per token with dynamic ranges.

Symmetric: q = clip(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1), s = max|x| / (2^(b-1) - 1).
Asymmetric: q = clip(round(x / s) + z, -2^(b-1), 2^(b-1) - 1) with the range [min, max]
(widened to contain 0, so the integer zero point z fits in b bits) mapped onto the grid.
Either way |x - dequant(quant(x))| <= s / 2 for every x inside the range.

NF4 (`weight_format="nf4"`, QLoRA's NormalFloat-4): each group's values divided by their
absmax are rounded to the nearest of 16 fixed levels, and the absmax values are
themselves quantized to int8 in blocks of 256 around their mean (double quantization).

Modules opt in by declaring a class attribute `quant = None` and calling
`linear_operands` / `embedding_table`; `set_quant` sets it on every such module. This is
a leaf module: it imports nothing from `models/` (`models/ptq.py` quantizes a model's
parameters module by module).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxlm.configs.sections import Quant


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    top = 2 ** (bits - 1) - 1
    return (-top, top) if symmetric else (-top - 1, top)


def qparams(x: jax.Array, axes: tuple[int, ...], bits: int, symmetric: bool
            ) -> tuple[jax.Array, jax.Array]:
    """(scale, zero point) over `axes` (kept as size-1 dims), from the data's range."""
    qmin, qmax = int_range(bits, symmetric)
    x = x.astype(jnp.float32)
    if symmetric:
        scale = jnp.max(jnp.abs(x), axis=axes, keepdims=True) / qmax
        zero = jnp.zeros_like(scale)
    else:
        lo = jnp.minimum(jnp.min(x, axis=axes, keepdims=True), 0.0)
        hi = jnp.maximum(jnp.max(x, axis=axes, keepdims=True), 0.0)
        scale = (hi - lo) / (qmax - qmin)
        scale = jnp.where(scale > 0, scale, 1.0)
        zero = qmin - jnp.round(lo / scale)
    scale = jnp.where(scale > 0, scale, 1.0)  # all-zero rows: any scale is exact
    return jax.lax.stop_gradient(scale), jax.lax.stop_gradient(zero)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fake_quant(x: jax.Array, scale: jax.Array, zero: jax.Array, qmin: int, qmax: int
               ) -> jax.Array:
    """Quantize then dequantize. Gradient (straight-through estimator): the identity where
    round(x / scale + zero) lies inside [qmin, qmax], zero where it is clipped."""
    return _fake_quant(x, scale, zero, qmin, qmax)


def _fake_quant(x, scale, zero, qmin, qmax):
    x32 = x.astype(jnp.float32)
    q = jnp.clip(jnp.round(x32 / scale + zero), qmin, qmax)
    return ((q - zero) * scale).astype(x.dtype)


def _fake_quant_fwd(x, scale, zero, qmin, qmax):
    v = jnp.round(x.astype(jnp.float32) / scale + zero)
    inside = (v >= qmin) & (v <= qmax)  # rounding alone did not leave the grid: no clip
    return _fake_quant(x, scale, zero, qmin, qmax), (inside, scale, zero)


def _fake_quant_bwd(qmin, qmax, res, g):
    inside, scale, zero = res
    return jnp.where(inside, g, 0).astype(g.dtype), jnp.zeros_like(scale), jnp.zeros_like(zero)


fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def _groups(w_IxO: jax.Array, group_size: int) -> jax.Array:
    """[I, O] -> [I/g, g, O]: groups of g consecutive inputs (one group per channel/tensor)."""
    i, o = w_IxO.shape
    g = i if group_size <= 0 else group_size
    return w_IxO.reshape(i // g, g, o)


def _weight_axes(cfg: Quant) -> tuple[int, ...]:
    return (0, 1, 2) if cfg.group_size == -1 else (1,)


def fake_quant_weight(w_IxO: jax.Array, cfg: Quant) -> jax.Array:
    """Fake-quantized weight matrix with the config's bits and granularity (STE)."""
    w = _groups(w_IxO, cfg.group_size)
    scale, zero = qparams(w, _weight_axes(cfg), cfg.weight_bits, cfg.symmetric)
    return fake_quant(w, scale, zero, *int_range(cfg.weight_bits, cfg.symmetric)
                      ).reshape(w_IxO.shape)


def fake_quant_activation(x_NxI: jax.Array, cfg: Quant) -> jax.Array:
    """Per-token dynamic fake quantization of a matmul input (STE)."""
    scale, zero = qparams(x_NxI, (x_NxI.ndim - 1,), cfg.activation_bits, cfg.symmetric)
    return fake_quant(x_NxI, scale, zero, *int_range(cfg.activation_bits, cfg.symmetric))


# ----------------------------------------------------------------------------------------
# Real integer weights.

@struct.dataclass
class QTensor:
    """A weight matrix as integers plus scales. Leading (stacked-layer) dims are allowed.

    qvalue: int8 [..., I, O], or for 3 and 4 bits uint8 [..., I/2, O] holding two values
            each (a nibble per value).
    scale:  float32 [..., groups, O] (per channel: 1 group; per tensor: [..., 1, 1]).
    zero:   int8 like scale (asymmetric), or None (symmetric).
    """
    qvalue: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    bits: int = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)  # the float kernel's shape

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The [I, O] float matrix (the last two dims; call per layer for stacked ones)."""
        q = unpack_int4(self.qvalue) if self.bits <= 4 else self.qvalue
        i, o = q.shape[-2:]
        g = self.scale.shape[-2]
        qf = q.astype(jnp.float32).reshape(*q.shape[:-2], g, i // g, o)
        zero = 0.0 if self.zero is None else self.zero.astype(jnp.float32)[..., None, :]
        w = (qf - zero) * self.scale[..., None, :]
        return w.reshape(*q.shape[:-2], i, o).astype(dtype)


def pack_int4(q: jax.Array) -> jax.Array:
    """int8 values in [-8, 7], [..., 2n, O] -> uint8 [..., n, O] (row 2k low nibble)."""
    lo, hi = q[..., 0::2, :], q[..., 1::2, :]
    return ((lo.astype(jnp.uint8) & 0xF) | (hi.astype(jnp.uint8) << 4)).astype(jnp.uint8)


def unpack_int4(p: jax.Array) -> jax.Array:
    """Inverse of pack_int4, sign-extending each nibble."""
    lo = jax.lax.shift_right_arithmetic((p << 4).astype(jnp.int8), jnp.int8(4))
    hi = jax.lax.shift_right_arithmetic(p.astype(jnp.int8), jnp.int8(4))
    out = jnp.stack([lo, hi], axis=-2)  # [..., n, 2, O]
    return out.reshape(*p.shape[:-2], 2 * p.shape[-2], p.shape[-1])


def quantize_matrix(w_IxO: jax.Array, cfg: Quant, shape: tuple[int, ...] | None = None
                    ) -> QTensor:
    """Round a float [I, O] matrix to integers plus scales (NF4 with `weight_format=nf4`)."""
    if cfg.weight_format == "nf4":
        return quantize_nf4(w_IxO, cfg, shape)
    bits = cfg.weight_bits
    w = _groups(w_IxO.astype(jnp.float32), cfg.group_size)
    scale, zero = qparams(w, _weight_axes(cfg), bits, cfg.symmetric)
    qmin, qmax = int_range(bits, cfg.symmetric)
    q = jnp.clip(jnp.round(w / scale + zero), qmin, qmax).astype(jnp.int8)
    q = q.reshape(w_IxO.shape)
    g_axis = scale.shape[0] if cfg.group_size != -1 else 1
    scale = scale.reshape(g_axis, -1)
    zero = None if cfg.symmetric else zero.reshape(g_axis, -1).astype(jnp.int8)
    return QTensor(qvalue=pack_int4(q) if bits <= 4 else q, scale=scale, zero=zero, bits=bits,
                   shape=tuple(shape or w_IxO.shape))


# ----------------------------------------------------------------------------------------
# NormalFloat-4 with double quantization (Dettmers et al. 2023, QLoRA).

# The 16 NF4 levels: bitsandbytes' `get_4bit_type("nf4")` (bitsandbytes/functional.py),
# the table of the QLoRA paper's appendix E; normal quantiles scaled into [-1, 1], with an
# exact zero.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
NF4_SCALE_BLOCK = 256  # absmax values per second-level (float32) scale


@struct.dataclass
class NF4Tensor(QTensor):
    """A weight matrix as NF4 level indices plus double-quantized absmax scales.

    qvalue:       uint8 [..., I/2, O]: level index - 8, a nibble per value (`pack_int4`).
    scale:        int8 [..., groups, O]: (absmax - scale_offset) / scale_scale, rounded;
                  the absmax values are taken in blocks of NF4_SCALE_BLOCK of their
                  row-major flattening (the last block may be short).
    scale_scale:  float32 [..., blocks]: each block's max |absmax - scale_offset| / 127.
    scale_offset: float32 [...]: the mean of the matrix's absmax values.
    zero is None; bits is 4.
    """
    scale_scale: jax.Array
    scale_offset: jax.Array

    def absmax(self) -> jax.Array:
        """The dequantized absmax scales, float32 [..., groups, O]."""
        lead, (g, o) = self.scale.shape[:-2], self.scale.shape[-2:]
        n, blocks = g * o, self.scale_scale.shape[-1]
        flat = self.scale.reshape(*lead, n).astype(jnp.float32)
        flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, blocks * NF4_SCALE_BLOCK - n)])
        flat = flat.reshape(*lead, blocks, NF4_SCALE_BLOCK) * self.scale_scale[..., None]
        flat = flat + self.scale_offset[..., None, None]
        return flat.reshape(*lead, -1)[..., :n].reshape(*lead, g, o)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The [I, O] float matrix: each value's level times its block's absmax."""
        idx = unpack_int4(self.qvalue).astype(jnp.int32) + 8
        levels = jnp.asarray(NF4_LEVELS, jnp.float32)[idx]
        lead, (i, o) = levels.shape[:-2], levels.shape[-2:]
        absmax = self.absmax()
        g = absmax.shape[-2]
        w = levels.reshape(*lead, g, i // g, o) * absmax[..., None, :]
        return w.reshape(*lead, i, o).astype(dtype)


def nf4_codes(x: jax.Array) -> jax.Array:
    """Indices (int32) of the nearest NF4 level of each x in [-1, 1]; a value halfway
    between two levels takes the lower one (bitsandbytes' comparisons: `x > midpoint`)."""
    levels = jnp.asarray(NF4_LEVELS, jnp.float32)
    return jnp.searchsorted((levels[1:] + levels[:-1]) / 2, x, side="left").astype(jnp.int32)


def double_quantize(absmax_GxO: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(int8 codes like absmax, float32 block scales, float32 offset): the absmax values
    minus their mean, quantized symmetrically to 8 bits in blocks of NF4_SCALE_BLOCK."""
    n = absmax_GxO.size
    blocks = -(-n // NF4_SCALE_BLOCK)
    offset = jnp.mean(absmax_GxO)
    flat = jnp.pad(absmax_GxO.reshape(-1) - offset, (0, blocks * NF4_SCALE_BLOCK - n))
    flat = flat.reshape(blocks, NF4_SCALE_BLOCK)
    scale = jnp.max(jnp.abs(flat), axis=1) / 127
    scale = jnp.where(scale > 0, scale, 1.0)  # a constant block: the offset is exact
    codes = jnp.clip(jnp.round(flat / scale[:, None]), -127, 127).astype(jnp.int8)
    return codes.reshape(-1)[:n].reshape(absmax_GxO.shape), scale, offset


def quantize_nf4(w_IxO: jax.Array, cfg: Quant, shape: tuple[int, ...] | None = None
                 ) -> NF4Tensor:
    """A float [I, O] matrix as NF4: each group's values divided by their absmax and
    rounded to the nearest level; the absmax values double-quantized."""
    w = _groups(w_IxO.astype(jnp.float32), cfg.group_size)
    absmax = jnp.max(jnp.abs(w), axis=_weight_axes(cfg), keepdims=True)
    safe = jnp.where(absmax > 0, absmax, 1.0)  # an all-zero group: level 0.0 is exact
    q = (nf4_codes(w / safe) - 8).astype(jnp.int8).reshape(w_IxO.shape)
    g_axis = absmax.shape[0] if cfg.group_size != -1 else 1
    codes, scale_scale, offset = double_quantize(absmax.reshape(g_axis, -1))
    return NF4Tensor(qvalue=pack_int4(q), scale=codes, zero=None, bits=4,
                     shape=tuple(shape or w_IxO.shape), scale_scale=scale_scale,
                     scale_offset=offset)


# ----------------------------------------------------------------------------------------
# What the modules call.

def linear_operands(x_NxI: jax.Array, w: Any, cfg: Quant | None, in_ndim: int,
                    dtype: Any) -> tuple[jax.Array, jax.Array, tuple[int, ...]]:
    """(x, w as [I, O], output feature shape) for a quantized Linear (x is [..., I]).

    `w` is the float kernel (fake-quantized if cfg has weight bits) or a QTensor (real
    integer weights, dequantized here). Activations are fake-quantized per token."""
    if isinstance(w, QTensor):
        w2 = w.dequantize(dtype)
        out_shape = w.shape[in_ndim:]
    else:
        out_shape = w.shape[in_ndim:]
        w2 = w.reshape(x_NxI.shape[-1], -1)
        if cfg is not None and cfg.weight_bits:
            w2 = fake_quant_weight(w2, cfg)
        w2 = w2.astype(dtype)
    if cfg is not None and cfg.activation_bits:
        x_NxI = fake_quant_activation(x_NxI, cfg)
    return x_NxI, w2, out_shape


def embedding_table(table: Any, cfg: Quant | None) -> jax.Array:
    """The [V, D] embedding (float32): fake-quantized, or dequantized from a QTensor.

    Its scales are per vocabulary row (over D), the contracted dim of the tied output
    projection, so the same integers serve the lookup and the logits."""
    if isinstance(table, QTensor):
        return table.dequantize(jnp.float32).T
    if cfg is not None and cfg.weight_bits:
        return fake_quant_weight(table.T, cfg).T
    return table


def set_quant(model: nnx.Module, cfg: Quant | None) -> nnx.Module:
    """Set `quant` on every module that declares it (Linear, Embed, ...)."""
    for _, module in model.iter_modules():
        if hasattr(type(module), "quant"):
            module.quant = cfg
    return model


def tree_bytes(tree: Any) -> int:
    """Bytes of every array in a pytree (QTensors count their integers and scales)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))
