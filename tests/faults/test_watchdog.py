"""The stall watchdog on 3 processes without a launcher: a rank blocked inside a gloo collective,
a stopped rank (SIGSTOP) and a rank stuck in Python. The first names the other two from their
heartbeats (the stopped one by its stale heartbeat, with its step) and the collective it waits
in; each rank dumps its Python stacks and exits on its own."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.parallel.launch import free_port

WORKER = Path(__file__).with_name("stall_worker.py")
REPO = Path(__file__).resolve().parents[2]


def test_a_stalled_job_names_the_stopped_rank_and_the_collective_then_dumps_stacks_and_exits(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # rank 0's countdown (6 s: heartbeats every second) ends first, rank 2's later: both still stuck when it reports
    procs = [subprocess.Popen([sys.executable, str(WORKER), minutes, str(tmp_path)], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, minutes in ((0, "0.1"), (1, "0.1"), (2, "0.12"))]
    start = time.monotonic()
    try:
        out0 = procs[0].communicate(timeout=120)[1]
        procs[1].kill()  # a stopped process never ends on its own (torchrun SIGKILLs it after --shutdown-timeout)
        out2 = procs[2].communicate(timeout=120)[1]
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert time.monotonic() - start < 60
    for p, err in ((procs[0], out0), (procs[2], out2)):
        assert p.returncode == 1 and "Timeout (0:00:" in err, err[-2000:]
    outs = [out0, None, out2]
    report = outs[0][outs[0].index("[rank 0] STALLED"):outs[0].index("Timeout (0:00:")]
    assert "no training step finished for 6 s (train.stall_timeout_minutes=0.1) in step 3" in report, report
    assert re.search(r"behind: rank 1 \(.*pid \d+\): no heartbeat for \d+ s \(stopped", report), report
    assert "last seen in step 3" in report.split("behind: rank 1", 1)[1].split("\n")[0]
    assert "behind: rank 2" in report and "running but not in a collective: in tests/faults/stall_worker.py:" in report
    assert re.search(r"waiting: rank 0 in all_reduce \(torch/distributed/distributed_c10d.py:\d+\) in step 3", report), report
    assert "in all_reduce" in outs[0][outs[0].index("Timeout (0:00:"):]  # the stacks: fired inside the collective
    assert f'File "{WORKER}", line' in out2


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
