"""Helpers that build transformers' Qwen3VLMoeForConditionalGeneration (eager attention and
eager experts) with our weights, and random multimodal batches, for parity tests."""

from __future__ import annotations

import dataclasses

import torch
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

from qvl_train.model import ModelConfig, Qwen3VLMoe, build_model, preset
from qvl_train.model import state_dict_adapter as adapter


def tiny_config(**text_changes) -> ModelConfig:
    cfg = preset("tiny")
    return cfg.replace(text=dataclasses.replace(cfg.text, **text_changes)) if text_changes else cfg


def hf_config(cfg: ModelConfig) -> Qwen3VLMoeConfig:
    hcfg = Qwen3VLMoeConfig(**cfg.to_hf_dict())
    for c in (hcfg, hcfg.text_config, hcfg.vision_config):
        c._attn_implementation = "eager"
        c._experts_implementation = "eager"
    return hcfg


def hf_twin(model: Qwen3VLMoe) -> Qwen3VLMoeForConditionalGeneration:
    """transformers' model holding exactly our weights (its in-memory layout = transformers5)."""
    torch.manual_seed(0)
    hf = Qwen3VLMoeForConditionalGeneration(hf_config(model.config)).to(next(model.parameters()).dtype)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == adapter.PATCH_EMBED:
            name, tensor = adapter.to_hf(name, tensor, model.config)
        state[name] = tensor
    assert hf.config.text_config._experts_implementation == "eager"
    assert hf.config.text_config._attn_implementation == "eager"
    result = hf.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight"} if model.config.tie_word_embeddings else not result.missing_keys
    return hf.eval()


def pair(cfg: ModelConfig | None = None, seed: int = 0):
    model = build_model(cfg or tiny_config(), seed=seed).eval()
    return model, hf_twin(model)


def image_span(cfg: ModelConfig, grid: tuple[int, int, int]) -> list[int]:
    t, h, w = grid
    return [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // 4) + [cfg.vision_end_token_id]


def video_span(cfg: ModelConfig, grid: tuple[int, int, int], timestamp_ids: list[int] | None = None) -> list[int]:
    """Per temporal group: (timestamp text) <vision_start> video_pad * (h*w/4) <vision_end>."""
    t, h, w = grid
    out = []
    for i in range(t):
        out += (timestamp_ids or [7, 8 + i])
        out += [cfg.vision_start_token_id] + [cfg.video_token_id] * (h * w // 4) + [cfg.vision_end_token_id]
    return out


def make_batch(
    cfg: ModelConfig,
    rows: list[list],
    *,
    padding: str = "right",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """rows: per sample a list of items: int (n random text tokens), ("image", (t,h,w)) or
    ("video", (t,h,w)). Returns a processor-like batch incl. mm_token_type_ids."""
    g = torch.Generator().manual_seed(seed)
    seqs, img_grids, vid_grids = [], [], []
    for row in rows:
        ids = []
        for item in row:
            if isinstance(item, int):
                ids += torch.randint(0, 900, (item,), generator=g).tolist()
            elif item[0] == "image":
                ids += image_span(cfg, item[1])
                img_grids.append(item[1])
            else:
                ids += video_span(cfg, item[1])
                vid_grids.append(item[1])
        seqs.append(ids)
    L = max(map(len, seqs))
    pad = cfg.text.pad_token_id or 0
    input_ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, ids in enumerate(seqs):
        sl = slice(0, len(ids)) if padding == "right" else slice(L - len(ids), L)
        input_ids[b, sl] = torch.tensor(ids)
        attention_mask[b, sl] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    mm = torch.zeros_like(input_ids)
    mm[input_ids == cfg.image_token_id] = 1
    mm[input_ids == cfg.video_token_id] = 2
    batch["mm_token_type_ids"] = mm
    patch_dim = cfg.vision.patch_dim
    if img_grids:
        grid = torch.tensor(img_grids)
        batch["image_grid_thw"] = grid
        batch["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g)
    if vid_grids:
        grid = torch.tensor(vid_grids)
        batch["video_grid_thw"] = grid
        batch["pixel_values_videos"] = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g)
    return batch


def ours_kwargs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "mm_token_type_ids"}


def rank_batch(cfg: ModelConfig, step: int, rank: int) -> dict:
    """The labelled micro-batch rank `rank` sees at `step` in the 2-process tests: rank 1 starts
    text-only and padded next to a rank with images (the case that hangs other stacks)."""
    if rank == 1 and step == 0:
        rows = [[9], [5]]
    elif rank == 1:
        rows = [[3, ("image", (1, 4, 4)), 4], [6]]
    else:
        rows = [[2, ("image", (1, 4, 6)), 3], [4, ("image", (1, 2, 4)), 2]]
    b = ours_kwargs(make_batch(cfg, rows, seed=100 * step + rank))
    labels = b["input_ids"].clone()
    labels[b["attention_mask"] == 0] = -100
    b["labels"] = labels
    return b


def supervised_tokens(b: dict) -> int:
    """Next-token targets in a labelled batch (the global loss normaliser counts these)."""
    return int((b["labels"][:, 1:] != -100).sum())
