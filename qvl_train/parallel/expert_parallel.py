"""Expert parallelism (EP) for Qwen3-VL-MoE under DeepSpeed ZeRO-3: two paths, and export.

Legend: T tokens on this rank, k top-k, S = T*k routed copies sent, R rows received, D hidden,
E experts, El = E / ep local experts, I expert intermediate.

1. TRAINABLE experts (full SFT), ep_size > 1: DeepSpeed AutoEP
   ----------------------------------------------------------------
   `autoep_config(model_cfg, ep_size)` returns the `expert_parallel` ds_config section (custom
   patterns for `model.language_model.layers.N.mlp`, fused gate_up_proj [E, 2I, D] / down_proj
   [E, D, I], softmax top-k with renormalisation = our Router, load_balance_coeff null).
   deepspeed.initialize then replaces every MoEBlock by an AutoEPMoELayer (params
   `mlp.router.gate.weight`, `mlp.experts.w1/w2/w3` holding this rank's El experts).
   After initialize call `install_autoep_router_capture(engine)`: a forward hook on each replaced
   layer's `router.gate` stores the router logits (T, E, with grad) on the layer, and our decoder
   layer (qvl_train.model.moe.external_moe_forward) picks them up, so ModelOutput.aux_loss,
   router_logits and expert_load work as without EP and router_aux_loss_coef takes effect.
   What DeepSpeed/AutoEP handles (checked in deepspeed 0.19.8 source and by tests/parallel):
   - EP/EDP groups (contiguous EP, strided EDP, same as groups.py), the token all-to-alls;
   - expert params are ZeRO-3 partitioned over the EDP group, router/dense over the world;
   - expert grads: summed over EDP and divided by the GLOBAL DP size (the correct scaling, as
     every rank's tokens reach the expert's owner through the all-to-all); dense grads averaged
     over the world as usual; the grad norm for clipping sums expert shards over EP.
   What it does NOT handle:
   - padding: AutoEP routes every token it is given (no mask input). We mask padding ourselves:
     the decoder layer passes only the valid tokens (one (1, T_valid, D) row) to the replaced
     layer and writes zeros at padding rows, so padding costs no expert FLOPs and never enters
     routing, the aux loss or the expert load (same semantics as our MoEBlock).
   - the aux loss (its load_balance_coeff must stay null; we compute ours from captured logits);
   - anything not in its layer: PEFT-wrapped experts are not detected (LoRA uses path 2);
   - changing ep between save and resume (DeepSpeed's own checkpoints cannot): our resharding
     checkpoints (qvl_train.checkpoint.reshard) store the experts as [E, ...] and reload any ep.
   ep_size == 1: no AutoEP at all (autoep_config returns {}): plain ZeRO-3 over our MoEBlock,
   whose GroupedExperts always runs (even with zero tokens), so ZeRO-3's hooks never hang.

2. FROZEN expert base weights (LoRA), ep_size >= 1: AllToAllDispatcher + ShardedExperts
   --------------------------------------------------------------------------------------
   `shard_experts_for_ep(model, ep_info)` (BEFORE deepspeed.initialize) replaces each
   MoEBlock.experts by a `ShardedExperts` holding this rank's experts [e0, e1) as NON-persistent
   BUFFERS (not parameters: ZeRO-3 would broadcast rank 0's values and partition them; buffers
   stay outside ZeRO and outside checkpoints - reload them from the Hub files), and sets
   MoEBlock.dispatcher = AllToAllDispatcher(ep_group). `from_pretrained_ep` builds a model that
   never materialises the other ranks' experts (safetensors get_slice()[e0:e1]).

   AllToAllDispatcher contract (same seam as moe.LocalDispatcher):
     d = dispatch(x_TD, top_w_Tk, top_i_Tk, num_experts)   # num_experts = GLOBAL E
       d.x_SD        (R, D) rows received from every EP rank, grouped by LOCAL expert 0..El-1
                     (within an expert: by source EP rank, then by source token order)
       d.weights_S   (R,) router weight of each received row (differentiable: the grad goes
                     back to the source rank's top_w)
       d.tokens_per_expert_E  (El,) long: rows per local expert (sum == R)
       d.ctx         opaque
     y_TD = combine(y_SD, d)   # y_SD (R, D) in d.x_SD's order -> (T, D) summed over the k picks
   - Collectives: one count exchange (all_to_all_single of E longs) + one all-to-all of
     [x | w] rows in dispatch, one all-to-all in combine, and their mirror images in backward.
     One host sync per layer (the row splits, read once and reused by all four exchanges).
     Padding picks (expert id E, see MoEBlock.forward) are not counted and never sent: the
     sends are the real picks only, and padding tokens get a zero output.
     EVERY EP rank runs all of them in EVERY MoE layer, also with zero tokens (R or S may be 0);
     never skip the dispatcher on a rank, and keep grad mode identical on all ranks (the
     backward all-to-alls run only where autograd reaches them: x_TD must require grad on all
     ranks or on none).
   - Autograd: gradients flow to x_TD and top_w_Tk through both all-to-alls; anything applied to
     d.x_SD / y_SD per local expert (expert LoRA: (x A_e^T) B_e^T with the El local slices of a
     ZeRO-3 LoRA param holding all E experts) gets its gradient on the owning rank; ranks not
     owning expert e produce zero grads for e's slice, so ZeRO's world average equals
     "sum over EDP / world" - no custom reduction needed. Use ShardedExperts.expert_start /
     num_local_experts to slice such params ([e0:e1]); keep all E slices in the graph (multiply
     the unused ones by 0 or use the full param) so ZeRO-3 fetches/reduces identically everywhere.
   - Trainable ShardedExperts are NOT supported (their grads would need an EDP all-reduce
     divided by the world size; use AutoEP for full SFT).

3. Export: `iter_full_state_dict(engine_or_model, ep_info=...)` yields (our name, full CPU tensor)
   on rank 0, one parameter at a time (ZeRO-3 GatheredParameters per param, EP shards gathered to
   rank 0 over rank 0's EP group; AutoEP's w1/w3/w2 mapped back to gate_up_proj/down_proj);
   `save_full_pretrained` feeds it to qvl_train.model.save_pretrained (streaming) on rank 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from qvl_train.model import state_dict_adapter as adapter
from qvl_train.model.config import ModelConfig
from qvl_train.model.moe import Dispatched, LocalDispatcher, MoEBlock, _GatherRows, combine_rows, expert_counts, experts_swiglu

from .groups import EPInfo, dist_info, validate_ep_size

MOE_LAYER_PATTERN = r"model\.language_model\.layers\.\d+\.mlp"


# ---- 1. AutoEP -------------------------------------------------------------------------------


def autoep_config(model_cfg: ModelConfig, ep_size: int, *, world_size: int | None = None) -> dict:
    """ds_config additions for EP with trainable experts: {"expert_parallel": {...}}, or {} for
    ep_size == 1 (plain ZeRO-3, no AutoEP). Merge into the ds_config before deepspeed.initialize."""
    t = model_cfg.text
    validate_ep_size(ep_size, world_size if world_size is not None else ep_size, t.num_experts)
    if ep_size == 1:
        return {}
    if t.hidden_act != "silu":
        raise ValueError(f"AutoEP path supports silu experts only, got {t.hidden_act!r}.")
    return {
        "expert_parallel": {
            "enabled": True,
            "autoep_size": ep_size,
            "moe_layer_pattern": MOE_LAYER_PATTERN,
            "router_pattern": "gate",
            "expert_pattern": "experts",
            "expert_w1": "gate_up_proj",  # fused [E, 2I, D], gate rows first (our layout)
            "expert_w2": "down_proj",  # [E, D, I]
            "expert_w3": None,
            "top_k": t.num_experts_per_tok,
            "has_shared_experts": False,
            "score_func": "softmax",
            "route_norm": True,  # Qwen3 renormalises the top-k weights
            "score_apply": "post",
            "load_balance_coeff": None,  # the aux loss is the model's (router_aux_loss_coef)
        }
    }


def is_autoep_layer(module: nn.Module) -> bool:
    return bool(getattr(module, "_is_autoep_layer", False))


def install_autoep_router_capture(engine_or_model) -> int:
    """Hook every AutoEP layer's router gate so our decoder layers get the router logits (for the
    aux loss, ModelOutput.router_logits and expert_load). Call once after deepspeed.initialize.
    Returns the number of hooked layers (0 when AutoEP is off). Idempotent."""
    model = getattr(engine_or_model, "module", engine_or_model)
    n = 0
    for module in model.modules():
        if not is_autoep_layer(module):
            continue
        if getattr(module, "_qvl_router_hook", None) is None:
            module._qvl_router_hook = module.router.gate.register_forward_hook(_make_capture(module))
        module.captured_router_logits = None
        n += 1
    return n


def _make_capture(owner: nn.Module):
    def hook(_gate, _inputs, logits_TE):
        owner.captured_router_logits = logits_TE

    return hook


# ---- 2. all-to-all dispatcher for frozen sharded experts -------------------------------------


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over rows with uneven splits; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, in_splits, out_splits, group):
        ctx.in_splits, ctx.out_splits, ctx.group = in_splits, out_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        grad = g.new_empty((sum(ctx.in_splits), *g.shape[1:]))
        dist.all_to_all_single(grad, g.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad, None, None, None


class AllToAllDispatcher:
    """Token dispatch to the EP rank owning each expert (contract in the module docstring)."""

    def __init__(self, ep_group) -> None:
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)

    def dispatch(self, x_TD: torch.Tensor, top_w_Tk: torch.Tensor, top_i_Tk: torch.Tensor, num_experts: int) -> Dispatched:
        ep, D, k = self.ep_size, x_TD.shape[1], top_i_Tk.shape[1]
        El = num_experts // ep
        flat_S = top_i_Tk.reshape(-1)
        order_S = torch.argsort(flat_S, stable=True)  # padding (id E) sorts last
        counts_E = expert_counts(flat_S, num_experts)  # padding not counted, so never sent
        recv_counts_E = torch.empty_like(counts_E)  # [src rank, local expert] flattened
        dist.all_to_all_single(recv_counts_E, counts_E, group=self.ep_group)
        counts_sE = recv_counts_E.view(ep, El)
        # the layer's one host sync: NCCL needs the row splits on the host; combine and both
        # backward exchanges reuse them
        splits = torch.cat([counts_E.view(ep, El).sum(1), counts_sE.sum(1)]).tolist()
        in_splits, out_splits = splits[:ep], splits[ep:]
        order_S = order_S[: sum(in_splits)]  # the real picks; padding sorted after them
        token_S = order_S // k
        w_S = top_w_Tk.reshape(-1)[order_S].to(x_TD.dtype)
        send_SD1 = torch.cat([_GatherRows.apply(x_TD, token_S), w_S[:, None]], dim=1)
        recv_RD1 = _AllToAll.apply(send_SD1, in_splits, out_splits, self.ep_group)
        # rows arrive grouped by (source rank, local expert): regroup by local expert
        expert_R = torch.repeat_interleave(torch.arange(El, device=x_TD.device).repeat(ep), counts_sE.reshape(-1),
                                           output_size=sum(out_splits))
        perm_R = torch.argsort(expert_R, stable=True)
        local_RD1 = _GatherRows.apply(recv_RD1, perm_R)
        return Dispatched(
            local_RD1[:, :D].contiguous(),
            local_RD1[:, D],
            counts_sE.sum(0),
            (perm_R, in_splits, out_splits, token_S, order_S, top_i_Tk[:, 0] < num_experts, k),
        )

    def combine(self, y_SD: torch.Tensor, d: Dispatched) -> torch.Tensor:
        perm_R, in_splits, out_splits, token_S, order_S, valid_T, k = d.ctx
        y_recv_RD = _GatherRows.apply(y_SD, torch.argsort(perm_R))  # back to arrival order
        y_back_SD = _AllToAll.apply(y_recv_RD, out_splits, in_splits, self.ep_group)
        return combine_rows(y_back_SD, token_S, order_S, valid_T, k)  # padding tokens: zero


class ShardedExperts(nn.Module):
    """This rank's experts [expert_start, expert_start + num_local_experts) of one MoE layer, as
    frozen non-persistent buffers gate_up_proj [El, 2I, D] and down_proj [El, D, I] (outside
    ZeRO-3 and outside checkpoints). Same forward as GroupedExperts."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, *, expert_start: int, num_experts: int, ep_group=None) -> None:
        super().__init__()
        self.register_buffer("gate_up_proj", gate_up_proj, persistent=False)
        self.register_buffer("down_proj", down_proj, persistent=False)
        self.expert_start = expert_start
        self.num_local_experts = gate_up_proj.shape[0]
        self.num_experts = num_experts
        self.ep_group = ep_group

    def forward(self, x_SD, weights_S, tokens_per_expert_E):
        return experts_swiglu(x_SD, weights_S, self.gate_up_proj, self.down_proj, tokens_per_expert_E)


def shard_experts_for_ep(
    model: nn.Module,
    ep_info: EPInfo,
    *,
    checkpoint_dir: str | Path | None = None,
    expert_layout: adapter.ExpertLayout | None = None,
    allow_meta: bool = False,
) -> int:
    """Replace every MoEBlock's experts by this rank's ShardedExperts slice and install an
    AllToAllDispatcher over ep_info.ep_group (ep_size 1: LocalDispatcher, slice = all experts).
    Slices come from the model's own expert tensors, or from `checkpoint_dir` (Hub safetensors,
    read with get_slice()[e0:e1], so other ranks' experts are never read). Call before
    deepspeed.initialize. Returns the number of blocks sharded. `allow_meta`: a meta-device model
    gets meta slices (structure only; fill them later, as from_pretrained_ep does)."""
    cfg = model.config
    E = cfg.text.num_experts
    validate_ep_size(ep_info.ep_size, ep_info.world_size, E)
    e0, e1 = ep_info.expert_range(E)
    slices = load_local_expert_slices(checkpoint_dir, cfg, e0, e1, expert_layout) if checkpoint_dir else None
    n = 0
    for name, block in model.named_modules():
        if not isinstance(block, MoEBlock):
            continue
        if isinstance(block.experts, ShardedExperts):
            raise ValueError(f"{name} is already sharded.")
        if slices is not None:
            gate_up, down = slices[f"{name}.experts.gate_up_proj"], slices[f"{name}.experts.down_proj"]
            like = block.experts.gate_up_proj
            if like.device.type != "meta":
                gate_up, down = gate_up.to(like.device, like.dtype), down.to(like.device, like.dtype)
        else:
            if block.experts.gate_up_proj.is_meta and not allow_meta:
                raise ValueError("The model's experts are on the meta device: pass checkpoint_dir.")
            gate_up = block.experts.gate_up_proj.detach()[e0:e1].clone()
            down = block.experts.down_proj.detach()[e0:e1].clone()
        block.experts = ShardedExperts(gate_up, down, expert_start=e0, num_experts=E, ep_group=ep_info.ep_group)
        block.dispatcher = AllToAllDispatcher(ep_info.ep_group) if ep_info.ep_size > 1 else LocalDispatcher()
        n += 1
    return n


def load_local_expert_slices(
    checkpoint_dir: str | Path,
    cfg: ModelConfig,
    e0: int,
    e1: int,
    expert_layout: adapter.ExpertLayout | None = None,
) -> dict[str, torch.Tensor]:
    """{our expert name: tensor [e1-e0, ...] in our layout} read with safetensors get_slice."""
    from safetensors import safe_open

    from qvl_train.model.io import checkpoint_files

    out = {}
    for file in checkpoint_files(checkpoint_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                if hf_name.endswith(adapter.GATE_UP) or hf_name.endswith(adapter.DOWN):
                    piece = f.get_slice(hf_name)[e0:e1]
                    name, t = adapter.expert_slice_from_hf(hf_name, piece, cfg, expert_layout)
                    out[name] = t.contiguous()
    return out


def from_pretrained_ep(
    path: str | Path,
    ep_info: EPInfo,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    expert_layout: adapter.ExpertLayout | None = None,
):
    """qvl_train.model.from_pretrained for the LoRA+EP path: only this rank's experts are ever
    read or allocated (ShardedExperts + dispatcher installed, as shard_experts_for_ep)."""
    from qvl_train.model.build import reset_buffers
    from qvl_train.model.io import load_config, load_into
    from qvl_train.model.model import Qwen3VLMoe

    cfg = load_config(path)
    with torch.device("meta"):
        model = Qwen3VLMoe(cfg)
    shard_experts_for_ep(model, ep_info, allow_meta=True)  # meta slices, just for the structure
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    reset_buffers(model)
    targets = dict(model.named_parameters())
    for n, m in model.named_modules():
        if isinstance(m, ShardedExperts):
            targets[f"{n}.gate_up_proj"], targets[f"{n}.down_proj"] = m.gate_up_proj, m.down_proj
    load_into(targets, path, cfg, expert_layout=expert_layout, expert_range=ep_info.expert_range(cfg.text.num_experts))
    return model


def iter_full_state_dict(engine_or_model, *, ep_info: EPInfo | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full CPU tensor) for every parameter in OUR naming and layout (the names of
    the un-parallelised model.state_dict(), tied lm_head included) on rank 0; other ranks yield
    nothing but MUST iterate to the end too (they take part in the gathers). One parameter is
    gathered at a time (ZeRO-3: GatheredParameters over the param's partition group; EP shards:
    gathered to rank 0 over rank 0's EP group). ep_info is optional (EP groups are read off the
    layers); when given, it is checked against them."""
    model = getattr(engine_or_model, "module", engine_or_model)
    rank, _, _ = dist_info()
    for name, tensor in _walk(model, "", rank, ep_info):
        if rank == 0:
            yield name, tensor


def save_full_pretrained(engine_or_model, path: str | Path, *, ep_info: EPInfo | None = None, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 1024**3):
    """Hub-format export of a (ZeRO-3 / EP) trained model: call on ALL ranks; rank 0 writes.
    Returns the path on rank 0, None elsewhere."""
    from qvl_train.model.io import save_pretrained

    model = getattr(engine_or_model, "module", engine_or_model)
    stream = iter_full_state_dict(engine_or_model, ep_info=ep_info)
    rank, _, _ = dist_info()
    if rank != 0:
        for _ in stream:
            pass
        return None
    return save_pretrained(model, path, state_dict=stream, dtype=dtype, max_shard_bytes=max_shard_bytes)


def gathered_to_rank0(p: torch.Tensor, rank: int) -> torch.Tensor | None:
    """Full value of a (maybe ZeRO-3 partitioned) param on rank 0, None elsewhere."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.data.detach().to("cpu", copy=True) if rank == 0 else None
    return p.detach().to("cpu", copy=True) if rank == 0 else None


def _gather_experts(local: torch.Tensor, group, rank: int) -> torch.Tensor | None:
    """Concatenate the EP shards along dim 0 on rank 0 (only rank 0's EP group communicates)."""
    if group is None or dist.get_world_size(group) == 1:
        return local.detach().to("cpu", copy=True) if rank == 0 else None
    ranks = dist.get_process_group_ranks(group)
    if 0 not in ranks:
        return None
    local = local.detach().contiguous()
    parts = [torch.empty_like(local) for _ in ranks] if rank == 0 else None
    dist.gather(local, parts, dst=0, group=group)
    return torch.cat(parts).cpu() if rank == 0 else None


def _walk(module: nn.Module, prefix: str, rank: int, ep_info: EPInfo | None):
    if is_autoep_layer(module):
        yield from _autoep_entries(module, prefix, rank, ep_info)
        return
    if isinstance(module, ShardedExperts):
        _check_group(module.ep_group, ep_info)
        for n in ("gate_up_proj", "down_proj"):
            yield prefix + n, _gather_experts(getattr(module, n), module.ep_group, rank)
        return
    for n, p in module._parameters.items():
        if p is not None:
            yield prefix + n, gathered_to_rank0(p, rank)
    for n, child in module._modules.items():
        if child is not None:
            yield from _walk(child, prefix + n + ".", rank, ep_info)


def _autoep_entries(layer: nn.Module, prefix: str, rank: int, ep_info: EPInfo | None):
    """AutoEP's layer -> our MoEBlock names: router.gate.weight -> gate.weight; experts w1 (gate)
    and w3 (up) [El, I, D] -> gate_up_proj [E, 2I, D]; w2 [El, D, I] -> down_proj [E, D, I]."""
    if layer.shared_experts is not None or getattr(layer.router, "gate", None) is None or layer.router.gate.bias is not None:
        raise NotImplementedError("AutoEP layer with shared experts or a gate bias: not our model.")
    _check_group(layer.ep_group, ep_info)
    yield prefix + "gate.weight", gathered_to_rank0(layer.router.gate.weight, rank)
    full = {}
    for n in ("w1", "w3", "w2"):
        p = getattr(layer.experts, n)
        if hasattr(p, "ds_id"):  # ZeRO-3: gather over the EDP group first
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                full[n] = _gather_experts(p.data, layer.ep_group if layer.ep_size > 1 else None, rank)
        else:
            full[n] = _gather_experts(p.data, layer.ep_group if layer.ep_size > 1 else None, rank)
    if rank == 0:
        yield prefix + "experts.gate_up_proj", torch.cat([full["w1"], full["w3"]], dim=1)
        yield prefix + "experts.down_proj", full["w2"]
    else:
        yield prefix + "experts.gate_up_proj", None
        yield prefix + "experts.down_proj", None


def _check_group(group, ep_info: EPInfo | None) -> None:
    if ep_info is None or group is None or ep_info.ep_size == 1:
        return
    if sorted(dist.get_process_group_ranks(group)) != sorted(ep_info.ep_ranks):
        raise ValueError("ep_info's EP group does not match the group the model's EP layers use.")
