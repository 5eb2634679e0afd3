"""Resumable training checkpoints: DeepSpeed engine state + per-rank loader state + RNG + step.

Layout: <run>/checkpoints/step_000100/ holds DeepSpeed's files (written by every rank), our
rank_<r>.pt files, then manifest.json (sizes and CRC-32 of every file, see manifest.py) and, last
of all, a COMPLETE marker written by rank 0 after a barrier. A crash in the middle of a write
leaves a directory without the marker, which resume ignores, so the previous checkpoint stays the
newest loadable one. Older complete checkpoints beyond keep_last are deleted only after the new
marker exists. resume=auto also skips a checkpoint whose files do not match its manifest (with a
warning naming the file); an explicit resume path that does not match fails naming the file.
Our rank files hold only tensors and plain Python values, so they load with weights_only=True.
"""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import manifest

MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MARKER).exists())


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)  # weights_only-safe
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, root: Path, *, step: int, rank: int, extra: dict, keep_last: int) -> Path:
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save({"step": step, "rng": rng_state(), **extra}, root / tag / f"rank_{rank}.pt")
    dist.barrier()
    manifest.write(root / tag, exclude=(MARKER,))
    if rank == 0:
        (root / tag / MARKER).write_text(str(step))
        for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / tag


def resolve_resume(setting: str, root: Path, *, warn=print) -> Path | None:
    """The checkpoint to resume from. Collective when a process group exists (files are verified
    by all ranks together), so call it on every rank."""
    if setting == "none":
        return None
    if setting == "auto":
        for path in reversed(complete_checkpoints(root)):
            bad = manifest.problems(path)
            if not bad:
                return path
            warn(f"WARNING: skipping damaged checkpoint {path}: {bad[0]}" + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""))
        return None
    path = Path(setting)
    if not (path / MARKER).exists():
        raise ValueError(f"checkpoint.resume={setting}: not a complete checkpoint directory (no {MARKER} file).")
    bad = manifest.problems(path)
    if bad:
        raise ValueError(f"checkpoint.resume={setting} is damaged: {'; '.join(bad)}. Resume from another checkpoint.")
    return path


def load_rank_state(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: cannot be loaded ({type(e).__name__}: {str(e)[:200]}); it is damaged or was "
                         "written by an older version. Resume from another checkpoint.") from e


def load(engine, path: Path, *, rank: int) -> dict:
    try:
        engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True)
    except Exception as e:  # name the checkpoint: DeepSpeed's own errors often do not
        raise RuntimeError(f"loading the DeepSpeed state of {path} failed: {type(e).__name__}: {e}") from e
    state = load_rank_state(path / f"rank_{rank}.pt")
    set_rng_state(state["rng"])
    return state
