#!/usr/bin/env bash
# The prepared GPU check (one GPU, at most 8 minutes in all; each step's timeout is capped by
# what is left of the budget):
#   1. the README's main job on the GPU: torchrun launch/sft.py +recipe=vqa under DeepSpeed
#      ZeRO-3, world 1, bf16, flex attention, fused AdamW (the trainer's choice on GPU), to the
#      end with its export; records the wall time, the exact match, the peak GPU memory (the
#      run's sys/peak_memory_gib) and whether the export was written (main_job.json);
#   2. bench/gpu_parity.py: CUDA / bf16 parity checks with tolerances against fp32 references,
#      and which attention kernel `auto` picks;
#   3. bench/bench_realwidth.py on CUDA in bf16: the 30B-A3B-width layer (+ head + loss) at
#      4k / 8k / 16k packed tokens, against the dense mask and transformers, with tokens/s and MFU.
# It also prints the device's total memory in GiB as torch reports it (the plan's device size).
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

BUDGET=${BUDGET:-470}  # seconds for the three steps (8 minutes less the machine info)
left() {  # seconds to give the next step: its cap, or what is left of the budget
    local rest=$(( BUDGET - ($(date +%s) - start) ))
    (( rest < $1 )) && echo $(( rest > 10 ? rest : 10 )) || echo "$1"
}

$PY -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}: {p.total_memory} B = {p.total_memory / 2**30:.2f} GiB total (torch)')" \
    2>&1 | tee -a "$OUT/machine.txt"

# 1. the main job, as the README runs it, on the GPU
RUNS=${RUNS:-/tmp/qvl_gpu_check_runs}  # checkpoints stay here; the run's small files go to $OUT
job_start=$(date +%s)
rm -rf "$RUNS/vqa_gpu"
timeout "$(left 200)" torchrun --standalone --nproc_per_node 1 launch/sft.py +recipe=vqa ${MAIN_JOB_OVERRIDES:-} \
    parallel.zero_stage=3 model.dtype=bfloat16 model.attn_impl=flex logging.wandb.mode=disabled \
    logging.progress_bar=false output_dir="$RUNS" run_name=vqa_gpu 2>&1 | tee "$OUT/main_job.txt"
job_rc=${PIPESTATUS[0]}
cp "$RUNS/vqa_gpu/metrics.jsonl" "$RUNS/vqa_gpu/summary.json" "$OUT/" 2>/dev/null
JOB_S=$(( $(date +%s) - job_start )) JOB_RC=$job_rc RUN="$RUNS/vqa_gpu" $PY - <<'PYEOF' 2>&1 | tee "$OUT/main_job.json"
import json, os
from pathlib import Path
run = Path(os.environ["RUN"])
summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").is_file() else []
peaks = [r["sys/peak_memory_gib"] for r in rows if "sys/peak_memory_gib" in r]
export = Path(summary.get("export_dir", run / "export"))
print(json.dumps({"rc": int(os.environ["JOB_RC"]), "wall_s": int(os.environ["JOB_S"]),
                  "steps": summary.get("step"), "exact_match": summary.get("eval/exact_match"),
                  "generated_samples": summary.get("eval/generated_samples"),
                  "peak_memory_gib": max(peaks) if peaks else None,
                  "export_written": (export / "config.json").is_file()}, indent=2))
PYEOF
job_ok=$($PY -c "import json; d = json.load(open('$OUT/main_job.json')); print(int(d['rc'] == 0 and d['exact_match'] is not None and d['export_written']))" 2>/dev/null)
[[ "$job_ok" == 1 ]] || status=1
echo "main job done at +$(( $(date +%s) - start )) s (status so far $status)"

# 2. parity
timeout "$(left 150)" $PY bench/gpu_parity.py --json "$OUT/gpu_parity.json" 2>&1 | tee "$OUT/gpu_parity.txt" || status=1
echo "gpu_parity done at +$(( $(date +%s) - start )) s (status so far $status)"

# 3. the real-width layer benchmark
timeout "$(left 120)" $PY bench/bench_realwidth.py --device cuda --dtype bfloat16 --warmup 1 --iters 3 \
    --attn-heads 32 --attn-kv-heads 4 --dense-max 16384 --json "$OUT/bench_realwidth.json" \
    2>&1 | tee "$OUT/bench_realwidth.txt" || status=1
echo "gpu_check done in $(( $(date +%s) - start )) s, status $status"
exit $status
