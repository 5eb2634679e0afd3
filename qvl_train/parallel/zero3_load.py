"""Loading a real checkpoint straight into ZeRO-3 partitions.

Built under deepspeed.zero.Init, every parameter is partitioned the moment it is created, so no
rank ever holds the whole model (8 ranks of a node would otherwise each load 62 GB for 30B-A3B
before DeepSpeed partitions them). Weights are then copied in one tensor at a time. A partitioned
parameter is gathered with GatheredParameters(modifier_rank=0): rank 0 writes the value and
DeepSpeed re-partitions it to every rank. The small parameters ZeRO-3 keeps whole on every rank
(below stage3_param_persistence_threshold) are not re-broadcast by that context, so every rank
writes those itself (seen: otherwise they keep their initial values on the other ranks).

Full SFT with AutoEP (ep_size > 1) must not hold all experts either, but AutoEP builds its expert
slices inside deepspeed.initialize from the MoE block it replaces (gathering a ZeRO-3 source in
full, every layer, on every rank). So `defer_experts=True` leaves each MoE block a stand-in
(DeferredExperts: full logical shapes, no memory) that AutoEP slices for free, and after
initialize `load_autoep_experts` reads each rank's expert slice straight from the shards
(safetensors get_slice) into AutoEP's parameters, one tensor at a time. (zero.Init still
allocates each layer's GroupedExperts whole for a moment before partitioning it; the stand-in
then takes its place.)
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from qvl_train.model import Qwen3VLMoe
from qvl_train.model import state_dict_adapter as adapter
from qvl_train.model.build import reset_buffers
from qvl_train.model.io import checkpoint_files, load_config
from qvl_train.model.moe import MoEBlock


def from_pretrained_zero3(
    path: str | os.PathLike,
    *,
    ds_config: dict,
    expert_layout: adapter.ExpertLayout | None = None,
    defer_experts: bool = False,
) -> Qwen3VLMoe:
    """`defer_experts`: skip the routed experts (DeferredExperts stand-ins; for AutoEP, which
    then gets them from load_autoep_experts after deepspeed.initialize)."""
    import deepspeed

    cfg = load_config(path)
    if cfg.tie_word_embeddings:
        raise ValueError("Loading into ZeRO-3 partitions does not handle tied embeddings; load without zero.Init.")
    # dtype comes from ds_config's bf16 section: deepspeed 0.19's Init ignores a `dtype` argument
    # on accelerators without fp16 (it picks bf16 on CPU); its F.linear override stays off
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False):
        model = Qwen3VLMoe(cfg)
    reset_buffers(model)  # Init casts floating buffers to the param dtype; rope tables stay fp32
    if defer_experts:
        _defer_experts(model)
    params = dict(model.named_parameters())
    rank = dist.get_rank()
    loaded = set()
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():  # the same order on every rank: each gather is collective
                name = adapter.name_from_hf(hf_name)
                if defer_experts and _is_routed_expert(hf_name):
                    loaded.add(name)
                    continue
                if name not in params:
                    raise ValueError(f"{file.name} has unexpected tensor {hf_name!r} for this config.")
                p = params[name]
                whole_everywhere = getattr(p, "ds_persist", False)
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=not whole_everywhere):
                    if whole_everywhere or rank == 0:
                        _, tensor = adapter.from_hf(hf_name, f.get_tensor(hf_name), cfg, expert_layout)
                        if tuple(tensor.shape) != tuple(p.shape):
                            raise ValueError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(p.shape)}.")
                        with torch.no_grad():
                            p.copy_(tensor)
                loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{path} is missing {len(missing)} tensors, e.g. {missing[:5]}.")
    return model


def _is_routed_expert(hf_name: str) -> bool:
    return hf_name.endswith((adapter.GATE_UP, adapter.DOWN))


class DeferredExperts(nn.Module):
    """Stand-in for a GroupedExperts whose weights load after AutoEP has sliced them: parameters
    of the full logical shape (AutoEP reads shapes and this rank's [e0:e1] from them) that are
    zero-stride views of one zero, so they own no memory and AutoEP's copy of the slice costs
    one layer's slice, transiently. Never run: AutoEP replaces the whole MoE block."""

    def __init__(self, *, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        zero = torch.zeros((), dtype=dtype, device=device)
        self.gate_up_proj = nn.Parameter(zero.expand(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(zero.expand(num_experts, hidden_size, intermediate_size))

    def forward(self, *args, **kwargs):
        raise RuntimeError("DeferredExperts never runs: enable AutoEP (parallel.ep_size > 1) so it is replaced.")


def _defer_experts(model: Qwen3VLMoe) -> None:
    t = model.config.text
    for block in model.modules():
        if isinstance(block, MoEBlock):
            like = block.gate.weight  # a ZeRO-3 parameter: the model's dtype and device
            block.experts = DeferredExperts(num_experts=t.num_experts, hidden_size=t.hidden_size,
                                            intermediate_size=t.moe_intermediate_size, dtype=like.dtype, device=like.device)


def load_autoep_experts(engine, path: str | os.PathLike, *, expert_layout: adapter.ExpertLayout | None = None) -> int:
    """After deepspeed.initialize with AutoEP on a model from `from_pretrained_zero3(...,
    defer_experts=True)`: read each rank's experts [e0, e1) of every MoE layer straight from the
    checkpoint (get_slice) into AutoEP's w1 (gate rows of gate_up_proj), w3 (up rows) and w2
    (down_proj), which ZeRO-3 partitions over the expert-data-parallel group; then refresh the
    optimizer's fp32 master partitions from them. Call on every rank. Returns the tensors read."""
    from qvl_train.parallel.expert_parallel import is_autoep_layer

    model = engine.module
    cfg = model.config
    layers = {name: m for name, m in model.named_modules() if is_autoep_layer(m)}
    if not layers:
        raise ValueError("load_autoep_experts needs a model whose MoE blocks AutoEP replaced (parallel.ep_size > 1).")
    inter = cfg.text.moe_intermediate_size
    done = set()
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():  # the same order on every rank: each write is collective
                if not _is_routed_expert(hf_name):
                    continue
                name = adapter.name_from_hf(hf_name)
                layer = layers[name.rsplit(".experts.", 1)[0]]
                e0 = layer.ep_rank * layer.num_local_experts
                e1 = e0 + layer.num_local_experts
                read = _slice_reader(f, hf_name, e0, e1, cfg, expert_layout)
                if name.endswith(adapter.GATE_UP):
                    _write_partitioned(layer.experts.w1, lambda: read()[:, :inter])
                    _write_partitioned(layer.experts.w3, lambda: read()[:, inter:])
                else:
                    _write_partitioned(layer.experts.w2, read)
                done.add(name)
    expected = {f"{n}.experts.{p}" for n in layers for p in ("gate_up_proj", "down_proj")}
    if done != expected:
        raise ValueError(f"{path} is missing {len(expected - done)} expert tensors, e.g. {sorted(expected - done)[:3]}.")
    engine.optimizer.refresh_fp32_params()  # the optimizer copied its master partitions at initialize
    return len(done)


def _slice_reader(f, hf_name: str, e0: int, e1: int, cfg, expert_layout):
    """read() -> experts [e0, e1) of one checkpoint tensor in our layout, read on first call
    only (ranks that do not write never read)."""
    box: list[torch.Tensor] = []

    def read() -> torch.Tensor:
        if not box:
            box.append(adapter.expert_slice_from_hf(hf_name, f.get_slice(hf_name)[e0:e1], cfg, expert_layout)[1])
        return box[0]

    return read


def _write_partitioned(p: torch.Tensor, read) -> None:
    """Set a ZeRO-3 parameter to read(): its partition group's rank 0 writes and DeepSpeed
    re-partitions; a parameter ZeRO keeps whole (ds_persist) is written by every rank."""
    import deepspeed

    persist = getattr(p, "ds_persist", False)
    writer = persist or dist.get_rank(group=p.ds_process_group) == 0
    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
        if writer:
            value = read()
            if tuple(value.shape) != tuple(p.ds_shape):
                raise ValueError(f"expert slice shape {tuple(value.shape)} != AutoEP parameter {tuple(p.ds_shape)}.")
            with torch.no_grad():
                p.data.copy_(value)
