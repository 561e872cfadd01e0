"""Quantization: round-trip error bounds, the straight-through gradient, int4 packing, and
real integer weights against fake quantization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.configs.sections import Quant
from jaxlm.models.quant import (fake_quant, fake_quant_weight, int_range, pack_int4, qparams,
                                quantize_matrix, unpack_int4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor", "8"])
def test_round_trip_error_within_half_a_step(bits, symmetric, granularity):
    cfg = Quant(weight_bits=bits, granularity=granularity, symmetric=symmetric)
    w = jnp.asarray(np.random.default_rng(bits).standard_t(3, size=(32, 16)), jnp.float32)
    qt = quantize_matrix(w, cfg)
    deq = qt.dequantize()
    # The step for every element: its group's scale.
    g = qt.scale.shape[0]
    step = jnp.broadcast_to(qt.scale[:, None, :], (g, 32 // g, 16)).reshape(32, 16)
    err = jnp.abs(deq - w)
    assert bool(jnp.all(err <= step / 2 * (1 + 1e-5))), float(jnp.max(err / step))
    # The theoretical step: range / (levels - 1), per group (here per channel/tensor/group).
    lo, hi = int_range(bits, symmetric)
    wg = np.asarray(w).reshape(g, 32 // g, 16)
    axes = (1, 2) if granularity == "per_tensor" else (1,)
    if symmetric:
        expected = np.max(np.abs(wg), axis=axes) / hi
    else:
        expected = (np.maximum(wg.max(axes), 0) - np.minimum(wg.min(axes), 0)) / (hi - lo)
    np.testing.assert_allclose(np.asarray(qt.scale).reshape(expected.shape), expected,
                               rtol=1e-6)
    # Integer storage: int8, or two int4 per byte.
    assert qt.qvalue.dtype == (jnp.int8 if bits == 8 else jnp.uint8)
    assert qt.qvalue.shape == ((32, 16) if bits == 8 else (16, 16))
    # Fake quantization computes the same values.
    np.testing.assert_allclose(fake_quant_weight(w, cfg), deq, rtol=1e-6, atol=1e-7)


def test_int4_pack_round_trip():
    q = jnp.asarray(np.arange(-8, 8).repeat(2).reshape(16, 2), jnp.int8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(q)), q)


def test_straight_through_gradient_is_identity_inside_and_zero_outside_the_range():
    x = jnp.array([-3.0, -1.27, -0.5, 0.0, 0.3, 1.27, 1.5, 40.0])
    scale, zero = jnp.array(0.01), jnp.array(0.0)  # grid [-127, 127] * 0.01
    y, vjp = jax.vjp(lambda x: fake_quant(x, scale, zero, -127, 127), x)
    (g,) = vjp(jnp.ones_like(x))
    np.testing.assert_array_equal(g, [0, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_allclose(y, [-1.27, -1.27, -0.5, 0.0, 0.3, 1.27, 1.27, 1.27], atol=1e-6)
    # With a range from the data (weights, activations) nothing is clipped: identity.
    w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)), jnp.float32)
    s, z = qparams(w, (0,), 4, False)
    g = jax.grad(lambda w: jnp.sum(fake_quant(w, s, z, -8, 7) * 3.0))(w)
    np.testing.assert_array_equal(g, jnp.full_like(w, 3.0))


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """A tiny int8 QAT run (weights and activations), trained 3 steps on one device."""
    from jaxlm.configs.shakespeare_char import get_config
    from tests.helpers import run_steps
    c = get_config("tiny")
    c.steps, c.batch_size, c.eval_batch_size, c.eval_max_batches = 3, 8, 16, 2
    c.quant.weight_bits, c.quant.activation_bits = 8, 8
    _, _, exp, state = run_steps(c, tmp_path_factory.mktemp("qat"), jax.devices()[:1])
    return exp, state


def test_int8_qat_real_integer_weights_agree_with_fake_quant(qat_run):
    from jaxlm.training.evaluate import evaluate
    from jaxlm.evaluation.quantized import evaluate_quantized
    exp, state = qat_run
    fake = evaluate(exp, state.params)["eval_loss"]
    real = evaluate_quantized(exp, state.params, "int8")
    assert abs(real["eval_loss"] - fake) / fake < 1e-3, (real["eval_loss"], fake)
    # int8 weights + float32 scales (+ float norms) take about a quarter of float32.
    assert real["weight_bytes"] < 0.3 * real["float_weight_bytes"]
    int4 = evaluate_quantized(exp, state.params, "int4", granularity="16")
    assert int4["weight_bytes"] < real["weight_bytes"]


def test_qat_changes_the_forward_and_float_does_not(qat_run):
    """The QAT model's logits are those of its fake-quantized weights, not its floats."""
    import dataclasses
    from flax import nnx
    from jaxlm.models.model import abstract_model, split_params
    exp, state = qat_run
    tokens = jnp.zeros((1, 8), jnp.int32)
    q_logits = nnx.merge(exp.graphdef, state.params)(tokens).logits
    float_graphdef, _ = split_params(abstract_model(dataclasses.replace(exp.model_cfg,
                                                                        quant=None)))
    f_logits = nnx.merge(float_graphdef, state.params)(tokens).logits
    diff = float(jnp.max(jnp.abs(q_logits - f_logits)))
    assert 0 < diff < 0.05
