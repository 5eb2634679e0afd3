#!/usr/bin/env bash
# Multi-node SFT under SLURM: one torchrun per node, c10d rendezvous on the first node.
#   sbatch --nodes=2 launch/slurm_sft.sh +recipe=235b_a22b_lora model.path=/models/Qwen3-VL-235B-A22B-Instruct
#
# Preemption (docs/reliability.md): 120 s before the time limit Slurm sends SIGUSR1 to the job
# steps; torchrun (told to handle SIGUSR1) forwards it to every worker; the workers finish the
# step together, write a checkpoint, write runs/<run>/PREEMPTED and exit with code 75. torchrun
# waits --shutdown-timeout for them, which must exceed checkpoint.preempt_grace_s (default 60).
# This script then requeues the job; the requeued job has the same run name, so resume=auto
# continues from that checkpoint. A preemption by the scheduler (SIGTERM) takes the same path.
# A node whose torchrun did not get the signal (it reached one node only) has it sent by its own
# local rank 0 after the checkpoint, so that MAX_RESTARTS never restarts a preempted job and no
# node waits out the rendezvous timeout (tests/faults/test_nodes.py).
#
# Automatic restart: when a worker dies (SIGKILL, OOM kill, a crashed process) torchrun stops the
# workers of every node and starts them again, up to MAX_RESTARTS times (default 3) within this
# allocation, with no person involved: they resume from the last complete checkpoint
# (checkpoint.resume=auto, the default) and metrics.jsonl keeps each step once (the rows of the
# steps after that checkpoint are dropped before they are replayed). A node that is gone for good
# does not come back this way: the job then fails, and a requeue gets a new allocation.
# Tested with two torchrun agents as two nodes: tests/faults/test_nodes.py.
#
# Shared by every node, at the same path: OUTPUT_DIR (checkpoints, metrics, heartbeats,
# PREEMPTED: rank 0 writes the markers, every rank writes its own checkpoint shards), the data
# (the data.datasets files and their images/videos) and the model dir (model.path, with its
# tokenizer), and this repository. A stalled job names the rank that stopped from the heartbeat
# files in OUTPUT_DIR/RUN_NAME/heartbeat (docs/reliability.md).
#
# Expert parallelism: torchrun numbers the ranks of a node contiguously, so an EP group stays
# inside one node whenever parallel.ep_size divides GPUS_PER_NODE (1, 2, 4 or 8 on 8-GPU nodes);
# a larger ep_size spans whole nodes, and the run prints a note about the inter-node all-to-all.
#SBATCH --job-name=qvl_sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
set -uo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
OUTPUT_DIR=${OUTPUT_DIR:-runs}
MAX_RESTARTS=${MAX_RESTARTS:-3}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# one run directory for every process of every node (rank 0 would otherwise pick a timestamp)
RUN_NAME=${RUN_NAME:-sft-$SLURM_JOB_ID}
rm -f "$OUTPUT_DIR/$RUN_NAME/PREEMPTED"
srun torchrun \
  --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" --max-restarts "$MAX_RESTARTS" \
  --rdzv_backend c10d --rdzv_endpoint "$head_node:29500" --rdzv_id "$SLURM_JOB_ID" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout 90 \
  launch/sft.py run_name="$RUN_NAME" output_dir="$OUTPUT_DIR" "$@"
status=$?
if [[ -f "$OUTPUT_DIR/$RUN_NAME/PREEMPTED" ]]; then
  echo "preempted after step $(cat "$OUTPUT_DIR/$RUN_NAME/PREEMPTED"): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit $status
