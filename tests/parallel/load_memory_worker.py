"""torchrun worker for tests/parallel/test_load_memory.py (CPU, gloo): load a real-width
checkpoint for full SFT with AutoEP the way the trainer does (from_pretrained_zero3 with
deferred experts -> deepspeed.initialize with AutoEP -> load_autoep_experts) and report this
rank's peak host memory during the load, and whether its partitions hold the file's values.

deepspeed.initialize runs without an optimizer: the optimizer's fp32 master copy, gradient
partitions and Adam states are training memory (the plan's optimizer and gradient lines), not
loading; bench/autoep_load_memory.py measures the load with them.

Peak: VmHWM (the kernel's exact peak resident set, reset via /proc/self/clear_refs) minus the
resident set just before loading; it includes any file pages mapped while reading.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors import safe_open  # noqa: E402

from qvl_train.model import load_config  # noqa: E402
from qvl_train.model.io import checkpoint_files  # noqa: E402
from qvl_train.model.state_dict_adapter import expert_slice_from_hf  # noqa: E402
from qvl_train.parallel.expert_parallel import autoep_config, is_autoep_layer  # noqa: E402
from qvl_train.parallel.zero3_load import (  # noqa: E402
    from_pretrained_zero3,
    load_autoep_experts,
    load_share_bytes,
    partition_range,
)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def partition_matches(p: torch.Tensor, full: torch.Tensor) -> bool:
    start, count = partition_range(p)
    return torch.equal(p.ds_tensor[:count], full.reshape(-1)[start:start + count].to(p.ds_tensor.dtype))


def check_values(engine, path: str) -> dict[str, bool]:
    """This rank's partitions of the embedding, a vision weight and the first layer's experts
    equal the checkpoint's values (read with safetensors, independently of our reader)."""
    model = engine.module
    params = dict(model.named_parameters())
    layer = next(m for m in model.modules() if is_autoep_layer(m))
    e0, inter = layer.ep_rank * layer.num_local_experts, model.config.text.moe_intermediate_size
    e1 = e0 + layer.num_local_experts
    out = {}
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in ("model.language_model.embed_tokens.weight", "model.visual.blocks.0.attn.qkv.weight"):
                    out[name] = partition_matches(params[name], f.get_tensor(name))
                elif name == "model.language_model.layers.0.mlp.experts.gate_up_proj":
                    gate_up = expert_slice_from_hf(name, f.get_slice(name)[e0:e1], model.config)[1]
                    out["w1"] = partition_matches(layer.experts.w1, gate_up[:, :inter])
                    out["w3"] = partition_matches(layer.experts.w3, gate_up[:, inter:])
                elif name == "model.language_model.layers.0.mlp.experts.down_proj":
                    down = expert_slice_from_hf(name, f.get_slice(name)[e0:e1], model.config)[1]
                    out["w2"] = partition_matches(layer.experts.w2, down)
    return out


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
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e4},
        "bf16": {"enabled": False},
    }
    dist.barrier()
    before = rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM starts again from the current resident set
    model = from_pretrained_zero3(args.path, ds_config=ds_config, defer_experts=True)
    peak_build = peak_bytes() - before
    ds_config.update(autoep_config(cfg, args.ep, world_size=world))
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    load_autoep_experts(engine, args.path)
    res = {"rank": rank, "peak": peak_bytes() - before, "peak_build": peak_build,
           **load_share_bytes(cfg, ep_size=args.ep, world_size=world, dtype=torch.float32),
           "values_match": check_values(engine, args.path)}
    results = [None] * world
    dist.all_gather_object(results, res)
    if rank == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump({"ranks": results}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
