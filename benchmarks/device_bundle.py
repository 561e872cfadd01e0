"""Download the wheels that a GPU machine without network access needs to run the device check.

    python benchmarks/device_bundle.py [DIR]        # here, with PyPI (DIR: .device_bundle)
    bash benchmarks/device_entry.sh DIR OUT_DIR     # there (see device_entry.sh)

The GPU machine has Python 3.12 with jax and its CUDA plugin, flax, optax, orbax-checkpoint,
torch and transformers preinstalled (PREINSTALLED: those and what they depend on), and no
network. This script resolves the project's other runtime dependencies (pyproject.toml's
`dependencies`, less PREINSTALLED and EXCLUDED, at constraints/jax-0.12.txt's versions)
with their dependencies for CPython 3.12 on manylinux x86_64, and keeps in DIR the wheels
of BUNDLE: pure-Python and manylinux wheels only, no GPU library, at most MAX_BYTES in
all. It fails when the resolution brings a distribution that is in neither BUNDLE nor
PREINSTALLED (then the lists below need a decision), or when the wheels outgrow MAX_BYTES.
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 60 * 2**20
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CONSTRAINTS = ROOT / "constraints" / "jax-0.12.txt"

# On the GPU machine: the named packages and the dependencies they install (those that
# jax 0.10 to 0.12, flax 0.12, optax 0.2, orbax-checkpoint 0.12, torch 2.13 and
# transformers 5 all have; tests/test_device_check.py checks each against the installed
# packages' metadata). GPU_ONLY are the CUDA plugin's.
GPU_ONLY = frozenset({"jax-cuda12-plugin", "jax-cuda12-pjrt"})
PREINSTALLED = GPU_ONLY | frozenset({
    "jax", "jaxlib", "ml-dtypes", "numpy", "opt-einsum", "scipy",
    "flax", "msgpack", "rich", "markdown-it-py", "mdurl", "pygments", "pyyaml", "tensorstore",
    "treescope", "typing-extensions",
    "optax", "absl-py",
    "orbax-checkpoint", "aiofiles", "etils", "fsspec", "humanize", "protobuf", "psutil",
    "simplejson", "zipp",
    "torch", "filelock", "jinja2", "markupsafe", "networkx", "sympy", "mpmath", "setuptools",
    "transformers", "huggingface-hub", "hf-xet", "packaging", "regex", "safetensors",
    "tokenizers", "tqdm", "typer", "click", "shellingham", "anyio", "idna", "h11",
})

# Runtime dependencies left out, each with what needs it: none of them is imported by
# the device check (tests/test_device_check.py checks that).
EXCLUDED = {
    "pyarrow": "Parquet input to `python -m jaxlm.data.prepare` (a 54 MiB wheel)",
}

# What the bundle holds, by distribution name (versions: the resolution's).
BUNDLE = frozenset({
    "grain", "array-record", "cloudpickle", "portpicker",
    "ml-collections",
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
    "tensorboardx",
    "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pillow", "pyparsing",
    "python-dateutil", "six",  # python-dateutil 2.9 (constraints/*.txt)
    "sentencepiece", "zstandard",
})


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them: 'ML_Collections' -> 'ml-collections'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group())


def wheel_name(path: Path) -> str:
    """The distribution of a wheel file: 'ml_collections-1.1.0-py3-none-any.whl' ->
    'ml-collections'."""
    return normalize(path.name.split("-")[0])


def project_requirements() -> list[str]:
    """pyproject.toml's runtime dependencies that the GPU machine lacks."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps
            if requirement_name(d) not in PREINSTALLED and requirement_name(d) not in EXCLUDED]


def download(out: Path, python=sys.executable) -> list[Path]:
    """Resolve and download into a staging folder, keep BUNDLE's wheels in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as staging:
        cmd = [python, "-m", "pip", "download", "--quiet", "--dest", staging,
               "--only-binary=:all:", "--implementation", "cp", "--python-version",
               PYTHON_VERSION, "--abi", "cp" + PYTHON_VERSION.replace(".", ""), "--abi",
               "abi3", "--abi", "none", "-c", str(CONSTRAINTS)]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        subprocess.run(cmd + project_requirements(), check=True)
        wheels = sorted(Path(staging).glob("*.whl"))
        names = {wheel_name(w) for w in wheels}
        unknown = sorted(names - BUNDLE - PREINSTALLED)
        if unknown:
            sys.exit(f"error: the resolution brings {unknown}, in neither BUNDLE nor "
                     "PREINSTALLED (benchmarks/device_bundle.py)")
        missing = sorted(BUNDLE - names)
        if missing:
            sys.exit(f"error: BUNDLE names {missing}, which the resolution does not bring")
        kept = []
        for w in wheels:
            if wheel_name(w) in BUNDLE:
                kept.append(Path(shutil.copy2(w, out / w.name)))
    total = sum(w.stat().st_size for w in kept)
    if total > MAX_BYTES:
        sys.exit(f"error: the bundle is {total / 2**20:.1f} MiB, over "
                 f"{MAX_BYTES / 2**20:.0f} MiB")
    return kept


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", default=str(ROOT / ".device_bundle"),
                        help="where the wheels go (default: .device_bundle)")
    args = parser.parse_args(argv)
    kept = download(Path(args.dir))
    for w in kept:
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    total = sum(w.stat().st_size for w in kept)
    print(f"{len(kept)} wheels, {total / 2**20:.1f} MiB in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
