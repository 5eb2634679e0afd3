"""Sparse MoE block: softmax top-k router, a token dispatcher seam, grouped experts, and the
load-balancing auxiliary loss.

Legend: T tokens (flattened batch), S = T_valid * k routed assignments, D hidden, E experts
(El local experts on this rank), I expert intermediate, k top-k.

Parallelism is applied from outside: `MoEBlock.dispatcher` is a `LocalDispatcher` here and is
swapped for an all-to-all dispatcher by the trainer for expert parallelism. A whole MoE block may
also be replaced from outside by a layer that maps hidden states to hidden states (DeepSpeed
AutoEP); `external_moe_forward` adapts such a layer to MoEBlock's contract. The model package
never imports torch.distributed.

Expert weights live in memory in transformers-5 layout (gate_up_proj [E, 2I, D], down_proj
[E, D, I]), the layout DeepSpeed AutoEP and PEFT's target_parameters expect; the Hub layout is
handled by the state-dict adapter.
"""

from __future__ import annotations

import warnings
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
    """What a dispatcher hands the experts. Rows of x_SD past tokens_per_expert_E.sum() are
    padding picks (LocalDispatcher sorts them last; the shapes stay static, so no host sync):
    the experts never compute on them, and what they return there (output rows and the rows'
    input and weight gradients) is never read - the dispatcher drops it."""

    x_SD: torch.Tensor  # routed token copies, grouped by (local) expert; padding copies last
    weights_S: torch.Tensor  # the router weight of each routed copy
    tokens_per_expert_E: torch.Tensor  # rows of x_SD per local expert, padding excluded (long, on x's device)
    ctx: object  # what combine() needs to send results back


class LocalDispatcher:
    """Single-device dispatch: sort (token, k) picks by expert. Padding picks carry the sentinel
    expert id E (all k picks of a padding token), so the stable sort puts them after every real
    expert's rows, and the counts leave them out."""

    def dispatch(self, x_TD: torch.Tensor, top_w_Tk: torch.Tensor, top_i_Tk: torch.Tensor, num_experts: int) -> Dispatched:
        T, k = top_i_Tk.shape
        sorted_S, order_S = torch.sort(top_i_Tk.reshape(-1), stable=True)
        counts_E = expert_counts(sorted_S, num_experts)
        token_S = order_S // k
        pad_S = sorted_S == num_experts
        # the experts leave padding rows unwritten: their input gradients go to a scratch row T
        # (dropped) and their weight gradients are zeroed (masked_fill is NaN-safe, a product is not)
        x_SD = _GatherRows.apply(x_TD, token_S, token_S.masked_fill(pad_S, T))
        w_S = top_w_Tk.reshape(-1)[order_S].masked_fill(pad_S, 0)
        valid_T = top_i_Tk[:, 0] < num_experts
        return Dispatched(x_SD, w_S, counts_E, (token_S, order_S, valid_T, k))

    def combine(self, y_SD: torch.Tensor, d: Dispatched) -> torch.Tensor:
        return combine_rows(y_SD, *d.ctx)


def combine_rows(y_SD: torch.Tensor, token_S: torch.Tensor, order_S: torch.Tensor, valid_T: torch.Tensor, top_k: int) -> torch.Tensor:
    """Sum each token's routed outputs: row s of y_SD is token token_S[s]'s pick order_S[s] (in
    the flattened (T, k) layout). Padding tokens (valid_T False) get exactly zero, whatever their
    rows hold (the experts leave them unwritten), and zero gradient back to those rows; y_SD may
    also hold only the real picks (the all-to-all dispatcher sends no padding)."""
    T, D = valid_T.shape[0], y_SD.shape[1]
    if y_SD.dtype == torch.float32:
        # scatter-add straight into the output: one pass over y, no unsorted copy
        y_TD = _ScatterRows.apply(y_SD, token_S, T, True)
    else:
        # low precision: sum each token's k contributions in fp32 (index_add_ would round per add)
        y_TkD = _ScatterRows.apply(y_SD, order_S, T * top_k, False).view(T, top_k, D)
        y_TD = y_TkD.float().sum(dim=1).to(y_SD.dtype)
    return torch.where(valid_T[:, None], y_TD, 0)


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert (long, on the ids' device); ids == num_experts (padding) are not
    counted. Unlike torch.bincount, never reads the ids' maximum back to the host (a CUDA sync)."""
    ids = expert_ids.reshape(-1)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    return counts.index_add_(0, ids, torch.ones_like(ids))[:num_experts]


class _GatherRows(torch.autograd.Function):
    """x[index] whose backward is a plain index_add_ (aten's accumulate-index_put is slower on CPU).
    `grad_index_S` (optional) sends row gradients elsewhere: to row T, a scratch row that is dropped."""

    @staticmethod
    def forward(ctx, x_TD, index_S, grad_index_S=None):
        ctx.save_for_backward(index_S if grad_index_S is None else grad_index_S)
        ctx.num_rows = x_TD.shape[0]
        ctx.scratch = grad_index_S is not None
        return x_TD.index_select(0, index_S)

    @staticmethod
    def backward(ctx, g_SD):
        (index_S,) = ctx.saved_tensors
        g_TD = g_SD.new_zeros(ctx.num_rows + ctx.scratch, g_SD.shape[1]).index_add_(0, index_S, g_SD)
        return g_TD[: ctx.num_rows], None, None


class _ScatterRows(torch.autograd.Function):
    """Rows of y_SD added (accumulate) or copied into row index_S of a new (num_rows, D) tensor.
    Autograd's index_add_ / index_copy_ save the whole source for backward, although the
    gradient needs only the index: here that is an S x D (k copies per token) tensor less per
    MoE layer kept until backward."""

    @staticmethod
    def forward(ctx, y_SD, index_S, num_rows, accumulate):
        ctx.save_for_backward(index_S)
        if accumulate:
            return y_SD.new_zeros(num_rows, y_SD.shape[1]).index_add_(0, index_S, y_SD)
        return y_SD.new_empty(num_rows, y_SD.shape[1]).index_copy_(0, index_S, y_SD)

    @staticmethod
    def backward(ctx, g_TD):
        (index_S,) = ctx.saved_tensors
        return g_TD.index_select(0, index_S), None, None, None


class GroupedExperts(nn.Module):
    """All experts of a layer as fused 3D weights, run as grouped matmuls over expert-sorted rows."""

    def __init__(self, cfg: TextConfig, num_local_experts: int | None = None) -> None:
        super().__init__()
        num = cfg.num_experts if num_local_experts is None else num_local_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num, 2 * cfg.moe_intermediate_size, cfg.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num, cfg.hidden_size, cfg.moe_intermediate_size))
        if cfg.hidden_act != "silu":
            raise ValueError(f"text hidden_act {cfg.hidden_act!r} is not supported (silu only).")

    def forward(self, x_SD: torch.Tensor, weights_S: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        return experts_swiglu(x_SD, weights_S, self.gate_up_proj, self.down_proj, tokens_per_expert_E)


def experts_swiglu(x_SD, weights_S, w_gate_up_E2ID, w_down_EDI, tokens_per_expert_E) -> torch.Tensor:
    """y = ((silu(x Wg^T) * (x Wu^T)) * w) Wd^T per expert group. Rows past the last group
    (padding, see Dispatched) are never computed: torch._grouped_mm leaves them unwritten (its
    output is allocated empty, on CPU and CUDA alike) and sums weight gradients over each group's
    rows only.

    w * (h @ Wd) == (w * h) @ Wd: scaling the I-wide activation moves less memory than the
    D-wide output (I < D in every Qwen3-VL-MoE).
    """
    weights_S = weights_S.to(x_SD.dtype)
    if x_SD.shape[0] and _grouped_mm_ok(x_SD, w_gate_up_E2ID, w_down_EDI):
        offs = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
        return _FusedExpertsSwiGLU.apply(x_SD, weights_S, w_gate_up_E2ID, w_down_EDI, offs)
    gate_up_S2I = padded_bmm(x_SD, w_gate_up_E2ID, tokens_per_expert_E)
    gate_SI, up_SI = gate_up_S2I.chunk(2, dim=-1)
    return padded_bmm(F.silu(gate_SI) * up_SI * weights_S[:, None], w_down_EDI, tokens_per_expert_E)


class _FusedExpertsSwiGLU:
    """Grouped SwiGLU experts with hand-written backwards: saves only the expert inputs and the
    gate/up projection (the SwiGLU product is recomputed), and skips the expert weight
    gradients when the experts are frozen (LoRA).

    Two autograd nodes, not one, because this backward is the step's memory peak (S = k rows per
    token): once the down projection's backward has returned, the engine frees the incoming
    (S, D) gradient and the saved gate/up projection before the gate/up backward allocates its
    outputs. Each S-sized temporary is also dropped or overwritten in place once used."""

    @staticmethod
    def apply(x_SD, w_S, w_gu, w_d, offs):
        return _DownSwiGLU.apply(_GateUp.apply(x_SD, w_gu, offs), w_S, w_d, offs)


class _GateUp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SD, w_gu, offs):
        ctx.save_for_backward(x_SD, w_gu, offs)
        return torch._grouped_mm(x_SD, w_gu.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, dgu_S2I):
        x_SD, w_gu, offs = ctx.saved_tensors
        need_x, need_gu = ctx.needs_input_grad[:2]
        dgu_S2I = dgu_S2I.contiguous()
        d_w_gu = torch._grouped_mm(dgu_S2I.t(), x_SD, offs=offs) if need_gu else None
        d_x = torch._grouped_mm(dgu_S2I, w_gu, offs=offs) if need_x else None
        return d_x, d_w_gu, None


class _DownSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu_S2I, w_S, w_d, offs):
        g_SI, u_SI = gu_S2I.chunk(2, dim=-1)
        h_SI = F.silu(g_SI).mul_(u_SI).mul_(w_S[:, None])  # no autograd here: update in place
        ctx.save_for_backward(gu_S2I, w_S, w_d, offs)
        return torch._grouped_mm(h_SI, w_d.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, dy_SD):
        gu_S2I, w_S, w_d, offs = ctx.saved_tensors
        need_gu, need_w, need_d = ctx.needs_input_grad[:3]
        dy_SD = dy_SD.contiguous()
        g_SI, u_SI = gu_S2I.chunk(2, dim=-1)
        silu_SI = F.silu(g_SI)
        h0_SI = silu_SI * u_SI
        dh_SI = torch._grouped_mm(dy_SD, w_d, offs=offs)
        d_w_S = torch.linalg.vecdot(dh_SI, h0_SI) if need_w else None
        d_w_d = torch._grouped_mm(dy_SD.t(), h0_SI.mul_(w_S[:, None]), offs=offs) if need_d else None
        del h0_SI, dy_SD
        if not need_gu:
            return None, d_w_S, d_w_d, None
        dh0_SI = dh_SI.mul_(w_S[:, None])
        # write d(gate) and d(up) straight into one buffer (no cat); silu_backward fuses
        # grad * silu'(g) into one pass
        I = g_SI.shape[1]
        dgu_S2I = torch.empty_like(gu_S2I)
        torch.mul(dh0_SI, silu_SI, out=dgu_S2I[:, I:])
        del silu_SI
        dgu_S2I[:, :I] = torch.ops.aten.silu_backward(dh0_SI.mul_(u_SI), g_SI)
        return dgu_S2I, d_w_S, d_w_d, None


class MoEBlock(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg)
        self.dispatcher = LocalDispatcher()

    def forward(self, x_BLD: torch.Tensor, token_mask_BL: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output, router logits (T, E), top-k expert ids (T, k), padding rows set to E).

        Padding (token_mask == 0) never reaches an expert, with no host sync: its picks get the
        sentinel expert id E, which the dispatcher sorts after every real expert's rows and leaves
        out of tokens_per_expert_E, so no expert computes on them (the all-to-all dispatcher does
        not send them); their output and every gradient through them are exactly zero (router
        weight 0 too), and they are left out of the aux loss and the expert load.
        """
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(-1, D)
        logits_TE, top_w_Tk, top_i_Tk = self.gate(x_TD)
        if token_mask_BL is not None:
            # the sentinel id alone marks padding: both dispatchers zero or drop its weights
            top_i_Tk = top_i_Tk.masked_fill(~token_mask_BL.reshape(-1, 1).bool(), self.num_experts)
        return self._route(x_TD, top_w_Tk, top_i_Tk).view(B, L, D), logits_TE, top_i_Tk

    def _route(self, x_TD, top_w_Tk, top_i_Tk) -> torch.Tensor:
        d = self.dispatcher.dispatch(x_TD, top_w_Tk, top_i_Tk, self.num_experts)
        y_SD = self.experts(d.x_SD, d.weights_S, d.tokens_per_expert_E)
        return self.dispatcher.combine(y_SD, d)


def external_moe_forward(mlp: nn.Module, x_BLD: torch.Tensor, token_mask_BL: torch.Tensor | None, top_k: int):
    """Run an MoE layer that was swapped in from outside the model and speaks the plain
    `hidden states -> hidden states` contract (DeepSpeed AutoEP's AutoEPMoELayer, installed by
    deepspeed.initialize; see qvl_train.parallel.expert_parallel). Returns what MoEBlock returns:
    (y_BLD, router logits (T, E), top-k expert ids (T, k) with padding rows set to E).
    (This path keeps host syncs: it selects the valid tokens, and AutoEP's all-to-all needs its
    splits on the host anyway.)

    - Padding is never routed: when token_mask has zeros, only the valid tokens are passed, as
      one (1, T_valid, D) row (the layer routes every row it is given), and padding rows get a
      zero output, exactly as in MoEBlock.
    - Router logits: taken from the layer's return value when it returns (y, logits), else from
      `mlp.captured_router_logits` (a forward hook on the layer's router sets it; it is consumed
      here). Rows of padding tokens are zero in the returned (T, E) logits; the aux loss masks
      them anyway. Without logits the layer contributes no aux loss and no expert load.
    """
    B, L, D = x_BLD.shape
    idx = None
    all_padding = False
    if token_mask_BL is not None and not bool(token_mask_BL.all()):
        idx = token_mask_BL.reshape(-1).bool().nonzero().squeeze(1)
        if idx.numel() == 0:  # still run the layer (its collectives) on one row, output discarded
            all_padding, idx = True, idx.new_zeros(1)
        x_in = x_BLD.reshape(-1, D)[idx][None]
    else:
        x_in = x_BLD
    mlp.captured_router_logits = None
    out = mlp(x_in)
    y, logits = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
    if logits is None:
        logits = getattr(mlp, "captured_router_logits", None)
    mlp.captured_router_logits = None
    y = y.reshape(-1, D)
    if all_padding:
        y = y * 0
        if logits is not None:
            logits = logits * 0
    if idx is not None:
        y = x_BLD.new_zeros(B * L, D).index_copy(0, idx, y.to(x_BLD.dtype))
    if logits is None:
        return y.view(B, L, D), None, None
    logits = logits.reshape(-1, logits.shape[-1])
    if idx is not None:
        logits = logits.new_zeros(B * L, logits.shape[-1]).index_copy(0, idx, logits)
    experts_Tk = torch.topk(logits.detach(), top_k, dim=-1).indices
    if token_mask_BL is not None:  # padding rows marked E, as MoEBlock returns them
        experts_Tk = experts_Tk.masked_fill(~token_mask_BL.reshape(-1, 1).bool(), logits.shape[-1])
    return y.view(B, L, D), logits, experts_Tk


# ---- grouped matmul ---------------------------------------------------------------------------


_GROUPED_MM_OK: dict[tuple, bool] = {}

# What torch._grouped_mm raises when it has no kernel for the operands' dtype, device or strides
# (its argument checks, a missing dispatch key, a GPU generation it does not support). Anything
# else (out of memory, a bad shape, a CUDA fault) is a real error and is re-raised.
_NO_KERNEL_MESSAGES = (
    "expected mat_a to be", "expected mat_b to be", "strides should be multiple of 16 bytes",
    "expected data_ptr to be aligned", "could not run 'aten::_grouped_mm'", "not supported", "only supported",
    "not implemented",
)
_WARNED: set[str] = set()


def is_missing_kernel(err: BaseException) -> bool:
    """Whether `err` from torch._grouped_mm means "no kernel for these operands" (a fallback is
    right) rather than a failure of a kernel that exists (re-raise: out of memory included)."""
    if isinstance(err, torch.OutOfMemoryError):
        return False
    if isinstance(err, NotImplementedError):
        return True
    message = str(err).lower()
    return isinstance(err, RuntimeError) and any(m in message for m in _NO_KERNEL_MESSAGES)


def warn_fallback_once(key: str, message: str) -> None:
    """One warning per fallback kind per process: the fallback is permanent for those operands,
    so repeating it every step would only flood the log."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _grouped_mm_ok(x_SD: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor) -> bool:
    """torch._grouped_mm needs a kernel for this device/dtype and 16-byte aligned strides; probe
    the exact forward and weight-gradient forms once per (device, dtype, D, I)."""
    key = (x_SD.device.type, x_SD.dtype, w_gu.dtype, w_d.dtype, x_SD.shape[1], w_d.shape[2])
    if key not in _GROUPED_MM_OK:
        reason = _probe_grouped_mm(x_SD, w_gu, w_d)
        _GROUPED_MM_OK[key] = reason is None
        if reason is not None:
            warn_fallback_once(
                f"moe:{key}",
                f"torch._grouped_mm has no kernel for the MoE experts on {x_SD.device.type} with "
                f"{x_SD.dtype}/{w_gu.dtype}/{w_d.dtype}, D={x_SD.shape[1]}, I={w_d.shape[2]} ({reason}); "
                "the experts run as a padded batched matmul instead for the rest of the run: every expert "
                "is padded to the busiest one's rows (more memory and FLOPs) and each layer reads two "
                "counts back to the host (a device sync).",
            )
    return _GROUPED_MM_OK[key]


def _probe_grouped_mm(x_SD, w_gu, w_d) -> str | None:
    """None when the grouped kernel runs the exact forms used here; else why not."""
    if not hasattr(torch, "_grouped_mm"):
        return "this torch has no torch._grouped_mm"
    if len({x_SD.dtype, w_gu.dtype, w_d.dtype}) > 1:
        return "mixed dtypes"
    E, D, I = w_d.shape
    try:
        with torch.no_grad():
            offs = torch.arange(1, E + 1, device=x_SD.device, dtype=torch.int32)
            x = x_SD.new_zeros(E, D)
            h = torch._grouped_mm(x, w_gu.transpose(-2, -1), offs=offs)[:, :I].contiguous()
            torch._grouped_mm(h, w_d.transpose(-2, -1), offs=offs)
            torch._grouped_mm(x, w_d, offs=offs)[:, :1]
            torch._grouped_mm(x.t(), h, offs=offs)
        return None
    except (RuntimeError, NotImplementedError) as err:
        if not is_missing_kernel(err):
            raise
        return str(err).splitlines()[0]


def padded_bmm(x_SK: torch.Tensor, w_ENK: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """out[rows of expert e] = x[rows of e] @ w[e]^T as one batched matmul over experts padded to
    the busiest expert's row count: the fallback where torch._grouped_mm has no kernel. Rows past
    the last expert's (padding, see Dispatched) are not computed (zero output, zero gradient).
    Reads two counts back to the host (the buffer's size): this fallback has no sync-free form."""
    E, S = w_ENK.shape[0], x_SK.shape[0]
    n_valid, capacity = torch.stack([tokens_per_expert_E.sum(), tokens_per_expert_E.max()]).tolist()
    expert_S = torch.repeat_interleave(torch.arange(E, device=x_SK.device), tokens_per_expert_E, output_size=n_valid)
    starts_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
    slot_S = torch.arange(n_valid, device=x_SK.device) - starts_E[expert_S]
    buf_ECK = x_SK.new_zeros(E, capacity, x_SK.shape[1]).index_put((expert_S, slot_S), x_SK[:n_valid])
    out_ECN = torch.bmm(buf_ECK, w_ENK.transpose(-2, -1))
    return F.pad(out_ECN[expert_S, slot_S], (0, 0, 0, S - n_valid))


# ---- auxiliary loss -------------------------------------------------------------------------


def load_balancing_loss(
    router_logits: list[torch.Tensor],
    *,
    num_experts: int,
    top_k: int,
    token_mask_T: torch.Tensor | None = None,
    reduce=None,
) -> torch.Tensor:
    """Switch-style aux loss over all MoE layers, padding excluded (transformers' formula):
    f_e = selections of e / valid rows, P_e = sum of p_e / valid rows (both summed over layers),
    aux = E * sum_e f_e * P_e.

    `reduce` (optional) sums the per-expert statistics (selections, probability sums, rows) over
    the other slices of the same rows (sequence parallelism): the result is then the whole rows'
    aux loss, which per-slice logits alone cannot give."""
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
    if reduce is not None:
        stats = reduce(torch.cat([counts_E, prob_sum_E, rows[None]]))
        counts_E, prob_sum_E, rows = stats[:num_experts], stats[num_experts:-1], stats[-1]
    return num_experts * torch.sum((counts_E / rows) * (prob_sum_E / rows))
