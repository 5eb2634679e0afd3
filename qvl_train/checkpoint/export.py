"""Hugging Face export of a training engine: gather the weights one parameter at a time (ZeRO-3
partitions, EP shards) and write the Hub layout shard by shard; `trainable_state_dict` gathers (e.g.
LoRA) parameters for adapters. The files around the weights (tokenizer, chat template, processor
configs, generation config, model card) are written by qvl_train.checkpoint.serving."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def trainable_state_dict(module: nn.Module, *, rank: int) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters (e.g. LoRA) on rank 0, gathered from ZeRO-3
    one at a time; the other ranks take part in the gathers and get {}."""
    from qvl_train.parallel.expert_parallel import gathered_to_rank0

    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            full = gathered_to_rank0(p, rank)
            if rank == 0:
                out[name] = full
    return out


def export_hf(engine, out_dir: Path, *, rank: int, ep_info, dtype=None) -> Path | None:
    """Every rank must call it (the gathers are collective); rank 0 writes. Expert shards (EP)
    are gathered by qvl_train.parallel.expert_parallel, one parameter at a time."""
    from qvl_train.parallel.expert_parallel import save_full_pretrained

    save_full_pretrained(engine, out_dir, ep_info=ep_info, dtype=dtype)
    if dist.is_initialized():
        dist.barrier()
    return out_dir if rank == 0 else None
