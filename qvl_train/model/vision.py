"""The Qwen3-VL vision tower: patch embed, interpolated learned positions, 2D rope, blocks with
block-diagonal attention per temporal group (one kernel call per block over the whole batch), the patch merger and the DeepStack mergers.

Legend: N patches (merge-block-major order t, h/2, w/2, 2, 2), C vision hidden, Hd heads,
Dh head dim, M = N/4 merged tokens, O out hidden (= text hidden).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import DocumentAttention, host_to_device, resolve_attn_impl, vision_attention
from .config import VisionConfig
from .rope import rotate_half, vision_patch_rows_cols, vision_rope_cos_sin


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride on a pre-flattened (C, T, ph, pw) patch is exactly a Linear;
    the Linear form skips cuDNN's slow 3D-conv path (see torch 2.9's Conv3D regression)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.patch_dim, cfg.hidden_size, bias=True)

    def forward(self, pixel_values_NP: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values_NP.to(self.proj.weight.dtype))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x_NC: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attend: DocumentAttention) -> torch.Tensor:
        N, C = x_NC.shape
        q_NHD, k_NHD, v_NHD = self.qkv(x_NC).view(N, 3, self.num_heads, -1).unbind(1)
        q_NHD, k_NHD = _apply_vision_rope(q_NHD, k_NHD, *rope)
        # every image and frame group of the batch in one call (one "row" of N tokens)
        out_1NHD = attend(q_NHD[None], k_NHD[None], v_NHD[None])
        return self.proj(out_1NHD.reshape(N, C))


def _apply_vision_rope(q: torch.Tensor, k: torch.Tensor, cos_ND: torch.Tensor, sin_ND: torch.Tensor):
    # rotary in fp32, as the reference does, then back to the activation dtype
    cos, sin = cos_ND[:, None], sin_ND[:, None]
    qf, kf = q.float(), k.float()
    return (qf * cos + rotate_half(qf) * sin).to(q.dtype), (kf * cos + rotate_half(kf) * sin).to(k.dtype)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        if cfg.hidden_act != "gelu_pytorch_tanh":
            raise ValueError(f"vision hidden_act {cfg.hidden_act!r} is not supported (gelu_pytorch_tanh only).")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x_NC, rope, attend):
        x_NC = x_NC + self.attn(self.norm1(x_NC), rope, attend)
        return x_NC + self.mlp(self.norm2(x_NC))


class PatchMerger(nn.Module):
    """2x2 merge: (N, C) -> (N/4, 4C) -> MLP -> (N/4, O). DeepStack mergers normalise after the
    shuffle (over 4C), the final merger before it (over C)."""

    def __init__(self, cfg: VisionConfig, *, postshuffle_norm: bool) -> None:
        super().__init__()
        merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.merged = merged
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(merged if postshuffle_norm else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(merged, merged)
        self.linear_fc2 = nn.Linear(merged, cfg.out_hidden_size)

    def forward(self, x_NC: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x_M4C = self.norm(x_NC.reshape(-1, self.merged))
        else:
            x_M4C = self.norm(x_NC).reshape(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x_M4C)))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.side = int(cfg.num_position_embeddings**0.5)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(cfg, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes
        )
        self.checkpoint_blocks = False
        self.attn_impl = "auto"  # see attention.ATTN_IMPLS

    def forward(self, pixel_values_NP: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Merged features (M, O) of all images/videos in input order, and one (M, O) tensor per
        DeepStack level. A plain tuple, so ZeRO-3's hooks can see every output tensor."""
        grid_thw = grid_thw.long().cpu()
        n_expected = int(grid_thw.prod(-1).sum())
        if pixel_values_NP.shape[0] != n_expected:
            raise ValueError(
                f"pixel rows ({pixel_values_NP.shape[0]}) do not match grid_thw (sum t*h*w = {n_expected})."
            )
        device = pixel_values_NP.device
        # index math on the host (grid_thw is host data), then asynchronous copies
        rows_N, cols_N = vision_patch_rows_cols(grid_thw, self.cfg.spatial_merge_size)
        index_N4, weight_N4 = self._pos_embed_taps(rows_N, cols_N, grid_thw)
        rows_N, cols_N = host_to_device(rows_N, device), host_to_device(cols_N, device)
        x_NC = self.patch_embed(pixel_values_NP)
        x_NC = x_NC + self._interpolated_pos_embed(host_to_device(index_N4, device),
                                                   host_to_device(weight_N4, device)).to(x_NC.dtype)
        rope = vision_rope_cos_sin(rows_N, cols_N, head_dim=self.cfg.head_dim, theta=self.cfg.rope_theta)
        # one attention group per image and per temporal patch group of a video
        lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).tolist()
        attend = vision_attention(resolve_attn_impl(self.attn_impl, device, x_NC.dtype), lengths, device)
        deepstack = []
        for i, block in enumerate(self.blocks):
            if self.checkpoint_blocks and self.training:
                x_NC = torch.utils.checkpoint.checkpoint(block, x_NC, rope, attend, use_reentrant=False)
            else:
                x_NC = block(x_NC, rope, attend)
            if i in self.cfg.deepstack_visual_indexes:
                j = self.cfg.deepstack_visual_indexes.index(i)
                deepstack.append(self.deepstack_merger_list[j](x_NC))
        return self.merger(x_NC), deepstack

    def _pos_embed_taps(self, rows_N, cols_N, grid_thw) -> tuple[torch.Tensor, torch.Tensor]:
        """The 4 table entries and bilinear (align_corners=True) weights that resample the learned
        side x side table to each patch's grid."""
        hs = torch.repeat_interleave(grid_thw[:, 1], grid_thw.prod(-1))
        ws = torch.repeat_interleave(grid_thw[:, 2], grid_thw.prod(-1))
        r_taps, r_w = _taps(rows_N, hs, self.side)
        c_taps, c_w = _taps(cols_N, ws, self.side)
        index_N4 = (r_taps[:, :, None] * self.side + c_taps[:, None, :]).reshape(-1, 4)
        weight_N4 = (r_w[:, :, None] * c_w[:, None, :]).reshape(-1, 4)
        return index_N4, weight_N4

    def _interpolated_pos_embed(self, index_N4, weight_N4) -> torch.Tensor:
        return (self.pos_embed(index_N4) * weight_N4[..., None].to(self.pos_embed.weight.dtype)).sum(1)


def _taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = index.float() * (side - 1) / torch.clamp(size - 1, min=1).float()
    floor = src.floor()
    taps = (floor.long()[:, None] + torch.arange(2, device=index.device)).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - torch.arange(2, device=index.device)).abs()).clamp(min=0)
    return taps, weights
