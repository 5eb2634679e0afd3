"""Loading a real checkpoint straight into ZeRO-3 partitions.

Built under deepspeed.zero.Init, every parameter is partitioned the moment it is created, so no
rank ever holds the whole model (8 ranks of a node would otherwise each load 62 GB for 30B-A3B
before DeepSpeed partitions them). Weights are then copied in one tensor at a time. A partitioned
parameter is gathered with GatheredParameters(modifier_rank=0): rank 0 writes the value and
DeepSpeed re-partitions it to every rank. The small parameters ZeRO-3 keeps whole on every rank
(below stage3_param_persistence_threshold) are not re-broadcast by that context, so every rank
writes those itself (seen: otherwise they keep their initial values on the other ranks).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from safetensors import safe_open

from qvl_train.model import Qwen3VLMoe
from qvl_train.model import state_dict_adapter as adapter
from qvl_train.model.build import reset_buffers
from qvl_train.model.io import checkpoint_files, load_config


def from_pretrained_zero3(
    path: str | os.PathLike,
    *,
    ds_config: dict,
    expert_layout: adapter.ExpertLayout | None = None,
) -> Qwen3VLMoe:
    import deepspeed

    cfg = load_config(path)
    if cfg.tie_word_embeddings:
        raise ValueError("Loading into ZeRO-3 partitions does not handle tied embeddings; load without zero.Init.")
    # dtype comes from ds_config's bf16 section: deepspeed 0.19's Init ignores a `dtype` argument
    # on accelerators without fp16 (it picks bf16 on CPU); its F.linear override stays off
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False):
        model = Qwen3VLMoe(cfg)
    reset_buffers(model)  # Init casts floating buffers to the param dtype; rope tables stay fp32
    params = dict(model.named_parameters())
    rank = dist.get_rank()
    loaded = set()
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():  # the same order on every rank: each gather is collective
                name = adapter.name_from_hf(hf_name)
                if name not in params:
                    raise ValueError(f"{file.name} has unexpected tensor {hf_name!r} for this config.")
                p = params[name]
                whole_everywhere = getattr(p, "ds_persist", False)
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=not whole_everywhere):
                    if whole_everywhere or rank == 0:
                        _, tensor = adapter.from_hf(hf_name, f.get_tensor(hf_name), cfg, expert_layout)
                        if tuple(tensor.shape) != tuple(p.shape):
                            raise ValueError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(p.shape)}.")
                        with torch.no_grad():
                            p.copy_(tensor)
                loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{path} is missing {len(missing)} tensors, e.g. {missing[:5]}.")
    return model
