"""qvl_train/parallel/elastic.py: a preemption stop ends torchrun instead of a restart. One real
`torchrun --max-restarts 1` of a small gloo worker (no DeepSpeed): the signal reaches a worker,
not torchrun; the node's local rank 0 has torchrun end. The two-node case, with launch/sft.py,
is tests/faults/test_nodes.py."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qvl_train.parallel import elastic

from .launch import REPO

pytestmark = pytest.mark.timeout(300)


def test_a_stop_torchrun_was_not_signalled_for_ends_it_without_a_restart(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # torchrun's default --signals-to-handle lacks SIGUSR1: the worker falls back to SIGTERM
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", str(Path(__file__).with_name("elastic_worker.py"))]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert "attempt 1" not in out, out[-4000:]  # no restart
    assert proc.returncode != 0, out[-4000:]  # torchrun exits 1 when signalled, as on a signalled node
    assert "[worker] rank 0 attempt 0" in out and "[worker] rank 1 attempt 0" in out
    assert out.count("this node's torchrun (pid") == 1, out[-4000:]  # local rank 0 only
    assert "[rank 0] this node's torchrun (pid" in out and "sending it SIGTERM so that it ends" in out, out[-4000:]
    assert "Received 15 death signal, shutting down workers" in out
    assert "[worker] rank 0 received 1 signal(s); exiting 75" in out, out[-4000:]  # torchrun forwarded it back
    assert "did not forward" not in out


def test_signal_handlers_are_read_from_proc_and_nothing_is_signalled_outside_torchrun(monkeypatch):
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: None)
    try:
        assert elastic.catches(os.getpid(), signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert not elastic.catches(os.getpid(), signal.SIGUSR2)
    for key in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    assert elastic.restarts_left() == 0
    agent, why = elastic.torchrun_pid()  # pytest's session leader's parent is no torchrun
    assert agent is None and why
