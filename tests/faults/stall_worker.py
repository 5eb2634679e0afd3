"""One rank of the stall test (argv: stall minutes, run dir). Three ranks take two steps together,
then in step 3 rank 0 waits in a gloo all-reduce, rank 1 stops itself with SIGSTOP (a frozen
process: no Python runs) and rank 2 hangs in Python outside any collective. Each has the training
loop's watchdog and heartbeat armed."""

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from qvl_train.parallel.watchdog import Watchdog

dist.init_process_group("gloo")
watchdog = Watchdog.with_heartbeat(float(sys.argv[1]), sys.argv[2], rank=dist.get_rank(), world_size=dist.get_world_size())
for step in (1, 2):
    watchdog.beat(step)
    dist.all_reduce(torch.ones(1))
watchdog.beat(3)
if dist.get_rank() == 1:
    os.kill(os.getpid(), signal.SIGSTOP)  # the test sends SIGCONT once rank 0 is gone
elif dist.get_rank() == 2:
    time.sleep(600)
dist.all_reduce(torch.ones(1))  # rank 0 waits here for the other two
sys.exit(0)  # not reached: the watchdog ends every rank
