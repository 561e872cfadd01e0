"""Generation: KV-cache decoding equals recomputation; sampling filters keep the right support."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Sampling
from jaxlm.inference.generate import Generator, filter_logits, generate_uncached, sample_tokens
from jaxlm.models.model import create_model, split_params
from tests.helpers import model_config

CFG = model_config(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                   mlp="swiglu", init_std=0.2)
CONTEXT = 16


@pytest.fixture(scope="module")
def model():
    graphdef, params = split_params(create_model(CFG, 0))
    return graphdef, params, Generator(graphdef, CFG, CONTEXT)


def test_greedy_kv_cache_equals_recomputation_across_the_cache_boundary(model):
    graphdef, params, gen = model
    prompts = [[5, 9, 13, 2, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]  # different lengths
    n = 3 * CONTEXT  # crosses the cache boundary several times
    cached, _ = gen.generate(params, prompts, n)
    ref = generate_uncached(graphdef, CFG, params, prompts, n, CONTEXT)
    assert cached == ref
    assert len(set(cached[0])) > 3  # not a degenerate constant stream


def test_batched_prompts_equal_single_prompts(model):
    """Within the cache (no context shift), left padding changes nothing."""
    _, params, gen = model
    prompts = [[5, 9, 13], [1, 2, 3, 4, 5, 6, 7, 8]]
    batched, _ = gen.generate(params, prompts, CONTEXT - 8)
    for p, out in zip(prompts, batched):
        single, _ = gen.generate(params, [p], CONTEXT - 8)
        assert single[0] == out


def test_sampling_is_seeded(model):
    _, params, gen = model
    sp = Sampling(temperature=1.0, top_k=10)
    a, _ = gen.generate(params, [[1, 2, 3]], 20, sp, seed=1)
    b, _ = gen.generate(params, [[1, 2, 3]], 20, sp, seed=1)
    c, _ = gen.generate(params, [[1, 2, 3]], 20, sp, seed=2)
    assert a == b and a != c
    assert all(t < CFG.vocab_size for t in a[0] + c[0])  # never a padded vocab id


def test_top_k_keeps_exactly_the_k_largest():
    logits = jnp.array([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=2, top_p=1.0)))
    np.testing.assert_array_equal(kept[0], [False, True, False, True, False])


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.5, 0.05, 0.3, 0.15])
    logits = jnp.log(jnp.asarray(probs))[None]
    for p, expected in [(0.5, [True, False, False, False]),
                        (0.6, [True, False, True, False]),
                        (0.8, [True, False, True, False]),
                        (0.81, [True, False, True, True]),
                        (0.99, [True, True, True, True])]:
        kept = np.isfinite(np.asarray(filter_logits(logits, top_k=0, top_p=p)))[0]
        np.testing.assert_array_equal(kept, expected, err_msg=f"top_p={p}")


def test_samples_stay_in_the_support():
    logits = jnp.tile(jnp.array([[0.0, 5.0, 4.0, -3.0, 4.5, 1.0]]), (512, 1))
    sp = Sampling(temperature=1.0, top_k=3)
    toks = np.asarray(sample_tokens(logits, jax.random.key(0), sp, vocab_size=6))
    assert set(toks.tolist()) == {1, 2, 4}
    # Padded vocabulary entries (ids >= vocab_size) are never sampled.
    toks = np.asarray(sample_tokens(logits, jax.random.key(0), Sampling(temperature=1.0), 3))
    assert toks.max() < 3


def test_prompt_longer_than_context_is_rejected(model):
    _, params, gen = model
    with pytest.raises(ConfigError, match="prompt: a prompt of 17 tokens is longer than the "
                                          "model's context of 16"):
        gen.generate(params, [list(range(17))], 4)


def test_decode_with_bf16_cache_runs(model):
    graphdef, params, _ = model
    cfg = CFG.replace_model(dtype="bfloat16")
    out, stats = Generator(graphdef, cfg, CONTEXT).generate(params, [[1, 2]], 5)
    assert len(out[0]) == 5 and stats["decode_tokens_per_sec"] > 0
