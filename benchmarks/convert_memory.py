"""Time and host memory of `convert.py` import and export for a GPT-2-small-sized model.

  python benchmarks/convert_memory.py [--dir=/tmp/convert_bench] [--layers=12]

Builds a random GPT-2 (124M parameters: 12 layers, d_model 768, vocabulary 50257) with
`transformers`, saves it with save_pretrained, then imports and exports it, each in a
fresh process, and reports wall time and peak resident memory (ru_maxrss). On CPU the
"device" arrays live in host memory too, so the report splits the peak into the
process's baseline (Python, JAX, the compiled code), what the devices hold at the end
(the parameters, plus the two AdamW moments of the step-0 checkpoint on import) and the
rest: the conversion's own working memory, to compare with the largest tensor group
(one parameter stacked over layers).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(out: Path, layers: int) -> None:
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=layers)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(out)
    print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))


def child(mode: str, directory: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import jax
    import numpy as np
    jax.config.update("jax_platforms", "cpu")
    jax.numpy.zeros(1).block_until_ready()
    from checkpoints.hf_export import export_hf
    from checkpoints.hf_import import import_hf
    from configs.base import get_base_config
    baseline = _rss_mb()
    t0 = time.perf_counter()
    if mode == "import":
        summary = import_hf(directory / "hf", directory / "run", get_base_config())
    else:
        summary = export_hf(directory / "run", directory / "out")
    seconds = time.perf_counter() - t0
    live = sum(x.nbytes for x in jax.live_arrays()) / 2**20
    print(json.dumps({"mode": mode, "seconds": round(seconds, 1), "baseline_mb": round(baseline),
                      "peak_mb": round(_peak_mb()), "device_arrays_mb": round(live),
                      "summary": {k: summary[k] for k in ("architecture", "step")}}))
    del np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/convert_bench")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--child", choices=["build", "import", "export"])
    args = ap.parse_args()
    directory = Path(args.dir)
    if args.child == "build":
        return build(directory / "hf", args.layers)
    if args.child:
        return child(args.child, directory)
    subprocess.run(["rm", "-rf", str(directory)], check=True)
    directory.mkdir(parents=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    results = {}
    for step in ("build", "import", "export"):
        out = subprocess.run([sys.executable, __file__, f"--dir={directory}", f"--child={step}",
                              f"--layers={args.layers}"], capture_output=True, text=True,
                             env=env, check=True)
        results[step] = json.loads(out.stdout.strip().splitlines()[-1])
    d, layers = 768, args.layers
    groups = {"embedding [50304, 768]": 50304 * d * 4, "mlp.up [layers, 768, 3072]":
              layers * d * 4 * d * 4}
    largest = max(groups.values()) / 2**20
    size = sum(f.stat().st_size for f in (directory / "hf").glob("*.safetensors")) / 2**20
    print(f"model: {results['build']['params']:,} parameters, {size:.0f} MiB of float32 "
          f"safetensors; largest tensor group {largest:.0f} MiB")
    for mode in ("import", "export"):
        r = results[mode]
        work = r["peak_mb"] - r["baseline_mb"] - r["device_arrays_mb"]
        print(f"{mode}: {r['seconds']} s, peak RSS {r['peak_mb']} MiB = baseline "
              f"{r['baseline_mb']} + device arrays {r['device_arrays_mb']} + working "
              f"{work} MiB ({work / largest:.2f}x the largest tensor group)")


if __name__ == "__main__":
    main()
