"""GPTQ: one matrix against a NumPy transcription of the paper's algorithm, a whole model
against round-to-nearest, and the refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.configs.sections import Quant
from jaxlm.models.gptq import GptqSettings, gptq_matrix
from jaxlm.models.quant import unpack_int4


def reference_gptq(w_OxI, h_IxI, bits, group, symmetric, damp, act_order, block=128):
    """Algorithm 1 of Frantar et al. (2022) in the paper's layout (W is [rows, columns] =
    [O, I]), with the reference code's grouping, asymmetric grid, dead inputs and
    act-order (static groups). Returns the integers [O, I]."""
    w = w_OxI.astype(np.float64).copy()
    h = h_IxI.astype(np.float64).copy()
    rows, cols = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    top = 2 ** (bits - 1) - 1
    qmin, qmax = (-top, top) if symmetric else (-top - 1, top)

    def find_params(x):  # per row of x [O, n]
        if symmetric:
            s = np.abs(x).max(axis=1) / qmax
            z = np.zeros_like(s)
        else:
            lo, hi = np.minimum(x.min(axis=1), 0), np.maximum(x.max(axis=1), 0)
            s = (hi - lo) / (qmax - qmin)
            s = np.where(s > 0, s, 1.0)
            z = qmin - np.round(lo / s)
        return np.where(s > 0, s, 1.0), z

    g = group if group > 0 else cols
    static = [find_params(w[:, k:k + g]) for k in range(0, cols, g)]
    scale, zero = static[0]
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * np.mean(np.diag(h)) * np.eye(cols)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: Hinv = U^T U
    q = np.zeros_like(w)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1 = w[:, i1:i2].copy(), np.zeros((rows, i2 - i1))
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group > 0:
                if act_order:
                    scale, zero = static[perm[col] // g]
                elif col % g == 0:  # from the group's columns as updated so far
                    scale, zero = find_params(w1[:, i:i + g])
            x = w1[:, i]
            qi = np.clip(np.round(x / scale + zero), qmin, qmax)
            q[:, col] = qi
            err = (x - (qi - zero) * scale) / hinv1[i, i]
            w1[:, i:] -= np.outer(err, hinv1[i, i:])
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q[:, np.argsort(perm)].astype(np.int64)


def _layer(i=64, o=24, n=256, seed=0):
    rng = np.random.default_rng(seed)
    # Correlated inputs with unequal scales, one input always zero (a dead column).
    x = rng.normal(size=(n, i)) @ rng.normal(size=(i, i)) * 0.3 + rng.normal(size=i)
    x[:, 5] = 0.0
    w = rng.normal(size=(i, o)) * 0.05
    return w.astype(np.float32), (2.0 * x.T @ x / n).astype(np.float32), x.astype(np.float32)


@pytest.mark.parametrize("bits,granularity,symmetric,act_order", [
    (4, "16", True, False), (4, "per_channel", False, True), (3, "32", False, False),
    (8, "16", True, True)])
def test_one_matrix_equals_the_papers_algorithm(bits, granularity, symmetric, act_order):
    w, h, _ = _layer()
    cfg = Quant(weight_bits=bits, granularity=granularity, symmetric=symmetric)
    qt = gptq_matrix(jnp.asarray(w), jnp.asarray(h), cfg, GptqSettings(0.01, act_order))
    q = np.asarray(unpack_int4(qt.qvalue) if bits <= 4 else qt.qvalue).astype(np.int64)
    ref = reference_gptq(w.T, h, bits, cfg.group_size, symmetric, 0.01, act_order, block=32)
    mismatch = np.mean(q != ref.T)
    assert mismatch == 0, f"{mismatch:.2%} of the integers differ"


def test_gptq_has_lower_output_error_than_rounding_to_nearest():
    from jaxlm.models.quant import quantize_matrix
    w, h, x = _layer(seed=1)
    cfg = Quant(weight_bits=4, granularity="16")
    gptq = np.asarray(gptq_matrix(jnp.asarray(w), jnp.asarray(h), cfg).dequantize())
    rtn = np.asarray(quantize_matrix(jnp.asarray(w), cfg).dequantize())
    err = lambda wq: float(np.mean((x @ (wq - w)) ** 2))  # noqa: E731
    assert err(gptq) < 0.7 * err(rtn), (err(gptq), err(rtn))


@pytest.fixture(scope="module")
def step0(tmp_path_factory):
    from jaxlm.configs.shakespeare_char import get_config
    from tests.helpers import step0_run
    c = get_config("tiny")
    return step0_run(c, tmp_path_factory.mktemp("gptq_run"), jax.devices()[:1])


@pytest.mark.parametrize("args,line", [
    (["--quant_granularity=24"], "error: quant.granularity: group size 24 does not divide the "
                                 "32 input features of embed"),
    (["--calibration_batches=5000"], "error: calibration_batches: 5000 batches of 8 x 32 "
                                     "tokens need 40000 windows"),
    (["--gptq_damp=0"], "error: gptq_damp: 0.0 is not in (0, 1)"),
])
def test_bad_gptq_input_is_one_line(step0, args, line):
    from tests.helpers import call_cli
    res = call_cli(["eval.py", f"--workdir={step0}", "--quantize=int4", "--quant_method=gptq",
                    *args])
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith(line), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.slow
def test_gptq_int4_beats_rounding_to_nearest_on_a_trained_run(tmp_path):
    """A 2-layer d_model 64 model trained 100 steps: GPTQ int4 in groups of 32 has a lower
    eval loss than RTN int4 in the same groups, in the same integer storage."""
    from jaxlm.configs.shakespeare_char import get_config
    from jaxlm.evaluation.quantized import evaluate_quantized
    from jaxlm.training.evaluate import evaluate
    from tests.helpers import run_steps
    c = get_config("tiny")
    c.steps, c.learning_rate, c.warmup_steps = 100, 3e-3, 10
    c.eval_batch_size, c.eval_max_batches = 64, 4
    c.model.d_model, c.model.d_ff = 64, 128
    _, _, exp, state = run_steps(c, tmp_path, jax.devices()[:1])
    float_loss = evaluate(exp, state.params)["eval_loss"]
    rtn = evaluate_quantized(exp, state.params, "int4", "32")
    gptq = evaluate_quantized(exp, state.params, "int4", "32", gptq=GptqSettings(),
                              calibration_count=8)
    assert float_loss < gptq["eval_loss"] < rtn["eval_loss"], (float_loss, gptq, rtn)
    assert gptq["weight_bytes"] == rtn["weight_bytes"]


def test_a_calibration_text_shorter_than_asked_is_one_line(step0, tmp_path):
    from tests.helpers import call_cli
    text = tmp_path / "short.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 20)
    res = call_cli(["eval.py", f"--workdir={step0}", "--quantize=int4", "--quant_method=gptq",
                    f"--data={text}", "--calibration_batches=4"])
    assert res.returncode == 1
    assert res.stderr.strip() == ("error: calibration_batches: 4 batches of 8 x 32 tokens need "
                                  "32 windows (1,024 tokens) of --data, which has 860; "
                                  "calibrate on fewer batches"), res.stderr



def test_block_hessians_of_a_batch_split_over_four_devices_equal_one_devices():
    """The Gram matrices of calibration inputs split over the batch axis are all-reduced:
    every device gets those of the whole batch."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxlm.models.gptq import block_hessians
    from jaxlm.models.model import abstract_model, split_params
    from tests.helpers import model_config
    model = abstract_model(model_config(num_layers=1, d_model=32, num_heads=4, d_ff=64))
    rng = np.random.default_rng(1)
    unit = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape[1:]) * 0.1, jnp.float32),
                        split_params(model)[1]["blocks"])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 32)), jnp.float32)
    rows = {"positions": jnp.broadcast_to(jnp.arange(16), (8, 16))}
    run = jax.jit(lambda p, x, r: block_hessians(model.blocks_graphdef, p, x, r)[1])
    one = run(unit, x, rows)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    split = NamedSharding(mesh, P("data"))
    four = run(jax.device_put(unit, NamedSharding(mesh, P())), jax.device_put(x, split),
               jax.device_put(rows, split))
    assert {("attn", "q"), ("attn", "o"), ("mlp", "down")} <= set(one)
    for path in one:
        assert four[path].sharding.is_fully_replicated
        np.testing.assert_allclose(four[path], one[path], rtol=1e-5, atol=1e-4)
