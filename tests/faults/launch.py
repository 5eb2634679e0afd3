"""2-process `torchrun launch/sft.py` runs of the demo recipe for the fault tests, and the data
they break: a copy of the demo set with one broken record that rank 1 reads in its first step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "data" / "vqa_demo"
QUICK = [
    "+recipe=vqa", "train.log_every=1", "train.generate_eval=false", "train.eval_max_batches=1",
    "checkpoint.export_at_end=false", "logging.progress_bar=false", "data.num_workers=0",
]


def data_with_bad_record_on_rank1(out: Path) -> tuple[Path, int]:
    """The demo train set with rank 1's first sample (2 ranks, epoch 0) replaced by broken JSON;
    returns (file, its 1-based line)."""
    from qvl_train.data.config import DatasetConfig
    from qvl_train.data.sources import Shard, build_mixture

    out.mkdir(parents=True, exist_ok=True)
    for media in ("images", "videos"):
        (out / media).symlink_to(DEMO / media)
    lines = (DEMO / "train.jsonl").read_text().splitlines()
    target = out / "train.jsonl"
    target.write_text("\n".join(lines) + "\n")
    mixture = build_mixture([DatasetConfig(path=str(target), name="vqa_demo")], seed=0, shuffle=True, keep="train")
    mixture.prepare()
    _, index = Shard(rank=1, world_size=2).take(mixture.epoch_order(0))[0]
    lines[int(index)] = '{"messages": [broken'
    target.write_text("\n".join(lines) + "\n")
    return target, int(index) + 1


@dataclass
class Launch:
    returncode: int
    output: str
    seconds: float
    seconds_after: dict[str, float]  # marker text -> seconds from its first appearance to the exit
    worker_exit_codes: list[int] | None = None  # per rank, as waitpid gave them (exit_codes_dir runs only)


def torchrun(args: list[str], *, timeout: float, env: dict | None = None, markers: tuple[str, ...] = (),
             torchrun_args: tuple[str, ...] = (), signal_at: tuple[str, int] | None = None,
             exit_codes_dir: Path | None = None, script: Path = REPO / "launch/sft.py") -> Launch:
    """Runs `torchrun --nproc_per_node 2 SCRIPT ARGS` (launch/sft.py), killing it after `timeout` s.
    signal_at (text, signum): send torchrun that signal once the text is in its output.
    exit_codes_dir: run each worker under exit_code_wrapper.py, which records its exit status."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    script = [str(script)]
    if exit_codes_dir is not None:
        exit_codes_dir.mkdir(parents=True, exist_ok=True)
        script = [str(Path(__file__).with_name("exit_code_wrapper.py")), str(exit_codes_dir), *script]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *torchrun_args,
           *script, *args]
    log_dir = args[-1].split("=", 1)[1] if args[-1].startswith("output_dir=") else "/tmp"
    log_path = Path(log_dir) / f"torchrun-{time.time_ns()}.log"
    seen: dict[str, float] = {}
    signalled = False
    start = time.monotonic()
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                if time.monotonic() - start > timeout:
                    os.killpg(proc.pid, 9)  # its own session: the workers go too
                    proc.wait()
                    raise AssertionError(f"torchrun still running after {timeout} s:\n{log_path.read_text()[-4000:]}")
                text = log_path.read_text()
                for m in markers:
                    if m not in seen and m in text:
                        seen[m] = time.monotonic()
                if signal_at and not signalled and signal_at[0] in text:
                    os.kill(proc.pid, signal_at[1])
                    signalled = True
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
    end = time.monotonic()
    text = log_path.read_text()
    for m in markers:
        if m not in seen and m in text:
            seen[m] = end
    codes = None
    if exit_codes_dir is not None:
        files = [exit_codes_dir / f"rank_{r}.exit" for r in range(2)]
        codes = [int(f.read_text()) if f.exists() else None for f in files]
    return Launch(proc.returncode, text, end - start, {m: end - t for m, t in seen.items()}, codes)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    found: dict[int, float] = {}
    for r in rows(run_dir):
        if "train/loss" in r:
            assert r["step"] not in found, f"step {r['step']} logged twice"
            found[r["step"]] = r["train/loss"]
    return found
