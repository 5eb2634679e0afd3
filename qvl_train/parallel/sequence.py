"""Ulysses sequence parallelism (`parallel.sp_size`): one packed row trained by sp ranks.

Layout of the process groups (world W, sp = parallel.sp_size, ep = parallel.ep_size):
- SP groups are blocks of sp CONTIGUOUS ranks {0..sp-1}, {sp..2sp-1}, ...: with torchrun's
  rank order (node-major, `--nproc_per_node` ranks per node) they sit inside one node as long
  as sp divides the GPUs per node, so the four all-to-alls per layer (q, k, v out, attention
  output back; twice more in backward) run over NVLink, never over the inter-node network.
- Data parallelism over rows: data-parallel rank = rank // sp, size W / sp. The loader shards
  rows by that rank, so every rank of an SP group gets the same row and each sample is used
  once per epoch. `data.max_length` and `data.tokens_per_batch` are per SP group (per row).
- ZeRO (any stage) still partitions and averages over the whole world: SP ranks hold slices of
  the same row, and their gradient contributions add up (see "Loss" below).
- Expert parallelism is unchanged: EP groups are contiguous blocks of ep ranks over the global
  rank set (groups.py), the same with or without SP. Routing is per token, so which rank holds a
  token (which slice of which row) does not matter to the EP all-to-all: SP is transparent to
  EP, and both AutoEP (full SFT) and our LoRA all-to-all dispatcher run as they are. With
  sp = ep the EP group is the SP group (one node's ranks); ep > sp spans several SP groups.

  8 GPUs (one node), sp 2, ep 4:   SP {0,1} {2,3} {4,5} {6,7};  DP rank = rank // 2 (4 rows
                                   at a time);  EP {0..3} {4..7};  ZeRO over all 8.
  16 GPUs (2 x 8), sp 4, ep 8:     SP {0..3} {4..7} {8..11} {12..15} (inside a node);
                                   DP rank = rank // 4 (4 rows);  EP {0..7} {8..15} (a node
                                   each);  ZeRO over all 16.

What runs where, per micro-batch (every rank of an SP group):
- sequence_rows.slice_rows: positions and next-token targets of the WHOLE row, then a
  contiguous slice of the row (see that module for contiguous vs zigzag).
- Vision: the row's whole pixel values go to `encode_visual`, which returns the tower rows of
  this slice's visual tokens (qvl_train.parallel.sp_vision spreads the tower work over the group).
- Attention (UlyssesAttention): local q/k/v (B, l, H, Dh) -all-to-all-> (B, L, H/sp, Dh), the
  whole row's document plan (built from the unsplit layout, so documents crossing a slice
  boundary are exact; no L x L tensor: the dense kernels are refused), all-to-all back.
- MoE: each rank routes its own tokens; the aux loss sums the per-expert statistics over the SP
  group (differentiable all-reduce of 2E + 1 numbers), so it is the whole row's.
- Loss: each rank sums the CE of its slice's targets and divides by the global batch's
  supervised-token count / W; ZeRO's world average then gives sum(CE) / count, the gradient of
  sp=1. The aux loss: every SP rank adds the same (whole-row) aux; the all-reduce's backward
  sums the sp copies' gradients, and the world average divides by W: sp / W = 1 / (W / sp), the
  data-parallel mean of sp=1.
- Evaluation and generation run without SP: every rank evaluates whole rows of its own share
  (the model takes the single-device path when no SequenceSlice is given).

Legend: B rows, L whole row, l = L / sp slice, H query heads, K KV heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from qvl_train.data.packing import HOST_PLAN_KEYS, IGNORE_INDEX, MODEL_KEYS
from qvl_train.model.attention import (DENSE_IMPLS, DocumentLayout, document_ids, host_to_device, is_document_layout,
                                       text_attention)
from qvl_train.model.config import ModelConfig
from qvl_train.model.model import SequenceSlice

from .expert_parallel import _AllToAll
from .groups import dist_info
from .sequence_rows import RowSlices, slice_rows, slice_stats
from .sp_vision import sp_encode_visual

# ---- configuration and groups ---------------------------------------------------------------


def validate_sp_size(sp_size: int, *, world_size: int, num_heads: int, num_kv_heads: int) -> None:
    """ValueError naming the fix unless sp can run: it divides the world and the query heads, and
    the KV heads split or replicate evenly. (The dense attention kernels, which would need an
    L x L mask, are refused by config.schema.validate.)"""
    if isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(f"parallel.sp_size must be a positive integer, got {sp_size!r}.")
    if world_size % sp_size:
        fits = [d for d in range(1, world_size + 1) if world_size % d == 0 and num_heads % d == 0]
        raise ValueError(f"parallel.sp_size={sp_size} must divide the world size {world_size}; use one of {fits} "
                         "or change the number of processes.")
    if num_heads % sp_size:
        fits = [d for d in range(1, num_heads + 1) if num_heads % d == 0 and world_size % d == 0]
        raise ValueError(f"parallel.sp_size={sp_size} must divide the model's {num_heads} attention (query) heads "
                         f"(Ulysses gives each rank heads/sp of them); use one of {fits}.")
    if num_kv_heads % sp_size and sp_size % num_kv_heads:
        raise ValueError(f"parallel.sp_size={sp_size} and the model's {num_kv_heads} KV heads: one must divide the "
                         "other (KV heads are split over the SP ranks, or replicated when fewer); choose another sp.")


def sp_group_ranks(world_size: int, sp_size: int) -> list[list[int]]:
    """SP groups: contiguous blocks of sp ranks (inside a node)."""
    return [list(range(s, s + sp_size)) for s in range(0, world_size, sp_size)]


@dataclass
class SPInfo:
    sp_size: int
    sp_rank: int
    dp_size: int  # rows trained at a time (world / sp): the loader's world
    dp_rank: int  # rank // sp: the loader's rank
    ranks: list[int]
    group: object = None  # torch ProcessGroup (None when sp == 1)


def build_sp_groups(sp_size: int) -> SPInfo:
    """Create the SP groups (a collective: every rank calls it, in the same order relative to the
    other new_group calls) and return this rank's SPInfo. sp == 1 creates no group."""
    rank, world, _ = dist_info()
    info = SPInfo(sp_size, rank % sp_size, world // sp_size, rank // sp_size,
                  next(g for g in sp_group_ranks(world, sp_size) if rank in g))
    if sp_size == 1:
        return info
    for ranks in sp_group_ranks(world, sp_size):
        g = dist.new_group(ranks)
        if rank in ranks:
            info.group = g
    return info


# ---- autograd collectives -------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; every rank's loss uses the sum, so the gradient of each rank's input is
    the sum of all ranks' output gradients (another all-reduce)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(x, group)


def seq_to_heads(x_BlHD: torch.Tensor, group, sp: int) -> torch.Tensor:
    """(B, l, H, Dh) slice of all heads -> (B, sp*l, H/sp, Dh) whole row of this rank's heads."""
    B, l, H, Dh = x_BlHD.shape
    x_sBlhD = x_BlHD.reshape(B, l, sp, H // sp, Dh).permute(2, 0, 1, 3, 4)
    y_sBlhD = _AllToAll.apply(x_sBlhD, [1] * sp, [1] * sp, group)  # dim 0: source rank = slice
    return y_sBlhD.permute(1, 0, 2, 3, 4).reshape(B, sp * l, H // sp, Dh)


def heads_to_seq(y_BLhD: torch.Tensor, group, sp: int) -> torch.Tensor:
    """Inverse of seq_to_heads: (B, L, H/sp, Dh) -> (B, L/sp, H, Dh)."""
    B, L, h, Dh = y_BLhD.shape
    y_sBlhD = y_BLhD.reshape(B, sp, L // sp, h, Dh).permute(1, 0, 2, 3, 4)
    x_sBlhD = _AllToAll.apply(y_sBlhD, [1] * sp, [1] * sp, group)  # dim 0: source rank = head block
    return x_sBlhD.permute(1, 2, 0, 3, 4).reshape(B, L // sp, sp * h, Dh)


# ---- attention ------------------------------------------------------------------------------


@dataclass
class UlyssesAttention:
    """Wraps the whole row's attention plan (model.attention.DocumentAttention): sequence-sliced
    q/k/v in, sequence-sliced output out, each rank attending over the whole row for H/sp heads.

    KV heads: with K >= sp each rank gets K/sp of them (the ones its query heads use: query head h
    uses KV head h // (H/K), and rank r's query heads [rH/sp, (r+1)H/sp) use exactly
    [rK/sp, (r+1)K/sp)). With K < sp (4 KV heads at sp 8) each KV head is first repeated sp/K
    times, so rank r receives a copy of KV head r*K/sp, the one its query heads use. Cost: the
    K and V all-to-alls move sp/K times the bytes of K heads (sp heads instead of K, at most as
    much as q's H heads), and their gradients are summed back over the copies by autograd; the
    gathered (B, L, 1, Dh) K/V per rank and the attention FLOPs are what any rank needs anyway."""

    plan: object  # callable (q_BLHD, k_BLKD, v_BLKD) -> out_BLHD over the whole row
    group: object
    sp: int

    def __call__(self, q_BlHD: torch.Tensor, k_BlKD: torch.Tensor, v_BlKD: torch.Tensor) -> torch.Tensor:
        K = k_BlKD.shape[2]
        if K % self.sp:
            k_BlKD, v_BlKD = (t.repeat_interleave(self.sp // K, dim=2) for t in (k_BlKD, v_BlKD))
        q_BLhD, k_BLkD, v_BLkD = (seq_to_heads(t, self.group, self.sp) for t in (q_BlHD, k_BlKD, v_BlKD))
        return heads_to_seq(self.plan(q_BLhD, k_BLkD, v_BLkD), self.group, self.sp)


@dataclass
class UlyssesPlanner:
    """text_attention's stand-in for a slice: the plan is built from the WHOLE rows' layout
    (attention mask and segment ids of the unsplit rows), then wrapped by UlyssesAttention."""

    row_attention_mask_BL: torch.Tensor
    row_segment_ids_BL: torch.Tensor | None
    group: object
    sp: int
    row_layout: DocumentLayout | None = None  # the loader's host layout: the plan reads no device data

    def __call__(self, kernel: str, *, attention_mask_BLk, segment_ids_BL, q_len: int, kv_len: int, device):
        del attention_mask_BLk, segment_ids_BL  # the slice's; the plan needs the whole rows'
        assert q_len == kv_len, "sequence parallelism is a training (no cache) feature"
        if kernel in DENSE_IMPLS:
            raise ValueError(f"attention kernel {kernel} builds an L x L mask, which sequence parallelism never does; "
                             "use model.attn_impl=auto (or flex, flash_varlen, sdpa_docs).")
        mask_BL, seg_BL = self.row_attention_mask_BL, self.row_segment_ids_BL
        if self.row_layout is None:  # a layout the loader built is one run per document already
            valid_BL = mask_BL.bool() if seg_BL is None else mask_BL.bool().expand_as(seg_BL)
            # checked here: text_attention would fall back to an L x L mask (with a warning)
            if not is_document_layout(valid_BL, seg_BL, document_ids(valid_BL, seg_BL)):
                raise ValueError("sequence parallelism needs every sample of a row to be one contiguous run of "
                                 "valid tokens (an L x L mask would be needed otherwise); pack rows with the "
                                 "repo's loader.")
        L = mask_BL.shape[1]
        plan = text_attention(kernel, attention_mask_BLk=mask_BL, segment_ids_BL=seg_BL, q_len=L, kv_len=L,
                              device=device, layout=self.row_layout)
        return UlyssesAttention(plan, self.group, self.sp)


# ---- the trainer's entry point --------------------------------------------------------------


class SequenceParallel:
    """What the trainer calls per micro-batch; at sp == 1 every method is the plain path.

        micro = [sp.shard(b) for b in batches]         # this rank's slice (host side)
        n = sum(sp.supervised_tokens(b) for b in micro) # counted once per row over the world
        out = engine(**to_device(b, device), **sp.slice_inputs(b, device), loss_normalizer=..., ...)
    """

    def __init__(self, info: SPInfo, model_cfg: ModelConfig, *, pad_token_id: int, device: torch.device,
                 encode_visual=sp_encode_visual) -> None:
        self.info, self.model_cfg, self.pad_token_id, self.device = info, model_cfg, pad_token_id, device
        self.encode_visual = encode_visual

    @property
    def size(self) -> int:
        return self.info.sp_size

    def shard(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.size == 1:
            return batch
        self._check_same_rows(batch["input_ids"])
        s = slice_rows(batch, sp_size=self.size, sp_rank=self.info.sp_rank, model_cfg=self.model_cfg,
                       pad_token_id=self.pad_token_id)
        # the whole rows' host plan (attention layout, target count) does not describe a slice
        out = {k: v for k, v in batch.items() if k not in MODEL_KEYS and k not in HOST_PLAN_KEYS}
        out.update(s.inputs)
        out["stats"] = slice_stats(batch["stats"], self.info.sp_rank) if "stats" in batch else {}
        out["_slice"] = s
        return out

    def check_resume(self, saved_sp_size: int, path) -> None:
        """A checkpoint resumes only at its own sp: the loader's shards (and states) are per SP
        group, so another sp would replay other rows."""
        if saved_sp_size != self.size:
            raise ValueError(f"{path} was written with parallel.sp_size={saved_sp_size}; resume it with that sp_size "
                             f"(this run has {self.size}), or start a new run (checkpoint.resume=none).")

    def once_per_group(self, counts: dict) -> dict:
        """Per-rank counts of the loader (skipped samples) that every rank of an SP group shares:
        kept on the group's first rank only, so sums over all ranks count each row once."""
        return counts if self.info.sp_rank == 0 else {}

    def supervised_tokens(self, batch: dict[str, Any]) -> int:
        """Next-token targets of this rank's part (host tensors: no sync)."""
        if self.size == 1:
            return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return batch["_slice"].num_targets

    def slice_inputs(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The model keyword arguments a slice adds to its tensors' (sequence_slice; none at sp 1)."""
        if self.size == 1:
            return {}
        s: RowSlices = batch["_slice"]
        group = self.info.group
        seg = None if s.row_segment_ids_BL is None else host_to_device(s.row_segment_ids_BL, device)
        return {"sequence_slice": SequenceSlice(
            targets_BL=host_to_device(s.targets_Bl, device),
            num_targets=s.num_targets,
            visual_index_M=s.visual_index_M,
            encode_visual=lambda tower, pixels, grid, *, wanted_M: self.encode_visual(
                tower, pixels, grid, wanted_M=wanted_M, group=group),
            plan_attention=UlyssesPlanner(host_to_device(s.row_attention_mask_BL, device), seg, group, self.size, s.row_layout),
            reduce_router_stats=lambda stats: all_reduce_sum(stats, group),
        )}

    def _check_same_rows(self, ids_BL: torch.Tensor) -> None:
        """Every rank of the group must hold the same row (the loader is deterministic per
        data-parallel rank); a mismatch would train on garbage silently, so fail instead."""
        weights = torch.arange(1, ids_BL.numel() + 1, dtype=torch.float64)
        sig = torch.tensor([*ids_BL.shape, float((ids_BL.reshape(-1).double() * weights).sum())],
                           dtype=torch.float64, device=self.device)
        got = [torch.empty_like(sig) for _ in range(self.size)]
        dist.all_gather(got, sig, group=self.info.group)
        if any(not torch.equal(g, got[0]) for g in got):
            raise RuntimeError(f"the ranks {self.info.ranks} of a sequence-parallel group got different batches; "
                               "the data loader must give every rank of an SP group the same rows.")
