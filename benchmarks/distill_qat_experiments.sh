#!/usr/bin/env bash
# The distillation and quantization experiments of the README, in sequence (~35-60 min on
# 2 shared CPU cores). Usage: bash benchmarks/distill_qat_experiments.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/issue6}"
PY="${PYTHON:-python}"
CFG="--config=configs/shakespeare_char.py"
QUIET="--config.eval_every=0 --config.checkpoint_every=0"
summary() { tail -n 1 "$1/metrics.jsonl"; }

# 1. Distillation. Teacher: 6 layers, d_model 192 (2.7M parameters), 2000 steps.
$PY train.py $CFG --workdir="$OUT/teacher" $QUIET --config.steps=2000 \
  --config.model.num_layers=6 --config.model.d_model=192 --config.model.num_heads=6 \
  --config.model.num_kv_heads=6 --config.model.d_ff=768
# Students: 2 layers, d_model 128, 2000 steps, from scratch and distilled (CE + KL).
STUDENT="--config.model.num_layers=2 --config.steps=2000 $QUIET"
$PY train.py $CFG --workdir="$OUT/student_scratch" $STUDENT
for kind in forward_kl reverse_kl; do
  $PY train.py $CFG --workdir="$OUT/student_$kind" $STUDENT \
    --config.loss.weights.distill=1.0 --config.loss.distill.kind=$kind \
    --config.loss.distill.teacher_workdir="$OUT/teacher"
done

# 2. Quantization of the default model (4 layers, d_model 128, 2000 steps).
$PY train.py $CFG --workdir="$OUT/float" $QUIET
for bits in 8 4; do
  $PY train.py $CFG --workdir="$OUT/qat_int$bits" $QUIET --config.quant.weight_bits=$bits
done
for run in float qat_int8 qat_int4; do
  for q in int8 int4; do $PY eval.py --workdir="$OUT/$run" --quantize=$q; done
done

echo "== final training records (eval_loss at the last step)"
for run in teacher student_scratch student_forward_kl student_reverse_kl float qat_int8 qat_int4; do
  echo "$run $(summary "$OUT/$run")"
done
