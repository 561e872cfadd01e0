"""Model behaviour: causality, scan == unrolled, remat == no remat, GQA, padding, dtypes."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.models.model import create_model, split_params
from jaxlm.kernels.reference import attention_block, attention_mask
from jaxlm.models.attention import xla_attention
from tests.helpers import model_config

BASE = model_config(num_layers=3, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                    mlp="swiglu", remat="none")  # the reference of the remat variants


def tokens(b=2, length=16, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, length), 0, 65)


class _GivenEmbeddings(nnx.Module):
    """Stands in for the token embedding so gradients w.r.t. inputs can be taken."""

    def __init__(self, embed, x):
        self.embed, self.x = embed, nnx.Variable(x)

    def __call__(self, tokens):
        return self.x[...]

    def attend(self, h):
        return self.embed.attend(h)


@pytest.mark.parametrize("mlp", ["swiglu", pytest.param("gelu", marks=pytest.mark.slow)])
def test_causality_gradient_is_exactly_zero_after_t(mlp):
    cfg = BASE.replace_model(mlp=mlp)
    model = create_model(cfg, 0)
    b, length, t = 2, 12, 5
    x = jax.random.normal(jax.random.key(1), (b, length, cfg.model.d_model))
    graphdef, params = split_params(model)

    def out_at_t(x):
        m = nnx.merge(graphdef, params)
        m.embed = _GivenEmbeddings(m.embed, x)
        return m(jnp.zeros((b, length), jnp.int32)).logits[:, t].sum()

    g = jax.grad(out_at_t)(x)
    assert np.all(np.asarray(g[:, t + 1:]) == 0.0)
    assert np.all(np.abs(np.asarray(g[:, :t + 1])).sum(-1) > 0)


def _loss_and_grads(cfg, toks):
    graphdef, params = split_params(create_model(cfg, 0))

    def loss(p):
        return nnx.merge(graphdef, p)(toks).logits.astype(jnp.float32).var()

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("variant", [dict(scan_layers=False), dict(remat="full"),
                                     dict(remat="dots"), dict(remat="dots_no_batch"),
                                     dict(scan_layers=False, remat="full")])
def test_variant_equals_scanned_no_remat(variant):
    toks = tokens()
    ref_loss, ref_grads = _loss_and_grads(BASE, toks)
    loss, grads = _loss_and_grads(BASE.replace_model(**variant), toks)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
                 grads, ref_grads)


def test_scanned_params_are_stacked_on_layers_axis():
    _, params = split_params(create_model(BASE, 0))
    assert params["blocks"]["attn"]["q"]["kernel"].shape == (3, 32, 4, 8)
    assert params["blocks"]["attn"]["k"]["kernel"].shape == (3, 32, 2, 8)
    assert params["embed"]["embedding"].shape == (128, 32)


def test_layers_get_different_initial_weights():
    _, params = split_params(create_model(BASE, 0))
    w = params["blocks"]["mlp"]["up"]["kernel"]
    assert not np.allclose(w[0], w[1])


def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA with 2 KV heads == MHA whose 4 KV heads repeat each GQA head twice."""
    gqa = BASE.replace_model(num_kv_heads=2)
    mha = BASE.replace_model(num_kv_heads=4)
    gd_g, p_g = split_params(create_model(gqa, 0))
    gd_m, p_m = split_params(create_model(mha, 0))
    p_m = jax.tree.map(lambda x: x, p_g)  # copy the structure, then widen K/V
    for name in ("k", "v"):
        p_m["blocks"]["attn"][name]["kernel"] = jnp.repeat(
            p_g["blocks"]["attn"][name]["kernel"], 2, axis=2)
    toks = tokens()
    out_g = nnx.merge(gd_g, p_g)(toks).logits
    out_m = nnx.merge(gd_m, p_m)(toks).logits
    np.testing.assert_allclose(out_g, out_m, rtol=1e-5, atol=1e-5)


def test_untied_embeddings_have_an_lm_head():
    cfg = BASE.replace_model(tie_embeddings=False)
    _, params = split_params(create_model(cfg, 0))
    assert params["lm_head"]["kernel"].shape == (32, 128)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = BASE.replace_model(dtype="bfloat16")
    graphdef, params = split_params(create_model(cfg, 0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    out = nnx.merge(graphdef, params)(tokens())
    ref = nnx.merge(*split_params(create_model(BASE, 0)))(tokens())
    assert out.logits.dtype == jnp.float32
    np.testing.assert_allclose(out.logits, ref.logits, atol=0.05)


def test_dropout_is_active_only_with_a_key():
    cfg = BASE.replace_model(dropout=0.5)
    model = nnx.merge(*split_params(create_model(cfg, 0)))
    toks = tokens()
    a = model(toks).logits
    b = model(toks).logits
    c = model(toks, dropout_key=jax.random.key(0)).logits
    d = model(toks, dropout_key=jax.random.key(1)).logits
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(c, d)


def test_attention_block_rows_without_keys_are_zero_not_nan():
    q = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
    k = v = jax.random.normal(jax.random.key(1), (1, 4, 2, 8))
    mask = jnp.zeros((1, 4, 4), bool).at[:, 2:, :2].set(True)
    out, lse = attention_block(q, k, v, mask)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[:, :2], 0.0)
    np.testing.assert_array_equal(lse[:, :, :2], -np.inf)
    assert np.all(np.isfinite(lse[:, :, 2:]))
    grads = jax.grad(lambda q, k, v: attention_block(q, k, v, mask)[0].sum(), (0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_array_equal(grads[0][:, :2], 0.0)


def test_segment_ids_block_attention_across_documents():
    q = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
    k = jax.random.normal(jax.random.key(1), (1, 6, 2, 8))
    v = jax.random.normal(jax.random.key(2), (1, 6, 2, 8))
    seg = jnp.array([[0, 0, 0, 1, 1, 1]])
    packed = xla_attention(q, k, v, causal=True, segment_ids_BxL=seg)
    first = xla_attention(q[:, :3], k[:, :3], v[:, :3], causal=True)
    second = xla_attention(q[:, 3:], k[:, 3:], v[:, 3:], causal=True)
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), atol=1e-6)


def test_attention_mask_combines_conditions():
    pos = jnp.arange(4)[None]
    m = attention_mask(pos, pos, causal=True, kv_valid=jnp.array([[False, True, True, True]]))
    expected = np.tril(np.ones((4, 4), bool))
    expected[:, 0] = False
    np.testing.assert_array_equal(m[0], expected)


def test_matmul_custom_vjp_equals_autodiff():
    from jaxlm.models.layers import matmul
    x = jax.random.normal(jax.random.key(0), (24, 16))
    w = jax.random.normal(jax.random.key(1), (16, 40))
    g = jax.random.normal(jax.random.key(2), (24, 40))
    ours = jax.vjp(matmul, x, w)[1](g)
    ref = jax.vjp(lambda a, b: a @ b, x, w)[1](g)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
