"""A full disk during a checkpoint save, on a real 1 MiB tmpfs (mounted for the test; the suite
runs as root): the free space is checked before a save, a write that still hits ENOSPC removes
the torn directory, the error says "no space left on <dir>" with the free space and the last
checkpoint's size, and the previous checkpoint stays intact and resumable."""

import errno
import subprocess

import pytest
import torch
import torch.distributed as dist

from qvl_train.checkpoint import space
from qvl_train.checkpoint.state import MARKER, complete_checkpoints, resolve_resume, save, tag_for
from qvl_train.model.safetensors_ranges import write_streamed

KIB = 1024


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def group():
    """A one-process gloo group (reused if the session already has one)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


class FakeEngine:
    """Writes `size` bytes as DeepSpeed's save_checkpoint would write its files."""

    def __init__(self, size: int) -> None:
        self.size = size

    def save_checkpoint(self, root, tag, save_latest):
        with open(f"{root}/{tag}/zero_pp_rank_0_mp_rank_00_optim_states.pt", "wb") as f:
            f.write(b"\x01" * self.size)


def _save(engine, root, step):
    return save(engine, root, step=step, rank=0, extra={"loader": {}}, keep_last=5, fmt="deepspeed",
                layout={"world_size": 1, "ep_size": 1, "zero_stage": 3, "peft": "none"})


def test_a_save_that_would_not_fit_is_refused_before_writing_anything(small_disk, group):
    root = small_disk / "checkpoints"
    first = _save(FakeEngine(400 * KIB), root, 1)
    second = _save(FakeEngine(400 * KIB), root, 2)  # ~800 KiB used of 1 MiB: the next one cannot fit
    with pytest.raises(space.CheckpointSpaceError) as e:
        _save(FakeEngine(400 * KIB), root, 3)
    msg = str(e.value)
    assert msg.startswith(f"[Errno {errno.ENOSPC}] no space left on {root}: ")
    assert f"the last checkpoint {second} took 0.4 MiB; this save needs about 0.4 MiB" in msg
    assert f"{second} is intact" in msg
    assert not (root / tag_for(3)).exists()  # nothing started
    assert complete_checkpoints(root) == [first, second] and resolve_resume("auto", root) == second


def test_enospc_during_a_save_removes_the_torn_directory_and_names_the_disk(small_disk, group):
    root = small_disk / "checkpoints"
    first = _save(FakeEngine(200 * KIB), root, 1)  # the estimate for the next save: ~200 KiB
    with pytest.raises(space.CheckpointSpaceError) as e:
        _save(FakeEngine(900 * KIB), root, 2)  # passes the check, then the disk fills up mid-write
    msg = str(e.value)
    assert f"no space left on {root}: " in msg and "free, the last checkpoint" in msg
    assert f"{first} took 0.2 MiB" in msg and f"the torn {tag_for(2)} was removed" in msg
    assert "unexpected pos" not in msg and "enforce fail" not in msg
    assert not (root / tag_for(2)).exists()
    assert resolve_resume("auto", root) == first and (first / MARKER).exists()


def test_our_shard_writer_and_rank_files_raise_enospc_on_a_full_disk(small_disk):
    with pytest.raises(OSError) as e:
        write_streamed(small_disk / "shard_0.safetensors", [("param/x@0", torch.float32, [400 * KIB])],
                       [torch.zeros(400 * KIB)], fsync=True)
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as e:  # torch.save straight to the file would raise "unexpected pos"
        space.torch_save({"x": torch.zeros(400 * KIB)}, small_disk / "rank_0.pt")
    assert e.value.errno == errno.ENOSPC
