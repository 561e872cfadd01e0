"""The Pallas FlashAttention kernels compiled for this machine's accelerator, against the
softmax reference: output, log-sum-exp and the VJP (dq, dk, dv), over a reduced grid.

  python benchmarks/kernel_check.py                       # GPU or TPU: compiled kernels
  python benchmarks/kernel_check.py --cpu_smoke           # CPU: interpreted, tiny shapes
  python benchmarks/kernel_check.py --json_out=kernels.jsonl

The grid: causal and full attention x no window / a window of 300 x no segments / packed
documents x GQA ratios 1 and 4 x head_dim 64 and 128 (plus 40, zero-padded), bfloat16
and float32, at sequence length 1000 (not a multiple of any block), the kernels' default
block sizes. The CPU smoke run has length 40, window 11, and the tests' small blocks.
Tolerances are the tests' (tests/test_flash_attention.py): errors relative to the
largest reference magnitude, bfloat16 output 1e-2, log-sum-exp 1e-3, gradients 3e-2;
float32 output and log-sum-exp 2e-5, gradients 1e-4 on CPU, and on a GPU 2e-3 and 5e-3
(Triton's float32 dots run in TF32). One JSON line per case; exits 1 if any case fails
or raises, naming it.
"""

import functools
import itertools
import json
import sys
import time
import traceback

from absl import app, flags


_CPU_SMOKE = flags.DEFINE_bool("cpu_smoke", False, "Interpret the kernels on CPU, tiny grid.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append one JSON line per case here.")

TOL = {"bfloat16": dict(out=1e-2, lse=1e-3, grad=3e-2),
       "float32": dict(out=2e-5, lse=2e-5, grad=1e-4)}
TOL_TF32 = dict(out=2e-3, lse=2e-3, grad=5e-3)


def _inputs(b, t, h, g, d, dtype, segments):
    import jax
    import jax.numpy as jnp
    import numpy as np
    kq, kk, kv, ko, kl = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(kq, (b, t, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, t, g, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, t, g, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ko, (b, t, h, d), jnp.float32).astype(dtype)
    dlse = jax.random.normal(kl, (b, h, t), jnp.float32)
    seg = None
    if segments:  # three packed documents of uneven lengths
        ids = np.zeros((b, t), np.int32)
        for cut in (t // 5, t // 2):
            ids[:, cut:] += 1
        seg = jnp.asarray(ids)
    return q, k, v, seg, do, dlse


def _vjp(attention, q, k, v, seg, do, dlse, **kwargs):
    import jax

    def f(q, k, v):
        return attention(q, k, v, segment_ids=seg, return_lse=True, **kwargs)
    (o, lse), vjp = jax.vjp(f, q, k, v)
    return (o, lse, *vjp((do, dlse)))


def _rel_err(x, ref) -> float:
    import numpy as np
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    finite = np.isfinite(ref)
    if not np.array_equal(np.isfinite(x), finite):
        return float("inf")
    return float(np.max(np.abs(x[finite] - ref[finite])) / max(np.max(np.abs(ref[finite])),
                                                                1e-30))


def check_case(causal, window, segments, ratio, d, dtype, *, t, interpret, blocks) -> dict:
    import jax
    import jax.numpy as jnp
    from jaxlm.kernels.flash_attention import flash_attention
    from jaxlm.kernels.reference import reference_attention
    from jaxlm.parallel.compat import fast_cpu_compile_options
    h = 4 if interpret else 8
    b = 1 if interpret else 2
    q, k, v, seg, do, dlse = _inputs(b, t, h, h // ratio, d, jnp.dtype(dtype), segments)
    # Interpreted kernels compile ~3x faster this way on CPU (as in the tests).
    options = fast_cpu_compile_options() if interpret else None
    kernel = jax.jit(functools.partial(_vjp, flash_attention, causal=causal,
                                       window_size=window, interpret=interpret,
                                       block_sizes=blocks), compiler_options=options)
    ref = jax.jit(lambda q, k, v, seg, do, dlse: _vjp(
        reference_attention, q.astype(jnp.float32), k.astype(jnp.float32),
        v.astype(jnp.float32), seg, do.astype(jnp.float32), dlse, causal=causal,
        window_size=window), compiler_options=options)
    got = kernel(q, k, v, seg, do, dlse)
    want = ref(q, k, v, seg, do, dlse)
    tol = TOL[dtype] if interpret or dtype != "float32" else TOL_TF32
    limits = (tol["out"], tol["lse"], tol["grad"], tol["grad"], tol["grad"])
    errors = {name: _rel_err(x, r) for name, x, r in zip(("o", "lse", "dq", "dk", "dv"),
                                                         got, want)}
    ok = all(errors[n] <= lim for n, lim in zip(errors, limits))
    return {"errors": errors, "limits": dict(zip(errors, limits)), "ok": ok}


def grid(cpu_smoke: bool):
    if cpu_smoke:  # one case per mask feature, both dtypes, a padded head dim
        return [(True, None, False, 1, 64, "float32"), (False, 11, True, 4, 64, "bfloat16"),
                (True, 11, True, 2, 40, "float32")]
    full = itertools.product([True, False], [None, 300], [False, True], [1, 4], [64, 128],
                             ["bfloat16"])
    return list(full) + [(True, None, False, 1, 128, "float32"), (True, 300, True, 4, 64,
                                                                   "float32"),
                         (True, None, True, 2, 40, "bfloat16")]


def main(argv: list[str]) -> None:
    del argv
    import jax
    from jaxlm.kernels.flash_attention import BlockSizes
    smoke = _CPU_SMOKE.value
    platform = jax.default_backend()
    if not smoke and platform not in ("gpu", "tpu"):
        sys.exit(f"error: no GPU or TPU here (backend {platform!r}); use --cpu_smoke to run "
                 "the kernels interpreted on CPU")
    t = 40 if smoke else 1000
    blocks = BlockSizes(16, 32, 32, 16, 16, 16) if smoke else None
    failed = []
    print(f"# Kernel check on {platform} ({jax.devices()[0].device_kind}), seq {t}"
          + (", interpreted" if smoke else ", compiled"))
    for case in grid(smoke):
        causal, window, segments, ratio, d, dtype = case
        name = (f"{'causal' if causal else 'full'}-win{window or 0}-"
                f"{'seg' if segments else 'noseg'}-r{ratio}-d{d}-{dtype}")
        t0 = time.perf_counter()
        try:
            row = check_case(*case, t=t, interpret=smoke, blocks=blocks)
        except Exception as e:  # noqa: BLE001  (reported and counted as a failure)
            traceback.print_exc()
            row = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        row = {"case": name, "seconds": round(time.perf_counter() - t0, 2), **row}
        print(("ok    " if row["ok"] else "FAIL  ") + name + "  " + json.dumps(
            row.get("errors", row.get("error"))), flush=True)
        if not row["ok"]:
            failed.append(name)
        if _JSON_OUT.value:
            with open(_JSON_OUT.value, "a") as f:
                f.write(json.dumps(row) + "\n")
    if failed:
        sys.exit(f"error: {len(failed)} kernel case(s) failed: {', '.join(failed)}")
    print("all kernel cases match the reference")


if __name__ == "__main__":
    app.run(main)
