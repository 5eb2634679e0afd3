"""torchrun worker of tests/parallel/test_elastic.py: SIGUSR1 reaches rank 1 only (a worker,
not torchrun) in attempt 0; the ranks agree to stop as the trainer does, and exit 75 like
launch/sft.py. Attempt 1 (a restart: what the test must not see) exits 0 at once."""

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from qvl_train.parallel.watchdog import PREEMPTED_EXIT_CODE, Preemption, Watchdog

rank, attempt = int(os.environ["RANK"]), os.environ["TORCHELASTIC_RESTART_COUNT"]
print(f"[worker] rank {rank} attempt {attempt}", flush=True)
if attempt != "0":
    os._exit(0)
dist.init_process_group("gloo")
preemption = Preemption(grace_s=60, watchdog=Watchdog(stall_minutes=0))
preemption.install()
if rank == 1:
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.1)  # the handler runs between bytecodes
signum = preemption.agreed(torch.device("cpu"))
assert signum == signal.SIGUSR1, signum
preemption.keep_torchrun_from_restarting()  # as Trainer._stop_for_preemption, after the checkpoint
preemption.uninstall()
print(f"[worker] rank {rank} received {preemption.signals_received} signal(s); exiting {PREEMPTED_EXIT_CODE}",
      file=sys.stderr, flush=True)
dist.barrier()
dist.destroy_process_group()
os._exit(PREEMPTED_EXIT_CODE)
