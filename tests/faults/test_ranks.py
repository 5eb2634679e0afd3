"""Faults in 2-process torchrun runs of the demo recipe (docs/reliability.md has the table):
one rank's bad sample ends the job fast; preemption checkpoints, resumes with the same losses,
logs every step once and sums bad-sample counts over ranks; damaged checkpoints are skipped.
Four launches in all (CI time): fail fast; SIGTERM; resume; fallback past two damaged checkpoints."""

import json

import pytest

from qvl_train.checkpoint.state import tag_for
from qvl_train.parallel.watchdog import PREEMPTED_EXIT_CODE

from ..train.wandb_reader import history
from .launch import QUICK, data_with_bad_record_on_rank1, losses, rows, torchrun

pytestmark = pytest.mark.timeout(900)


def test_a_bad_sample_on_one_rank_ends_the_job_within_60_s_with_file_and_line_first(tmp_path):
    data, line = data_with_bad_record_on_rank1(tmp_path / "data")
    run = torchrun([*QUICK, "train.max_steps=4", f"data.datasets.0.path={data}", "data.on_bad_sample=error",
                    "logging.wandb.mode=disabled", "run_name=bad", f"output_dir={tmp_path}"],
                   timeout=300, markers=("FAILED",))
    assert run.returncode != 0
    assert run.seconds_after["FAILED"] < 60, run.seconds_after  # without the fix: the 10-minute collective timeout
    first = run.output.index("FAILED")
    assert run.output[first - 20:first].strip().endswith("[rank 1]")
    assert f"[bad_json] {data}:{line}" in run.output[first:first + 300]
    assert "Traceback" not in run.output[:first]  # the root cause comes first, nothing buries it
    assert "[rank 0] stopping because another rank failed first" in run.output


def test_preemption_checkpoint_resume_and_damaged_checkpoints(tmp_path):
    data, line = data_with_bad_record_on_rank1(tmp_path / "data")
    common = [*QUICK, "train.max_steps=6", f"data.datasets.0.path={data}", "data.on_bad_sample=skip",
              "checkpoint.save_every=2", "checkpoint.keep_last=5", "logging.wandb.mode=offline", "run_name=p",
              f"output_dir={tmp_path}"]
    run_dir, ckpts = tmp_path / "p", tmp_path / "p" / "checkpoints"

    # 1. SIGTERM to torchrun after step 3 (as Slurm sends it): every rank stops after the same step,
    #    the checkpoint of that step is complete, both workers exit with the documented code (their
    #    exit status as their parent sees it)
    pre = torchrun(common, timeout=300, env={"QVL_FAULT_SIGTERM_LAUNCHER_AT_STEP": "3"}, markers=("death signal",),
                   exit_codes_dir=tmp_path / "exits")
    assert pre.returncode != 0 and pre.worker_exit_codes == [PREEMPTED_EXIT_CODE] * 2, pre.output[-3000:]
    assert pre.seconds_after["death signal"] < 60  # checkpoint and exit within the grace
    stopped = int((run_dir / "PREEMPTED").read_text())
    assert 3 <= stopped < 6 and sorted(losses(run_dir)) == list(range(1, stopped + 1))
    assert (ckpts / tag_for(stopped) / "COMPLETE").exists() and (ckpts / tag_for(stopped) / "manifest.json").exists()
    # the bad record sits on rank 1: its skip is counted in the (rank 0) metrics
    assert rows(run_dir)[0]["data/skipped/bad_json"] == 1

    # 2. resume=auto continues from that checkpoint to the end
    res = torchrun(common, timeout=300)
    assert res.returncode == 0, res.output[-3000:]
    assert f"resumed from {ckpts / tag_for(stopped)} at step {stopped}" in res.output
    first = losses(run_dir)
    assert sorted(first) == list(range(1, 7))
    assert json.loads((run_dir / "summary.json").read_text())["data/skipped/bad_json"] == 1

    # 3. damage the two newest checkpoints: resume=auto names each bad file, skips it, resumes from
    #    step 2 and replays steps 3-6 with the same losses; each step stays in the logs once
    garbage, truncated = ckpts / tag_for(4) / "shard_1.safetensors", ckpts / tag_for(6) / "rank_1.pt"
    with open(garbage, "r+b") as f:  # 4 KiB of garbage inside, same size
        f.seek(garbage.stat().st_size // 2)
        f.write(b"\xff" * 4096)
    for ckpt in ckpts.glob("step_*"):  # 6, and the preemption's own if it is not 4
        if ckpt.name not in (tag_for(2), tag_for(4)):
            (ckpt / "rank_1.pt").write_bytes((ckpt / "rank_1.pt").read_bytes()[:100])
    again = torchrun(common, timeout=300)
    assert again.returncode == 0, again.output[-3000:]
    assert f"skipping damaged checkpoint {ckpts / tag_for(6)}: {truncated}: 100 bytes" in again.output
    assert f"skipping damaged checkpoint {ckpts / tag_for(4)}: {garbage}: checksum" in again.output
    assert f"resumed from {ckpts / tag_for(2)} at step 2" in again.output
    replayed = losses(run_dir)  # (asserts each step once)
    assert sorted(replayed) == list(range(1, 7))
    for step in range(1, 7):
        assert replayed[step] == pytest.approx(first[step], rel=1e-6, abs=1e-7), step

    # W&B (offline, one file per launch, same run id): each step's loss once over the three files
    seen: dict[int, int] = {}
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for step, h in history(f).items():
            if "train/loss" in h:
                seen[step] = seen.get(step, 0) + 1
    assert seen == dict.fromkeys(range(1, 7), 1), seen
