#!/usr/bin/env bash
# One-command check of a machine with one NVIDIA GPU (H100/H200 class), in at most 8 minutes:
#
#   bash benchmarks/device_check.sh OUT_DIR               # on the GPU machine
#   bash benchmarks/device_check.sh OUT_DIR --cpu_smoke   # every stage, tiny, on CPU
#
# Stages, each under its own time budget (seconds), each writing its rows as it goes:
#   device     the devices JAX sees (device.json); no GPU or TPU is an error unless --cpu_smoke
#   kernels    benchmarks/kernel_check.py: the Pallas flash-attention kernels compiled for
#              the device (not interpreted) against the softmax reference, forward and
#              backward, over a reduced grid
#   attention  benchmarks/attention.py: forward and forward+backward TFLOP/s of ours, XLA
#              and cuDNN, bf16, head_dim 64/128, causal and not, seq 1k-16k
#   train      benchmarks/train_throughput.py: step time, tokens/s and MFU of
#              configs/device_check.py's 125m and 1b dense models and its moe model, bf16,
#              synthetic data
#   report     OUT_DIR/device_check.json and OUT_DIR/device_check.md
# A stage that fails or runs out of its budget is reported as such (its log is
# OUT_DIR/STAGE.log) and the script exits 1 after writing the report: nothing is skipped
# silently. Without a usable device the later stages do not run (reported as such). Set PYTHON to choose the interpreter (default: python).
set -uo pipefail

usage() { echo "usage: bash benchmarks/device_check.sh OUT_DIR [--cpu_smoke]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
OUT=$(mkdir -p "$1" && cd "$1" && pwd) || usage
SMOKE=0
if [[ $# -eq 2 ]]; then [[ "$2" == "--cpu_smoke" ]] || usage; SMOKE=1; fi
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
rm -f "$OUT"/stages.tsv "$OUT"/*.jsonl "$OUT"/device.json "$OUT"/device_check.json \
      "$OUT"/device_check.md "$OUT"/*.log

# Budgets add up to 460 s, leaving time for the interpreter starts within 8 minutes.
BUDGET_DEVICE=60 BUDGET_KERNELS=90 BUDGET_ATTENTION=140 BUDGET_TRAIN=150 BUDGET_REPORT=20
if (( SMOKE )); then
  export JAX_PLATFORMS=cpu
  KERNEL_FLAGS=(--cpu_smoke)
  ATTENTION_FLAGS=(--cpu_smoke --strict)
  TRAIN_CONFIGS=(smoke_dense smoke_moe)
  TRAIN_FLAGS=(--steps=2 --warmup=1 --repeats=1)
else
  KERNEL_FLAGS=()
  ATTENTION_FLAGS=(--seqs=1024,2048,4096,8192,16384 --head_dims=64,128 --impls=ours,xla,cudnn
                   --repeats=10 --nomemory --strict)
  TRAIN_CONFIGS=(125m 1b moe)
  TRAIN_FLAGS=(--steps=10 --warmup=3 --repeats=2 --config.model.attention_impl=cudnn)
fi

run_stage() {  # NAME BUDGET COMMAND...: run, log, and append "name rc seconds budget"
  local name=$1 budget=$2; shift 2
  local start=$SECONDS
  echo "== $name (budget ${budget} s)"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%d\t%d\t%d\n' "$name" "$rc" $((SECONDS - start)) "$budget" >> "$OUT/stages.tsv"
  if (( rc == 124 )); then echo "== $name: ran out of its ${budget} s budget" >&2
  elif (( rc != 0 )); then echo "== $name: FAILED (exit $rc)" >&2; fi
  return 0
}

device_stage() {
  timeout -k 10 "$BUDGET_DEVICE" "$PY" - "$OUT/device.json" "$SMOKE" <<'EOF'
import datetime, json, sys
import jax
devices = jax.devices()
info = {"backend": jax.default_backend(), "device_kind": devices[0].device_kind,
        "count": len(devices), "jax": jax.__version__,
        "date": datetime.date.today().isoformat(), "cpu_smoke": sys.argv[2] == "1"}
json.dump(info, open(sys.argv[1], "w"))
print(json.dumps(info))
if info["backend"] not in ("gpu", "tpu") and not info["cpu_smoke"]:
    sys.exit(f"error: no GPU or TPU (JAX backend {info['backend']!r}); install the "
             "accelerator extra (pip install -e '.[cuda12]') or pass --cpu_smoke")
EOF
}

train_stage() {  # every config in turn, within one budget; a failing config fails the stage
  local deadline=$((SECONDS + BUDGET_TRAIN)) rc=0 left spec
  for spec in "${TRAIN_CONFIGS[@]}"; do
    left=$((deadline - SECONDS))
    if (( left <= 0 )); then echo "error: no time left for $spec" >&2; return 124; fi
    timeout -k 10 "$left" "$PY" benchmarks/train_throughput.py \
        --config="configs/device_check.py:$spec" --synthetic --label="$spec" \
        --json_out="$OUT/train.jsonl" "${TRAIN_FLAGS[@]}"
    local r=$?
    if (( r == 124 )); then return 124; fi
    if (( r != 0 )); then echo "error: train config $spec failed (exit $r)" >&2; rc=$r; fi
  done
  return $rc
}

run_stage device "$BUDGET_DEVICE" device_stage
if [[ "$(tail -1 "$OUT/stages.tsv" | cut -f2)" != 0 ]]; then
  echo "== no usable device: the other stages did not run" >&2
  timeout -k 5 "$BUDGET_REPORT" "$PY" benchmarks/device_check_report.py "$OUT"
  exit 1
fi
run_stage kernels "$BUDGET_KERNELS" timeout -k 10 "$BUDGET_KERNELS" "$PY" \
    benchmarks/kernel_check.py --json_out="$OUT/kernels.jsonl" "${KERNEL_FLAGS[@]}"
run_stage attention "$BUDGET_ATTENTION" timeout -k 10 "$BUDGET_ATTENTION" "$PY" \
    benchmarks/attention.py --json_out="$OUT/attention.jsonl" "${ATTENTION_FLAGS[@]}"
run_stage train "$BUDGET_TRAIN" train_stage
timeout -k 5 "$BUDGET_REPORT" "$PY" benchmarks/device_check_report.py "$OUT"
