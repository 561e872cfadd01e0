"""NF4 with double quantization: the code book, the round trip, the bits it takes, the
errors for what it does not support, and its eval loss against int4 RTN."""

from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Quant
from jaxlm.models.quant import NF4_LEVELS, NF4_SCALE_BLOCK, quantize_matrix

NF4 = Quant(weight_bits=4, granularity="64", weight_format="nf4")
INT4 = Quant(weight_bits=4, granularity="64")

# The QLoRA paper's appendix E (Dettmers et al. 2023), as bitsandbytes prints it.
PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
             0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def _normal_matrix(rows=1024, cols=256, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(rows, cols)), jnp.float32)


@jax.jit
def _nf4_round_trip(w):
    """(the NF4 tensor, its dequantized matrix and absmax, int4 RTN's dequantized matrix)."""
    nf = quantize_matrix(w, NF4)
    return nf, nf.dequantize(), nf.absmax(), quantize_matrix(w, INT4).dequantize()


@pytest.fixture(scope="module")
def normal_round_trip():
    w = _normal_matrix()
    return w, *_nf4_round_trip(w)


def test_code_book_is_the_published_table_and_the_papers_construction():
    assert list(NF4_LEVELS) == PUBLISHED
    # QLoRA: quantiles of N(0, 1) at 8 equal steps from 0.9677083 to 1/2 for the positive
    # side, 7 for the negative, plus 0, scaled by the largest.
    quantile, top = NormalDist().inv_cdf, 0.9677083
    pos = [quantile(p) for p in np.linspace(top, 0.5, 9)[:-1]]
    neg = [-quantile(p) for p in np.linspace(top, 0.5, 8)[:-1]]
    levels = np.sort(pos + [0.0] + neg) / max(pos)
    np.testing.assert_allclose(NF4_LEVELS, levels, rtol=0, atol=2e-7)


def test_round_trip_is_the_nearest_level_and_beats_int4_rtn(normal_round_trip):
    w, nf, deq, absmax, int4 = normal_round_trip
    w, deq, absmax, int4 = map(np.asarray, (w, deq, absmax, int4))
    assert absmax.shape == (16, 256)
    # Every value is the level nearest to w / (its block's true absmax), times the block's
    # dequantized absmax.
    wb = np.asarray(w).reshape(16, 64, 256)
    x = wb / np.abs(wb).max(axis=1, keepdims=True)
    nearest = np.asarray(PUBLISHED, np.float32)[np.abs(x[..., None] - PUBLISHED).argmin(-1)]
    np.testing.assert_allclose(deq, (nearest * absmax[:, None]).reshape(w.shape), rtol=1e-6)
    # The double-quantized absmax is within half a step of the true one.
    true = np.abs(wb).max(axis=1).reshape(-1)
    steps = np.repeat(np.asarray(nf.scale_scale), NF4_SCALE_BLOCK)
    assert np.all(np.abs(absmax.reshape(-1) - true) <= steps / 2 * (1 + 1e-5))
    nf_err, int4_err = np.mean((deq - w) ** 2), np.mean((int4 - w) ** 2)
    assert nf_err < 0.8 * int4_err, (nf_err, int4_err)


def test_double_quantization_takes_4_127_bits_per_parameter(normal_round_trip):
    from jaxlm.evaluation.quantized import bits_per_parameter
    from jaxlm.models.quant import tree_bytes
    n, nf = 1024 * 256, normal_round_trip[1]
    # Nibbles, an int8 absmax per 64 values, a float32 scale per 256 of those, one offset.
    assert tree_bytes(nf) == n // 2 + n // 64 + 4 * n // (64 * 256) + 4
    assert bits_per_parameter({"w": nf}) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256),
                                                          abs=32 / n)
    int4 = jax.eval_shape(lambda w: quantize_matrix(w, INT4), normal_round_trip[0])
    assert bits_per_parameter({"w": int4}) == 4.5  # 4 bits and a float32 scale per 64


def test_stacked_layers_are_quantized_one_by_one():
    w = _normal_matrix(128, 64)

    @jax.jit
    def run(w):
        both = jax.vmap(lambda m: quantize_matrix(m, NF4))(jnp.stack([w, 3 * w]))
        return both, both.dequantize()[1], quantize_matrix(w, NF4).dequantize()
    both, second, one = run(w)
    assert both.scale_offset.shape == (2,)
    np.testing.assert_allclose(second, 3 * one, rtol=1e-5)


@pytest.mark.parametrize("values,line", [
    ({"weight_bits": 4, "activation_bits": 8}, "quant.activation_bits: nf4 stores weights "
                                               "only"),
    ({"weight_bits": 8}, "quant.weight_bits: nf4 is a 4-bit format (got 8)"),
    ({"weight_bits": 4, "symmetric": False}, "quant.symmetric: nf4 scales each block by its "
                                             "absmax"),
])
def test_unsupported_nf4_settings_are_one_line(values, line):
    with pytest.raises(ConfigError) as e:
        Quant.parse({**values, "weight_format": "nf4"})
    assert str(e.value).startswith(line), str(e.value)


def test_nf4_with_gptq_or_quantization_aware_training_is_one_line(tmp_path):
    from tests.helpers import call_cli
    res = call_cli(["eval.py", f"--workdir={tmp_path}", "--quantize=nf4",
                    "--quant_method=gptq"])
    assert res.returncode == 1
    assert res.stderr.strip().startswith("error: quant_method: gptq gives integers"), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    from jaxlm.configs.sections import Config
    with pytest.raises(ConfigError, match="^quant.weight_format: nf4 is the stored format"):
        Config.from_dict({"quant": {"weight_bits": 4, "weight_format": "nf4"}})


def test_nf4_beats_int4_rtn_on_the_eval_loss_of_a_normally_initialised_model(tmp_path):
    """A random init (normal weights) of a 2-layer d_model 64 model, evaluated as eval.py
    --quantize does: NF4 in blocks of 64 is closer to the float loss than int4 RTN in
    groups of 64, in fewer bits."""
    from jaxlm.configs.shakespeare_char import get_config
    from jaxlm.evaluation.quantized import evaluate_quantized
    from jaxlm.training.evaluate import evaluate
    from jaxlm.training.experiment import Experiment
    c = get_config("tiny")
    c.eval_batch_size, c.eval_max_batches = 16, 2
    c.model.d_model, c.model.d_ff = 64, 128
    exp = Experiment.build(c, tmp_path, jax.devices()[:1])
    params = exp.init_state().params
    float_loss = evaluate(exp, params)["eval_loss"]
    nf4 = evaluate_quantized(exp, params, "nf4")
    int4 = evaluate_quantized(exp, params, "int4", "64")
    assert abs(nf4["eval_loss"] - float_loss) < abs(int4["eval_loss"] - float_loss), (
        float_loss, nf4["eval_loss"], int4["eval_loss"])
    assert nf4["granularity"] == "64" and nf4["bits_per_parameter"] < int4["bits_per_parameter"]
    assert nf4["weight_bytes"] < int4["weight_bytes"]


@pytest.mark.slow
def test_qlora_on_an_nf4_base_trains_with_the_base_bit_identical(tmp_path):
    """QLoRA with `quant.weight_format=nf4`: the frozen base is NF4 with double-quantized
    scales, training moves only the adapters, and merging gives a float run."""
    from jaxlm.checkpoints.lora_merge import merged_config
    from jaxlm.configs.shakespeare_char import get_config
    from jaxlm.models.quant import NF4Tensor
    from jaxlm.training import lora
    from jaxlm.training.experiment import Experiment
    from tests.helpers import train_source
    c = get_config("tiny")
    c.batch_size, c.steps, c.warmup_steps = 8, 8, 0
    c.schedule, c.learning_rate, c.min_learning_rate = "constant", 1e-2, 1e-2
    c.lora.rank = 4
    c.quant.weight_bits, c.quant.weight_format, c.quant.granularity = 4, "nf4", "32"
    exp = Experiment.build(c, tmp_path, jax.devices()[:1])
    state = exp.init_state()
    q = state.params["blocks"]["attn"]["q"]["kernel"]
    assert isinstance(q, NF4Tensor) and q.qvalue.dtype == np.uint8 and q.scale.dtype == np.int8
    assert isinstance(state.params["embed"]["embedding"], NF4Tensor)
    frozen0 = jax.device_get(lora.split_trainable(state.params)[1])
    batch = exp.to_global(train_source(exp)[0])
    losses = []
    for _ in range(8):
        state, metrics = exp.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    frozen1 = jax.device_get(lora.split_trainable(state.params)[1])
    assert jax.tree.structure(frozen0) == jax.tree.structure(frozen1)
    for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(frozen1)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert losses[-1] < losses[0] - 0.05, losses
    merged = merged_config(exp.config)
    assert merged.quant.weight_bits == 0 and merged.quant.weight_format == "int"
