#!/usr/bin/env bash
# The prepared GPU check (one GPU, at most 8 minutes; torch + transformers only, no DeepSpeed):
#   1. bench/gpu_parity.py: CUDA / bf16 parity checks with tolerances against fp32 references,
#      and which attention kernel `auto` picks;
#   2. bench/bench_realwidth.py on CUDA in bf16: the 30B-A3B-width layer (+ head + loss) at
#      4k / 8k / 16k packed tokens, against the dense mask and transformers, with tokens/s and MFU.
# Everything it prints also goes to files under $OUT (default bench/out). Exit 1 if a step failed.
#
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/qvl_inductor}
PY=${PYTHON:-python3}
status=0
start=$(date +%s)

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

timeout 270 $PY bench/gpu_parity.py --json "$OUT/gpu_parity.json" 2>&1 | tee "$OUT/gpu_parity.txt" || status=1
echo "gpu_parity done at +$(( $(date +%s) - start )) s (status so far $status)"

timeout 180 $PY bench/bench_realwidth.py --device cuda --dtype bfloat16 --warmup 1 --iters 3 \
    --attn-heads 32 --attn-kv-heads 4 --dense-max 16384 --json "$OUT/bench_realwidth.json" \
    2>&1 | tee "$OUT/bench_realwidth.txt" || status=1
echo "gpu_check done in $(( $(date +%s) - start )) s, status $status"
exit $status
