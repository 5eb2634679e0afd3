"""Which parameters train, at which learning rate: parts (vision tower, merger, language model),
freeze switches, per-part learning rates, no weight decay on 1-D tensors, warmup + cosine."""

from __future__ import annotations

import math

import torch
from torch import nn

from qvl_train.config.schema import OptimSection

PARTS = ("vision", "merger", "llm")


def part_of(name: str) -> str:
    if name.startswith("model.visual.merger") or name.startswith("model.visual.deepstack_merger_list"):
        return "merger"
    if name.startswith("model.visual."):
        return "vision"
    return "llm"


def apply_freeze(model: nn.Module, cfg: OptimSection) -> None:
    frozen = {"vision": cfg.freeze_vision, "merger": cfg.freeze_merger, "llm": cfg.freeze_llm}
    for name, p in model.named_parameters():
        if frozen[part_of(name)]:
            p.requires_grad_(False)


def param_groups(model: nn.Module, cfg: OptimSection) -> list[dict]:
    lrs = {"llm": cfg.lr, "vision": cfg.vision_lr or cfg.lr, "merger": cfg.merger_lr or cfg.lr}
    buckets: dict[tuple[str, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            # ds_shape: a ZeRO-3 partitioned parameter (built under zero.Init) is flat here
            decay = len(getattr(p, "ds_shape", p.shape)) >= 2 and "norm" not in name
            buckets.setdefault((part_of(name), decay), []).append(p)
    groups = []
    for (part, decay), params in sorted(buckets.items()):
        groups.append(
            {"params": params, "lr": lrs[part], "weight_decay": cfg.weight_decay if decay else 0.0, "name": f"{part}{'' if decay else '_no_decay'}"}
        )
    if not groups:
        raise ValueError("No trainable parameters: check optim.freeze_* and peft settings.")
    return groups


def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0 to 1, then cosine down to min_ratio at max_steps."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
