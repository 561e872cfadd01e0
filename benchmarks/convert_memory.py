"""Time and host memory of `convert.py` import and export for a GPT-2-small-sized model.

  python benchmarks/convert_memory.py [--dir=/tmp/convert_bench] [--layers=12]

Builds a random GPT-2 (124M parameters: 12 layers, d_model 768, vocabulary 50257) with
`transformers`, saves it with save_pretrained, then imports and exports it, each in a
fresh process, and reports wall time and peak resident memory (VmHWM). On CPU the
"device" arrays live in host memory too, so the conversion steps themselves are also
measured alone (the peak is reset before each): building the parameters from the
safetensors files (import) and writing the safetensors files from the parameters
(export). Their working memory is the step's peak minus the memory before it minus the
parameters now (import) or already (export) on the devices, to compare with the
largest tensor group (one parameter stacked over layers).
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
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measured(fn, record: dict):
    """`fn` with the peak memory of its call recorded (before, peak) in `record`."""
    def wrapper(*args, **kwargs):
        _reset_peak()
        record["before_mb"] = _rss_mb()
        out = fn(*args, **kwargs)
        record["peak_mb"] = _peak_mb()
        return out
    return wrapper


def build(out: Path, layers: int) -> None:
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=layers)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(out)
    print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))


def child(mode: str, directory: Path) -> None:
    import jax
    import numpy as np
    jax.config.update("jax_platforms", "cpu")
    jax.numpy.zeros(1).block_until_ready()
    from jaxlm.checkpoints import hf_export, hf_import
    from jaxlm.configs.imported import get_config
    baseline = _rss_mb()
    step: dict = {}
    t0 = time.perf_counter()
    if mode == "import":
        hf_import.place_params = _measured(hf_import.place_params, step)
        summary = hf_import.import_hf(directory / "hf", directory / "run", get_config())
    else:
        hf_export.write_sharded = _measured(hf_export.write_sharded, step)
        summary = hf_export.export_hf(directory / "run", directory / "out")
    seconds = time.perf_counter() - t0
    params_mb = summary["num_params"] * 4 / 2**20 if "num_params" in summary else \
        sum(f.stat().st_size for f in (directory / "out").glob("*.safetensors")) / 2**20
    print(json.dumps({"mode": mode, "seconds": round(seconds, 1), "baseline_mb": round(baseline),
                      "peak_mb": round(_peak_mb()), "params_mb": round(params_mb),
                      "step_before_mb": round(step["before_mb"]),
                      "step_peak_mb": round(step["peak_mb"])}))
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
    for mode, what in (("import", "building the parameters"),
                       ("export", "writing the safetensors files")):
        r = results[mode]
        added = r["params_mb"] if mode == "import" else 0
        work = r["step_peak_mb"] - r["step_before_mb"] - added
        print(f"{mode}: {r['seconds']} s in all, peak RSS {r['peak_mb']} MiB (baseline "
              f"{r['baseline_mb']}); {what}: peak {r['step_peak_mb']} MiB from "
              f"{r['step_before_mb']}, of which {added} MiB are the placed parameters and "
              f"{work} MiB working memory = {work / largest:.2f}x the largest tensor group")


if __name__ == "__main__":
    main()
