"""Evaluation under data parallelism: held-out loss and generation exact-match accuracy.

Ranks hold different numbers of eval batches, but under ZeRO-3 every forward is collective, so
each rank runs the same number of forwards: ranks that run out repeat a batch with weight 0.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch.distributed as dist

from qvl_train.data import build_loader, model_inputs
from qvl_train.data.config import DataConfig
from qvl_train.model import generate
from qvl_train.model.model import IGNORE_INDEX


def _equalised(batches: list[dict], device: torch.device) -> Iterable[tuple[dict, float]]:
    n = torch.tensor([len(batches)], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    if n.item() and not batches:
        raise RuntimeError("this rank has no eval batch while others do; add eval data or use fewer ranks")
    for i in range(int(n.item())):
        yield (batches[i], 1.0) if i < len(batches) else (batches[0], 0.0)


HOST_KEYS = ("image_grid_thw", "video_grid_thw")  # small metadata the model reads on the host


def to_device(batch: dict, device: torch.device) -> dict:
    """Asynchronous host-to-device copies (the loader pins its batches on GPU machines). The
    grids stay on the CPU: the model reads them with .tolist(), which on a GPU copy would be a
    host sync per read."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k not in HOST_KEYS else v)
            for k, v in model_inputs(batch).items()}


def eval_batches(cfg: DataConfig, tokenizer, *, rank: int, world: int, max_batches: int = 0,
                 max_samples: int = 0) -> list[dict]:
    """This rank's share of the eval split, unpacked (one sample per row), at most `max_batches`
    batches or `max_samples` samples (0: no limit)."""
    # one encoding buffer of max_samples: its batches hold exactly the first max_samples samples
    buffer_size = min(cfg.buffer_size, max_samples) if max_samples else cfg.buffer_size
    loader = build_loader(dataclasses.replace(cfg, packing=False, num_workers=0, buffer_size=buffer_size), tokenizer,
                          rank=rank, world_size=world, split="eval", num_epochs=1)
    out, samples = [], 0
    for batch in loader:
        if (max_batches and len(out) >= max_batches) or (max_samples and samples >= max_samples):
            break
        out.append(batch)
        samples += batch["input_ids"].shape[0]
    return out


@torch.no_grad()
def eval_loss(model, batches: list[dict], device: torch.device) -> float:
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for batch, weight in _equalised(batches, device):
        inputs = to_device(batch, device)
        out = model(**inputs, loss_normalizer=1.0, return_logits=False)
        sums[0] += weight * float(out.ce_loss)
        sums[1] += weight * float((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    dist.all_reduce(sums)
    model.train(was_training)
    return float(sums[0] / sums[1].clamp(min=1))


def split_prompts(batch: dict, pad_id: int) -> tuple[dict, list[list[int]]]:
    """Unpacked eval batch -> left-padded prompts (everything before the last answer's first
    trained token) and the reference answer token ids."""
    ids, labels = batch["input_ids"], batch["labels"]
    prompts, refs = [], []
    for row_ids, row_labels in zip(ids, labels):
        trained = (row_labels != IGNORE_INDEX).nonzero().squeeze(1)
        first = int(trained[0]) if len(trained) else int(batch["attention_mask"][len(prompts)].sum())
        prompts.append(row_ids[:first])
        refs.append(row_labels[trained].tolist())
    L = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for b, p in enumerate(prompts):
        input_ids[b, L - len(p):] = p
        mask[b, L - len(p):] = 1
    gen = {"input_ids": input_ids, "attention_mask": mask}
    for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        gen[k] = batch.get(k)
    return gen, refs


@torch.no_grad()
def exact_match(model, batches: list[dict], tokenizer, device: torch.device, *, max_new_tokens: int,
                eos_ids: list[int]) -> tuple[float, int, list[tuple[str, str]]]:
    """Greedy answers vs references after stripping whitespace and case; returns (accuracy,
    number of samples, a few (prediction, reference) examples from rank 0)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    examples = []
    for batch, weight in _equalised(batches, device):
        gen, refs = split_prompts(batch, tokenizer.pad_token_id)
        gen = {k: (v.to(device) if v is not None and k not in HOST_KEYS else v) for k, v in gen.items()}
        out = generate(model, **gen, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                       pad_token_id=tokenizer.pad_token_id, stop_early=not dist.is_initialized() or dist.get_world_size() == 1)
        new = out[:, gen["input_ids"].shape[1]:].tolist()
        for pred_ids, ref_ids in zip(new, refs):
            pred, ref = _answer(tokenizer, pred_ids, eos_ids), _answer(tokenizer, ref_ids, eos_ids)
            counts[0] += weight * float(pred == ref)
            counts[1] += weight
            if weight and len(examples) < 8:
                examples.append((pred, ref))
    dist.all_reduce(counts)
    model.train(was_training)
    return float(counts[0] / counts[1].clamp(min=1)), int(counts[1]), examples


def _answer(tokenizer, ids: list[int], eos_ids: list[int]) -> str:
    for i, t in enumerate(ids):
        if t in eos_ids:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip().lower()
