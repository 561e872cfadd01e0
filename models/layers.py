"""Building blocks: parameters with logical axes, linear maps, norms, embeddings, RoPE, MLPs."""

from collections.abc import Callable, Iterator, Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.configs.sections import Lora, RopeScaling
from jaxlm.models.quant import QTensor, embedding_table, fake_quant_activation, linear_operands
from jaxlm.parallel.context import context_shards
from jaxlm.parallel.sharding import constrain

Initializer = nnx.initializers.Initializer
LORA_A, LORA_B = "lora_a", "lora_b"  # a Linear's adapter parameters


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int],
          axes: Sequence[str]) -> nnx.Param:
    """A float32 parameter that carries its logical axis names.

    `out_sharding` is the metadata key flax's transforms (e.g. `nnx.vmap` over layers)
    extend; eager sharding is off because we place parameters ourselves with a jitted,
    sharded init.
    """
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32),
                     out_sharding=tuple(axes), eager_sharding=False)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity without a key (evaluation) or at rate 0."""
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


@jax.custom_vjp
def matmul(x_NxI: jax.Array, w_IxO: jax.Array) -> jax.Array:
    """x @ w, with a backward pass that computes dW as (g^T x)^T; x may have several
    leading dims ([..., I]).

    XLA:CPU otherwise computes dW = x^T g by materialising g^T, the big [N, O]
    activation gradient, inside an elementwise fusion that writes it transposed; that
    single fusion took ~20% of the step for the default recipe. Computing the small
    [O, I] product and transposing it is ~1.5x faster end to end; the barrier stops the
    algebraic simplifier from folding the transpose back.
    """
    return x_NxI @ w_IxO


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(res, g_NxO):
    x_NxI, w_IxO = res
    dx = g_NxO @ w_IxO.T
    dw_OxI = jax.lax.optimization_barrier(jnp.einsum("...o,...i->oi", g_NxO, x_NxI))
    return dx, dw_OxI.T


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nnx.Module):
    """y = x @ W (+ b) over the trailing `len(in_shape)` dims of x; W is `in_shape +
    out_shape`, the optional bias b is `out_shape` (initialised to zero).

    `quant` (set by `models.quant.set_quant`) fake-quantizes W and/or x; W may also hold
    real integer weights (a `QTensor`). Without either, the float path is unchanged.

    `lora` adds a low-rank adapter: y += scale * dropout(x) A B with A `in_shape + [r]`
    (normal, std 1/sqrt(inputs)) and B `[r] + out_shape` (zeros, so the adapted map starts
    equal to the base). They carry the kernel's input and output axis names and the
    rank axis `lora_rank`.
    """

    quant = None
    capture = False  # models/gptq.py sets it: keep the inputs' Gram matrix X^T X as `gram`

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], axes: Sequence[str],
                 *, std: float, dtype: jnp.dtype, rngs: nnx.Rngs, bias: bool = False,
                 lora: Lora | None = None):
        n = self.in_ndim = len(in_shape)
        self.dtype = dtype
        self.kernel = param(rngs, nnx.initializers.normal(std), (*in_shape, *out_shape), axes)
        self.use_bias = bias
        if bias:
            self.bias = param(rngs, nnx.initializers.zeros, tuple(out_shape),
                              tuple(axes[len(in_shape):]))
        self.lora = lora
        if lora is not None:
            a_std = 1.0 / math.sqrt(math.prod(in_shape))
            self.lora_a = param(rngs, nnx.initializers.normal(a_std), (*in_shape, lora.rank),
                                (*axes[:n], "lora_rank"))
            self.lora_b = param(rngs, nnx.initializers.zeros, (lora.rank, *out_shape),
                                ("lora_rank", *axes[n:]))

    def __call__(self, x: jax.Array, lora_key: jax.Array | None = None) -> jax.Array:
        w = self.kernel.get_value()
        n = self.in_ndim
        batch_shape, in_shape = x.shape[:x.ndim - n], x.shape[x.ndim - n:]
        # The leading dims merge into one (a plain 2-D matmul) unless the sequence is split
        # over devices: GSPMD cannot merge a split length axis with the batch axis without
        # gathering the whole sequence.
        lead = batch_shape if context_shards() > 1 else (-1,)
        x2 = x_in = x.astype(self.dtype).reshape(*lead, math.prod(in_shape))
        if self.quant is None and not isinstance(w, QTensor):
            w = w.astype(self.dtype)
            out_shape = w.shape[n:]
            w2 = w.reshape(math.prod(in_shape), -1)
        else:
            x2, w2, out_shape = linear_operands(x2, w, self.quant, n, self.dtype)
        y = matmul(x2, w2)
        if self.capture:
            x32 = x2.reshape(-1, x2.shape[-1]).astype(jnp.float32)
            self.gram = nnx.Intermediate(x32.T @ x32)
        if self.lora is not None:
            y = y + self._adapter(x_in, lora_key)
        y = y.reshape(*batch_shape, *out_shape)
        if self.use_bias:
            y = y + self.bias[...].astype(y.dtype)
        return y


    def _adapter(self, x_NxI: jax.Array, key: jax.Array | None) -> jax.Array:
        """scale * dropout(x) A B, [N, O]."""
        r = self.lora.rank
        a_IxR = self.lora_a[...].astype(self.dtype).reshape(-1, r)
        b_RxO = self.lora_b[...].astype(self.dtype).reshape(r, -1)
        h_NxR = matmul(dropout(x_NxI, self.lora.dropout, key), a_IxR)
        return (matmul(h_NxR, b_RxO) * self.lora.scale).astype(self.dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square norm, computed in float32."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...]).astype(self.dtype)


class LayerNorm(nnx.Module):
    """Layer norm with a learned scale and bias (GPT-2's), computed in float32."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",))
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


def make_norm(kind: str, dim: int, *, eps: float, dtype: jnp.dtype,
              rngs: nnx.Rngs) -> RMSNorm | LayerNorm:
    """`rmsnorm` or `layernorm` over the last axis."""
    norm = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}[kind]
    return norm(dim, eps=eps, dtype=dtype, rngs=rngs)


class Embed(nnx.Module):
    """Token embedding; `attend` is the tied output projection. `quant` as for Linear."""

    quant = None

    def __init__(self, vocab: int, dim: int, *, std: float, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, nnx.initializers.normal(std), (vocab, dim),
                               ("vocab", "embed"))

    def table(self) -> jax.Array:
        table = self.embedding.get_value()
        if self.quant is None and not isinstance(table, QTensor):
            return table
        return embedding_table(table, self.quant)

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        return jnp.take(self.table(), tokens_BxL, axis=0).astype(self.dtype)

    def attend(self, x_BxLxD: jax.Array) -> jax.Array:
        if self.quant is not None and self.quant.activation_bits:
            x_BxLxD = fake_quant_activation(x_BxLxD, self.quant)
        return jnp.einsum("bld,vd->blv", x_BxLxD, self.table().astype(self.dtype))



def weight_matrices(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Module, str, bool]]:
    """(module path, module, parameter name, stacked over layers) of every weight matrix:
    the Linear kernels and Embed tables that quantization and LoRA merging rewrite."""
    for path, module in model.iter_modules():
        if isinstance(module, Linear):
            var, name = module.kernel, "kernel"
        elif isinstance(module, Embed):
            var, name = module.embedding, "embedding"
        else:
            continue
        yield path, module, name, var.get_metadata().get("out_sharding", (None,))[0] == "layers"


def subtree(tree: dict[str, Any], path: Sequence[Any]) -> Any:
    """The node of a nested dict at `path` (a module path of `nnx.Module.iter_modules`)."""
    for key in path:
        tree = tree[key]
    return tree

class PositionEmbed(nnx.Module):
    """Learned absolute position embeddings (GPT-2's): row p is added at position p.

    The table's position axis has no logical name: it is small and never split."""

    def __init__(self, max_positions: int, dim: int, *, std: float, dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, nnx.initializers.normal(std), (max_positions, dim),
                               (None, "embed"))

    def __call__(self, positions_BxL: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], positions_BxL, axis=0).astype(self.dtype)


def rope_frequencies(half: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """The `half` inverse frequencies of RoPE, scaled as Llama 3 does when `scaling` is set:
    long wavelengths are divided by `factor`, short ones kept, the band between blended."""
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_positions / scaling.low_freq_factor
    high_wavelen = scaling.original_max_positions / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_positions / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, blended, scaled)


def rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float,
         scaling: RopeScaling | None = None) -> jax.Array:
    """Rotary position embedding (rotate-half form), computed in float32."""
    half = x_BxLxHxK.shape[-1] // 2
    inv_freq = rope_frequencies(half, theta, scaling)
    angle_BxLxK = positions_BxL[..., None].astype(jnp.float32) * inv_freq
    sin = jnp.sin(angle_BxLxK)[:, :, None, :]
    cos = jnp.cos(angle_BxLxK)[:, :, None, :]
    x = x_BxLxHxK.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


class MLP(nnx.Module):
    """Feed-forward block: SwiGLU (gated) or GELU (tanh approximation, as GPT-2's)."""

    def __init__(self, d_model: int, d_ff: int, kind: str, *, std: float, out_std: float,
                 dtype: jnp.dtype, rngs: nnx.Rngs, bias: bool = False,
                 lora: Callable[[str], Lora | None] = lambda name: None):
        self.kind = kind
        if kind == "swiglu":
            self.gate = Linear((d_model,), (d_ff,), ("embed", "mlp"), std=std, dtype=dtype,
                               rngs=rngs, bias=bias, lora=lora("gate"))
        self.up = Linear((d_model,), (d_ff,), ("embed", "mlp"), std=std, dtype=dtype, rngs=rngs,
                         bias=bias, lora=lora("up"))
        self.down = Linear((d_ff,), (d_model,), ("mlp", "embed"), std=out_std, dtype=dtype,
                           rngs=rngs, bias=bias, lora=lora("down"))

    def __call__(self, x_BxLxD: jax.Array, lora_key: jax.Array | None = None) -> jax.Array:
        keys = (None,) * 3 if lora_key is None else jax.random.split(lora_key, 3)
        if self.kind == "swiglu":
            h_BxLxF = jax.nn.silu(self.gate(x_BxLxD, keys[0])) * self.up(x_BxLxD, keys[1])
        else:
            h_BxLxF = jax.nn.gelu(self.up(x_BxLxD, keys[1]), approximate=True)
        h_BxLxF = constrain(h_BxLxF, ("act_batch", "act_len", "act_mlp"))
        return self.down(h_BxLxF, keys[2])


def residual_std(std: float, num_layers: int) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return std / math.sqrt(2 * num_layers)
