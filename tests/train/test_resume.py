"""Kill and resume: a run killed right after a checkpoint and restarted with resume=auto
continues with exactly the losses of an uninterrupted run (same data order, weights, optimizer
state and RNG).

Only the killed run needs a process of its own (it dies by os._exit, as under SIGKILL); the
uninterrupted run and the resume run in this process (one torchrun launch per case instead of
three, CI time), on one thread as the launched worker (OMP_NUM_THREADS=1), so the sums agree;
the uninterrupted run trains while the killed one runs (2 cores)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qvl_train.checkpoint.state import MARKER, resolve_resume, tag_for

REPO = Path(__file__).resolve().parents[2]
COMMON = [
    "+recipe=vqa", "train.max_steps=6", "train.log_every=1", "train.generate_eval=false",
    "train.eval_max_batches=1", "checkpoint.save_every=3", "checkpoint.export_at_end=false",
    "logging.progress_bar=false", "logging.wandb.mode=disabled", "data.num_workers=0",
]


def _start_killed(out: Path, name: str, *, extra: list[str], after: int) -> subprocess.Popen:
    """`torchrun launch/sft.py` that dies (os._exit, as under SIGKILL) right after step `after`."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "QVL_FAULT_AFTER_STEP": str(after)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # (this process's own group, from the runtime fixture, is not the child's)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(REPO / "launch/sft.py"), *COMMON, *extra, f"output_dir={out}", f"run_name={name}"]
    with open(out / f"{name}.log", "w") as log:  # a file, not a pipe: nobody reads it while it runs
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _in_process(runtime, out: Path, name: str, *, extra: list[str], capsys) -> str:
    """The same run in this process; returns what it printed."""
    from qvl_train.config import compose, to_config
    from qvl_train.train.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(to_config(compose([*COMMON, *extra, f"output_dir={out}", f"run_name={name}"])), runtime).fit()
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return captured.out + captured.err


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.parametrize("extra", [[], ["peft=lora", "optim.lr=1e-2"]], ids=["full", "lora"])
def test_kill_and_resume_reproduces_the_uninterrupted_losses(tmp_path, extra, runtime, capsys):
    killed = _start_killed(tmp_path, "resumed", extra=extra, after=3)  # dies right after step 3's checkpoint
    try:  # the uninterrupted run meanwhile, on the other core
        _in_process(runtime, tmp_path, "full", extra=extra, capsys=capsys)
        killed.wait(timeout=600)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert killed.returncode != 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert sorted(_losses(tmp_path / "resumed")) == [1, 2, 3]
    printed = _in_process(runtime, tmp_path, "resumed", extra=extra, capsys=capsys)
    assert f"resumed from {tmp_path / 'resumed' / 'checkpoints' / tag_for(3)} at step 3" in printed
    expected, got = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_resume_auto_ignores_a_checkpoint_whose_write_never_finished(tmp_path):
    done, torn = tmp_path / tag_for(3), tmp_path / tag_for(6)
    done.mkdir()
    (done / MARKER).write_text("3")
    torn.mkdir()  # a crash mid-write: files but no marker
    (torn / "rank_0.pt").write_bytes(b"partial")
    assert resolve_resume("auto", tmp_path) == done
    assert resolve_resume("none", tmp_path) is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(torn), tmp_path)
