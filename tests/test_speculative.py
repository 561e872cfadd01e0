"""Speculative decoding: exact greedy output, the target's sampling distribution, errors."""

import dataclasses
import itertools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Sampling
from jaxlm.inference.generate import Generator, generate_uncached
from jaxlm.inference.speculative import SpeculativeGenerator, accept_tokens, filtered_logits
from jaxlm.models.model import create_model, split_params
from tests.helpers import model_config

TARGET = model_config(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                      mlp="swiglu", init_std=0.2)
DRAFT = model_config(num_layers=1, d_model=16, num_heads=2, num_kv_heads=2, head_dim=8, d_ff=32,
                     init_std=0.2, vocab_multiple=8)
CONTEXT = 16


@pytest.fixture(scope="module")
def models():
    gt, pt = split_params(create_model(TARGET, 0))
    gd, pd = split_params(create_model(DRAFT, 1))
    return (gt, pt), (gd, pd)


@pytest.mark.parametrize("draft_context, k", [pytest.param(CONTEXT, 3, marks=pytest.mark.slow),
                                              (6, 4)])
def test_greedy_output_is_the_targets_own_greedy_output(models, draft_context, k):
    """Across the target's cache boundary (context shifts), with a draft that disagrees
    often and one whose own (shorter) windows shift at other times."""
    (gt, pt), (gd, pd) = models
    prompts = [[5, 9, 13, 2, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    n = 3 * CONTEXT
    spec = SpeculativeGenerator((gt, TARGET, CONTEXT), (gd, DRAFT, draft_context), k)
    out, stats = spec.generate(pt, pd, prompts, n)
    plain = Generator(gt, TARGET, CONTEXT)
    for p, o in zip(prompts, out):
        assert o == plain.generate(pt, [p], n)[0][0]
        assert o == generate_uncached(gt, TARGET, pt, [p], n, CONTEXT)[0]
    assert 0.0 <= stats["acceptance_rate"] < 1.0
    assert stats["rounds"] < 2 * n and stats["decode_tokens_per_sec"] > 0


def test_the_target_as_its_own_draft_accepts_everything(models):
    (gt, pt), _ = models
    spec = SpeculativeGenerator((gt, TARGET, CONTEXT), (gt, TARGET, CONTEXT), 4)
    out, stats = spec.generate(pt, pt, [[3, 1, 4, 1, 5]], 40)
    assert out[0] == Generator(gt, TARGET, CONTEXT).generate(pt, [[3, 1, 4, 1, 5]], 40)[0][0]
    assert stats["acceptance_rate"] == 1.0
    assert stats["tokens_per_round"] >= 3.5  # K+1 per round, fewer at context shifts


def test_acceptance_rule_greedy_and_limit():
    p = jnp.log(jnp.array([[.1, .9, 0, 0], [.8, .2, 0, 0], [.3, .3, .4, 0]]))
    q = jnp.zeros((2, 4))
    sp = Sampling()
    key = jax.random.key(0)
    out, a = accept_tokens(p, q, jnp.array([1, 0]), 2, key, sp, 4)
    assert int(a) == 2 and out.tolist() == [1, 0, 2]  # both accepted, then the bonus token
    out, a = accept_tokens(p, q, jnp.array([1, 1]), 2, key, sp, 4)
    assert int(a) == 1 and out.tolist()[:2] == [1, 0]  # rejected at 2: the target's argmax
    out, a = accept_tokens(p, q, jnp.array([1, 0]), 1, key, sp, 4)
    assert int(a) == 1 and out.tolist()[:2] == [1, 0]  # a context boundary after one token


TINY_T = model_config(3, num_layers=2, d_model=16, num_heads=2, num_kv_heads=2, head_dim=8,
                      d_ff=32, init_std=0.3, vocab_multiple=8)
TINY_D = model_config(3, num_layers=1, d_model=16, num_heads=2, num_kv_heads=1, head_dim=8,
                      d_ff=32, init_std=1.0, vocab_multiple=8)


def _sequence_probs(graphdef, params, prompt, length, sp, vocab):
    """Exact probability of every continuation of `length` tokens (full recomputation)."""
    seqs = np.array(list(itertools.product(range(vocab), repeat=length)))
    full = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1)
    logits = nnx.merge(graphdef, params)(jnp.asarray(full)).logits
    probs = np.ones(len(seqs))
    for j in range(length):
        p = jax.nn.softmax(filtered_logits(logits[:, len(prompt) - 1 + j], sp, vocab), -1)
        probs *= np.asarray(p)[np.arange(len(seqs)), seqs[:, j]]
    return probs


def _chi2_critical(dof: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty)."""
    h = 2.0 / (9.0 * dof)
    return dof * (1.0 - h + z * math.sqrt(h)) ** 3


def _chi2(counts, expected):
    big = expected >= 5  # pool the rare cells into one
    c = np.append(counts[big], counts[~big].sum())
    e = np.append(expected[big], expected[~big].sum())
    keep = e > 0
    return float(((c[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("sp", [pytest.param(Sampling(temperature=1.0), marks=pytest.mark.slow),
                                Sampling(temperature=0.7, top_k=2)],
                         ids=["t1", "t0.7_top2"])
def test_sampling_follows_the_target_distribution(sp):
    """Chi-square test of the joint distribution of 3 tokens over a vocabulary of 3
    (27 outcomes): the samples fit the target's distribution and not the draft's."""
    gt, pt = split_params(create_model(TINY_T, 0))
    gd, pd = split_params(create_model(TINY_D, 7))
    prompt, length, n = [0, 1], 3, 800
    target = _sequence_probs(gt, pt, prompt, length, sp, 3)
    draft = _sequence_probs(gd, pd, prompt, length, sp, 3)
    spec = SpeculativeGenerator((gt, TINY_T, 8), (gd, TINY_D, 8), 2)
    counts = np.zeros(3 ** length)
    accepted = []
    for seed in range(n):
        out, stats = spec.generate(pt, pd, [prompt], length, sp, seed=seed)
        counts[np.ravel_multi_index(out[0], (3,) * length)] += 1
        accepted.append(stats["acceptance_rate"])
    assert 0.2 < np.mean(accepted) < 0.98  # both accepting and rejecting are exercised
    stat, dof = _chi2(counts, n * target)
    assert stat < _chi2_critical(dof), (stat, dof)
    stat, dof = _chi2(counts, n * draft)
    assert stat > _chi2_critical(dof), "the test cannot tell the draft from the target"


def test_draft_with_another_vocabulary_is_an_error(models):
    (gt, _), _ = models
    other = dataclasses.replace(TARGET, vocab_size=70)
    with pytest.raises(ValueError, match="the draft model's vocabulary has 70 tokens, the "
                                         "target's 65"):
        SpeculativeGenerator((gt, TARGET, CONTEXT), (gt, other, CONTEXT), 4)


def test_draft_run_with_another_tokenizer_is_an_error(monkeypatch):
    from jaxlm.data.tokenizers import ByteTokenizer, CharTokenizer
    from jaxlm.evaluation import sampling

    def fake_run(tokenizer):
        return types.SimpleNamespace(data=types.SimpleNamespace(tokenizer=tokenizer),
                                     model_cfg=types.SimpleNamespace(vocab_size=tokenizer.vocab_size))

    monkeypatch.setattr(sampling, "restore_run",
                        lambda *a, **k: (fake_run(ByteTokenizer()), None, 0))
    target = fake_run(CharTokenizer(list("abc")))
    with pytest.raises(ConfigError, match=r"draft_workdir: the draft run /runs/bytes uses "
                                          r"another vocabulary \(byte, 256 tokens\) than the "
                                          r"target \(char, 3 tokens\)"):
        sampling.sample_speculative(target, None, "/runs/bytes", ["ab"], 5, Sampling())


def test_prompt_longer_than_the_targets_context_is_an_error(models):
    (gt, pt), (gd, pd) = models
    spec = SpeculativeGenerator((gt, TARGET, CONTEXT), (gd, DRAFT, 64), 2)
    with pytest.raises(ConfigError, match="prompt: a prompt of 17 tokens is longer than the "
                                          "model's context of 16"):
        spec.generate(pt, pd, [list(range(17))], 4)
