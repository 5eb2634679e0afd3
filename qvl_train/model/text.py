"""The Qwen3-VL-MoE text decoder: q/k-normed GQA attention with interleaved MRoPE, MoE or dense
MLPs, DeepStack injection of visual features into the first layers.

Legend: B batch, L query length, Lk key length (cache included), D hidden, H query heads,
K kv heads, Dh head dim, E experts, T = B*L tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import DocumentAttention, DocumentLayout, resolve_attn_impl, text_attention
from .config import TextConfig
from .moe import MoEBlock, external_moe_forward
from .rope import apply_rope, mrope_axis_of_frequency, mrope_cos_sin, text_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache:
    """Per-layer key/value tensors (B, K, Lk, Dh), grown by concatenation (generation only)."""

    def __init__(self, num_layers: int) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def update(self, layer: int, k_BKLD: torch.Tensor, v_BKLD: torch.Tensor):
        if self.kv[layer] is not None:
            k_old, v_old = self.kv[layer]
            k_BKLD, v_BKLD = torch.cat([k_old, k_BKLD], dim=2), torch.cat([v_old, v_BKLD], dim=2)
        self.kv[layer] = (k_BKLD, v_BKLD)
        return k_BKLD, v_BKLD

    def length(self) -> int:
        return 0 if self.kv[0] is None else self.kv[0][0].shape[2]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x_BLD, rope, attend: DocumentAttention, cache: KVCache | None = None) -> torch.Tensor:
        B, L, _ = x_BLD.shape
        q_BLHD = self.q_norm(self.q_proj(x_BLD).view(B, L, -1, self.head_dim))
        k_BLKD = self.k_norm(self.k_proj(x_BLD).view(B, L, -1, self.head_dim))
        v_BLKD = self.v_proj(x_BLD).view(B, L, -1, self.head_dim)
        q_BLHD, k_BLKD = apply_rope(q_BLHD, *rope), apply_rope(k_BLKD, *rope)
        if cache is not None:
            k_BKLD, v_BKLD = cache.update(self.layer_idx, k_BLKD.transpose(1, 2), v_BLKD.transpose(1, 2))
            k_BLKD, v_BLKD = k_BKLD.transpose(1, 2), v_BKLD.transpose(1, 2)
        return self.o_proj(attend(q_BLHD, k_BLKD, v_BLKD).reshape(B, L, -1))


class DenseMLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MoEBlock(cfg) if self.is_moe else DenseMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.activation_checkpointing = False
        self.top_k = cfg.num_experts_per_tok

    def forward(self, x_BLD, rope, attend, token_mask_BL, cache=None):
        """Returns (hidden, router logits or None, routed expert ids or None).

        `mlp` of an MoE layer is our MoEBlock, or a layer swapped in from outside that takes
        hidden states only (DeepSpeed AutoEP's; see moe.external_moe_forward)."""
        x_BLD = x_BLD + self.self_attn(self.input_layernorm(x_BLD), rope, attend, cache)
        h_BLD = self.post_attention_layernorm(x_BLD)
        if not self.is_moe:
            return x_BLD + self.mlp(h_BLD), None, None
        if isinstance(self.mlp, MoEBlock):
            y_BLD, logits_TE, experts_Sk = self.mlp(h_BLD, token_mask_BL)
        else:
            y_BLD, logits_TE, experts_Sk = external_moe_forward(self.mlp, h_BLD, token_mask_BL, self.top_k)
        return x_BLD + y_BLD, logits_TE, experts_Sk


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", text_inv_freq(head_dim=cfg.head_dim, theta=cfg.rope_theta), persistent=False)
        axis = mrope_axis_of_frequency(head_dim=cfg.head_dim, mrope_section=cfg.mrope_section)
        self.register_buffer("mrope_axis", axis, persistent=False)
        self.attn_impl = "auto"  # see attention.ATTN_IMPLS

    def _apply(self, fn, recurse=True):
        """Casts (model.to(bf16), DeepSpeed's engine.bfloat16()) leave the rope frequencies fp32:
        in bf16 (8 mantissa bits) inv_freq is off by up to 0.4%, i.e. whole radians at 16k tokens."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if inv_freq.is_meta or self.inv_freq.is_meta:
            self.inv_freq = self.inv_freq.float()
        else:
            self.inv_freq = inv_freq.float().to(self.inv_freq.device)
        return self

    def forward(
        self,
        embeds_BLD: torch.Tensor,
        *,
        position_ids_3BL: torch.Tensor,
        attention_mask_BLk: torch.Tensor | None,
        segment_ids_BL: torch.Tensor | None = None,
        visual_mask_BL: torch.Tensor | None = None,
        deepstack: list[torch.Tensor] | None = None,
        cache: KVCache | None = None,
        layout: DocumentLayout | None = None,
        plan_attention=None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """`layout`: the batch's document layout as host integers (the loader's), if known: the
        attention plan is then made without reading the masks back from the device.
        `plan_attention`: text_attention's stand-in when the input is a slice of longer rows
        (see model.SequenceSlice); it plans from the whole row, so `layout` is not used then."""
        B, L, _ = embeds_BLD.shape
        kv_len = L + (cache.length() if cache is not None else 0)
        # one plan (block mask, cu_seqlens or document runs) for every layer of this forward
        attend = (plan_attention or text_attention)(
            resolve_attn_impl(self.attn_impl, embeds_BLD.device, embeds_BLD.dtype),
            attention_mask_BLk=attention_mask_BLk, segment_ids_BL=segment_ids_BL, q_len=L, kv_len=kv_len,
            device=embeds_BLD.device, **({} if plan_attention else {"layout": layout}),
        )
        rope = mrope_cos_sin(position_ids_3BL, inv_freq_F=self.inv_freq, axis_F=self.mrope_axis, dtype=embeds_BLD.dtype)
        token_mask_BL = None if attention_mask_BLk is None else attention_mask_BLk[:, -L:]
        x_BLD, router_logits, routed = embeds_BLD, [], []
        if deepstack:  # visual token positions, their count known on the host: no sync
            visual_N = torch.nonzero_static(visual_mask_BL.reshape(-1), size=deepstack[0].shape[0]).squeeze(1)
        for i, layer in enumerate(self.layers):
            if layer.activation_checkpointing and self.training:
                x_BLD, logits, experts = checkpoint(layer, x_BLD, rope, attend, token_mask_BL, cache, use_reentrant=False)
            else:
                x_BLD, logits, experts = layer(x_BLD, rope, attend, token_mask_BL, cache)
            if logits is not None:
                router_logits.append(logits)
                routed.append(experts)
            if deepstack is not None and i < len(deepstack):
                # DeepStack: add level-i visual features at the visual token positions
                x_BLD = x_BLD.reshape(B * L, -1).index_add(0, visual_N, deepstack[i].to(x_BLD.dtype)).view(x_BLD.shape)
        return self.norm(x_BLD), router_logits, routed
