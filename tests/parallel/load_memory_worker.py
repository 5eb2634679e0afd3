"""torchrun worker for tests/parallel/test_load_memory.py (CPU, gloo): load a real-width
checkpoint for full SFT with AutoEP the way the trainer does (from_pretrained_zero3 with
deferred experts -> deepspeed.initialize with AutoEP -> load_autoep_experts) and report this
rank's peak host memory during the load, and whether its partitions hold the file's values.

Nothing here comes from the loader under test: the share a rank must hold is read off
DeepSpeed's own partitions after the load (each parameter's ds_tensor; AutoEP's expert
parameters are this rank's expert slice), and the values are compared after DeepSpeed's own
all-gather of each parameter (GatheredParameters) with the file read by safetensors.

deepspeed.initialize runs without an optimizer: the optimizer's fp32 master copy, gradient
partitions and Adam states are training memory (the plan's optimizer and gradient lines), not
loading; bench/autoep_load_memory.py measures the load with them.

Peak: VmHWM (the kernel's exact peak resident set, reset via /proc/self/clear_refs) minus the
resident set just before loading; it includes any file pages mapped while reading.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors import safe_open  # noqa: E402

from bench.common import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402
from qvl_train.model import load_config  # noqa: E402
from qvl_train.model.io import checkpoint_files  # noqa: E402
from qvl_train.model.state_dict_adapter import expert_slice_from_hf  # noqa: E402
from qvl_train.parallel.expert_parallel import autoep_config, is_autoep_layer  # noqa: E402
from qvl_train.parallel.zero3_load import (  # noqa: E402
    from_pretrained_zero3,
    load_autoep_experts,
    load_share_bytes,
)

ROWS = 8192  # rows compared at a time (the embedding is 1.2 GB in fp32)


def gathered_matches(p: torch.Tensor, rows) -> bool:
    """DeepSpeed's all-gather of `p` (every rank's partition, as ZeRO-3 assembles it for a
    forward) equals the file: rows(i, j) gives the file's rows i:j (collective)."""
    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
        full = p.data
        return all(torch.equal(full[i:i + ROWS].reshape(-1), rows(i, i + ROWS).reshape(-1).to(full.dtype))
                   for i in range(0, full.shape[0], ROWS))


def held_share(engine, path: str) -> dict[str, int]:
    """Bytes this rank holds after the load, read off DeepSpeed's partitions: its AutoEP expert
    slice and its ZeRO-3 partitions of everything else (whole where ZeRO keeps a parameter on
    every rank); and the checkpoint's largest tensor in the model's dtype (safetensors header: the
    most a load may hold whole at once)."""
    experts = {id(p) for m in engine.module.modules() if is_autoep_layer(m) for p in m.experts.parameters()}
    out = {"expert_slice": 0, "zero_share": 0, "largest_tensor": 0}
    b = 4  # fp32
    for p in engine.module.parameters():
        assert p.ds_tensor.element_size() == b
        held = p.ds_numel if getattr(p, "ds_persist", False) else p.ds_tensor.numel()
        out["expert_slice" if id(p) in experts else "zero_share"] += held * b
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                out["largest_tensor"] = max(out["largest_tensor"], math.prod(f.get_slice(name).get_shape()) * b)
    return out


def check_values(engine, path: str) -> dict[str, bool]:
    """The embedding, a vision weight and the first layer's experts (this rank's slice, whose
    expert range comes from DeepSpeed's AutoEP layer) equal the checkpoint's values (read with
    safetensors, independently of our reader)."""
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
                    out[name] = gathered_matches(params[name], lambda i, j, s=f.get_slice(name): s[i:j])
                elif name == "model.language_model.layers.0.mlp.experts.gate_up_proj":
                    gate_up = expert_slice_from_hf(name, f.get_slice(name)[e0:e1], model.config)[1]
                    out["w1"] = gathered_matches(layer.experts.w1, lambda i, j: gate_up[i:j, :inter])
                    out["w3"] = gathered_matches(layer.experts.w3, lambda i, j: gate_up[i:j, inter:])
                    del gate_up
                elif name == "model.language_model.layers.0.mlp.experts.down_proj":
                    down = expert_slice_from_hf(name, f.get_slice(name)[e0:e1], model.config)[1]
                    out["w2"] = gathered_matches(layer.experts.w2, lambda i, j: down[i:j])
                    del down
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
    reset_peak_rss()  # VmHWM starts again from the current resident set
    model = from_pretrained_zero3(args.path, ds_config=ds_config, defer_experts=True)
    peak_build = peak_rss_bytes() - before
    ds_config.update(autoep_config(cfg, args.ep, world_size=world))
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    load_autoep_experts(engine, args.path)
    res = {"rank": rank, "peak": peak_rss_bytes() - before, "peak_build": peak_build, **held_share(engine, args.path),
           "planned": load_share_bytes(cfg, ep_size=args.ep, world_size=world, dtype=torch.float32),
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
