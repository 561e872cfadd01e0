#!/usr/bin/env bash
# The device check on a machine without network access, from wheels brought along:
#
#   python benchmarks/device_bundle.py .device_bundle                   # here, with PyPI
#   bash benchmarks/device_entry.sh .device_bundle OUT_DIR              # on the GPU machine
#   bash benchmarks/device_entry.sh .device_bundle OUT_DIR --cpu_smoke  # the same, on CPU
#
# Installs the bundle's wheels whose distributions the interpreter lacks with
# `pip install --no-index --no-deps --target SITE` (SITE: a new temporary folder; a
# distribution already installed is kept, not shadowed), links this checkout into SITE as
# the `jaxlm` package, puts SITE on PYTHONPATH, prints the versions the check runs with
# (OUT_DIR/versions.json: the main packages, and under "bundle" what SITE holds), then
# runs benchmarks/device_check.sh OUT_DIR [--cpu_smoke] and exits with its status.
# Set PYTHON to choose the interpreter (default: python3).
set -euo pipefail

usage() {
  echo "usage: bash benchmarks/device_entry.sh BUNDLE_DIR OUT_DIR [--cpu_smoke]" >&2; exit 2
}
[[ $# -ge 2 && $# -le 3 ]] || usage
[[ $# -eq 2 || "$3" == "--cpu_smoke" ]] || usage
BUNDLE=$(cd "$1" && pwd) || usage
OUT=$(mkdir -p "$2" && cd "$2" && pwd) || usage
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHON=${PYTHON:-python3}
SITE=$(mktemp -d "${TMPDIR:-/tmp}/jaxlm_site.XXXXXX")
trap 'rm -rf "$SITE"' EXIT
start=$SECONDS

# The wheels whose distributions are not installed (file names are NAME-VERSION-...whl).
mapfile -t WANTED < <("$PYTHON" - "$BUNDLE" <<'EOF'
import importlib.metadata, pathlib, re, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = wheel.name.split("-")[0]
    try:
        importlib.metadata.distribution(re.sub(r"[-_.]+", "-", name))
    except importlib.metadata.PackageNotFoundError:
        print(wheel)
EOF
)
if (( ${#WANTED[@]} )); then
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
      --target "$SITE" "${WANTED[@]}"
fi
ln -s "$REPO" "$SITE/jaxlm"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
echo "== installed ${#WANTED[@]} wheels into $SITE in $((SECONDS - start)) s"

"$PYTHON" - "$OUT/versions.json" "$SITE" <<'EOF'
import importlib.metadata, json, pathlib, platform, sys
site = pathlib.Path(sys.argv[2]).resolve()
names = ["jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
         "jax-cuda13-pjrt", "flax", "optax", "orbax-checkpoint", "grain", "ml-collections",
         "pydantic", "numpy", "torch", "transformers"]
versions = {"python": platform.python_version()}
for name in names:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        continue
    where = pathlib.Path(dist.locate_file("")).resolve()
    versions[name] = dist.version + (" (bundle)" if where == site else "")
for name, version in versions.items():
    print(f"{name:20s} {version}")
versions["bundle"] = {dist.metadata["Name"]: dist.version
                      for dist in importlib.metadata.distributions(path=[str(site)])}
print("from the bundle:", ", ".join(f"{k} {v}" for k, v in sorted(versions["bundle"].items())))
json.dump(versions, open(sys.argv[1], "w"), indent=1)
import jaxlm.models.model  # noqa: F401  (the project imports with what is installed)
EOF

# device_check.sh writes its own report; its exit status is the check's.
bash "$REPO/benchmarks/device_check.sh" "$OUT" ${3:+"$3"}
