#!/usr/bin/env bash
# Multi-node SFT under SLURM: one torchrun per node, c10d rendezvous on the first node.
#   sbatch --nodes=2 launch/slurm_sft.sh +recipe=235b_a22b_lora model.path=/models/Qwen3-VL-235B-A22B-Instruct
#SBATCH --job-name=qvl_sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# one run directory for every process of every node (rank 0 would otherwise pick a timestamp)
RUN_NAME=${RUN_NAME:-sft-$SLURM_JOB_ID}
srun torchrun \
  --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$head_node:29500" --rdzv_id "$SLURM_JOB_ID" \
  launch/sft.py run_name="$RUN_NAME" "$@"
