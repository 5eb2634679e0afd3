"""The stall watchdog on 2 processes without a launcher: a rank blocked inside a gloo collective
and a rank stuck in Python each dump their Python stacks and exit on their own."""

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.parallel.launch import free_port

WORKER = Path(__file__).with_name("stall_worker.py")
REPO = Path(__file__).resolve().parents[2]


def test_a_stalled_job_dumps_every_ranks_stack_and_exits():
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # rank 0's countdown ends first, so rank 1 is still alive (and stuck) when it fires
    procs = [subprocess.Popen([sys.executable, str(WORKER), minutes], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, minutes in ((0, "0.05"), (1, "0.1"))]
    start = time.monotonic()
    outs = [p.communicate(timeout=120) for p in procs]
    assert time.monotonic() - start < 60
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 1 and "Timeout (0:00:0" in err, err[-2000:]
    assert "in all_reduce" in outs[0][1]  # fired while the main thread sat in the collective
    assert f'File "{WORKER}", line' in outs[1][1]


def test_sigusr1_and_sigterm_request_a_preemption_with_the_grace_armed():
    import signal

    from qvl_train.parallel.watchdog import Preemption, Watchdog

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        watchdog = Watchdog(stall_minutes=0)
        p = Preemption(grace_s=60, watchdog=watchdog)
        p.install()
        try:
            os.kill(os.getpid(), sig)
            time.sleep(0.05)  # Python runs the handler between bytecodes
            assert p.signum == sig and watchdog.deadline_set
        finally:
            watchdog.stop()
            p.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers restored
