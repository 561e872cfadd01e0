"""Attention kernels: speed (GPU/TPU) and compiled temporary memory (any backend).

  python benchmarks/attention.py                      # everything this machine can run
  python benchmarks/attention.py --seqs=1024,4096 --head_dims=128 --causal=true
  python benchmarks/attention.py --tune               # also sweep our block sizes
  python benchmarks/attention.py --nospeed --mem_seqs=256,512,1024,2048,4096
  python benchmarks/attention.py --cpu_smoke --json_out=rows.jsonl   # the speed path on CPU

Speed (GPU or TPU only): forward and forward+backward time and TFLOP/s in bfloat16 for
  ours      kernels.flash_attention (Pallas: Triton on GPU, Mosaic on TPU)
  xla       models.attention.xla_attention (einsum + softmax, materialises [L, S])
  cudnn     jax.nn.dot_product_attention(implementation="cudnn")           (GPU)
  jax       JAX's bundled Pallas attention, as a peer: ops.gpu.attention.mha (GPU),
            ops.tpu.flash_attention (TPU)
over seq 512..16k, head_dim 64 and 128, causal and not. Batch x heads is chosen so that
every row moves the same number of tokens (batch = 16k / seq, heads = 2048 / head_dim),
as in the FlashAttention papers. FLOPs: forward 4*B*H*T*S*D (halved when causal);
forward+backward 3.5x that (the backward has 5 matmuls to the forward's 2).

Memory (any backend): `compiled.memory_analysis().temp_size_in_bytes` of the jitted
forward and forward+backward, ours vs xla, at growing sequence length: O(S) vs O(S^2).
On CPU "ours" is the kernel in Pallas interpret mode (what `pallas_interpret` runs).

`--cpu_smoke` runs the speed table on CPU at tiny sizes (ours interpreted, xla; seq 64,
head_dim 64) to check the script itself. `--json_out` appends one JSON line per speed
cell; `--strict` exits 1 when any implementation asked for fails or is unavailable.
"""

import functools
import sys
import time

from absl import app, flags


_SEQS = flags.DEFINE_list("seqs", ["512", "1024", "2048", "4096", "8192", "16384"],
                          "Sequence lengths for the speed table.")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head dims for the speed table.")
_CAUSAL = flags.DEFINE_list("causal", ["true", "false"], "Causal settings to run.")
_IMPLS = flags.DEFINE_list("impls", ["ours", "xla", "cudnn", "jax"], "Implementations.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "batch * seq for every speed row.")
_HIDDEN = flags.DEFINE_integer("hidden", 2048, "heads * head_dim for every speed row.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls; the median is reported.")
_SPEED = flags.DEFINE_boolean("speed", True, "Run the speed table (GPU/TPU only).")
_TUNE = flags.DEFINE_boolean("tune", False, "Sweep our block sizes per row (GPU/TPU).")
_MEM_SEQS = flags.DEFINE_list("mem_seqs", ["256", "512", "1024", "2048", "4096"],
                              "Sequence lengths for the memory table.")
_MEM_SHAPE = flags.DEFINE_list("mem_shape", ["1", "4", "64"],
                               "batch, heads, head_dim for the memory table.")
_MEMORY = flags.DEFINE_boolean("memory", True, "Run the memory table.")
_CPU_SMOKE = flags.DEFINE_boolean("cpu_smoke", False, "Speed table on CPU at tiny sizes "
                                  "(ours interpreted, xla); no memory table.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append one JSON line per speed cell.")
_STRICT = flags.DEFINE_boolean("strict", False, "Exit 1 if any implementation fails.")
FAILURES: list[str] = []


def attention_flops(b, h, t, d, causal: bool, backward: bool) -> float:
    fwd = 4.0 * b * h * t * t * d * (0.5 if causal else 1.0)
    return fwd * (3.5 if backward else 1.0)


def make_impls(platform: str):
    """name -> fn(q, k, v, causal) on [B, L, H, K] inputs (None where unavailable)."""
    import jax
    from jaxlm.kernels.flash_attention import flash_attention
    from jaxlm.models.attention import xla_attention

    interpret = platform not in ("gpu", "tpu")
    impls = {
        "ours": lambda q, k, v, causal, blocks=None: flash_attention(
            q, k, v, causal=causal, block_sizes=blocks, interpret=interpret),
        "xla": lambda q, k, v, causal: xla_attention(q, k, v, causal=causal),
        "cudnn": None,
        "jax": None,
    }
    if platform == "gpu":
        impls["cudnn"] = lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn")
        from jax.experimental.pallas.ops.gpu import attention as jax_gpu_attention
        impls["jax"] = lambda q, k, v, causal: jax_gpu_attention.mha(
            q, k, v, segment_ids=None, sm_scale=q.shape[-1] ** -0.5, causal=causal)
    elif platform == "tpu":
        from jax.experimental.pallas.ops.tpu import flash_attention as jax_tpu_attention

        def jax_tpu(q, k, v, causal):
            t = lambda x: x.swapaxes(1, 2)  # noqa: E731  [B, L, H, K] <-> [B, H, L, K]
            return t(jax_tpu_attention.flash_attention(
                t(q), t(k), t(v), causal=causal, sm_scale=q.shape[-1] ** -0.5))
        impls["jax"] = jax_tpu
    return impls


def _inputs(b, t, h, d, dtype):
    import jax
    ks = jax.random.split(jax.random.key(0), 4)
    return [jax.random.normal(kk, (b, t, h, d), dtype) for kk in ks]


def _fwd_and_fwdbwd(fn):
    import jax

    def fwd(q, k, v):
        return fn(q, k, v)

    def fwd_bwd(q, k, v, do):
        o, vjp = jax.vjp(fn, q, k, v)
        return vjp(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def _time(f, *args, repeats: int) -> float:
    """Median seconds per call, after one compile+warm-up call."""
    import jax
    import numpy as np
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def speed_table(platform: str) -> None:
    import jax.numpy as jnp
    from jaxlm.kernels.flash_attention import BlockSizes, DEFAULT_BLOCK_SIZES

    impls = make_impls(platform)
    print(f"\n## Speed on {platform}: bf16, MHA, batch*seq = {_TOKENS.value}, "
          f"heads*head_dim = {_HIDDEN.value}; median of {_REPEATS.value} calls")
    print("| impl | causal | head_dim | seq | fwd ms | fwd TFLOP/s | fwd+bwd ms | "
          "fwd+bwd TFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for causal in [c.lower() == "true" for c in _CAUSAL.value]:
        for d in map(int, _HEAD_DIMS.value):
            for t in map(int, _SEQS.value):
                b, h = max(1, _TOKENS.value // t), max(1, _HIDDEN.value // d)
                q, k, v, do = _inputs(b, t, h, d, jnp.bfloat16)
                for name in _IMPLS.value:
                    fn = impls.get(name)
                    if fn is None:
                        print(f"| {name} | {causal} | {d} | {t} | n/a on {platform} | | | |")
                        _record(dict(impl=name, causal=causal, head_dim=d, seq=t,
                                     error=f"not available on {platform}"))
                        continue
                    cells = _measure(functools.partial(fn, causal=causal), q, k, v, do,
                                     b, h, t, d, causal)
                    print(f"| {name} | {causal} | {d} | {t} | "
                          + " | ".join(cells.pop("text")) + " |", flush=True)
                    _record(dict(impl=name, causal=causal, head_dim=d, seq=t, batch=b,
                                 heads=h, **cells))
                if _TUNE.value:
                    default = DEFAULT_BLOCK_SIZES["triton" if platform == "gpu" else "mosaic"]
                    best = None
                    for bq in (64, 128, 256):
                        for bk in (32, 64, 128, 256):
                            for bb in (32, 64, 128):
                                blocks = BlockSizes(bq, bk, bb, bb, bb, bb)
                                fn = functools.partial(impls["ours"], causal=causal,
                                                       blocks=blocks)
                                try:
                                    f1, f2 = _fwd_and_fwdbwd(fn)
                                    ms = 1e3 * _time(f2, q, k, v, do, repeats=5)
                                except Exception:  # noqa: BLE001  (shape not supported)
                                    continue
                                if best is None or ms < best[0]:
                                    best = (ms, blocks)
                    if best:
                        print(f"| ours tuned {best[1]} (default {default}) | {causal} | {d} | "
                              f"{t} | | | {best[0]:.3f} | "
                              f"{attention_flops(b, h, t, d, causal, True) / best[0] / 1e9:.1f}"
                              " |", flush=True)


def _record(row: dict) -> None:
    """Append a speed cell to --json_out; remember failures for --strict."""
    import json
    if "error" in row:
        FAILURES.append(f"{row['impl']} causal={row['causal']} d={row['head_dim']} "
                        f"seq={row['seq']}: {row['error']}")
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "a") as f:
            f.write(json.dumps(row) + "\n")


def _measure(fn, q, k, v, do, b, h, t, d, causal) -> dict:
    """{fwd_ms, fwd_tflops, fwd_bwd_ms, fwd_bwd_tflops, text: table cells}, or an error."""
    f1, f2 = _fwd_and_fwdbwd(fn)
    out: dict = {"text": []}
    for f, args, backward in ((f1, (q, k, v), False), (f2, (q, k, v, do), True)):
        key = "fwd_bwd" if backward else "fwd"
        try:
            sec = _time(f, *args, repeats=_REPEATS.value)
            tflops = attention_flops(b, h, t, d, causal, backward) / sec / 1e12
            out.update({f"{key}_ms": 1e3 * sec, f"{key}_tflops": tflops})
            out["text"] += [f"{1e3 * sec:.3f}", f"{tflops:.1f}"]
        except Exception as e:  # noqa: BLE001  (OOM, unsupported shape, ...)
            out["error"] = f"{key}: {type(e).__name__}: {str(e)[:300]}"
            out["text"] += [type(e).__name__, ""]
    return out


def memory_table(platform: str) -> None:
    import jax
    import jax.numpy as jnp

    impls = make_impls(platform)
    b, h, d = map(int, _MEM_SHAPE.value)
    interpret = platform not in ("gpu", "tpu")
    dtype = jnp.float32 if interpret else jnp.bfloat16
    from jaxlm.kernels.flash_attention import flash_attention
    ours = functools.partial(flash_attention, interpret=interpret)
    print(f"\n## Compiled temporary memory on {platform} (memory_analysis().temp_size_in_bytes)"
          f": batch {b}, heads {h}, head_dim {d}, {jnp.dtype(dtype).name}, causal"
          + ("; ours = kernel in Pallas interpret mode" if interpret else ""))
    print("| seq | ours fwd MiB | xla fwd MiB | ours fwd+bwd MiB | xla fwd+bwd MiB |")
    print("| --- | --- | --- | --- | --- |")
    for t in map(int, _MEM_SEQS.value):
        q, k, v, do = (jax.ShapeDtypeStruct((b, t, h, d), dtype) for _ in range(4))
        cells = []
        for backward in (False, True):
            for fn in (lambda q, k, v: ours(q, k, v, causal=True),
                       lambda q, k, v: impls["xla"](q, k, v, causal=True)):
                f1, f2 = _fwd_and_fwdbwd(fn)
                f, args = (f2, (q, k, v, do)) if backward else (f1, (q, k, v))
                mem = f.lower(*args).compile().memory_analysis()
                cells.append(f"{mem.temp_size_in_bytes / 2**20:.2f}")
        print(f"| {t} | " + " | ".join(cells) + " |", flush=True)


def main(argv):
    del argv
    import jax
    platform = jax.default_backend()
    device = jax.devices()[0].device_kind
    print(f"# Attention benchmark: jax {jax.__version__}, {platform} ({device})")
    if _CPU_SMOKE.value:
        flags.FLAGS.seqs, flags.FLAGS.head_dims, flags.FLAGS.impls = ["64"], ["64"], \
            ["ours", "xla"]
        flags.FLAGS.tokens, flags.FLAGS.hidden, flags.FLAGS.repeats = 128, 128, 2
        speed_table(platform)
    elif platform in ("gpu", "tpu"):
        if _SPEED.value:
            speed_table(platform)
    else:
        print(f"No GPU or TPU here (backend {platform!r}): the Pallas kernels only run "
              "interpreted, so there is no speed table; running the memory part only.")
        FAILURES.append(f"no speed table on {platform} (no GPU or TPU; --cpu_smoke runs it "
                        "at tiny sizes)")
    if _MEMORY.value and not _CPU_SMOKE.value:
        memory_table(platform)
    if _STRICT.value and FAILURES:
        sys.exit("error: attention benchmark cells failed:\n  " + "\n  ".join(FAILURES))


if __name__ == "__main__":
    app.run(main)
