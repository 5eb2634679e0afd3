"""Kill and resume: a run killed right after a checkpoint and restarted with resume=auto
continues with exactly the losses of an uninterrupted run (same data order, weights, optimizer
state and RNG)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qvl_train.checkpoint.state import MARKER, resolve_resume, tag_for

REPO = Path(__file__).resolve().parents[2]
COMMON = [
    "+recipe=vqa", "train.max_steps=6", "train.log_every=1", "train.generate_eval=false",
    "train.eval_max_batches=1", "checkpoint.save_every=3", "checkpoint.export_at_end=false",
    "logging.progress_bar=false", "logging.wandb.mode=disabled", "data.num_workers=0",
]


def _run(out: Path, name: str, *, extra: list[str], fault_after: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("QVL_FAULT_AFTER_STEP", None)
    if fault_after is not None:
        env["QVL_FAULT_AFTER_STEP"] = str(fault_after)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(REPO / "launch/sft.py"), *COMMON, *extra, f"output_dir={out}", f"run_name={name}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.parametrize("extra", [[], ["peft=lora", "optim.lr=1e-2"]], ids=["full", "lora"])
def test_kill_and_resume_reproduces_the_uninterrupted_losses(tmp_path, extra):
    full = _run(tmp_path, "full", extra=extra)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _run(tmp_path, "resumed", extra=extra, fault_after=3)  # dies right after step 3's checkpoint
    assert killed.returncode != 0
    assert sorted(_losses(tmp_path / "resumed")) == [1, 2, 3]
    resumed = _run(tmp_path, "resumed", extra=extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
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
