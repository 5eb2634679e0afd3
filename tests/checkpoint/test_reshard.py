"""Resharding checkpoints (qvl_train.checkpoint.reshard), end to end with the Trainer: full SFT
(AutoEP experts) and LoRA (expert LoRA) saved by 2 processes with ep 2 under ZeRO-3, resumed on
1 process (ep 1), 2 processes (ep 1) and 4 processes (ep 4 and ep 2). After the load every partition (fp32 master, Adam
exp_avg / exp_avg_sq, the model's copy) equals the checkpoint exactly; one step on the same global
batch gives the uninterrupted run's loss and a step-3 state equal to its step-3 checkpoint (up to
float summation order, 1e-5); training then continues from the resharded data position.
Three launches (tests/checkpoint/reshard_worker.py): save on 2 processes then resume there with
ep 1; resume on 1 process; resume on 4 processes. Without a launch: the Reader fills a live
partition from pieces in two shards with no temporary of the partition's size."""

import json
import math

import pytest
import torch

from qvl_train.checkpoint import reshard
from qvl_train.model.safetensors_ranges import write_streamed

from ..host_memory import added_peak_bytes
from ..parallel.launch import run_torchrun

pytestmark = pytest.mark.timeout(1200)
WORKER = str(__import__("pathlib").Path(__file__).with_name("reshard_worker.py"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    result = run_torchrun(WORKER, ["--phase", "save", "--eps", "1"], out, nproc=2, timeout=900)
    return out, result


def _check(result: dict, names: list[str]) -> None:
    assert sorted(result) == sorted(names)
    for name, r in result.items():
        assert r["compared_elements"] > 0, name
        assert r["loss_b"] == pytest.approx(r["reference_loss_b"], rel=1e-6), name
        assert r["worst_step3_difference"] < 1e-5, (name, r["worst_step3_difference"])
        assert r["final_step"] == 4 and r["final_loss_finite"], name


def test_saved_pieces_equal_deepspeeds_own_gathers(saved):
    _, result = saved
    assert result["full"]["checked_tensors"] > 0 and result["lora"]["checked_tensors"] > 0
    assert all(math.isfinite(result[m]["loss_b"]) for m in ("full", "lora"))


def test_resume_on_2_processes_with_ep_1(saved):
    _, result = saved
    _check({k: v for k, v in result.items() if k.startswith(("full_", "lora_"))}, ["full_w2_ep1", "lora_w2_ep1"])


@pytest.mark.parametrize("nproc,eps,modes,bf16", [(1, "1", "full,lora", "lora"), (4, "4,2", "full,lora", "")],
                         ids=["1proc_ep1", "4proc_ep4_ep2"])
def test_resume_on_another_layout(saved, tmp_path, nproc, eps, modes, bf16):
    """(1 process: also a bf16 LoRA run resuming the fp32 run's checkpoint, as a GPU user would,
    and a full-SFT run pointed at the LoRA checkpoint, refused naming the saving layout.)"""
    out, _ = saved
    result = run_torchrun(WORKER, ["--phase", "resume", "--eps", eps, "--modes", modes, "--saved", str(out),
                                   "--bf16", bf16, *(["--refusal"] if nproc == 1 else [])], tmp_path, nproc=nproc,
                          timeout=900)
    if nproc == 1:
        msg = result.pop("refused")
        assert "does not match this run's trainable parameters" in msg and "state_dict" not in msg
        assert "saved by a run with world_size=2, num_nodes=1, ep_size=2, zero_stage=3, peft=lora" in msg
        assert "this run has world_size=1, num_nodes=1, ep_size=1, zero_stage=3, peft=none" in msg
        assert "set peft=lora" in msg and "this run does not train" in msg and "checkpoint.resume=none" in msg
    low = {k: result.pop(k) for k in list(result) if k.endswith("_bf16")}
    _check(result, [f"{m}_w{nproc}_ep{e}" for m in modes.split(",") for e in eps.split(",")])
    assert sorted(low) == [f"{m}_w{nproc}_ep1_bf16" for m in filter(None, bf16.split(","))]
    for name, r in low.items():
        assert r["compared_elements"] > 0 and r["final_step"] == 3 and r["final_loss_finite"], name


def test_reader_reads_pieces_straight_into_the_live_partition(tmp_path):
    """A 64 MiB fp32 partition spanning two saved pieces (two shard files), as a 2 -> 1 process
    resume reads it: the values land in the destination and the read adds well under one piece
    (before: each piece was read into a temporary, then copied: +32 MiB or more)."""
    n = 16 * 2**20
    values = torch.arange(n, dtype=torch.float32)
    half = n // 2
    for rank, offset in ((0, 0), (1, half)):
        write_streamed(tmp_path / reshard.shard_file(rank), [(f"param/w@{offset}", torch.float32, [half])],
                       [values[offset:offset + half]])
    tensors = {"w": {"shape": [n], "chunks": [[0, half, 0], [half, half, 1]]}}
    (tmp_path / reshard.INDEX).write_text(json.dumps({"version": reshard.VERSION, "kinds": ["param"], "adam_step": None,
                                                      "tensors": tensors}))
    (tmp_path / reshard.TRAIN_STATE).write_text("{}")
    reader = reshard.Reader(tmp_path)
    live = torch.full((n + 10,), -1.0)  # a flat optimizer buffer; the partition is [5, 5 + n - 8)
    added = added_peak_bytes(lambda: reader.read_into("param", "w", 3, live[5:5 + n - 8]))
    assert torch.equal(live[5:5 + n - 8], values[3:n - 5]) and (live[:5] == -1).all() and (live[n - 3:] == -1).all()
    assert added < 4 * 2**20, f"reading a {n * 4 / 2**20:.0f} MiB partition added {added / 2**20:.1f} MiB"
