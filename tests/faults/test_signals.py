"""Exit paths on 2 ranks under torchrun, each worker's exit status read by its parent
(exit_code_wrapper.py), in one launch (divergence_worker.py): SIGUSR1 (Slurm's --signal) sent to
torchrun reaches every rank's preemption handling, and a preemption whose checkpoint write
outlasts the grace dumps every rank's stacks and exits 1; every rank skips the same non-finite
steps and stops at the same step (ZeRO-3, and ZeRO-1/2 in fp32); ZeRO-0, which applies
non-finite updates, stops at the first one. SIGTERM's clean path (checkpoint, exit 75 on every
worker) is test_ranks.py's. (docs/reliability.md has the table.)"""

import json
import signal
from pathlib import Path

import pytest

from qvl_train.checkpoint.state import tag_for
from qvl_train.parallel.watchdog import FAILED_EXIT_CODE

from .divergence_worker import GRACE_MARKER
from .launch import torchrun

pytestmark = pytest.mark.timeout(600)
SLURM_TORCHRUN = ("--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "90")  # launch/slurm_sft.sh


def test_sigusr1_grace_expiry_and_nonfinite_steps_on_two_ranks_under_zero_0_to_3(tmp_path):
    run = torchrun([f"output_dir={tmp_path}"], timeout=540, script=Path(__file__).with_name("divergence_worker.py"),
                   torchrun_args=SLURM_TORCHRUN, signal_at=(GRACE_MARKER, signal.SIGUSR1), exit_codes_dir=tmp_path / "exits")
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]

    # 3. SIGUSR1 through torchrun, then the grace: both ranks dumped their stacks inside the slow
    #    checkpoint write and exited 1 by themselves
    assert run.worker_exit_codes == [FAILED_EXIT_CODE] * 2, run.output[-3000:]
    assert run.output.count("Timeout (0:00:02)!") == 2 and "in slow_checkpoint_write" in run.output, run.output[-3000:]
    assert "still running" not in run.output

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
