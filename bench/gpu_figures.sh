#!/usr/bin/env bash
# Every GPU figure of issue 26 ("training that fits large models and large batches"), in one run.
# On one GPU (about 10 minutes on an H200):   bench/gpu_figures.sh
# The same steps on a CPU, small (a check that the script runs, not figures; open_clip_train needs
# a model name, not a config file):
#   DEVICE=cpu PRECISION=fp32 MODEL=tiny.json LARGE=tiny.json BATCH=16 LARGE_BATCH=16 BUDGET=1.3 \
#   STEPS=1 WARMUP=1 OC_MODEL=ViT-B-32 OC_BATCH=2 bench/gpu_figures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda} PRECISION=${PRECISION:-bf16} MODEL=${MODEL:-ViT-B-32} BATCH=${BATCH:-192}
STEPS=${STEPS:-10} WARMUP=${WARMUP:-3} LARGE=${LARGE:-ViT-L-14} LARGE_BATCH=${LARGE_BATCH:-48} BUDGET=${BUDGET:-24}
OC_MODEL=${OC_MODEL:-$MODEL} OC_BATCH=${OC_BATCH:-$BATCH}
common=(--device "$DEVICE" --precision "$PRECISION" --steps "$STEPS" --warmup "$WARMUP")

echo "== 1. EntityCLIP step vs --no-experts step, $MODEL, batch $BATCH (goals: <= 1.4x time, <= 1.3x peak memory)"
$PY bench/bench_train_step.py "${common[@]}" --model "$MODEL" --batch "$BATCH" \
    --variants plain,plain+expl,entityclip,entityclip+gc,entityclip+acc4

echo "== 2. $LARGE EntityCLIP: largest batch within $BUDGET GB (goal with --grad-checkpointing: >= 192)"
$PY bench/bench_train_step.py "${common[@]}" --model "$LARGE" --batch "$LARGE_BATCH" --memory-budget "$BUDGET" \
    --variants entityclip+gc,entityclip

echo "== 3. --no-experts samples/s vs open_clip_train, $OC_MODEL, batch $OC_BATCH (goal: >= 0.95x)"
$PY bench/bench_train_step.py "${common[@]}" --model "$OC_MODEL" --batch "$OC_BATCH" --variants open_clip_train,plain
