"""Process-level runtime: torchrun environment, process group, device, and a clean exit.

DeepSpeed picks its accelerator at import time: on a machine without CUDA we set
DS_ACCELERATOR=cpu before importing it (and use gloo), so the same entry point runs on a laptop,
in CI and on GPU nodes.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(backend: str = "auto", timeout_minutes: float = 10.0) -> Runtime:
    """timeout_minutes bounds every collective of the process group (parallel.timeout_minutes)."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = ("nccl" if cuda else "gloo") if backend == "auto" else backend
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    import deepspeed

    # On CPU, DeepSpeed prints "DeepSpeed deepspeed_shm_comm_op built successfully" as it loads
    # its shared-memory op, once per process: rank 0's copy is enough.
    quiet = contextlib.redirect_stdout(io.StringIO()) if os.environ["RANK"] != "0" else contextlib.nullcontext()
    with quiet:
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_minutes))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown() -> None:
    """The end of a healthy run: gloo may abort at interpreter exit with a live process group, so
    tear it down. Never on the error path: a barrier there waits for ranks that may be gone
    (launch/sft.py leaves through parallel.watchdog.exit_on_error instead)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
