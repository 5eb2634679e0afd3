"""Hugging Face export of a training engine: gather the full weights (ZeRO-3 partitions one
parameter at a time, so rank 0 holds one copy of the model and never two) and write the Hub
layout with save_pretrained, plus the tokenizer, chat template and processor configs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from qvl_train.model import save_pretrained

PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja")


def iter_gathered(module: nn.Module, *, rank: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full CPU tensor) for every parameter and persistent buffer, on rank 0 only; the
    other ranks take part in the gathers and yield nothing."""
    import deepspeed

    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=hasattr(p, "ds_id")):
            if rank == 0:
                yield name, p.detach().to("cpu", copy=True)
    for name, b in module.named_buffers():
        if rank == 0 and name in module.state_dict():
            yield name, b.detach().cpu()


def full_state_dict(module: nn.Module, *, rank: int, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    wanted = {n for n, p in module.named_parameters() if p.requires_grad} if trainable_only else None
    return {n: t for n, t in iter_gathered(module, rank=rank) if wanted is None or n in wanted}


def export_hf(model: nn.Module, out_dir: Path, *, rank: int, tokenizer, tokenizer_src: Path | None, dtype=None) -> Path | None:
    """Writes on rank 0; every rank must call it (the gathers are collective)."""
    state = full_state_dict(model, rank=rank)
    if rank == 0:
        save_pretrained(model, out_dir, state_dict=state, dtype=dtype)
        tokenizer.save_pretrained(out_dir)
        if tokenizer_src is not None:
            for name in PROCESSOR_FILES:
                if (tokenizer_src / name).exists() and not (out_dir / name).exists():
                    shutil.copy(tokenizer_src / name, out_dir / name)
    del state
    if dist.is_initialized():
        dist.barrier()
    return out_dir if rank == 0 else None
