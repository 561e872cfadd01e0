"""benchmarks/device_check.sh: the report of its stages, and every stage on CPU (--cpu_smoke)."""

import functools
import json
import os
import subprocess
import sys

import pytest

from benchmarks.device_check_report import collect, main
from tests.helpers import ROOT


def _write_stages(out, rcs):
    out.mkdir(exist_ok=True)
    (out / "stages.tsv").write_text("".join(f"{name}\t{rc}\t5\t60\n" for name, rc in rcs))
    (out / "device.json").write_text(json.dumps({"backend": "gpu", "device_kind": "NVIDIA H200",
                                                 "count": 1, "jax": "0.10.2"}))
    (out / "train.jsonl").write_text(json.dumps(
        {"config": "125m", "num_params": 124_000_000, "batch_size": 16, "seq_len": 1024,
         "dtype": "bfloat16", "step_ms": 100.0, "tokens_per_sec": 163_840,
         "model_tflop_per_s_per_device": 400.0, "mfu": 0.404, "compile_s": 20.0}) + "\n")


def test_report_fails_loudly_and_keeps_partial_rows(tmp_path, capsys):
    _write_stages(tmp_path, [("device", 0), ("kernels", 1), ("attention", 0), ("train", 124)])
    report = collect(tmp_path)
    assert not report["ok"]
    statuses = {name: s["status"] for name, s in report["stages"].items()}
    assert statuses == {"device": "ok", "kernels": "failed (exit 1)", "attention": "ok",
                        "train": "timed out"}
    assert report["stages"]["train"]["rows"][0]["mfu"] == 0.404  # measured before the timeout
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "stage 'kernels' failed (exit 1)" in err and "stage 'train' timed out" in err
    md = (tmp_path / "device_check.md").read_text()
    assert "**FAILED**" in md and "| 125m | 124,000,000 | 16 x 1024 | bfloat16 |" in md
    assert "40.4%" in md
    assert json.loads((tmp_path / "device_check.json").read_text())["ok"] is False


def test_report_of_a_stage_that_did_not_run(tmp_path):
    _write_stages(tmp_path, [("device", 1)])
    report = collect(tmp_path)
    assert report["stages"]["train"]["status"] == "did not run" and not report["ok"]


def _run_check(*args, script="device_check.sh"):
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(ROOT / ".pytest_cache" / "xla"))
    return subprocess.run(["bash", str(ROOT / "benchmarks" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=480, env=env)


def _probe_wheel(folder):
    """A one-module wheel of a distribution that is not installed: `probe_bundle`."""
    import zipfile
    folder.mkdir()
    files = {"probe_bundle/__init__.py": "VALUE = 7\n",
             "probe_bundle-1.0.dist-info/METADATA":
                 "Metadata-Version: 2.1\nName: probe-bundle\nVersion: 1.0\n",
             "probe_bundle-1.0.dist-info/WHEEL":
                 "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files["probe_bundle-1.0.dist-info/RECORD"] = "".join(f"{name},,\n" for name in files) + \
        "probe_bundle-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(folder / "probe_bundle-1.0-py3-none-any.whl", "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


def test_without_an_accelerator_the_check_fails_at_once(tmp_path):
    result = _run_check(tmp_path)
    assert result.returncode == 1
    assert "error: no GPU or TPU" in result.stdout + result.stderr
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["stages"]["kernels"]["status"] == "did not run"


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage_from_a_bundle(tmp_path):
    """benchmarks/device_entry.sh: installs the bundle's wheels that are not installed
    (offline), prints the versions, then runs every stage of the check."""
    _probe_wheel(tmp_path / "bundle")
    result = _run_check(tmp_path / "bundle", tmp_path, "--cpu_smoke", script="device_entry.sh")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "installed 1 wheels" in result.stdout
    versions = json.loads((tmp_path / "versions.json").read_text())
    import jax
    assert versions["jax"] == jax.__version__ and "python" in versions
    assert versions["bundle"] == {"probe-bundle": "1.0"}
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["ok"] and report["device"]["cpu_smoke"]
    stages = report["stages"]
    assert all(s["status"] == "ok" for s in stages.values())
    assert len(stages["kernels"]["rows"]) == 3 and all(r["ok"] for r in stages["kernels"]["rows"])
    assert {r["impl"] for r in stages["attention"]["rows"]} == {"ours", "xla"}
    assert all(r["fwd_bwd_tflops"] > 0 for r in stages["attention"]["rows"])
    assert [r["config"] for r in stages["train"]["rows"]] == ["smoke_dense", "smoke_moe"]
    assert all(r["tokens_per_sec"] > 0 for r in stages["train"]["rows"])
    assert "all stages passed" in (tmp_path / "device_check.md").read_text()


# The device bundle (benchmarks/device_bundle.py): the offline GPU machine has PREINSTALLED,
# the bundle brings BUNDLE; together they must hold what the project imports.

def _python_files() -> list:
    folders = ("configs", "models", "parallel", "kernels", "data", "losses", "training",
               "evaluation", "inference", "sweeps", "checkpoints", "benchmarks")
    files = [p for f in folders for p in sorted((ROOT / f).rglob("*.py"))]
    return files + sorted(ROOT.glob("*.py"))


def _imports(path) -> list[tuple[str, bool]]:
    """(module, deferred) for every absolute import in the file (`from a import b` gives
    `a.b`); deferred: inside a function, so it runs only when that function does."""
    import ast
    tree = ast.parse(path.read_text())
    deferred_nodes = {id(n) for f in ast.walk(tree)
                      if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out += [(name, id(node) in deferred_nodes) for name in names]
    return out


def _third_party_imports(path) -> list[tuple[str, bool]]:
    """(top-level module, deferred) for every import of a third-party module in the file."""
    return [(name.split(".")[0], deferred) for name, deferred in _imports(path)
            if name.split(".")[0] not in sys.stdlib_module_names
            and name.split(".")[0] not in ("jaxlm", "benchmarks", "tests")]


@functools.cache
def _distributions() -> dict[str, list[str]]:
    from importlib.metadata import packages_distributions
    return packages_distributions()


def _distribution(module: str) -> str:
    """The distribution that installs `module` here (its own name where none does)."""
    from benchmarks.device_bundle import normalize
    return normalize((_distributions().get(module) or [module])[0])


def test_the_bundle_and_the_preinstalled_packages_hold_every_import_of_the_project():
    from benchmarks.device_bundle import BUNDLE, EXCLUDED, PREINSTALLED
    # The .[wandb] and .[eval] extras, imported only where a run logs to wandb or eval.py
    # scores generations or runs the harness. evaluation/harness.py is that feature as a
    # whole: it imports lm_eval at its top, and every import of it is deferred.
    optional = {"wandb", "lm-eval", "datasets", "sacrebleu", "rouge-score"}
    optional_modules = {"evaluation/harness.py": "jaxlm.evaluation.harness"}
    uncovered, eager_excluded = set(), set()
    for path in _python_files():
        eager = [m for m, deferred in _imports(path) if not deferred]
        for name in optional_modules.values():
            if name in eager:
                eager_excluded.add(f"{path.relative_to(ROOT)}: {name}")
        if str(path.relative_to(ROOT)) in optional_modules:
            continue
        for module, deferred in _third_party_imports(path):
            dist = _distribution(module)
            if dist in EXCLUDED or dist in optional:
                if not deferred:
                    eager_excluded.add(f"{path.relative_to(ROOT)}: {module}")
            elif dist not in BUNDLE | PREINSTALLED:
                uncovered.add(f"{path.relative_to(ROOT)}: {module} ({dist})")
    assert not uncovered, "in neither BUNDLE nor PREINSTALLED: " + ", ".join(sorted(uncovered))
    # Left out of the bundle, so imported only where the feature that needs it runs.
    assert not eager_excluded, ", ".join(sorted(eager_excluded))


def _requirement_closure(roots, stop=frozenset()) -> set[str]:
    """The installed distributions that `roots` need (their runtime requirements, with the
    extras they ask for), not looking past the distributions in `stop`."""
    import importlib.metadata

    from packaging.requirements import Requirement

    from benchmarks.device_bundle import normalize
    seen, done, todo = set(), set(), [(normalize(r), frozenset()) for r in roots]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in done:
            continue
        done.add((name, extras))
        seen.add(name)
        if name in stop:
            continue
        for req in map(Requirement, importlib.metadata.requires(name) or []):
            if req.marker is None or any(req.marker.evaluate({"extra": e})
                                         for e in ("", *extras)):
                todo.append((normalize(req.name), frozenset(req.extras)))
    return seen


def test_the_bundle_holds_every_requirement_the_machine_lacks():
    """What jaxlm needs (its requirements and theirs, as installed here), less what the
    GPU machine has and the deliberately excluded, is in BUNDLE, and BUNDLE holds nothing
    else."""
    from benchmarks.device_bundle import BUNDLE, EXCLUDED, PREINSTALLED
    needed = _requirement_closure(["jaxlm"], stop=PREINSTALLED | set(EXCLUDED)) - {"jaxlm"}
    assert needed - PREINSTALLED - set(EXCLUDED) == BUNDLE


def test_preinstalled_names_only_what_the_preinstalled_packages_bring():
    """Every distribution assumed on the GPU machine is one of its packages or a requirement
    of theirs (here, as installed), so the bundle leaves out nothing the machine lacks."""
    import importlib.util
    if not all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
        pytest.skip("the .[hf] extra (torch, transformers) is not installed")
    from benchmarks.device_bundle import GPU_ONLY, PREINSTALLED
    brought = _requirement_closure(["jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
                                    "torch", "transformers"])
    assert PREINSTALLED - GPU_ONLY <= brought, sorted(PREINSTALLED - GPU_ONLY - brought)
