"""The one place where our parameter names and layouts meet the Hugging Face checkpoint's.

Our module tree uses the Hub's key names, so the map is the identity except for layouts:
- `model.visual.patch_embed.proj.weight`: ours a Linear [C, 3*2*16*16]; Hub a Conv3d
  [C, 3, 2, 16, 16] (the same numbers, reshaped).
- routed experts: ours (and transformers 5.x in memory / in its own saves) gate_up_proj
  [E, 2I, D] and down_proj [E, D, I]; the Hub checkpoint (and transformers 4.57) [E, D, 2I] and
  [E, I, D]. We read either, deciding by shape, and refuse when the shape cannot tell (2I == D
  or I == D) unless the caller names the layout. Our exports always use the Hub layout.
Used by both loading (io.from_pretrained) and export (io.save_pretrained).
"""

from __future__ import annotations

from typing import Literal

import torch

from .config import ModelConfig

ExpertLayout = Literal["hub", "transformers5"]

PATCH_EMBED = "model.visual.patch_embed.proj.weight"
GATE_UP, DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"


def to_hf(
    name: str, tensor: torch.Tensor, cfg: ModelConfig, expert_layout: ExpertLayout = "hub"
) -> tuple[str, torch.Tensor]:
    """Our (name, tensor) -> Hub (name, tensor); `expert_layout="transformers5"` keeps the experts
    as transformers 5 saves them (only the random-checkpoint writer asks for it)."""
    if name == PATCH_EMBED:
        v = cfg.vision
        return name, tensor.reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    if expert_layout == "hub" and (name.endswith(GATE_UP) or name.endswith(DOWN)):
        return name, tensor.transpose(1, 2).contiguous()
    return name, tensor


def name_from_hf(name: str) -> str:
    """Our parameter name for a checkpoint key (the same: our modules use the Hub's names)."""
    return name


def from_hf(
    name: str, tensor: torch.Tensor, cfg: ModelConfig, expert_layout: ExpertLayout | None = None
) -> tuple[str, torch.Tensor]:
    """Hub or transformers-5 (name, tensor) -> our (name, tensor)."""
    if name == PATCH_EMBED:
        return name, tensor.reshape(tensor.shape[0], -1)
    if name.endswith(GATE_UP) or name.endswith(DOWN):
        return name, _experts_from_hf(name, tensor, cfg, expert_layout)
    return name, tensor


def expected_layout_shapes(name: str, cfg: ModelConfig) -> dict[ExpertLayout, tuple[int, ...]]:
    t = cfg.text
    E, D, I = t.num_experts, t.hidden_size, t.moe_intermediate_size
    if name.endswith(GATE_UP):
        return {"transformers5": (E, 2 * I, D), "hub": (E, D, 2 * I)}
    return {"transformers5": (E, D, I), "hub": (E, I, D)}


def _experts_from_hf(name, tensor, cfg, expert_layout):
    shapes = expected_layout_shapes(name, cfg)
    if expert_layout is None:
        if shapes["hub"] == shapes["transformers5"]:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, which reads the same in the Hub layout and the "
                "transformers-5 layout (2*moe_intermediate_size or moe_intermediate_size equals hidden_size). "
                "Pass expert_layout='hub' (files from the Hub or transformers 4.57) or "
                "expert_layout='transformers5' (files written by transformers 5.x save_pretrained)."
            )
        matches = [k for k, s in shapes.items() if tuple(tensor.shape) == s]
        if not matches:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}; expected {shapes['hub']} (Hub layout) or "
                f"{shapes['transformers5']} (transformers-5 layout) for this config."
            )
        expert_layout = matches[0]
    if tuple(tensor.shape) != shapes[expert_layout]:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, not {shapes[expert_layout]} ({expert_layout} layout).")
    return tensor.transpose(1, 2) if expert_layout == "hub" else tensor


def expert_slice_from_hf(
    name: str, tensor: torch.Tensor, cfg: ModelConfig, expert_layout: ExpertLayout | None = None
) -> tuple[str, torch.Tensor]:
    """Like from_hf for a routed-expert tensor holding only some experts (dim 0 sliced, e.g.
    safetensors get_slice()[e0:e1] for expert parallelism): the layout is decided by the
    per-expert shape."""
    shapes = expected_layout_shapes(name, cfg)
    n = tensor.shape[0]
    sliced = {k: (n, *s[1:]) for k, s in shapes.items()}
    if expert_layout is None:
        if sliced["hub"] == sliced["transformers5"]:
            raise ValueError(
                f"{name}: per-expert shape {tuple(tensor.shape[1:])} reads the same in the Hub and the "
                "transformers-5 layout; pass expert_layout='hub' or expert_layout='transformers5'."
            )
        matches = [k for k, s in sliced.items() if tuple(tensor.shape) == s]
        if not matches:
            raise ValueError(f"{name} slice has shape {tuple(tensor.shape)}; expected {sliced['hub']} or {sliced['transformers5']}.")
        expert_layout = matches[0]
    if tuple(tensor.shape) != sliced[expert_layout]:
        raise ValueError(f"{name} slice has shape {tuple(tensor.shape)}, not {sliced[expert_layout]} ({expert_layout} layout).")
    return name, tensor.transpose(1, 2) if expert_layout == "hub" else tensor
