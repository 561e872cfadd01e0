"""GPTQ (Frantar et al. 2022): post-training quantization that rounds a weight matrix one
input row at a time and corrects the rows not yet rounded with the inverse Hessian of the
layer's inputs, H = 2 X^T X / n over a calibration set.

A matrix is handled in its [I, O] form (I = inputs, the paper's columns). For each input
row i, in order (or by decreasing diag(H) with act-order): q_i = quant(w_i),
e = (w_i - dequant(q_i)) / U_ii, and every later row j gets w_j -= U_ij e, where U is the
upper Cholesky factor of (H + damp * mean(diag H) * 1)^-1. Rows are processed in blocks of
at most 128 (the paper's lazy batch updates: the same arithmetic, the updates of rows past
a block are applied once per block as one matmul). Inputs that are always zero (diag
H = 0) get H_ii = 1 and weight 0.

Scales: per channel and per tensor from the whole matrix before any update; groups of g
inputs from the group's rows as updated by the rows before them, when the first row of the
group is reached. With act-order and groups, the scales of every group are computed first
from the matrix (the reference's `static_groups`), so the groups stay g consecutive inputs
in the original order and the result is today's storage (`models.quant.QTensor`).

`gptq_params` quantizes a whole Transformer block by block: each block's Linear inputs are
collected by running it, in float, on the outputs of the blocks already quantized; its
matrices are quantized; then the block is run again with its integer weights to give the
next block's inputs. Last, the output projection (the tied embedding table, or the untied
`lm_head`) is quantized by GPTQ on the final norm's outputs; the same integers serve the
tied table's lookups. An untied input embedding is rounded to nearest, as
`models.ptq.quantize_params` does (a lookup has no inputs to calibrate on).

Sharding: the calibration activations are split over the batch axes like any batch; each
device sums X^T X over its rows and the jitted sum over the batch is an all-reduce, so
every device ends with the whole [I, I] Hessian of each matrix of the current block
(replicated, float32), and runs the column loop on the replicated matrix. Per block that
holds one Hessian per Linear (q, k, v, gate and up repeat their shared input's): 211.6 MiB
at configs/gpt_1b.py (`benchmarks/gptq.py --plan_config`), all-reduced once per
calibration batch.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.configs.sections import Quant
from jaxlm.models.layers import Linear, subtree
from jaxlm.models.ptq import quantize_params
from jaxlm.models.quant import QTensor, _groups, _weight_axes, int_range, pack_int4, qparams
from jaxlm.parallel.context import default_positions

MAX_BLOCK = 128  # rows per lazy batch update


@dataclasses.dataclass(frozen=True)
class GptqSettings:
    """The algorithm's options besides the integer format (`Quant`)."""
    damp: float = 0.01  # added to diag(H), as a fraction of its mean
    act_order: bool = False  # process inputs by decreasing diag(H)


def block_size(inputs: int, group_size: int) -> int:
    """Rows per lazy batch: a divisor of `inputs`, at most MAX_BLOCK unless one group is
    larger, and a multiple of the group size (a group never spans two blocks)."""
    unit = group_size if group_size > 0 else 1
    n = inputs // unit
    k = max([d for d in range(1, n + 1) if n % d == 0 and d * unit <= MAX_BLOCK] or [1])
    return k * unit


def inverse_hessian_factor(h_IxI: jax.Array, damp: float) -> jax.Array:
    """U, upper triangular, with U^T U = (H + damp * mean(diag H) * 1)^-1."""
    i = h_IxI.shape[0]
    h = h_IxI + damp * jnp.mean(jnp.diag(h_IxI)) * jnp.eye(i, dtype=h_IxI.dtype)
    lower = jnp.linalg.cholesky(h)
    h_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(i, dtype=h.dtype))
    return jnp.linalg.cholesky(h_inv).T


def _round(w: jax.Array, scale: jax.Array, zero: jax.Array, qmin: int, qmax: int
           ) -> tuple[jax.Array, jax.Array]:
    """(integers, their dequantized values) of a row of weights."""
    q = jnp.clip(jnp.round(w / scale + zero), qmin, qmax)
    return q, (q - zero) * scale


def gptq_matrix(w_IxO: jax.Array, h_IxI: jax.Array, cfg: Quant,
                settings: GptqSettings = GptqSettings(),
                shape: tuple[int, ...] | None = None) -> QTensor:
    """Quantize one [I, O] matrix with GPTQ, given its inputs' Hessian [I, I]."""
    i, o = w_IxO.shape
    g = cfg.group_size
    bits, symmetric = cfg.weight_bits, cfg.symmetric
    qmin, qmax = int_range(bits, symmetric)
    h = h_IxI.astype(jnp.float32)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[:, None], 0.0, w_IxO.astype(jnp.float32))
    n_groups = i // g if g > 0 else 1
    dynamic = g > 0 and not settings.act_order  # group scales from the updated rows
    scale, zero = qparams(_groups(w, g), _weight_axes(cfg), bits, symmetric)
    scale_GxO = jnp.broadcast_to(scale.reshape(-1, scale.shape[-1]), (n_groups, o))
    zero_GxO = jnp.broadcast_to(zero.reshape(-1, zero.shape[-1]), (n_groups, o))
    perm = jnp.argsort(-jnp.diag(h), stable=True) if settings.act_order else jnp.arange(i)
    w, h = w[perm], h[perm][:, perm]
    group_of_row = perm // g if g > 0 else jnp.zeros(i, jnp.int32)
    u = inverse_hessian_factor(h, settings.damp)
    b = block_size(i, g)
    rows = jnp.arange(i)

    def one_block(k, carry):
        w, q, scale_GxO, zero_GxO = carry
        start = k * b
        w_blk = jax.lax.dynamic_slice(w, (start, 0), (b, o))
        u_blk = jax.lax.dynamic_slice(u, (start, start), (b, b))

        def one_row(j, inner):
            w_blk, q_blk, err_blk, scale_GxO, zero_GxO = inner
            if dynamic:
                def new_scales(sz):
                    grp = jax.lax.dynamic_slice(w_blk, (j, 0), (g, o))
                    s, z = qparams(grp, (0,), bits, symmetric)
                    gi = (start + j) // g
                    return sz[0].at[gi].set(s[0]), sz[1].at[gi].set(z[0])
                scale_GxO, zero_GxO = jax.lax.cond(
                    j % g == 0, new_scales, lambda sz: sz, (scale_GxO, zero_GxO))
            gi = group_of_row[start + j]
            row, d = w_blk[j], u_blk[j, j]
            q_row, deq = _round(row, scale_GxO[gi], zero_GxO[gi], qmin, qmax)
            err = (row - deq) / d
            later = (jnp.arange(b) > j)[:, None]
            w_blk = w_blk - jnp.where(later, u_blk[j][:, None] * err[None, :], 0.0)
            return w_blk, q_blk.at[j].set(q_row), err_blk.at[j].set(err), scale_GxO, zero_GxO

        zeros = jnp.zeros((b, o), jnp.float32)
        _, q_blk, err_blk, scale_GxO, zero_GxO = jax.lax.fori_loop(
            0, b, one_row, (w_blk, zeros, zeros, scale_GxO, zero_GxO))
        u_rows = jax.lax.dynamic_slice(u, (start, 0), (b, i))  # [b, I]
        w = jnp.where((rows >= start + b)[:, None], w - u_rows.T @ err_blk, w)
        q = jax.lax.dynamic_update_slice(q, q_blk, (start, 0))
        return w, q, scale_GxO, zero_GxO

    q0 = jnp.zeros((i, o), jnp.float32)
    _, q, scale_GxO, zero_GxO = jax.lax.fori_loop(
        0, i // b, one_block, (w, q0, scale_GxO, zero_GxO))
    q = q[jnp.argsort(perm)].astype(jnp.int8)
    if g == -1:  # per tensor: one scale
        scale_GxO, zero_GxO = scale_GxO[:1, :1], zero_GxO[:1, :1]
    return QTensor(qvalue=pack_int4(q) if bits <= 4 else q, scale=scale_GxO,
                   zero=None if symmetric else zero_GxO.astype(jnp.int8), bits=bits,
                   shape=tuple(shape or w_IxO.shape))


# ----------------------------------------------------------------------------------------
# A whole model, block by block.

def _linears(block: nnx.Module) -> list[tuple[tuple, Linear]]:
    return [(tuple(p), m) for p, m in block.iter_modules() if isinstance(m, Linear)]


def block_hessians(graphdef: nnx.GraphDef, block_params: Any, x_BxLxD: jax.Array,
                   rows: dict[str, jax.Array]) -> tuple[jax.Array, dict[tuple, jax.Array]]:
    """(the block's output, {Linear path: X^T X of its inputs}) for one batch."""
    block = nnx.merge(graphdef, block_params)
    linears = _linears(block)
    for _, m in linears:
        m.capture = True
    out, _, _ = block(x_BxLxD, rows["positions"], segment_ids_BxL=rows.get("segment_ids"))
    return out, {p: m.gram.get_value() for p, m in linears}


def block_forward(graphdef: nnx.GraphDef, block_params: Any, x_BxLxD: jax.Array,
                  rows: dict[str, jax.Array]) -> jax.Array:
    block = nnx.merge(graphdef, block_params)
    out, _, _ = block(x_BxLxD, rows["positions"], segment_ids_BxL=rows.get("segment_ids"))
    return out


def embed_inputs(model: nnx.Module, params: Any, batch: dict[str, jax.Array]
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(the first block's input, the rows: positions and segment ids) of one batch."""
    graphdef, _ = nnx.split(model)
    m = nnx.merge(graphdef, params)
    tokens = batch["inputs"]
    positions = batch.get("positions")
    if positions is None:
        positions = default_positions(*tokens.shape)
    x = m.embed(tokens)
    if m.cfg.model.position == "learned":
        x = x + m.pos_embed(positions)
    rows = {"positions": positions}
    if batch.get("segment_ids") is not None:
        rows["segment_ids"] = batch["segment_ids"]
    return x, rows


def gptq_params(float_model: nnx.Module, quant_model: nnx.Module, params: dict[str, Any],
                batches: Sequence[dict[str, jax.Array]], cfg: Quant,
                settings: GptqSettings = GptqSettings()) -> dict[str, Any]:
    """`quantize_params`'s output, with every Linear of the blocks quantized by GPTQ on
    the calibration `batches`, block by block. `float_model` runs the blocks with float
    weights (activation quantization as `cfg` says), `quant_model` (the model with `cfg`)
    with integer ones; both may be abstract."""
    out = quantize_params(quant_model, params, cfg)
    f_graphdef = float_model.blocks_graphdef
    q_graphdef = quant_model.blocks_graphdef
    embed = jax.jit(lambda p, b: embed_inputs(float_model, p, b))
    hessians = jax.jit(lambda p, x, r: block_hessians(f_graphdef, p, x, r))
    forward = jax.jit(lambda p, x, r: block_forward(q_graphdef, p, x, r))
    final_gram = jax.jit(lambda p, x: output_gram(float_model, p, x))
    jitted = jax.jit(gptq_matrix, static_argnames=("cfg", "settings"))

    def quantize(w_IxO, h, cfg, settings, shape):  # one compilation per [I, O] shape
        return jitted(w_IxO, h, cfg, settings).replace(shape=shape)
    inputs = [embed(params, b) for b in batches]
    count = sum(x.shape[0] * x.shape[1] for x, _ in inputs)  # tokens
    stacked = params["blocks"]
    units = jax.tree.leaves(stacked)[0].shape[0]
    new_units = []
    for k in range(units):
        unit = jax.tree.map(lambda a, k=k: a[k], stacked)
        grams = None
        for x, rows in inputs:
            _, g = hessians(unit, x, rows)
            grams = g if grams is None else jax.tree.map(jnp.add, grams, g)
        qunit = jax.tree.map(lambda a: a, unit)
        for path, gram in grams.items():
            node = subtree(qunit, path)
            kernel = node["kernel"]
            n_in = _in_features(quant_model, path, kernel)
            node["kernel"] = quantize(kernel.reshape(n_in, -1), 2.0 * gram / count, cfg,
                                      settings, tuple(kernel.shape))
        new_units.append(qunit)
        inputs = [(forward(qunit, x, rows), rows) for x, rows in inputs]
    out["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *new_units)
    gram = None
    for x, _ in inputs:
        g = final_gram(params, x)
        gram = g if gram is None else gram + g
    h = 2.0 * gram / count
    if float_model.cfg.model.tie_embeddings:  # [V, D], quantized as [D, V]
        table = params["embed"]["embedding"]
        out["embed"]["embedding"] = quantize(table.T, h, cfg, settings, tuple(table.shape))
    else:
        kernel = params["lm_head"]["kernel"]
        out["lm_head"]["kernel"] = quantize(kernel, h, cfg, settings, tuple(kernel.shape))
    return out


def output_gram(model: nnx.Module, params: Any, x_BxLxD: jax.Array) -> jax.Array:
    """X^T X of the output projection's inputs: the final norm of the last block's output."""
    graphdef, _ = nnx.split(model)
    x = nnx.merge(graphdef, params).final_norm(x_BxLxD)
    x32 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return x32.T @ x32


def _in_features(model: nnx.Module, path: tuple, kernel: jax.Array) -> int:
    """The input features of the block Linear at `path` (its kernel's first in_ndim dims)."""
    module = model.blocks
    for key in path:
        module = getattr(module, key) if not isinstance(key, int) else module[key]
    n = 1
    for d in kernel.shape[:module.in_ndim]:
        n *= d
    return n
