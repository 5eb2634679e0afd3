"""torchrun worker for tests/parallel/test_zero3_load.py (2 processes, CPU, gloo; its run() also
runs inside zero3_worker.py's launch, which the suite uses): load a
checkpoint straight into ZeRO-3 partitions (experts in ZeRO, and LoRA's sharded expert slice
with ep 2) and compare every gathered parameter with the single-process from_pretrained."""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from qvl_train.model import from_pretrained  # noqa: E402
from qvl_train.parallel.expert_parallel import ShardedExperts  # noqa: E402
from qvl_train.parallel.groups import build_ep_groups  # noqa: E402
from qvl_train.parallel.zero3_load import from_pretrained_zero3  # noqa: E402


def max_diff(model, ref: dict[str, torch.Tensor]) -> tuple[float, int]:
    worst, n = 0.0, 0
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            worst = max(worst, (p.detach() - ref[name]).abs().max().item())
        n += 1
    for name, m in model.named_modules():
        if isinstance(m, ShardedExperts):
            e0, e1 = m.expert_start, m.expert_start + m.num_local_experts
            for b in ("gate_up_proj", "down_proj"):
                worst = max(worst, (getattr(m, b) - ref[f"{name}.{b}"][e0:e1]).abs().max().item())
                n += 1
    return worst, n


def run(path: str) -> dict | None:
    """On every rank of an initialized group; rank 0 returns {"ranks": every rank's results}."""
    ds_config = {"train_micro_batch_size_per_gpu": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000},
                 "bf16": {"enabled": False}}
    ref = dict(from_pretrained(path).state_dict())
    full = from_pretrained_zero3(path, ds_config=ds_config)
    ep_info = build_ep_groups(2, num_experts=full.config.text.num_experts)
    lora = from_pretrained_zero3(path, ds_config=ds_config, ep_info=ep_info)
    res = {"full": max_diff(full, ref), "lora_ep2": max_diff(lora, ref), "params": len(ref)}
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, res)
    return {"ranks": results} if dist.get_rank() == 0 else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    deepspeed.init_distributed("gloo")
    res = run(args.path)
    if dist.get_rank() == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
