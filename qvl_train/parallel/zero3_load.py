"""Loading a real checkpoint straight into ZeRO-3 partitions, each rank reading only its share.

The model is built on the meta device and then allocated uninitialised (its pages are mapped,
not touched, so they cost no memory) and handed to deepspeed.zero.Init(module=...), which turns
each parameter into a ZeRO-3 parameter holding only this rank's flat partition (whole for a
moment, one parameter at a time: deepspeed's Init broadcasts it from rank 0 while converting
it). Each rank then reads its partition's element range straight from the safetensors shards
(model.safetensors_ranges: plain reads, no mmap) into the partition: no gather or broadcast of
ours, and no whole tensor except one our layout reorders (Hub experts are transposed), read
whole by each rank and sliced. Freed host memory goes back to the system after each tensor
(release_host_memory), so the resident set follows what is live.

Full SFT with AutoEP (ep_size > 1) must not hold all experts either, but AutoEP builds its expert
slices inside deepspeed.initialize from the MoE block it replaces (gathering a ZeRO-3 source in
full, every layer, on every rank). So `defer_experts=True` leaves each MoE block a stand-in
(DeferredExperts: full logical shapes, no memory) that AutoEP slices for free, and after
initialize `load_autoep_experts` reads each rank's expert slice straight from the shards into
AutoEP's partitions, one tensor at a time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

import torch
import torch.distributed as dist
from torch import nn

from qvl_train.model import Qwen3VLMoe
from qvl_train.model import state_dict_adapter as adapter
from qvl_train.model.build import reset_buffers
from qvl_train.model.io import checkpoint_files, load_config
from qvl_train.model.moe import MoEBlock
from qvl_train.model.safetensors_ranges import SafetensorsRanges


def from_pretrained_zero3(
    path: str | os.PathLike,
    *,
    ds_config: dict,
    expert_layout: adapter.ExpertLayout | None = None,
    defer_experts: bool = False,
    ep_info=None,
) -> Qwen3VLMoe:
    """`defer_experts`: skip the routed experts (DeferredExperts stand-ins; for AutoEP, which
    then gets them from load_autoep_experts after deepspeed.initialize). `ep_info` (LoRA with
    expert parallelism): the experts become this rank's frozen ShardedExperts slice (buffers,
    outside ZeRO-3, as shard_experts_for_ep), read as rows e0:e1 of each expert tensor."""
    import deepspeed

    from qvl_train.parallel.expert_parallel import ShardedExperts, shard_experts_for_ep

    cfg = load_config(path)
    if cfg.tie_word_embeddings:
        raise ValueError("Loading into ZeRO-3 partitions does not handle tied embeddings; load without zero.Init.")
    dtype = zero3_dtype(ds_config)
    with torch.device("meta"):
        model = Qwen3VLMoe(cfg).to(dtype)
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    if defer_experts and ep_info is not None:
        raise ValueError("defer_experts (AutoEP, full SFT) and ep_info (LoRA's sharded experts) exclude each other.")
    if defer_experts:
        for block in blocks:
            block.experts = nn.Module()  # kept out of ZeRO-3: the stand-in goes in after Init
    if ep_info is not None:
        shard_experts_for_ep(model, ep_info, allow_meta=True)  # buffers: zero.Init leaves them whole, per rank
    model = model.to_empty(device="cpu")
    reset_buffers(model)  # rope tables (fp32) and the like: computed, not loaded
    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config, mem_efficient_linear=False)
    release_host_memory(collect=True)
    if defer_experts:
        for block in blocks:
            block.experts = DeferredExperts(num_experts=cfg.text.num_experts, hidden_size=cfg.text.hidden_size,
                                            intermediate_size=cfg.text.moe_intermediate_size, dtype=dtype,
                                            device=torch.device("cpu"))
    params = dict(model.named_parameters())
    sharded = {f"{n}.{b}": getattr(m, b) for n, m in model.named_modules() if isinstance(m, ShardedExperts)
               for b in ("gate_up_proj", "down_proj")}
    loaded = set()
    for file in checkpoint_files(path):
        f = SafetensorsRanges(file)
        for hf_name in f.keys():
            name = adapter.name_from_hf(hf_name)
            if name in sharded:
                e0, e1 = ep_info.expert_range(cfg.text.num_experts)
                piece = adapter.expert_slice_from_hf(hf_name, f.read_rows(hf_name, e0, e1), cfg, expert_layout)[1]
                with torch.no_grad():
                    sharded[name].copy_(piece)
            elif not (defer_experts and _is_routed_expert(hf_name)):
                if name not in params:
                    raise ValueError(f"{file.name} has unexpected tensor {hf_name!r} for this config.")
                _read_into_partition(params[name], f, hf_name, cfg, expert_layout)
                release_host_memory()
            loaded.add(name)
    missing = sorted((set(params) | set(sharded)) - loaded)
    if missing:
        raise ValueError(f"{path} is missing {len(missing)} tensors, e.g. {missing[:5]}.")
    return model


def zero3_dtype(ds_config: dict) -> torch.dtype:
    """The parameter dtype a ds_config asks for (bf16 / fp16 sections; fp32 otherwise)."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def partition_range(p: torch.Tensor) -> tuple[int, int]:
    """(start, count): the elements of the flattened parameter that this rank's ZeRO-3 partition
    holds (deepspeed: partition i = flat [i * size, (i + 1) * size), the last one padded)."""
    size = p.ds_tensor.ds_numel
    start = dist.get_rank(group=p.ds_process_group) * size
    return start, max(0, min(size, p.ds_numel - start))


def _read_into_partition(p: torch.Tensor, f: SafetensorsRanges, hf_name: str, cfg, expert_layout) -> None:
    on_disk = torch.empty(f.shape(hf_name), dtype=f.dtype(hf_name), device="meta")
    ours = adapter.from_hf(hf_name, on_disk, cfg, expert_layout)[1]
    if tuple(ours.shape) != tuple(p.ds_shape):
        raise ValueError(f"{hf_name}: checkpoint shape {tuple(ours.shape)} != model {tuple(p.ds_shape)}.")
    start, count = partition_range(p)
    if getattr(p, "ds_persist", False) or not ours.is_contiguous():
        # whole: ZeRO keeps it on every rank, or our layout reorders its elements (Hub experts)
        value = adapter.from_hf(hf_name, f.read(hf_name), cfg, expert_layout)[1]
        write_partition(p, value)
    elif count:  # our layout keeps the file's element order: read just this rank's range, into the partition
        with torch.no_grad():
            f.read_flat_into(hf_name, start, p.ds_tensor[:count])


def write_partition(p: torch.Tensor, value: torch.Tensor) -> None:
    """Set a ZeRO-3 parameter to `value` (its full logical shape) on this rank without any
    collective: this rank's partition, and the whole tensor where this rank holds it (ZeRO keeps
    small parameters, ds_persist, whole on every rank)."""
    if tuple(value.shape) != tuple(p.ds_shape):
        raise ValueError(f"shape {tuple(value.shape)} != ZeRO-3 parameter {tuple(p.ds_shape)}.")
    start, count = partition_range(p)
    with torch.no_grad():
        if p.data.numel() == p.ds_numel:  # whole here (ds_persist, or gathered): keep it in step
            p.data.copy_(value)
        if count:
            p.ds_tensor[:count].copy_(value.reshape(-1)[start:start + count])


def release_host_memory(*, collect: bool = False) -> None:
    """Hand freed heap memory back to the system (glibc malloc_trim). glibc keeps freed chunks
    below its mmap threshold (up to 32 MB) in its arenas; after many transient tensors that is
    GBs of resident memory nothing uses (1.3 GB per rank measured on the 30B-A3B slice). A no-op
    where the C library has no malloc_trim."""
    if collect:  # replaced modules sit in reference cycles until collected
        gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


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


def load_autoep_experts(engine, path: str | os.PathLike, *, expert_layout: adapter.ExpertLayout | None = None) -> int:
    """After deepspeed.initialize with AutoEP on a model from `from_pretrained_zero3(...,
    defer_experts=True)`: read each rank's experts [e0, e1) of every MoE layer straight from the
    checkpoint (rows e0:e1 only) into its partitions of AutoEP's w1 (gate rows of gate_up_proj),
    w3 (up rows) and w2 (down_proj), which ZeRO-3 partitions over the expert-data-parallel group;
    then refresh the optimizer's fp32 master partitions from them. Call on every rank (no
    collectives, but the optimizer refresh is per rank). Returns the tensors read."""
    from qvl_train.parallel.expert_parallel import is_autoep_layer

    model = engine.module
    cfg = model.config
    layers = {name: m for name, m in model.named_modules() if is_autoep_layer(m)}
    if not layers:
        raise ValueError("load_autoep_experts needs a model whose MoE blocks AutoEP replaced (parallel.ep_size > 1).")
    inter = cfg.text.moe_intermediate_size
    done = set()
    for file in checkpoint_files(path):
        f = SafetensorsRanges(file)
        for hf_name in f.keys():
            if not _is_routed_expert(hf_name):
                continue
            name = adapter.name_from_hf(hf_name)
            layer = layers[name.rsplit(".experts.", 1)[0]]
            e0 = layer.ep_rank * layer.num_local_experts
            piece = adapter.expert_slice_from_hf(hf_name, f.read_rows(hf_name, e0, e0 + layer.num_local_experts), cfg,
                                                 expert_layout)[1]
            if name.endswith(adapter.GATE_UP):
                write_partition(layer.experts.w1, piece[:, :inter])
                write_partition(layer.experts.w3, piece[:, inter:])
            else:
                write_partition(layer.experts.w2, piece)
            del piece
            release_host_memory()
            done.add(name)
    expected = {f"{n}.experts.{p}" for n in layers for p in ("gate_up_proj", "down_proj")}
    if done != expected:
        raise ValueError(f"{path} is missing {len(expected - done)} expert tensors, e.g. {sorted(expected - done)[:3]}.")
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:  # the optimizer copied its master partitions at initialize
        refresh()
    return len(done)


def load_share_bytes(cfg, *, ep_size: int, world_size: int, dtype: torch.dtype) -> dict[str, int]:
    """What one rank must hold of a model in ZeRO-3 + AutoEP, in bytes of `dtype`: its expert
    slice (E / ep experts of every MoE layer), its ZeRO share of everything else, and the largest
    single tensor (the most a load may hold whole at once). The issue's bound on the load peak
    is 1.3 x their sum (tests/parallel/test_load_memory.py)."""
    from qvl_train.model.build import build_model

    b = torch.empty((), dtype=dtype).element_size()
    experts = share = largest = 0
    for name, p in build_model(cfg, device="meta").named_parameters():
        largest = max(largest, p.numel() * b)
        if _is_routed_expert(name):
            experts += p.numel() * b // ep_size  # ZeRO then splits it over the world / ep EDP ranks
        else:
            share += p.numel() * b // world_size
    return {"expert_slice": experts, "zero_share": share, "largest_tensor": largest}
