"""Building the model: random init (for tests and from-scratch tiny runs) and meta-device builds."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig, preset
from .model import Qwen3VLMoe
from .moe import GroupedExperts, Router
from .text import RMSNorm, TextModel
from .rope import mrope_axis_of_frequency, text_inv_freq


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02) -> None:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, GroupedExperts):
            nn.init.normal_(module.gate_up_proj, 0.0, std)
            nn.init.normal_(module.down_proj, 0.0, std)
        elif isinstance(module, Router):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


@torch.no_grad()
def reset_buffers(model: Qwen3VLMoe) -> None:
    """Recompute the non-persistent rope buffers (needed after building on the meta device)."""
    for m in model.modules():
        if isinstance(m, TextModel):
            m.inv_freq = text_inv_freq(head_dim=m.cfg.head_dim, theta=m.cfg.rope_theta).to(m.inv_freq.device)
            m.mrope_axis = mrope_axis_of_frequency(head_dim=m.cfg.head_dim, mrope_section=m.cfg.mrope_section).to(
                m.mrope_axis.device
            )


def build_model(
    cfg: ModelConfig | str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int | None = 0,
) -> Qwen3VLMoe:
    """A randomly initialised model (std from the config); `device="meta"` builds shapes only."""
    cfg = preset(cfg) if isinstance(cfg, str) else cfg
    if str(device) == "meta":
        with torch.device("meta"):
            return Qwen3VLMoe(cfg).to(dtype)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3VLMoe(cfg)
    init_weights(model, cfg.text.initializer_range)
    return model.to(dtype)


def count_parameters(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
