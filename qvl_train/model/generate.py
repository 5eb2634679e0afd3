"""Generation with a KV cache (greedy or sampling), for evaluation and the demo.

Decoding positions: after prefill, a new token's three MRoPE positions all equal
(number of real tokens before it) + rope_delta, where rope_delta = max prefill position + 1 -
prefill length; this continues each row's positions right after its last visual/text position.
"""

from __future__ import annotations

import torch

from .model import Qwen3VLMoe
from .text import KVCache


@torch.no_grad()
def generate(
    model: Qwen3VLMoe,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    stop_early: bool = True,
) -> torch.Tensor:
    """Returns (B, L + new) token ids: the prompt followed by the generated tokens; rows that hit
    EOS are filled with pad_token_id (default: the first EOS id). Left-pad batched prompts.

    stop_early=False always runs max_new_tokens forwards: data-parallel ranks (ZeRO-3) must run
    the same number of forwards whatever their prompts produce."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = eos_token_id if eos_token_id is not None else model.config.text.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (int(eos_ids[0]) if len(eos_ids) else 0)

    position_ids, rope_deltas = model.rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask)
    cache = KVCache(len(model.model.language_model.layers))
    out = model(
        input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw,
        cache=cache,
        logits_to_keep=1,
    )
    tokens, done = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        next_B = _choose(out.logits[:, -1].float(), do_sample, temperature, top_k, top_p, generator)
        next_B = torch.where(done, torch.full_like(next_B, pad), next_B)
        tokens = torch.cat([tokens, next_B[:, None]], dim=1)
        done = done | torch.isin(next_B, eos_ids)
        if (stop_early and bool(done.all())) or step == max_new_tokens - 1:
            break
        pos_B1 = attention_mask.sum(-1, keepdim=True) + rope_deltas
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_B)[:, None]], dim=1)
        out = model(
            next_B[:, None],
            attention_mask=attention_mask,
            position_ids=pos_B1[None].expand(3, -1, -1),
            cache=cache,
        )
    return tokens


def _choose(logits_BV, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
    if not do_sample:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1])).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits_BV, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(1, order, sorted_logits)
    probs = torch.softmax(logits_BV, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
