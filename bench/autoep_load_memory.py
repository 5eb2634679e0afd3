"""Peak host memory per rank while loading a checkpoint for full SFT with AutoEP (CPU, gloo):

    flock /tmp/bigmem.lock torchrun --standalone --nproc_per_node 2 bench/autoep_load_memory.py \
        --path DIR --ep 2 --out OUT     # DIR: e.g. random_checkpoint --preset 30B-A3B --layers 1 --vision-layers 1

Loads a real-width checkpoint for full SFT with AutoEP the way the trainer does
(from_pretrained_zero3(defer_experts=True) -> deepspeed.initialize with AutoEP ->
load_autoep_experts) and reports this rank's peak host memory during the load, next to the
bound: its expert slice + its ZeRO share of everything else + the largest single tensor (fp32)
+ the ZeRO-3 gradient partition buffer deepspeed.initialize allocates for training.

Peak: VmHWM (the kernel's exact peak resident set) minus the resident set before loading. It
counts the safetensors pages a rank has mapped while reading, so it errs high.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from qvl_train.config.schema import OptimSection  # noqa: E402
from qvl_train.model import load_config  # noqa: E402
from qvl_train.model.build import build_model  # noqa: E402
from qvl_train.parallel.expert_parallel import autoep_config  # noqa: E402
from qvl_train.parallel.zero3_load import from_pretrained_zero3, load_autoep_experts  # noqa: E402
from qvl_train.train.optim import param_groups  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Make VmHWM start from the current resident set (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bound_bytes(path: str, ep: int, world: int) -> dict[str, int]:
    cfg = load_config(path)
    meta = build_model(cfg, device="meta")
    experts = share = largest = 0
    for name, p in meta.named_parameters():
        n = p.numel() * 4
        largest = max(largest, n)
        if ".mlp.experts." in name:
            experts += n // ep  # this rank's EP slice; ZeRO partitions it over world/ep ranks
        else:
            share += n // world
    edp = world // ep
    return {"expert_slice": experts, "zero_share": share, "largest_tensor": largest,
            "grad_partitions": experts // edp + share}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", required=True)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(args.path)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e4},
        "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": 1e-5}},
        "bf16": {"enabled": False},
    }
    dist.barrier()
    before = rss_bytes()
    reset_peak()
    t0 = time.time()
    model = from_pretrained_zero3(args.path, ds_config=ds_config, defer_experts=True)
    after_build = peak_bytes() - before
    groups = param_groups(model, OptimSection(weight_decay=0.1))
    ds_config.update(autoep_config(cfg, args.ep, world_size=world))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    after_init = peak_bytes() - before
    load_autoep_experts(engine, args.path)
    res = {"rank": rank, "peak": peak_bytes() - before, "peak_build": after_build, "peak_init": after_init,
           "seconds": time.time() - t0, **bound_bytes(args.path, args.ep, world)}
    results = [None] * world
    dist.all_gather_object(results, res)
    if rank == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump({"ranks": results}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
