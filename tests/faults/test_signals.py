"""Exit paths checked on the processes themselves (their exit status as their parent sees it):
SIGUSR1 (Slurm's --signal) through torchrun ends a 2-rank run with a checkpoint and exit 75 on
every worker; a preemption whose checkpoint outlasts the grace dumps stacks and exits 1; on 2
ranks every rank skips the same non-finite steps and stops at the same step; ZeRO-0/2 in fp32,
which apply non-finite updates, stop at the first one. (docs/reliability.md has the table.)"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qvl_train.checkpoint.state import tag_for
from qvl_train.parallel.watchdog import FAILED_EXIT_CODE, PREEMPTED_EXIT_CODE
from tests.parallel.launch import free_port

from .launch import QUICK, REPO, losses, torchrun

pytestmark = pytest.mark.timeout(600)
SLURM_TORCHRUN = ("--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "90")  # launch/slurm_sft.sh


def test_sigusr1_through_torchrun_checkpoints_and_every_worker_exits_75(tmp_path):
    run = torchrun([*QUICK, "train.max_steps=40", "checkpoint.save_every=0", "logging.wandb.mode=disabled",
                    "run_name=u", f"output_dir={tmp_path}"], timeout=300, torchrun_args=SLURM_TORCHRUN,
                   signal_at=("step 2:", signal.SIGUSR1), exit_codes_dir=tmp_path / "exits")
    assert run.worker_exit_codes == [PREEMPTED_EXIT_CODE] * 2, run.output[-3000:]
    stopped = int((tmp_path / "u" / "PREEMPTED").read_text())
    assert 2 <= stopped < 40 and sorted(losses(tmp_path / "u")) == list(range(1, stopped + 1))
    assert (tmp_path / "u" / "checkpoints" / tag_for(stopped) / "COMPLETE").exists()
    assert f"stopped by SIGUSR1 after step {stopped}" in run.output


def test_grace_expiry_and_nonfinite_steps_on_two_ranks_under_zero_0_to_3(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    worker = Path(__file__).with_name("divergence_worker.py")
    procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path)], cwd=REPO,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=540) for p in procs]
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]

    # 3. the grace: both ranks dumped their stacks inside the slow checkpoint write and exited 1
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == FAILED_EXIT_CODE and "Timeout (0:00:02)!" in err, err[-3000:]
        assert "in slow_checkpoint_write" in err and "still running" not in err, err[-3000:]

    # 1. ZeRO-3 (and ZeRO-1/2: DeepSpeed's ZeRO optimizer checks for overflow in fp32 too): the
    #    same non-finite steps skipped on both ranks, both stopped at the same step, no checkpoint
    #    from a non-finite step
    for stage in (3, 1, 2):
        a, b = ranks[0][f"zero{stage}"], ranks[1][f"zero{stage}"]
        assert a["error"] and a == b, (stage, a, b)
        assert a["nonfinite"] == a["skipped"] == 2 and f"2 non-finite steps in a row, the last at step {a['step']}" in a["error"]
        assert all(c < tag_for(a["step"] - 1) for c in a["checkpoints"]), (stage, a)

    # 2. ZeRO-0 in fp32 applies a non-finite update: stopped at the first one, on both ranks
    a, b = ranks[0]["zero0"], ranks[1]["zero0"]
    assert a["error"] and a == b and "this optimizer applied the update" in a["error"], (a, b)
    assert a["nonfinite"] == 1 and a["skipped"] == 0, a
    assert all(c < tag_for(a["step"]) for c in a["checkpoints"]), a
