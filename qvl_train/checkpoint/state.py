"""Resumable training checkpoints: DeepSpeed engine state + per-rank loader state + RNG + step.

Layout: <run>/checkpoints/step_000100/ holds DeepSpeed's files (written by every rank), our
rank_<r>.pt files and, last of all, a COMPLETE marker written by rank 0 after a barrier. A crash
in the middle of a write leaves a directory without the marker, which resume ignores, so the
previous checkpoint stays the newest loadable one. Older complete checkpoints beyond keep_last
are deleted only after the new marker exists.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MARKER).exists())


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, root: Path, *, step: int, rank: int, extra: dict, keep_last: int) -> Path:
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save({"step": step, "rng": rng_state(), **extra}, root / tag / f"rank_{rank}.pt")
    dist.barrier()
    if rank == 0:
        (root / tag / MARKER).write_text(str(step))
        for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / tag


def resolve_resume(setting: str, root: Path) -> Path | None:
    if setting == "none":
        return None
    if setting == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(setting)
    if not (path / MARKER).exists():
        raise ValueError(f"checkpoint.resume={setting}: not a complete checkpoint directory (no {MARKER} file).")
    return path


def load(engine, path: Path, *, rank: int) -> dict:
    engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True)
    state = torch.load(path / f"rank_{rank}.pt", weights_only=False)
    set_rng_state(state["rng"])
    return state
