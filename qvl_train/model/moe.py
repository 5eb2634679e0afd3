"""Sparse MoE block: softmax top-k router, a token dispatcher seam, grouped experts, and the
load-balancing auxiliary loss.

Legend: T tokens (flattened batch), S = T_valid * k routed assignments, D hidden, E experts
(El local experts on this rank), I expert intermediate, k top-k.

Parallelism is applied from outside: `MoEBlock.dispatcher` is a `LocalDispatcher` here and is
swapped for an all-to-all dispatcher by the trainer for expert parallelism. The model package
never imports torch.distributed.

Expert weights live in memory in transformers-5 layout (gate_up_proj [E, 2I, D], down_proj
[E, D, I]), the layout DeepSpeed AutoEP and PEFT's target_parameters expect; the Hub layout is
handled by the state-dict adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig


class Router(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_TE = F.linear(x_TD, self.weight)
        probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        top_w_Tk, top_i_Tk = torch.topk(probs_TE, self.top_k, dim=-1)
        top_w_Tk = top_w_Tk / top_w_Tk.sum(dim=-1, keepdim=True)
        return logits_TE, top_w_Tk.to(logits_TE.dtype), top_i_Tk


@dataclass
class Dispatched:
    x_SD: torch.Tensor  # routed token copies, grouped by (local) expert
    tokens_per_expert_E: torch.Tensor  # rows of x_SD per local expert (long, on x's device)
    ctx: object  # what combine() needs to send results back


class LocalDispatcher:
    """Single-device dispatch: sort (token, k) assignments by expert."""

    def dispatch(self, x_TD: torch.Tensor, top_i_Tk: torch.Tensor, num_experts: int) -> Dispatched:
        flat_S = top_i_Tk.reshape(-1)
        order_S = torch.argsort(flat_S, stable=True)
        counts_E = torch.bincount(flat_S, minlength=num_experts)
        token_S = order_S // top_i_Tk.shape[1]
        return Dispatched(x_TD[token_S], counts_E, (order_S, top_i_Tk.shape))

    def combine(self, y_SD: torch.Tensor, top_w_Tk: torch.Tensor, d: Dispatched) -> torch.Tensor:
        order_S, (T, k) = d.ctx
        y_unsorted = torch.empty_like(y_SD).index_copy_(0, order_S, y_SD)  # back to (token, k) order
        return (y_unsorted.view(T, k, -1) * top_w_Tk[..., None]).sum(dim=1)


class GroupedExperts(nn.Module):
    """All experts of a layer as fused 3D weights, run as grouped matmuls over expert-sorted rows."""

    def __init__(self, cfg: TextConfig, num_local_experts: int | None = None) -> None:
        super().__init__()
        num = cfg.num_experts if num_local_experts is None else num_local_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num, 2 * cfg.moe_intermediate_size, cfg.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num, cfg.hidden_size, cfg.moe_intermediate_size))
        if cfg.hidden_act != "silu":
            raise ValueError(f"text hidden_act {cfg.hidden_act!r} is not supported (silu only).")

    def forward(self, x_SD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        gate_up_S2I = grouped_mm(x_SD, self.gate_up_proj, tokens_per_expert_E)
        gate_SI, up_SI = gate_up_S2I.chunk(2, dim=-1)
        return grouped_mm(F.silu(gate_SI) * up_SI, self.down_proj, tokens_per_expert_E)


class MoEBlock(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg)
        self.dispatcher = LocalDispatcher()

    def forward(self, x_BLD: torch.Tensor, token_mask_BL: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output, router logits (T, E), top-k expert ids of the routed tokens).

        Padding (token_mask == 0) is never routed: its output is zero and it costs no expert FLOPs.
        """
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(-1, D)
        logits_TE, top_w_Tk, top_i_Tk = self.gate(x_TD)
        if token_mask_BL is None:
            return self._route(x_TD, top_w_Tk, top_i_Tk).view(B, L, D), logits_TE, top_i_Tk
        keep_T = token_mask_BL.reshape(-1).bool()
        idx = keep_T.nonzero().squeeze(1)
        y_kept = self._route(x_TD[idx], top_w_Tk[idx], top_i_Tk[idx])
        y_TD = x_TD.new_zeros(x_TD.shape).index_copy(0, idx, y_kept)
        return y_TD.view(B, L, D), logits_TE, top_i_Tk[idx]

    def _route(self, x_TD, top_w_Tk, top_i_Tk) -> torch.Tensor:
        d = self.dispatcher.dispatch(x_TD, top_i_Tk, self.num_experts)
        y_SD = self.experts(d.x_SD, d.tokens_per_expert_E)
        return self.dispatcher.combine(y_SD, top_w_Tk, d)


# ---- grouped matmul ---------------------------------------------------------------------------


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: torch._grouped_mm's
    backward rejects expanded (stride-0) gradients such as the one from `.sum()`."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


_GROUPED_MM_OK: dict[tuple, bool] = {}


def grouped_mm(x_SK: torch.Tensor, w_ENK: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """out[rows of expert e] = x[rows of e] @ w[e]^T, rows grouped by expert in order.

    Uses torch._grouped_mm where the device/dtype/shape supports it (it needs 16-byte aligned
    strides), else a padded batched matmul (no Python loop over experts).
    """
    if x_SK.shape[0] == 0:  # keep the weights in the graph so every rank's backward matches
        return x_SK.new_zeros(0, w_ENK.shape[1]) + 0 * w_ENK.sum()
    key = (x_SK.device.type, x_SK.dtype, x_SK.shape[1] * x_SK.element_size() % 16, w_ENK.shape[1] * x_SK.element_size() % 16)
    if _GROUPED_MM_OK.get(key, True) and hasattr(torch, "_grouped_mm") and x_SK.dtype == w_ENK.dtype:
        try:
            offs = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
            out = torch._grouped_mm(x_SK.contiguous(), w_ENK.transpose(-2, -1), offs=offs)
            _GROUPED_MM_OK[key] = True
            return _ContiguousGrad.apply(out)
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_OK[key] = False
    return padded_bmm(x_SK, w_ENK, tokens_per_expert_E)


def padded_bmm(x_SK: torch.Tensor, w_ENK: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    E, S = w_ENK.shape[0], x_SK.shape[0]
    capacity = int(tokens_per_expert_E.max())
    expert_S = torch.repeat_interleave(torch.arange(E, device=x_SK.device), tokens_per_expert_E)
    starts_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
    slot_S = torch.arange(S, device=x_SK.device) - starts_E[expert_S]
    buf_ECK = x_SK.new_zeros(E, capacity, x_SK.shape[1]).index_put((expert_S, slot_S), x_SK)
    out_ECN = torch.bmm(buf_ECK, w_ENK.transpose(-2, -1))
    return out_ECN[expert_S, slot_S]


# ---- auxiliary loss -------------------------------------------------------------------------


def load_balancing_loss(
    router_logits: list[torch.Tensor],
    *,
    num_experts: int,
    top_k: int,
    token_mask_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-style aux loss over all MoE layers, padding excluded (transformers' formula):
    f_e = selections of e / valid rows, P_e = sum of p_e / valid rows (both summed over layers),
    aux = E * sum_e f_e * P_e."""
    device = router_logits[0].device
    counts_E = torch.zeros(num_experts, device=device, dtype=torch.float32)
    prob_sum_E = torch.zeros(num_experts, device=device, dtype=torch.float32)
    rows = torch.zeros((), device=device, dtype=torch.float32)
    mask = None if token_mask_T is None else token_mask_T.reshape(-1).to(device=device, dtype=torch.float32)
    for logits_TE in router_logits:
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        sel_Tk = torch.topk(probs_TE, top_k, dim=-1).indices
        m = torch.ones(probs_TE.shape[0], device=device) if mask is None else mask
        counts_E = counts_E.scatter_add(0, sel_Tk.reshape(-1), m.repeat_interleave(top_k))
        prob_sum_E = prob_sum_E + (probs_TE * m[:, None]).sum(0)
        rows = rows + m.sum()
    return num_experts * torch.sum((counts_E / rows) * (prob_sum_E / rows))
