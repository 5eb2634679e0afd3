"""One rank of the stall test: rank 0 blocks in a gloo all-reduce that never completes, rank 1
hangs in Python; each has the training loop's watchdog armed (argv[1] minutes)."""

import sys
import time

import torch
import torch.distributed as dist

from qvl_train.parallel.watchdog import Watchdog

dist.init_process_group("gloo")
Watchdog(stall_minutes=float(sys.argv[1])).beat()
if dist.get_rank() == 0:
    dist.all_reduce(torch.ones(1))  # rank 1 never joins
else:
    time.sleep(600)
sys.exit(0)  # not reached: the watchdog ends both
