"""The vision tower split over a sequence-parallel (SP) group.

Every rank of an SP group trains on the same packed row but holds only a slice of its tokens.
Instead of each rank encoding every image and frame of the row (what ms-swift does), the row's
visual work is cut into units and spread over the group:

- A unit is one temporal frame group of one `grid_thw` entry: an image (t = 1) or one frame group
  of a video. Qwen3-VL's vision attention never crosses a frame group, and the learned position
  embedding and the 2-D vision rope depend only on (row, column, h, w), so a (t, h, w) entry
  encodes exactly like t entries (1, h, w) (tests/parallel/test_sp_vision.py checks it).
- `plan_vision_units` (host only, from grid_thw) gives each rank a CONTIGUOUS run of units, cut at
  the unit boundary nearest to k/sp of the patches: each rank encodes at most total/sp patches
  plus one unit. Contiguous runs keep the merged rows a rank encodes close to the rows its token
  slice needs (a long video's frames mostly stay where they are encoded), so little moves.
- Each rank encodes its units in ONE tower call (a rank without units runs a 4-patch dummy image,
  so ZeRO-3's gather hooks see the same calls on every rank), then rows travel with one
  autograd-aware all-to-all to the ranks that want them; backward sends the gradients back to the
  encoding rank. The final merger and every DeepStack level travel together as one row.

Collectives per call: an all-to-all of sp longs (request counts; its result is the call's one host
read: NCCL needs the row splits on the host), an all-to-all of the requested row indices, and the
all-to-all of the rows (plus its mirror image in backward). Every rank of the group must call
`sp_encode_visual` for the same row, and put BOTH outputs into its loss graph even when its
wanted set is empty (e.g. `index_put` with an empty index): the backward all-to-all runs only
where autograd reaches it.

Legend: N patches, P patch dim, U grid entries, M merged rows (N / merge^2), O out hidden,
F = O * (1 + DeepStack levels).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qvl_train.model.moe import _GatherRows
from qvl_train.model.vision import VisionTower
from qvl_train.parallel.expert_parallel import _AllToAll


@dataclass(frozen=True)
class VisionShare:
    """One rank's contiguous run of units: patches [patch_start, patch_end) of the row's pixels,
    merged rows [merged_start, merged_end), encoded with `grid_thw` (k3; empty when no units)."""

    patch_start: int
    patch_end: int
    merged_start: int
    merged_end: int
    grid_thw: torch.Tensor

    @property
    def num_patches(self) -> int:
        return self.patch_end - self.patch_start


def plan_vision_units(grid_thw_U3: torch.Tensor, *, merge: int, num_ranks: int) -> list[VisionShare]:
    """Split the row's frame groups over `num_ranks` ranks: contiguous runs, balanced by patches.

    Deterministic and host-only (the same result on every rank from the same grids). Cut k sits at
    the unit boundary nearest to k * total / num_ranks, so each run holds at most total/num_ranks
    patches plus the largest unit.
    """
    grid = grid_thw_U3.detach().to("cpu", torch.long).reshape(-1, 3)
    unit_hw = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])  # patches per unit
    unit_entry = torch.repeat_interleave(torch.arange(len(grid)), grid[:, 0])  # grid row of each unit
    bounds = [0, *torch.cumsum(unit_hw, 0).tolist()]  # patch offset before each unit, and the total
    total = bounds[-1]
    cuts = [0]
    for k in range(1, num_ranks if total else 0):
        target = k * total / num_ranks
        hi = min(bisect.bisect_right(bounds, target), len(bounds) - 1)  # bounds[hi - 1] <= target
        best = hi if bounds[hi] - target < target - bounds[hi - 1] else hi - 1
        cuts.append(max(best, cuts[-1]))
    cuts += [len(unit_hw)] * (num_ranks + 1 - len(cuts))
    shares = []
    for u0, u1 in zip(cuts[:-1], cuts[1:]):
        p0, p1 = bounds[u0], bounds[u1]
        shares.append(VisionShare(p0, p1, p0 // merge**2, p1 // merge**2, _run_grid(grid, unit_entry[u0:u1])))
    return shares


def _run_grid(grid_U3: torch.Tensor, unit_entry: torch.Tensor) -> torch.Tensor:
    """grid_thw of a run of units: consecutive frame groups of one entry stay one (k, h, w) row."""
    entries, counts = torch.unique_consecutive(unit_entry, return_counts=True)
    run = grid_U3[entries].clone()
    run[:, 0] = counts
    return run


def sp_encode_visual(
    tower: VisionTower,
    pixel_values_NP: torch.Tensor,
    grid_thw_U3: torch.Tensor,
    *,
    wanted_M: torch.Tensor,
    group,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The merged features and DeepStack features of rows `wanted_M` of the row's visual input,
    equal to `tower(pixel_values_NP, grid_thw_U3)` indexed by `wanted_M`, with the encoding
    spread over `group` (see the module docstring for the contract).

    pixel_values_NP / grid_thw_U3: the row's whole visual input (images, then videos), identical
    on every rank of the group. wanted_M: host LongTensor of merged-row indices this rank needs.
    Returns (embeds (W, O), [level (W, O) per DeepStack level]) in wanted_M's order.
    """
    merge = tower.cfg.spatial_merge_size
    grid = grid_thw_U3.detach().to("cpu", torch.long).reshape(-1, 3)
    num_merged = int(grid.prod(-1).sum()) // merge**2
    wanted_M = _check_wanted(wanted_M, num_merged)
    sp, rank = dist.get_world_size(group), dist.get_rank(group)
    shares = plan_vision_units(grid, merge=merge, num_ranks=sp)
    mine = shares[rank]
    device = pixel_values_NP.device

    packed_MF = _encode_share(tower, pixel_values_NP, mine)

    # which rank encodes each wanted row, and its row index there (host)
    starts = torch.tensor([s.merged_start for s in shares])
    owner_W = torch.searchsorted(starts, wanted_M, right=True) - 1
    order_W = torch.argsort(owner_W, stable=True)
    request_W = wanted_M[order_W] - starts[owner_W[order_W]]
    recv_counts = torch.bincount(owner_W, minlength=sp)

    # owners learn what to send: counts (the one host read), then the row indices themselves
    recv_counts_dev = recv_counts.to(device)
    send_counts_dev = torch.empty_like(recv_counts_dev)
    dist.all_to_all_single(send_counts_dev, recv_counts_dev, group=group)
    send_splits, recv_splits = send_counts_dev.tolist(), recv_counts.tolist()
    send_idx = torch.empty(sum(send_splits), dtype=torch.long, device=device)
    dist.all_to_all_single(send_idx, request_W.to(device), send_splits, recv_splits, group=group)

    send_SF = _GatherRows.apply(packed_MF, send_idx)
    recv_WF = _AllToAll.apply(send_SF, send_splits, recv_splits, group)
    out_WF = _GatherRows.apply(recv_WF, torch.argsort(order_W).to(device))  # back to wanted order
    embeds, *deepstack = out_WF.split(tower.cfg.out_hidden_size, dim=-1)
    return embeds, deepstack


def _check_wanted(wanted_M: torch.Tensor, num_merged: int) -> torch.Tensor:
    if wanted_M.device.type != "cpu" or wanted_M.dtype != torch.long or wanted_M.dim() != 1:
        raise ValueError(
            f"wanted_M must be a 1-D host (CPU) LongTensor of merged-row indices, got {wanted_M.dtype} "
            f"{tuple(wanted_M.shape)} on {wanted_M.device}: build it on the host from the row's token slice."
        )
    if len(wanted_M) and (int(wanted_M.min()) < 0 or int(wanted_M.max()) >= num_merged):
        raise ValueError(
            f"wanted_M holds indices outside [0, {num_merged}): the row's grid_thw gives {num_merged} merged "
            "visual rows; pass the whole row's pixels and grids on every rank."
        )
    return wanted_M


def _encode_share(tower: VisionTower, pixel_values_NP: torch.Tensor, share: VisionShare) -> torch.Tensor:
    """This rank's units through the tower in one call, the merger and DeepStack outputs side by
    side (M_local, F). Without units: a 4-patch dummy image whose rows are never sent; the
    gather's backward still reaches the tower (zero gradients), as ZeRO-3 needs."""
    if share.num_patches:
        pixels, grid = pixel_values_NP[share.patch_start : share.patch_end], share.grid_thw
    else:
        m = tower.cfg.spatial_merge_size
        pixels, grid = pixel_values_NP.new_zeros(m * m, pixel_values_NP.shape[1]), torch.tensor([[1, m, m]])
    embeds_MO, deepstack_MO = tower(pixels, grid)
    return torch.cat([embeds_MO, *deepstack_MO], dim=-1)
