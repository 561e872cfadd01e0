"""Context parallelism: per-device memory, ring traffic and attention work vs the split.

  python benchmarks/context_parallel.py                         # 2k-16k tokens, context 1-8
  python benchmarks/context_parallel.py --lengths=4096 --contexts=1,4 --context_attention=allgather

For every sequence length and context size N it compiles (nothing runs) the train step of
a 4-layer model (d_model 256, 4 heads of 64, d_ff 1024, full remat, float32) on 8 fake CPU
devices as `mesh.context=N x mesh.data=8/N` with a global batch of 8/N sequences: every
device holds 1/N of one sequence. It prints per device: compiled temporary memory
(`memory_analysis()`, activations and workspace), its ratio to context 1, the
collective-permute traffic of a step (the ring's K/V and dK/dV blocks), the all-gather
traffic, and the causal attention work per device under the zig-zag order (min-max) next
to what a contiguous split would give (max / mean). One JSON line per case, then a table.
"""

import json
import os
import tempfile
import time

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_LENGTHS = flags.DEFINE_list("lengths", ["2048", "4096", "8192", "16384"], "Sequence lengths.")
_CONTEXTS = flags.DEFINE_list("contexts", ["1", "2", "4", "8"], "Context sizes (divide 8).")
_ATTENTION = flags.DEFINE_enum("context_attention", "ring", ["ring", "allgather"],
                               "Attention across the split.")
_IMPL = flags.DEFINE_enum("attention_impl", "xla", ["xla", "pallas_interpret"],
                          "Attention implementation (blocks of the ring).")
_LAYERS = flags.DEFINE_integer("num_layers", 4, "Layers.")


def _config(length: int, context: int):
    from jaxlm.configs.shakespeare_char import get_config
    c = get_config()
    c.name = f"context{context}_seq{length}"
    c.seq_len = length
    c.batch_size = c.eval_batch_size = 8 // context  # one sequence per data-parallel group
    c.mesh.data, c.mesh.context = 8 // context, context
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff = _LAYERS.value, 256, 4, 4, 1024
    m.attention_impl, m.context_attention = _IMPL.value, _ATTENTION.value
    return c


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def main(argv):
    del argv
    from jaxlm.parallel.distributed import initialize
    initialize(8)
    from jaxlm.training.planner import plan

    rows = []
    for length in map(int, _LENGTHS.value):
        base = None
        for context in map(int, _CONTEXTS.value):
            start = time.perf_counter()
            r = plan(_config(length, context), tempfile.mkdtemp())
            r["compile_seconds"] = time.perf_counter() - start
            print(json.dumps(r), flush=True)
            temp = r["per_device_bytes"]["temporaries"]
            base = temp if context == 1 else base
            rows.append((length, context, r, temp / base if base else None))

    print(f"\nPer device, 8 fake CPU devices (context x data = 8), one sequence per data "
          f"group; {_ATTENTION.value} attention, {_IMPL.value} blocks, "
          f"{_LAYERS.value} layers, d_model 256.\n")
    header = ["seq", "context", "temporaries MiB", "vs context 1", "collective-permute",
              "all-gather MiB", "attention GFLOP (zig-zag)", "contiguous max/mean"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for length, context, r, ratio in rows:
        coll = r["collectives_per_device"]
        ctx = r["context"]
        if ctx:
            zz, cont = ctx["attention_flops_per_device"], ctx["contiguous_attention_flops_per_device"]
            work = f"{min(zz) / 1e9:,.2f}-{max(zz) / 1e9:,.2f}"
            balance = f"{max(cont) / (sum(cont) / len(cont)):.2f}"
        else:  # one device holds the whole sequence: all its causal pairs
            pairs = length * (length + 1) // 2
            work = f"{pairs * 12 * _LAYERS.value * 4 * 64 / 1e9:,.2f}"
            balance = "-"
        cp = coll["collective-permute"]
        cells = [str(length), str(context), _mib(r["per_device_bytes"]["temporaries"]),
                 "-" if ratio is None else f"{ratio:.3f}",
                 f"{cp['count']} ops, {_mib(cp['bytes'])} MiB",
                 _mib(coll["all-gather"]["bytes"]), work, balance]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    app.run(main)
