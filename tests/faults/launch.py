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

from tests.parallel.launch import free_port

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
             launcher: tuple[str, ...] = ("--standalone", "--nproc_per_node", "2"),
             torchrun_args: tuple[str, ...] = (), signal_at: tuple[str, int] | None = None,
             exit_codes_dir: Path | None = None, script: Path = REPO / "launch/sft.py") -> Launch:
    """Runs `torchrun LAUNCHER TORCHRUN_ARGS SCRIPT ARGS` (launch/sft.py), killing it after `timeout` s.
    signal_at (text, signum): send torchrun that signal once the text is in its output.
    exit_codes_dir: run each worker under exit_code_wrapper.py, which records its exit status."""
    return agents(args, nodes=[env or {}], timeout=timeout, markers=markers, launcher=(*launcher, *torchrun_args),
                  signal_at=signal_at, exit_codes_dir=exit_codes_dir, script=script)[0]


def agents(args: list[str], *, nodes: list[dict], timeout: float, markers: tuple[str, ...] = (),
           launcher: tuple[str, ...] | None = None, signal_at: tuple[str, int] | None = None,
           exit_codes_dir: Path | None = None, script: Path = REPO / "launch/sft.py") -> list[Launch]:
    """One torchrun agent per entry of `nodes` (that agent's extra environment), all started at
    once; by default one process each, as nodes of a c10d rendezvous on 127.0.0.1 (the way
    launch/slurm_sft.sh starts one per node). Kills them all after `timeout` s. signal_at and
    exit_codes_dir as in torchrun() (the signal goes to every agent)."""
    base = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if launcher is None:
        launcher = ("--nnodes", str(len(nodes)), "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    worker = [str(script)]
    if exit_codes_dir is not None:
        exit_codes_dir.mkdir(parents=True, exist_ok=True)
        worker = [str(Path(__file__).with_name("exit_code_wrapper.py")), str(exit_codes_dir), *worker]
    out = Path(args[-1].split("=", 1)[1] if args[-1].startswith("output_dir=") else "/tmp")
    logs = [out / f"torchrun-{time.time_ns()}-{i}.log" for i in range(len(nodes))]
    seen: list[dict[str, float]] = [{} for _ in nodes]
    procs: list[subprocess.Popen] = []
    signalled = [False] * len(nodes)
    start = time.monotonic()
    try:
        for i, (env, log_path) in enumerate(zip(nodes, logs)):
            node = ("--node-rank", str(i)) if len(nodes) > 1 else ()
            cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, *node, *worker, *args]
            with open(log_path, "w") as log:  # its own session: killing the group takes the workers too
                procs.append(subprocess.Popen(cmd, cwd=REPO, env={**base, **env}, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        ends: list[float | None] = [None] * len(procs)
        while None in ends:
            for i, (proc, log_path) in enumerate(zip(procs, logs)):
                if ends[i] is None and proc.poll() is not None:
                    ends[i] = time.monotonic()
                text = log_path.read_text()
                for m in markers:
                    if m not in seen[i] and m in text:
                        seen[i][m] = time.monotonic()
                if signal_at and not signalled[i] and signal_at[0] in text and proc.poll() is None:
                    os.kill(proc.pid, signal_at[1])
                    signalled[i] = True
            if time.monotonic() - start > timeout:
                tails = "\n".join(f"--- agent {i}:\n{p.read_text()[-3000:]}" for i, p in enumerate(logs))
                raise AssertionError(f"torchrun still running after {timeout} s:\n{tails}")
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    codes = None
    if exit_codes_dir is not None:
        files = sorted(exit_codes_dir.glob("rank_*.exit"), key=lambda f: int(f.stem.split("_")[1]))
        codes = [int(f.read_text()) for f in files]
    launches = []
    for proc, log_path, end, marks in zip(procs, logs, ends, seen):
        text = log_path.read_text()
        for m in markers:
            if m not in marks and m in text:
                marks[m] = end
        launches.append(Launch(proc.returncode, text, end - start, {m: end - t for m, t in marks.items()}, codes))
    return launches


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    found: dict[int, float] = {}
    for r in rows(run_dir):
        if "train/loss" in r:
            assert r["step"] not in found, f"step {r['step']} logged twice"
            found[r["step"]] = r["train/loss"]
    return found
