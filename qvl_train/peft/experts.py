"""LoRA on the fused 3D experts (and on the router), computed per expert group on expert-sorted rows.

The adapted expert MLP is

    gu = x Wgu_e^T + s (x A_gu,e^T) B_gu,e^T          (rows of expert e)
    h  = silu(gu[:, :I]) * gu[:, I:] * w               (w = router weight of the routed copy)
    y  = h Wd_e^T  + s (h A_d,e^T) B_d,e^T

run as grouped matmuls over the rows the dispatcher grouped by expert: the LoRA terms cost
O(S r (in + out)) and no [E, out, in] delta is ever built (PEFT's `target_parameters` path folds
the delta into a full copy of the expert stack on every forward, and its backward produces a
full-size gradient of that copy).

Parameters and names mirror PEFT's `ParamWrapper` exactly, so an adapter trained here saves to,
and loads from, the files `PeftModel` reads for transformers' Qwen3VLMoeForConditionalGeneration:
- one wrapper per targeted parameter, nested in the base module's parameter order: the outer
  wrapper adapts `down_proj`, its `base_layer` adapts `gate_up_proj`, whose `base_layer` is the
  GroupedExperts. Names: `mlp.experts.base_layer.lora_A.default.weight` (gate_up),
  `mlp.experts.lora_A.default.weight` (down), base `mlp.experts.base_layer.base_layer.gate_up_proj`.
- lora_A.weight [r*E, in]: expert e is rows e*r:(e+1)*r; lora_B.weight [out, r*E] read as
  (out, r, E): expert e is [:, :, e]. scaling = alpha / r (alpha / sqrt(r) with rslora).

Expert parallelism: the experts module may hold only this rank's El = E/ep experts
(qvl_train.parallel.expert_parallel.ShardedExperts, frozen buffers, `expert_start` = first hosted
expert); the LoRA parameters always hold all E experts (they live in ZeRO like every other
trainable parameter). The wrapper slices the rows of experts [expert_start, expert_start + El)
out of the full LoRA tensors (a view: the full parameter stays in the graph), so LoRA grads of
experts a rank does not host are exactly zero there and ZeRO's plain average over all ranks is
right. Under ZeRO-3 the wrappers read their LoRA weights directly (not through the nn.Linear
forwards), so they are ZeRO-3 leaf modules (`_z3_leaf = True`, DeepSpeed's own flag; nothing to
call; without it DeepSpeed fails with "'Tensor' object has no attribute 'ds_status'").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qvl_train.model.moe import Router, is_missing_kernel, warn_fallback_once

ADAPTER = "default"  # PEFT's adapter name in parameter names (dropped in saved files)


# ---- grouped matmul primitives (torch._grouped_mm with an exact per-expert fallback) ---------

_GMM_OK: dict[tuple, bool] = {}


def _gmm(kind: str, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, counts: list[int] | None):
    """kind 'nt': a [S,K], b [E,N,K] -> [S,N], rows of e times b[e]^T
    kind 'nn': a [S,N], b [E,N,K] -> [S,K], rows of e times b[e]
    kind 'tn': a [S,N], b [S,K] -> [E,N,K], sum over rows of e of a^T b (weight gradients)."""
    key = (kind, a.device.type, a.dtype, b.dtype, tuple(a.shape[1:]), tuple(b.shape[1:]))
    if _GMM_OK.get(key, True) and hasattr(torch, "_grouped_mm") and a.dtype == b.dtype:
        try:
            if kind == "nt":
                out = torch._grouped_mm(a, b.transpose(-2, -1), offs=offs)
            elif kind == "nn":
                out = torch._grouped_mm(a, b, offs=offs)
            else:
                out = torch._grouped_mm(a.t(), b, offs=offs)
            _GMM_OK[key] = True
            return out
        except (RuntimeError, NotImplementedError) as err:
            if not is_missing_kernel(err):
                raise
            _GMM_OK[key] = False
            warn_fallback_once(
                f"lora_experts:{key}",
                f"torch._grouped_mm has no kernel for the LoRA experts' {kind!r} product on {a.device.type} "
                f"with {a.dtype} ({str(err).splitlines()[0]}); it runs as one matmul per expert instead for "
                "the rest of the run: E small kernels per product, and on a GPU the group sizes are read "
                "back to the host (a device sync) in each layer.",
            )
    if counts is None:
        counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    tail = a.shape[0] - sum(counts)  # rows past the last group (padding): skipped, zero output
    if kind == "tn":
        E = len(counts)
        out = a.new_zeros(E, a.shape[1], b.shape[1])
        for e, (ae, be) in enumerate(zip(a.split(counts + [tail]), b.split(counts + [tail]))):
            if ae.shape[0] and e < E:
                out[e] = ae.t() @ be
        return out
    parts = [ae @ (b[e].t() if kind == "nt" else b[e]) for e, ae in enumerate(a.split(counts + [tail])[:-1])]
    return torch.cat([*parts, a.new_zeros(tail, b.shape[1] if kind == "nt" else b.shape[2])])


class _LoraExpertsSwiGLU(torch.autograd.Function):
    """Grouped SwiGLU experts plus LoRA on gate_up and/or down, with a hand-written backward.

    Saves the expert inputs, the gate/up projection (LoRA included) and the two rank-r LoRA
    intermediates; the SwiGLU product is recomputed. Base-weight gradients are computed only
    when the base weights require grad (never with LoRA). Rows past offs[-1] (padding, see
    moe.Dispatched) are never computed; what is returned there is never read."""

    @staticmethod
    def forward(ctx, x_SD, w_S, w_gu, w_d, a_gu, b_gu, a_d, b_d, offs, s_gu, s_d):
        counts = None if x_SD.device.type != "cpu" else torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
        gu_S2I = _gmm("nt", x_SD, w_gu, offs, counts)
        xa_Sr = ha_Sr = None
        if a_gu is not None:
            xa_Sr = _gmm("nt", x_SD, a_gu, offs, counts)
            gu_S2I = gu_S2I + s_gu * _gmm("nt", xa_Sr, b_gu, offs, counts)
        g_SI, u_SI = gu_S2I.chunk(2, dim=-1)
        h_SI = F.silu(g_SI) * u_SI * w_S[:, None]
        y_SD = _gmm("nt", h_SI, w_d, offs, counts)
        if a_d is not None:
            ha_Sr = _gmm("nt", h_SI, a_d, offs, counts)
            y_SD = y_SD + s_d * _gmm("nt", ha_Sr, b_d, offs, counts)
        ctx.save_for_backward(x_SD, w_S, w_gu, w_d, a_gu, b_gu, a_d, b_d, offs, gu_S2I, xa_Sr, ha_Sr)
        ctx.scales = (s_gu, s_d)
        ctx.counts = counts
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD):
        x_SD, w_S, w_gu, w_d, a_gu, b_gu, a_d, b_d, offs, gu_S2I, xa_Sr, ha_Sr = ctx.saved_tensors
        need = ctx.needs_input_grad
        s_gu, s_d = ctx.scales
        counts = ctx.counts
        dy_SD = dy_SD.contiguous()
        grads = [None] * 11
        g_SI, u_SI = gu_S2I.chunk(2, dim=-1)
        sig_SI = torch.sigmoid(g_SI)
        silu_SI = g_SI * sig_SI
        h0_SI = silu_SI * u_SI
        h_SI = h0_SI * w_S[:, None]
        dh_SI = _gmm("nn", dy_SD, w_d, offs, counts)
        if need[3]:
            grads[3] = _gmm("tn", dy_SD, h_SI, offs, counts)
        if a_d is not None:
            grads[7] = s_d * _gmm("tn", dy_SD, ha_Sr, offs, counts)  # dB_d [E, D, r]
            dha_Sr = s_d * _gmm("nn", dy_SD, b_d, offs, counts)
            grads[6] = _gmm("tn", dha_Sr, h_SI, offs, counts)  # dA_d [E, r, I]
            dh_SI = dh_SI + _gmm("nn", dha_Sr, a_d, offs, counts)
        if need[1]:
            grads[1] = (dh_SI * h0_SI).sum(-1)
        dh0_SI = dh_SI * w_S[:, None]
        dg_SI = dh0_SI * u_SI * sig_SI * (1 + g_SI * (1 - sig_SI))
        dgu_S2I = torch.cat([dg_SI, dh0_SI * silu_SI], dim=-1)
        dx_SD = _gmm("nn", dgu_S2I, w_gu, offs, counts) if need[0] else None
        if need[2]:
            grads[2] = _gmm("tn", dgu_S2I, x_SD, offs, counts)
        if a_gu is not None:
            grads[5] = s_gu * _gmm("tn", dgu_S2I, xa_Sr, offs, counts)  # dB_gu [E, 2I, r]
            dxa_Sr = s_gu * _gmm("nn", dgu_S2I, b_gu, offs, counts)
            grads[4] = _gmm("tn", dxa_Sr, x_SD, offs, counts)  # dA_gu [E, r, D]
            if need[0]:
                dx_SD = dx_SD + _gmm("nn", dxa_Sr, a_gu, offs, counts)
        grads[0] = dx_SD
        return tuple(grads)


def lora_experts_swiglu(x_SD, weights_S, w_gate_up, w_down, tokens_per_expert_E, gate_up_lora=None, down_lora=None):
    """experts_swiglu with LoRA: `*_lora` is None or (A [El, r, in], B [El, out, r], scaling) for
    the local experts, in expert order (the rows of x_SD grouped by expert, counts given)."""
    weights_S = weights_S.to(x_SD.dtype)
    a_gu, b_gu, s_gu = gate_up_lora if gate_up_lora is not None else (None, None, 0.0)
    a_d, b_d, s_d = down_lora if down_lora is not None else (None, None, 0.0)
    cast = lambda t: None if t is None else t.to(x_SD.dtype)
    if x_SD.shape[0] == 0:
        # no rows here (possible per EP rank): keep every weight in the graph with a zero output
        # so all ranks run the same backward (ZeRO-3 hooks, gradient reduction)
        keep = sum(t.sum() * 0 for t in (w_gate_up, w_down, a_gu, b_gu, a_d, b_d) if t is not None and t.requires_grad)
        return x_SD.new_zeros(0, w_down.shape[1]) + keep + (weights_S.sum() * 0)
    offs = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
    return _LoraExpertsSwiGLU.apply(
        x_SD.contiguous(), weights_S, w_gate_up, w_down,
        cast(a_gu), cast(b_gu), cast(a_d), cast(b_d), offs, s_gu, s_d,
    )


# ---- modules ---------------------------------------------------------------------------------


def _scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's logical shape: a ZeRO-3 partitioned parameter keeps it in `ds_shape` (its
    own `.shape` is then the flat local partition, or (0,) outside a gather)."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


class _Wrapper(nn.Module):
    """Public attribute reads fall through to the wrapped module (like PEFT's BaseTunerLayer).

    `_z3_leaf = True` is what deepspeed.utils.set_z3_leaf_modules sets: ZeRO-3 gathers all of a
    wrapper's parameters at its forward (the wrappers read their LoRA weights directly, not
    through the nn.Linear forwards that ZeRO-3's per-module hooks would gather)."""

    _z3_leaf = True

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or name.startswith("_") or name.startswith("ds_"):
                raise
            return getattr(self.base_layer, name)

    def get_base_layer(self) -> nn.Module:
        m = self.base_layer
        while isinstance(m, _Wrapper):
            m = m.base_layer
        return m


class ExpertLora(_Wrapper):
    """LoRA on one 3D expert tensor of a GroupedExperts / ShardedExperts (`gate_up_proj`
    [El, 2I, D] or `down_proj` [El, D, I]); nest two of them to adapt both (gate_up inside, down
    outside). `num_experts` is the global E (the LoRA tensors hold all of them)."""

    def __init__(self, base_layer: nn.Module, parameter_name: str, *, r: int, alpha: float, num_experts: int,
                 use_rslora: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        param = getattr(base_layer, parameter_name)
        _, out_features, in_features = full_shape(param)
        self.r, self.lora_alpha, self.num_experts = r, alpha, num_experts
        self.in_features, self.out_features = in_features, out_features
        self.scaling = _scaling(r, alpha, use_rslora)
        self.expert_offset: int | None = None
        kw = {"device": param.device, "dtype": param.dtype}
        self.lora_A = nn.ModuleDict({ADAPTER: nn.Linear(in_features, r * num_experts, bias=False, **kw)})
        self.lora_B = nn.ModuleDict({ADAPTER: nn.Linear(r * num_experts, out_features, bias=False, **kw)})
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if self.lora_A[ADAPTER].weight.device.type == "meta":
            return
        # PEFT's default init (init_lora_weights=True): A Kaiming-uniform, B zero
        nn.init.kaiming_uniform_(self.lora_A[ADAPTER].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[ADAPTER].weight)

    def local_range(self) -> tuple[int, int]:
        """[e0, e1): the experts the base module holds (all E, or an EP slice)."""
        experts = self.get_base_layer()
        local = full_shape(getattr(experts, self.parameter_name))[0]
        offset = self.expert_offset if self.expert_offset is not None else getattr(experts, "expert_start", None)
        if offset is None:
            if local != self.num_experts:
                raise ValueError(
                    f"The experts module holds {local} of {self.num_experts} experts but has no expert_start "
                    "(first hosted expert); set it (ShardedExperts does) or ExpertLora.expert_offset."
                )
            offset = 0
        if not 0 <= offset <= self.num_experts - local:
            raise ValueError(f"expert range [{offset}, {offset + local}) is outside 0..{self.num_experts}.")
        return int(offset), int(offset) + local

    def factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A [El, r, in], B [El, out, r], scaling) of the local experts."""
        e0, e1 = self.local_range()
        a = self.lora_A[ADAPTER].weight.view(self.num_experts, self.r, self.in_features)[e0:e1]
        b = self.lora_B[ADAPTER].weight.view(self.out_features, self.r, self.num_experts)[:, :, e0:e1]
        b = b.permute(2, 0, 1).contiguous()
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        return a.contiguous(), b, self.scaling

    def chain(self) -> tuple[nn.Module, dict[str, ExpertLora]]:
        loras, m = {}, self
        while isinstance(m, ExpertLora):
            loras.setdefault(m.parameter_name, m)
            m = m.base_layer
        return m, loras

    def forward(self, x_SD: torch.Tensor, weights_S: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        experts, loras = self.chain()
        gu = loras["gate_up_proj"].factors() if "gate_up_proj" in loras else None
        dn = loras["down_proj"].factors() if "down_proj" in loras else None
        return lora_experts_swiglu(
            x_SD, weights_S, experts.gate_up_proj, experts.down_proj, tokens_per_expert_E, gu, dn
        )

    @torch.no_grad()
    def merge_into_base(self) -> None:
        """W[e] += s * B_e A_e for the local experts, one expert at a time (fp32 accumulate)."""
        param = getattr(self.get_base_layer(), self.parameter_name)
        a, b, s = self.factors()
        for e in range(param.shape[0]):
            delta = (b[e].float() @ a[e].float()) * s
            param[e].copy_((param[e].float() + delta).to(param.dtype))

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, r={self.r}, num_experts={self.num_experts}"


class RouterLora(_Wrapper):
    """LoRA on the router weight [E, D] (PEFT: `target_parameters=["mlp.gate.weight"]`). The
    router stays the base module's own code, run with W + s B A (an [E, D] tensor, as small as
    the router itself)."""

    def __init__(self, base_layer: Router, *, r: int, alpha: float, use_rslora: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.parameter_name = "weight"
        w = base_layer.weight
        out_features, in_features = full_shape(w)
        self.r, self.lora_alpha = r, alpha
        self.scaling = _scaling(r, alpha, use_rslora)
        kw = {"device": w.device, "dtype": w.dtype}
        self.lora_A = nn.ModuleDict({ADAPTER: nn.Linear(in_features, r, bias=False, **kw)})
        self.lora_B = nn.ModuleDict({ADAPTER: nn.Linear(r, out_features, bias=False, **kw)})
        if w.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A[ADAPTER].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[ADAPTER].weight)

    def delta(self) -> torch.Tensor:
        return (self.lora_B[ADAPTER].weight @ self.lora_A[ADAPTER].weight) * self.scaling

    def forward(self, x_TD: torch.Tensor):
        w = self.base_layer.weight
        return torch.func.functional_call(self.base_layer, {"weight": w + self.delta().to(w.dtype)}, (x_TD,))

    @torch.no_grad()
    def merge_into_base(self) -> None:
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta().float()).to(w.dtype))


def zero3_leaf_module_classes() -> list[type[nn.Module]]:
    """The LoRA wrapper classes that must be ZeRO-3 leaf modules. They already set DeepSpeed's
    `_z3_leaf` flag themselves; this is for callers that list leaf classes explicitly."""
    return [ExpertLora, RouterLora]
