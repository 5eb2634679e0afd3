"""Process-level runtime: torchrun environment, process group, device, and a clean exit.

DeepSpeed picks its accelerator at import time: on a machine without CUDA we set
DS_ACCELERATOR=cpu before importing it (and use gloo), so the same entry point runs on a laptop,
in CI and on GPU nodes.

Automatic restart (`torchrun --max-restarts N`): torch 2.13's workers build their process group
on the agent's TCPStore (TORCHELASTIC_USE_AGENT_STORE), which outlives a worker generation, with
no per-attempt key prefix. Restarted workers then read the dead workers' gloo/NCCL addresses
from it ("Gloo connectFullMesh failed ... Connection refused", or a hang). A prefix from
TORCHELASTIC_RESTART_COUNT is not enough: that count is per node, and a node whose workers were
restarted by a membership change does not increase it. So rank 0 of every generation hosts a
fresh store and announces its port and a random token through the agent's store; the other
ranks retry until they reach a live store holding that token (`_generation_store`).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

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

    timeout = timedelta(minutes=timeout_minutes)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # under torchrun: see the module docstring
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = _generation_store(rank=rank, world_size=world, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                **({"device_id": torch.device("cuda", local_rank)} if cuda else {}))
    # On CPU, DeepSpeed prints "DeepSpeed deepspeed_shm_comm_op built successfully" as it loads
    # its shared-memory op, once per process: rank 0's copy is enough.
    quiet = contextlib.redirect_stdout(io.StringIO()) if os.environ["RANK"] != "0" else contextlib.nullcontext()
    with quiet:
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts the group above if any
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


def check_shared_dir(path: Path, rt: Runtime, *, key: str = "output_dir") -> None:
    """Every rank must see the files rank 0 writes in `path` (collective). The run dir is one
    directory for every node: rank 0 writes its markers and files, each rank its checkpoint
    shards. On a node-local disk the other nodes would fail much later, and obscurely."""
    marker = Path(path) / ".shared_by_every_rank"
    token = broadcast_object(uuid.uuid4().hex if rt.is_main else None)
    if rt.is_main:
        marker.write_text(token)
    dist.barrier()
    try:
        seen = marker.read_text() == token
    except OSError:
        seen = False
    verdicts: list = [None] * rt.world_size
    dist.all_gather_object(verdicts, (rt.rank, socket.gethostname(), seen))
    blind = [(r, host) for r, host, ok in verdicts if not ok]
    if blind:
        hosts = sorted({host for _, host in blind})
        raise ValueError(
            f"{key}: the run dir {path} is not shared: {len(blind)} rank(s) on {', '.join(hosts)} do not see the file "
            f"rank 0 wrote there. Put {key} on a filesystem every node mounts at the same path (checkpoints, metrics "
            "and markers are written there by different ranks); the data and model.path must be shared too.")


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _generation_store(*, rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """A TCPStore that only this generation of workers uses, hosted by rank 0 (on MASTER_ADDR's
    node: torchrun puts global rank 0 on the rendezvous' node rank 0)."""
    addr, agent_port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = dist.TCPStore(addr, agent_port, world_size, is_master=False, timeout=timeout)
    key = f"qvl_train/generation_store/{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
    if rank == 0:
        store = dist.TCPStore(addr, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        token = uuid.uuid4().hex
        store.set("token", token)
        agent.set(key, f"{store.port} {token}")
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:  # the key may still name the previous generation's store: dead, or another token
        port, token = agent.get(key).decode().split()
        try:
            store = dist.TCPStore(addr, int(port), world_size, is_master=False, timeout=timedelta(seconds=5))
            if store.get("token").decode() == token:
                store.set_timeout(timeout)
                return store
        except (RuntimeError, dist.DistStoreError):  # refused or timed out: not (yet) the live store
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank}: no live process-group store announced by rank 0 on {addr} within "
                               f"{timeout}; is rank 0 running?")
        time.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
