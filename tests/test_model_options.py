"""Architecture options: LayerNorm, learned positions, Llama 3 RoPE scaling, biases, q/k
norm, sliding-window attention (XLA, flash kernel, cuDNN's call, KV cache), and their keys."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.configs.base import get_base_config
from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config, RopeScaling
from jaxlm.inference.generate import Generator, generate_uncached
from jaxlm.kernels.reference import reference_attention
from jaxlm.models.model import create_model, param_logical_axes, split_params
from jaxlm.models.attention import ATTENTION_IMPLS, cudnn_attention, xla_attention
from jaxlm.models.layers import LayerNorm, rope_frequencies
from jaxlm.training import rundir
from jaxlm.training.optimizer import decay_mask
from tests.helpers import model_config

GPT2_LIKE = model_config(num_layers=2, d_model=32, num_heads=4, num_kv_heads=4, head_dim=8,
                         d_ff=64, mlp="gelu", norm="layernorm", position="learned",
                         max_positions=48, attention_bias="all", mlp_bias=True, init_std=0.2)
QWEN_LIKE = model_config(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                         d_ff=64, mlp="swiglu", qk_norm=True, attention_bias="qkv",
                         sliding_window=5, tie_embeddings=False, init_std=0.2,
                         rope_scaling={"type": "llama3", "factor": 4.0,
                                       "original_max_positions": 16})


def test_layer_norm_matches_its_definition():
    x = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32) * 3 + 1
    norm = LayerNorm(16, eps=1e-5, dtype=jnp.float32, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.linspace(0.5, 1.5, 16)
    norm.bias[...] = jnp.linspace(-1, 1, 16)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    want = (x - mean) / np.sqrt(var + 1e-5) * np.linspace(0.5, 1.5, 16) + np.linspace(-1, 1, 16)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_llama3_rope_frequencies_follow_the_published_rule():
    half, theta = 32, 500_000.0
    s = RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_positions=8192)
    base = theta ** (-np.arange(half) / half)
    want = []
    for f in base:  # Meta's reference implementation, one frequency at a time
        wavelen = 2 * math.pi / f
        if wavelen < s.original_max_positions / s.high_freq_factor:
            want.append(f)
        elif wavelen > s.original_max_positions / s.low_freq_factor:
            want.append(f / s.factor)
        else:
            smooth = (s.original_max_positions / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            want.append((1 - smooth) * f / s.factor + smooth * f)
    got = np.asarray(rope_frequencies(half, theta, s))
    np.testing.assert_allclose(got, want, rtol=2e-6)
    assert got[-1] < base[-1] / 7 and got[0] == pytest.approx(base[0])
    np.testing.assert_array_equal(np.asarray(rope_frequencies(half, theta)),
                                  np.asarray(theta ** (-jnp.arange(half, dtype=jnp.float32)
                                                       / half)))


def _qkv(b=2, t=24, h=4, g=2, k=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, t, h, k)), jax.random.normal(keys[1], (b, t, g, k)),
            jax.random.normal(keys[2], (b, t, g, k)))


@pytest.mark.parametrize("window", [1, 5, 24, 100])
def test_sliding_window_xla_matches_the_kernel_reference(window):
    q, k, v = _qkv()
    want = reference_attention(q, k, v, causal=True, window_size=window)
    np.testing.assert_allclose(xla_attention(q, k, v, window=window), want, atol=2e-5)
    np.testing.assert_allclose(cudnn_attention(q, k, v, window=window, implementation="xla"),
                               want, atol=2e-5)


def test_window_without_causality_reaches_both_ways_in_every_implementation():
    """A window w without the causal mask: keys within w - 1 positions on either side."""
    q, k, v = _qkv()
    want = reference_attention(q, k, v, causal=False, window_size=5)
    np.testing.assert_allclose(xla_attention(q, k, v, causal=False, window=5), want, atol=2e-5)
    np.testing.assert_allclose(cudnn_attention(q, k, v, causal=False, window=5,
                                               implementation="xla"), want, atol=2e-5)
    assert not np.allclose(want, reference_attention(q, k, v, causal=True, window_size=5),
                           atol=1e-3)


def test_sliding_window_flash_kernel_matches_xla():
    q, k, v = _qkv(t=40)
    seg = jnp.asarray(np.repeat([[1] * 30 + [2] * 10], 2, axis=0))
    got = ATTENTION_IMPLS["pallas_interpret"](q, k, v, segment_ids_BxL=seg, window=7)
    np.testing.assert_allclose(got, xla_attention(q, k, v, segment_ids_BxL=seg, window=7),
                               atol=2e-5)


def test_window_longer_than_the_input_changes_nothing():
    q, k, v = _qkv()
    np.testing.assert_array_equal(xla_attention(q, k, v, window=24), xla_attention(q, k, v))


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [GPT2_LIKE, QWEN_LIKE], ids=["gpt2_like", "qwen_like"])
def test_kv_cache_decoding_equals_recomputation(cfg):
    """Learned positions, LayerNorm and biases; q/k norm, q/k/v biases, Llama 3 RoPE and a
    window shorter than the prompt: the cached path equals recomputation."""
    graphdef, params = split_params(create_model(cfg, 0))
    prompts = [[5, 9, 13, 2, 7, 3, 3, 8], [1, 2, 3]]
    cached, _ = Generator(graphdef, cfg, 24).generate(params, prompts, 30)
    assert cached == generate_uncached(graphdef, cfg, params, prompts, 30, 24)


def test_optional_parameters_and_their_logical_axes():
    model = create_model(GPT2_LIKE, 0)
    _, params = split_params(model)
    axes = param_logical_axes(model)
    assert set(params["blocks"]["attn"]["q"]) == {"kernel", "bias"}
    assert tuple(axes["blocks"]["attn"]["q"]["bias"]) == ("layers", "heads", "head_dim")
    assert tuple(axes["pos_embed"]["embedding"]) == (None, "embed")
    assert set(params["blocks"]["attn_norm"]) == {"scale", "bias"}
    mask = decay_mask(axes)
    assert mask["blocks"]["attn"]["q"]["kernel"] and not mask["blocks"]["attn"]["q"]["bias"]
    assert not mask["blocks"]["mlp"]["up"]["bias"]
    _, qparams = split_params(create_model(QWEN_LIKE, 0))
    assert "bias" not in qparams["blocks"]["attn"]["o"]
    assert set(qparams["blocks"]["attn"]) >= {"q_norm", "k_norm"}
    assert "lm_head" in qparams and "pos_embed" not in qparams
    _, default = split_params(create_model(GPT2_LIKE.replace_model(norm="rmsnorm", position="rope",
                                                                   attention_bias="none",
                                                                   mlp_bias=False), 0))
    assert "bias" not in default["blocks"]["attn"]["q"] and "pos_embed" not in default


@pytest.mark.parametrize("key, value, message", [
    ("model.position", "learned", "model.max_positions: required by position='learned'"),
    ("model.rope_scaling.type", "yarn", "model.rope_scaling.type: unknown value 'yarn'; "
                                        "choose one of ['none', 'llama3']"),
    ("model.rope_scaling.high_freq_factor", 0.5, "model.rope_scaling.high_freq_factor: "
                                                 "must be above low_freq_factor"),
    ("model.attention_bias", "o", "model.attention_bias: unknown value 'o'"),
    ("model.norm", "batchnorm", "model.norm: unknown value 'batchnorm'"),
])
def test_option_errors_name_their_key(key, value, message):
    c = get_base_config()
    if key == "model.rope_scaling.high_freq_factor":
        c.model.rope_scaling.type = "llama3"
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        Config.from_dict(c)


def test_learned_positions_bound_the_sequence_and_moe_has_no_mlp_bias():
    c = get_base_config()
    c.model.position, c.model.max_positions, c.seq_len = "learned", 32, 64
    with pytest.raises(ConfigError, match="seq_len: 64 is longer than the 32 learned positions"):
        Config.from_dict(c)
    c = get_base_config()
    c.model.moe.num_experts, c.model.mlp_bias = 4, True
    with pytest.raises(ConfigError, match="model.mlp_bias: experts have no biases"):
        Config.from_dict(c)


def test_a_config_json_without_the_new_keys_still_resumes(tmp_path):
    """A run directory written before these keys existed resumes with their defaults."""
    old = Config().to_dict()
    for key in ("norm", "position", "max_positions", "rope_scaling", "attention_bias",
                "mlp_bias", "qk_norm", "sliding_window"):
        del old["model"][key]
    (tmp_path / rundir.CONFIG_FILE).write_text(json.dumps(old))
    assert rundir.check_resume(Config(), tmp_path, None) == []
    assert rundir.load_config(tmp_path) == Config()
