"""Resumable training checkpoints: model and optimizer state + per-rank loader state + RNG + step.

Two formats (checkpoint.format): "resharding" (reshard.py: full logical tensors in pieces, any
world size / ep_size / node count resumes it; the default under ZeRO-3, where it replaces
DeepSpeed's own because it does everything that one does for our runs and more) and "deepspeed"
(engine.save_checkpoint: per rank and per layout, kept for ZeRO 0-2, whose optimizer layouts
reshard.py does not read). Either way layout.json records the saving layout, so a resume that
cannot work is refused with both layouts named and what to do (check_layout), never with a raw
state_dict error.

Layout: <run>/checkpoints/step_000100/ holds the format's files (written by every rank), our
rank_<r>.pt files, then manifest.json (sizes and CRC-32 of every file, see manifest.py) and, last
of all, a COMPLETE marker written by rank 0 after a barrier. A crash in the middle of a write
leaves a directory without the marker, which resume ignores, so the previous checkpoint stays the
newest loadable one. Older complete checkpoints beyond keep_last are deleted only after the new
marker exists. resume=auto also skips a checkpoint whose files do not match its manifest (with a
warning naming the file); an explicit resume path that does not match fails naming the file.
Our rank files hold only tensors and plain Python values, so they load with weights_only=True.

A full disk: before a save the free space of the checkpoint directory is checked against the
larger of the last checkpoint's size and this one's planned size (space.py); a write that still
fails with ENOSPC removes the torn directory and raises CheckpointSpaceError naming the directory,
its free space and the last checkpoint's size. The previous checkpoint is never touched.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import manifest, reshard, space

MARKER = "COMPLETE"
LAYOUT = "layout.json"
FORMATS = ("auto", "resharding", "deepspeed")


def resolve_format(setting: str, zero_stage: int) -> str:
    if setting not in FORMATS:
        raise ValueError(f"checkpoint.format={setting!r}: use one of {FORMATS}.")
    if setting == "auto":
        return "resharding" if zero_stage == 3 else "deepspeed"
    if setting == "resharding" and zero_stage != 3:
        raise ValueError("checkpoint.format=resharding needs parallel.zero_stage=3 (it reads ZeRO-3 partitions); "
                         "set checkpoint.format=deepspeed or auto.")
    return setting


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


def save(engine, root: Path, *, step: int, rank: int, extra: dict, keep_last: int, layout: dict,
         fmt: str = "deepspeed", train_state: dict | None = None) -> Path:
    """Collective. `layout`: the saving run's (world_size, ep_size, ...; layout.json). `train_state`
    (resharding format): what every rank may need on resume, e.g. all ranks' loader states."""
    tag = tag_for(step)
    out = root / tag
    previous = complete_checkpoints(root)
    planned = reshard.planned_bytes(engine) if fmt == "resharding" else 0
    space.check_before_save(root, last=previous[-1] if previous else None, planned_bytes=planned)
    error = None
    try:
        out.mkdir(parents=True, exist_ok=True)  # every rank (no barrier inside the try: a failing rank would skip it)
        if fmt == "resharding":
            reshard.save(engine, out, rank=rank, train_state={**(train_state or {}), "step": step, "layout": layout})
        else:
            engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        space.torch_save({"step": step, "rng": rng_state(), **extra}, out / f"rank_{rank}.pt")
        if rank == 0:
            (out / LAYOUT).write_text(json.dumps({**layout, "format": fmt}, indent=1))
    except OSError as e:  # ENOSPC and friends: every rank must learn it before anyone goes on
        error = e
    space.raise_if_any_failed(error, out, rank=rank, last=previous[-1] if previous else None)
    manifest.write(out, exclude=(MARKER,))
    if rank == 0:
        (out / MARKER).write_text(str(step))
        for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return out


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


def saved_layout(path: Path) -> dict:
    """The layout that wrote a checkpoint (layout.json; for DeepSpeed checkpoints written before it
    existed, the world size read off DeepSpeed's per-rank files)."""
    if (path / LAYOUT).is_file():
        return json.loads((path / LAYOUT).read_text())
    ranks = {m.group(1) for f in path.glob("*zero_pp_rank_*_optim_states.pt") if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))}
    return {"format": "deepspeed", **({"world_size": len(ranks)} if ranks else {})}


_HINTS = {"world_size": "{} processes in all (torchrun --nnodes x --nproc_per_node)", "ep_size": "parallel.ep_size={}",
          "zero_stage": "parallel.zero_stage={}", "peft": "peft={}"}


def check_layout(path: Path, saved: dict, current: dict) -> None:
    """Refuse what cannot be resumed, before any file is read, naming both layouts."""
    fmt = saved.get("format", "deepspeed")
    if fmt == "resharding":
        if current.get("zero_stage") != 3:
            raise ValueError(f"checkpoint {path} ({reshard.describe_layout(saved)}, resharding format) loads into "
                             f"ZeRO-3 partitions; this run has {reshard.describe_layout(current)}. "
                             "Resume with parallel.zero_stage=3 (any world size and ep_size work).")
        return
    changed = [k for k in ("world_size", "ep_size", "zero_stage", "peft") if k in saved and saved[k] != current.get(k)]
    if changed:
        raise ValueError(
            f"checkpoint {path} is in DeepSpeed's own format, which loads only into the layout that wrote it: saved "
            f"with {reshard.describe_layout(saved)}, this run has {reshard.describe_layout(current)} "
            f"({' and '.join(changed)} differ). Resume with the saving layout: "
            + ", ".join(_HINTS[k].format(saved[k]) for k in changed)
            + "; checkpoints of ZeRO-3 runs with checkpoint.format=auto or resharding resume on any world size "
            "and parallel.ep_size.")


def load(engine, path: Path, *, rank: int, layout: dict) -> dict:
    """Restore a checkpoint into this run; returns this rank's state (step, loader, and for the
    resharding format `train_state`, whose loader states are every saving rank's)."""
    saved = saved_layout(path)
    check_layout(path, saved, layout)
    if saved.get("format") == "resharding":
        moved = [k for k in ("world_size", "num_nodes", "ep_size", "num_workers") if saved.get(k) != layout.get(k)]
        if moved and rank == 0:
            print(f"resharding {path}: saved with {reshard.describe_layout(saved)}, resuming with "
                  f"{reshard.describe_layout(layout)}", flush=True)
        train_state = reshard.load(engine, path, layout=layout)
        _restore_engine_counters(engine, train_state)
        own = path / f"rank_{rank}.pt"  # a new layout's extra ranks start from rank 0's RNG
        state = load_rank_state(own if own.is_file() else path / "rank_0.pt")
        set_rng_state(state["rng"])
        return {**state, "step": train_state["step"], "train_state": train_state}
    try:
        engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True)
    except Exception as e:  # name the checkpoint and both layouts: DeepSpeed's own errors do not
        raise RuntimeError(f"loading the DeepSpeed state of {path} (saved with {reshard.describe_layout(saved)}; "
                           f"this run: {reshard.describe_layout(layout)}) failed: {type(e).__name__}: {e}") from e
    state = load_rank_state(path / f"rank_{rank}.pt")
    set_rng_state(state["rng"])
    return state


def engine_counters(engine, scheduler) -> dict:
    """What DeepSpeed's own checkpoint restores besides the tensors: the engine's step counters
    and the LR schedule position (LambdaLR: its lambda is rebuilt from the config)."""
    return {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
            "skipped_steps": engine.skipped_steps,
            "scheduler": {"last_epoch": scheduler.last_epoch, "_step_count": scheduler._step_count}}


def _restore_engine_counters(engine, train_state: dict) -> None:
    c = train_state["engine"]
    engine.global_steps, engine.global_samples, engine.skipped_steps = c["global_steps"], c["global_samples"], c["skipped_steps"]
    engine.micro_steps = c["global_steps"] * engine.gradient_accumulation_steps()
    sched = engine.lr_scheduler
    sched.last_epoch, sched._step_count = c["scheduler"]["last_epoch"], c["scheduler"]["_step_count"]
    lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(engine.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs
