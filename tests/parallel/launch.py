"""Run a torchrun job (CPU, gloo) from pytest on a free port; `script` is a path relative to
tests/parallel/ or absolute."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str | Path, args: list[str], out_dir: Path, *, nproc: int = 2, timeout: int = 240) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(Path(__file__).parent / script), *args, "--out", str(out_dir),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{tail}"
    result = out_dir / "result.json"
    assert result.exists(), f"no result.json:\n{tail}"
    return json.loads(result.read_text())
