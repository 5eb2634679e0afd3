"""A full disk during a checkpoint save: checked before, reported plainly after.

Before a save every rank checks the free space of the checkpoint directory against what the save
will write (the larger of the last complete checkpoint's size and this save's planned size, plus
5%), and all ranks agree on the verdict (one rank refusing alone would leave the others waiting in
a collective). A write that still fails (another job filled the disk meanwhile) is caught on every
rank, the verdicts are gathered, rank 0 removes the torn directory, and every rank raises the same
CheckpointSpaceError: "no space left on <dir>", its free space and the last checkpoint's size,
instead of torch's "[enforce fail at inline_container.cc] unexpected pos".
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

MARGIN = 1.05


class CheckpointSpaceError(OSError):
    """Not enough free space for a checkpoint (before the save, or ENOSPC during it)."""


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def free_bytes(path: Path) -> int:
    """Free space of the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _agree(problem: str | None) -> str | None:
    """Collective: the first problem any rank found (same answer on every rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return problem
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, problem)
    return next((p for p in found if p), None)


def _message(root: Path, *, free: int, last: Path | None, need: int | None) -> str:
    last_part = f"the last checkpoint {last} took {gib(dir_bytes(last))}" if last else "there is no earlier checkpoint"
    need_part = f"; this save needs about {gib(need)}" if need else ""
    return (f"no space left on {root}: {gib(free)} free, {last_part}{need_part}. Free some space (or point "
            "output_dir at a larger disk, or lower checkpoint.keep_last) and resume; "
            + (f"{last} is intact." if last else "nothing was lost."))


def check_before_save(root: Path, *, last: Path | None, planned_bytes: int) -> None:
    """Collective. `planned_bytes`: this rank's share of the save (0: unknown); the whole save is
    estimated as the sum over ranks, or the last checkpoint's size if larger."""
    planned = planned_bytes
    if dist.is_initialized() and dist.get_world_size() > 1:  # (objects: a CPU tensor would not pass NCCL)
        shares: list = [None] * dist.get_world_size()
        dist.all_gather_object(shares, planned_bytes)
        planned = sum(shares)
    need = int(max(planned, dir_bytes(last) if last else 0) * MARGIN)
    free = free_bytes(root)
    problem = _message(root, free=free, last=last, need=need) if need > free else None
    problem = _agree(problem)
    if problem:
        raise CheckpointSpaceError(errno.ENOSPC, problem)


def torch_save(obj, path: Path) -> None:
    """torch.save through a buffer: a full disk then surfaces as OSError(ENOSPC) from write()
    rather than torch's zip writer's "unexpected pos" RuntimeError."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(path, "wb") as f:
        f.write(buf.getbuffer())
        f.flush()
        os.fsync(f.fileno())


def raise_if_any_failed(error: OSError | None, out: Path, *, rank: int, last: Path | None) -> None:
    """Collective, after every rank tried its writes: if any rank failed, remove the torn
    directory (rank 0) and raise the same error everywhere."""
    mine = None
    if error is not None:
        kind = "ENOSPC" if error.errno == errno.ENOSPC else f"{type(error).__name__}"
        mine = f"{kind}|rank {rank}: {error}"
    problem = _agree(mine)
    if problem is None:
        return
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    kind, _, detail = problem.partition("|")
    root = out.parent
    if kind == "ENOSPC":
        raise CheckpointSpaceError(errno.ENOSPC, _message(root, free=free_bytes(root), last=last, need=None)
                                   + f" (the torn {out.name} was removed; {detail})")
    raise OSError(f"writing checkpoint {out} failed ({detail}); the torn directory was removed"
                  + (f", {last} is intact." if last else "."))
