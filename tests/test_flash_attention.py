"""The Pallas FlashAttention kernels against a plain softmax(QK^T)V reference, on CPU.

Both lowerings run interpreted: the Triton kernel in Pallas's HLO interpreter
(`interpret=True`), the Mosaic kernel in the TPU interpreter (`pltpu.InterpretParams`).
Each case checks the output, the log-sum-exp and the VJP (dq, dk, dv, with random
cotangents on both the output and the log-sum-exp) in one compiled program.

Tolerances are on the error relative to the largest reference magnitude:
  float32: output and log-sum-exp 2e-5, gradients 1e-4 (measured: <= 2e-6);
  bfloat16: output 1e-2, log-sum-exp 1e-3, gradients 3e-2 (kernel and reference get the
  same bf16 inputs; the kernel rounds P and dS to bf16 before its matmuls, as
  FlashAttention does, while the reference computes in float32).
Sequence length 40 is not a multiple of any block, so every case also covers padding.
"""

import contextlib
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm.models.attention
from jaxlm.configs.base import DEFAULT_RULES
from jaxlm.configs.errors import ConfigError
from jaxlm.kernels.flash_attention import BlockSizes, flash_attention, flash_attention_backward
from jaxlm.kernels.reference import (attention_block, attention_mask, block_grads,
                                     merge_blocks, reference_attention)
from jaxlm.models.attention import ATTENTION_IMPLS, xla_attention
from jaxlm.parallel.compat import fast_cpu_compile_options, gpu_lowering_target
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.sharding import use_rules
from tests.helpers import no_compilation, params_fast_only, run_steps

# XLA:CPU spends most of these tests compiling the interpreted kernels. LLVM optimisation
# level 0 and, where XLA has them, the classic fusion emitters compile them ~3x faster.
FAST_COMPILE = fast_cpu_compile_options()
TOL = {"float32": dict(out=2e-5, lse=2e-5, grad=1e-4),
       "bfloat16": dict(out=1e-2, lse=1e-3, grad=3e-2)}
# Unequal blocks across the three kernels exercise the block-range logic. The TPU
# interpreter pays per grid step, so its dQ blocks are larger.
BLOCKS = {
    "triton": BlockSizes(block_q=16, block_kv=32, block_q_dkv=32, block_kv_dkv=16,
                         block_q_dq=16, block_kv_dq=16),
    "mosaic": BlockSizes(block_q=16, block_kv=32, block_q_dkv=32, block_kv_dkv=16,
                         block_q_dq=32, block_kv_dq=32),
}
T = 40  # not a multiple of 16 or 32
WINDOW = 11  # not aligned to any block
EMPTY = 99  # a key segment id no query has


def _segments(b: int, t: int) -> jax.Array:
    """Packed documents of uneven lengths, different in every row."""
    bounds = [(7, 19), (15, 33)]
    ids = np.zeros((b, t), np.int32)
    for row in range(b):
        for cut in bounds[row % 2]:
            ids[row, cut:] += 1
    return jnp.asarray(ids)


def _inputs(b, t, h, g, d, dtype, seed=0):
    kq, kk, kv, ko, kl = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(kq, (b, t, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, t, g, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, t, g, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ko, (b, t, h, d), jnp.float32).astype(dtype)
    dlse = jax.random.normal(kl, (b, h, t), jnp.float32)
    return q, k, v, do, dlse


def _vjp_fn(attention, **kwargs):
    """(q, k, v, seg, kv_seg, do, dlse) -> (o, lse, dq, dk, dv)."""
    def run(q, k, v, seg, kv_seg, do, dlse):
        def f(q, k, v):
            return attention(q, k, v, segment_ids=seg, kv_segment_ids=kv_seg,
                             return_lse=True, **kwargs)
        (o, lse), vjp = jax.vjp(f, q, k, v)
        return (o, lse, *vjp((do, dlse)))
    return run


@functools.cache
def _kernel(backend, causal, window, blocks, scale):
    return jax.jit(_vjp_fn(flash_attention, backend=backend, interpret=True, causal=causal,
                           window_size=window, block_sizes=blocks, softmax_scale=scale),
                   compiler_options=FAST_COMPILE)


@functools.cache
def _reference(causal, window, scale):
    def run(q, k, v, seg, kv_seg, do, dlse):
        f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
        return _vjp_fn(reference_attention, causal=causal, window_size=window,
                       softmax_scale=scale)(*f32[:3], seg, kv_seg, f32[3], dlse)
    return jax.jit(run, compiler_options=FAST_COMPILE)


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(x), finite)  # no NaN; -inf lse rows agree
    np.testing.assert_array_equal(x[~finite], ref[~finite])
    x, ref = x[finite], ref[finite]
    return np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30)


def _check(backend, *, causal, window, segments, empty_rows=False, heads=4, groups=2,
           dtype="float32", b=2, t=T, d=64, blocks="test", scale=None):
    q, k, v, do, dlse = _inputs(b, t, heads, groups, d, jnp.dtype(dtype))
    seg = kv_seg = _segments(b, t) if segments else None
    if empty_rows:  # queries of segment 1 find no key of their segment
        kv_seg = jnp.where(seg == 1, EMPTY, seg)
    blocks = BLOCKS[backend] if blocks == "test" else blocks
    got = _kernel(backend, causal, window, blocks, scale)(q, k, v, seg, kv_seg, do, dlse)
    want = _reference(causal, window, scale)(q, k, v, seg, kv_seg, do, dlse)
    tol = TOL[dtype]
    for name, x, ref, limit in zip(("o", "lse", "dq", "dk", "dv"), got, want,
                                   (tol["out"], tol["lse"], tol["grad"], tol["grad"],
                                    tol["grad"])):
        assert x.dtype == (jnp.float32 if name == "lse" else jnp.dtype(dtype)), name
        err = _rel_err(x, ref)
        assert err <= limit, f"{name}: relative error {err:.2e} > {limit:.0e}"
    if empty_rows:  # fully masked rows: zeros (not NaN), lse -inf, no gradient
        o, lse, dq = (np.asarray(x, np.float32) for x in got[:3])
        rows = np.asarray(seg == 1)
        assert rows.any()
        assert np.all(o[rows] == 0.0) and np.all(dq[rows] == 0.0)
        assert np.all(np.swapaxes(lse, 1, 2)[rows] == -np.inf)


# The grid: every combination of backend x causal x window x segment ids x GQA ratio x
# dtype (96 cases, a few minutes on 2 cores) runs in the full suite. The fast tier keeps a
# cover of it: on the Triton kernel each mask feature with and without the others, on the
# slower-to-interpret Mosaic kernel a pairwise cover; each GQA ratio meets causal and full
# attention, bfloat16 meets every mask feature. Two cases have query rows that see no key.
def _case(backend, causal, window, segments, ratio, dtype, empty_rows=False, slow=False):
    name = "-".join([backend, "causal" if causal else "full", "win" if window else "nowin",
                     "seg" if segments else "noseg", f"r{ratio}", dtype]
                    + (["empty-rows"] if empty_rows else []))
    case = dict(causal=causal, window=WINDOW if window else None, segments=segments,
                empty_rows=empty_rows, groups=4 // ratio, dtype=dtype)
    return pytest.param(backend, case, id=name, marks=[pytest.mark.slow] if slow else [])


FAST_GRID = [
    ("triton", True, False, False, 1, "float32"),
    ("triton", True, True, True, 1, "bfloat16"),
    ("triton", False, False, True, 4, "float32", True),
    ("triton", False, True, False, 2, "float32"),
    ("mosaic", True, True, True, 2, "float32", True),
    ("mosaic", False, False, True, 4, "bfloat16"),
]
GRID = [_case(*c) for c in FAST_GRID] + [
    _case(*c, slow=True) for c in itertools.product(
        ["triton", "mosaic"], [True, False], [False, True], [False, True], [1, 2, 4],
        ["float32", "bfloat16"]) if c not in FAST_GRID]


@pytest.mark.parametrize("backend,case", GRID)
def test_kernel_matches_reference(backend, case):
    # The TPU interpreter pays per grid step: one batch row keeps its grid small.
    _check(backend, b=1 if backend == "mosaic" else 2, **case)


@pytest.mark.parametrize("backend,d", [("triton", 128), ("triton", 40), ("mosaic", 40)],
                         ids=["triton-d128", "triton-d40", "mosaic-d40"])
def test_head_dims_and_default_blocks(backend, d):
    """head_dim 128 as is, 40 zero-padded; the default blocks, shrunk to T=64."""
    _check(backend, causal=True, window=None, segments=False, t=64, b=1, d=d, blocks=None,
           scale=0.3 if d == 40 else None)


def _chunk_positions(b: int):
    """Query positions of two non-adjacent chunks (a zig-zag shard) and key positions of
    two other chunks, overlapping the queries': masks no block range can describe."""
    q_pos = np.concatenate([np.arange(8, 28), np.arange(60, 80)])
    kv_pos = np.concatenate([np.arange(0, 20), np.arange(50, 70)])
    return (jnp.asarray(np.broadcast_to(q_pos, (b, T)), jnp.int32),
            jnp.asarray(np.broadcast_to(kv_pos, (b, T)), jnp.int32))


@pytest.mark.parametrize("backend", ["triton", pytest.param("mosaic", marks=pytest.mark.slow)])
def test_positions_decide_the_causal_and_window_masks(backend):
    """With query and key position arrays the kernel equals the reference that masks by
    those positions (causal, window, segment ids): output, lse and gradients."""
    b = 1 if backend == "mosaic" else 2
    q, k, v, do, dlse = _inputs(b, T, 4, 2, 64, jnp.float32)
    q_pos, kv_pos = _chunk_positions(b)
    seg = _segments(b, T)
    kwargs = dict(causal=True, window_size=WINDOW, q_positions=q_pos, kv_positions=kv_pos)
    got = jax.jit(_vjp_fn(flash_attention, backend=backend, interpret=True,
                          block_sizes=BLOCKS[backend], **kwargs),
                  compiler_options=FAST_COMPILE)(q, k, v, seg, seg, do, dlse)
    want = _vjp_fn(reference_attention, **kwargs)(q, k, v, seg, seg, do, dlse)
    for name, x, ref in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        limit = TOL["float32"]["grad" if name.startswith("d") else "out"]
        assert _rel_err(x, ref) <= limit, name


@pytest.mark.parametrize("backend", params_fast_only(["triton", "mosaic"], fast={"triton"}))
def test_blocks_merged_by_lse_and_backward_from_the_whole_rows_lse(backend):
    """Ring attention's two rules, on the kernel: key blocks attended separately and merged
    by their log-sum-exp give the whole attention, and `flash_attention_backward` of each
    block, given the whole rows' lse and delta, gives gradients that add up to the whole
    attention's."""
    b = 1 if backend == "mosaic" else 2
    q, k, v, do, _ = _inputs(b, T, 4, 2, 64, jnp.float32)
    q_pos, kv_pos = _chunk_positions(b)
    seg = _segments(b, T)
    common = dict(causal=True, window_size=WINDOW, segment_ids=seg, q_positions=q_pos,
                  backend=backend, interpret=True, block_sizes=BLOCKS[backend])
    halves = (slice(0, T // 2), slice(T // 2, T))

    def run(q, k, v, do):
        def whole(q, k, v):
            return flash_attention(q, k, v, kv_segment_ids=seg, kv_positions=kv_pos,
                                   return_lse=True, **common)
        (o, lse), vjp = jax.vjp(whole, q, k, v)
        grads = vjp((do, jnp.zeros_like(lse)))
        parts = [flash_attention(q, k[:, h], v[:, h], kv_segment_ids=seg[:, h],
                                 kv_positions=kv_pos[:, h], return_lse=True, **common)
                 for h in halves]
        merged_lse = jnp.logaddexp(parts[0][1], parts[1][1])
        merged = sum(jnp.exp(l - merged_lse)[..., None].swapaxes(1, 2) * p for p, l in parts)
        delta = jnp.sum(o * do, axis=-1).swapaxes(1, 2)
        block_grads = [flash_attention_backward(q, k[:, h], v[:, h], do, lse, delta,
                                                kv_segment_ids=seg[:, h],
                                                kv_positions=kv_pos[:, h], **common)
                       for h in halves]
        return o, lse, grads, merged, merged_lse, block_grads

    o, lse, (dq, dk, dv), merged, merged_lse, ((dq0, dk0, dv0), (dq1, dk1, dv1)) = jax.jit(
        run, compiler_options=FAST_COMPILE)(q, k, v, do)
    np.testing.assert_allclose(merged, o, atol=2e-5)
    np.testing.assert_allclose(merged_lse, lse, atol=2e-5)
    np.testing.assert_allclose(dq0 + dq1, dq, atol=1e-4)
    np.testing.assert_allclose(jnp.concatenate([dk0, dk1], 1), dk, atol=1e-4)
    np.testing.assert_allclose(jnp.concatenate([dv0, dv1], 1), dv, atol=1e-4)


def test_attention_blocks_merged_by_lse_and_block_grads_from_the_whole_rows_lse():
    """The same two rules on the XLA block (`attention_block`, as the context-parallel
    loop calls it): merged halves give the whole attention, and `block_grads` of each half
    add up to autodiff of the whole."""
    q, k, v, do, _ = _inputs(2, T, 4, 2, 16, jnp.float32)
    q_pos, kv_pos = _chunk_positions(2)
    seg = _segments(2, T)

    def block(h):
        def attend(q, k, v):
            mask = attention_mask(q_pos, kv_pos[:, h], causal=True, window=WINDOW,
                                  q_segment=seg, kv_segment=seg[:, h])
            return attention_block(q, k, v, mask)
        return attend

    whole = block(slice(None))
    (o, lse), vjp = jax.vjp(whole, q, k, v)
    dq, dk, dv = vjp((do, jnp.zeros_like(lse)))
    halves = (slice(0, T // 2), slice(T // 2, T))
    first, second = (block(h)(q, k[:, h], v[:, h]) for h in halves)
    assert np.isneginf(second[1]).any()  # rows that see none of these keys
    merged, merged_lse = merge_blocks(*first, *second)
    np.testing.assert_allclose(merged_lse, lse, atol=2e-5)
    np.testing.assert_allclose(merged, o, atol=2e-5)
    delta = jnp.sum(o * do, axis=-1).swapaxes(1, 2)
    (dq0, dk0, dv0), (dq1, dk1, dv1) = (
        block_grads(block(h), q, k[:, h], v[:, h], do, lse, delta) for h in halves)
    np.testing.assert_allclose(dq0 + dq1, dq, atol=1e-4)
    np.testing.assert_allclose(jnp.concatenate([dk0, dk1], 1), dk, atol=1e-4)
    np.testing.assert_allclose(jnp.concatenate([dv0, dv1], 1), dv, atol=1e-4)


def test_sharded_kernel_equals_one_device(monkeypatch):
    """On 8 devices (data 4 x tensor 2) the kernel runs per shard with equal results."""
    mesh = make_mesh(dict(data=4, tensor=2), jax.devices())
    b, t, h, g, d = 4, T, 4, 2, 16
    q, k, v, do, _ = _inputs(b, t, h, g, d, jnp.float32)
    seg = _segments(b, t)
    local_shapes = []

    def recording_kernel(q, k, v, **kwargs):
        local_shapes.append((q.shape, k.shape))
        return flash_attention(q, k, v, **kwargs)

    monkeypatch.setattr(jaxlm.models.attention, "flash_attention", recording_kernel)
    impl = ATTENTION_IMPLS["pallas_interpret"]

    def loss(q, k, v, sharded):
        if sharded:
            with use_rules(mesh, DEFAULT_RULES):
                o = impl(q, k, v, causal=True, segment_ids_BxL=seg)
        else:
            o = impl(q, k, v, causal=True, segment_ids_BxL=seg)
        return jnp.sum(o * do), o

    results = []
    for sharded in (False, True):
        fn = jax.jit(jax.value_and_grad(functools.partial(loss, sharded=sharded),
                                        argnums=(0, 1, 2), has_aux=True),
                     compiler_options=FAST_COMPILE)
        results.append(fn(q, k, v))
    # Traced twice: whole arrays, then per shard (batch / 4, heads / 2).
    assert local_shapes[0] == ((b, t, h, d), (b, t, g, d))
    assert local_shapes[1] == ((b // 4, t, h // 2, d), (b // 4, t, g // 2, d))
    (_, o1), g1 = results[0]
    (_, o8), g8 = results[1]
    np.testing.assert_allclose(o8, o1, rtol=1e-5, atol=1e-6)
    for a, c in zip(g8, g1):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o1, xla_attention(q, k, v, causal=True, segment_ids_BxL=seg),
                               atol=2e-5)


def _train_config(c, impl):
    # Same train-step program as tests/test_parallel.py's reference (shared XLA cache).
    c.batch_size, c.steps, c.grad_accum_steps = 16, 3, 1
    c.eval_batch_size = 16
    c.model.attention_impl = impl
    return c


@pytest.fixture(scope="module")
def xla_losses(tmp_path_factory):
    from jaxlm.configs.shakespeare_char import get_config
    c = _train_config(get_config("tiny"), "xla")
    c.mesh.data = 1
    losses, _, _, _ = run_steps(c, tmp_path_factory.mktemp("xla"), jax.devices()[:1])
    return losses


@pytest.mark.slow
def test_training_with_pallas_interpret_matches_xla(xla_losses, tiny_config, tmp_path):
    """The tiny model (2 scanned layers, GQA 4/2, full remat) on 8 devices, pipeline 2 x
    fsdp 2 x tensor 2, with the kernel trains to the losses of `xla` on one device."""
    c = _train_config(tiny_config, "pallas_interpret")
    c.mesh.data, c.mesh.pipeline, c.mesh.fsdp, c.mesh.tensor = 1, 2, 2, 2
    losses, _, _, _ = run_steps(c, tmp_path, jax.devices())
    np.testing.assert_allclose(losses, xla_losses, rtol=2e-5)


@pytest.mark.parametrize("impl,key,message", [
    ("pallas", "model.attention_impl", "'pallas' cannot run on cpu devices"),
    ("cudnn", "model.attention_impl", "'cudnn' runs in bfloat16 or float16 only"),
])
def test_unsupported_impl_is_rejected_before_compiling(impl, key, message, tiny_config,
                                                       tmp_path):
    from jaxlm.training.experiment import Experiment
    c = tiny_config
    c.model.attention_impl = impl
    with no_compilation() as compiled, pytest.raises(ConfigError) as err:
        Experiment.build(c, tmp_path, jax.devices()[:1])
    assert err.value.key == key
    assert message in str(err.value)
    assert compiled == []


def test_cudnn_without_gpu_is_rejected(tiny_config, tmp_path):
    from jaxlm.training.experiment import Experiment
    c = tiny_config
    c.model.attention_impl = "cudnn"
    c.model.dtype = "bfloat16"
    with no_compilation() as compiled, pytest.raises(ConfigError) as err:
        Experiment.build(c, tmp_path, jax.devices()[:1])
    assert "'cudnn' cannot run on cpu devices" in str(err.value)
    assert compiled == []


def test_direct_call_without_accelerator_says_so():
    q = jnp.zeros((1, 16, 2, 64))
    with pytest.raises(ValueError, match="no GPU or TPU"):
        flash_attention(q, q, q)


@pytest.mark.parametrize("positions", [False, True], ids=["index-masks", "position-masks"])
@pytest.mark.parametrize("backend,platform", [("triton", "cuda"), ("mosaic", "tpu")])
def test_kernels_lower_for_their_accelerator(backend, platform, positions):
    """Forward + backward lower through Pallas's Triton / Mosaic pipelines at the default
    blocks (bf16, head_dim 128, GQA, segment ids; masks from the indices or from position
    arrays). This checks the lowering rules and the TPU tiling constraints, not the device
    compilers (no GPU or TPU here)."""
    b, t, h, g, d = 2, 1024, 8, 2, 128
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, g, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def f(q, k, v, seg):
        pos = dict(q_positions=seg, kv_positions=seg) if positions else {}

        def loss(q, k, v):
            o = flash_attention(q, k, v, causal=True, segment_ids=seg, window_size=300,
                                backend=backend, **pos)
            return jnp.sum(o.astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    with gpu_lowering_target() if platform == "cuda" else contextlib.nullcontext():
        lowered = jax.jit(f).trace(q, kv, kv, seg).lower(lowering_platforms=(platform,))
    text = lowered.as_text()
    target = "__gpu$xla.gpu.triton" if backend == "triton" else "tpu_custom_call"
    assert text.count(f"@{target}") == 3  # forward, dK/dV, dQ
