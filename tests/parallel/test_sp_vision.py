"""The vision tower split over a sequence-parallel group (qvl_train/parallel/sp_vision.py).

- a (t, h, w) grid entry encodes exactly like t entries (1, h, w) (position-embed interpolation,
  vision rope and the per-frame-group attention all ignore t), the fact the split rests on;
- the plan: contiguous runs covering every unit once, no rank over total/sp patches + one unit;
- 2 gloo processes (one spawn) against the whole tower on one process: outputs of the wanted rows
  and every tower parameter gradient (summed over the group) of the same downstream loss, for an
  image + a 4-frame-group video + an image with the wanted split inside the video (rows move one
  way, then the other way), an arbitrary interleaved wanted set, a rank that wants nothing, and a
  row with one small image (the second rank encodes nothing and runs the dummy). fp32, 1e-6.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qvl_train.model.config import preset
from qvl_train.model.vision import VisionTower
from qvl_train.parallel.sp_vision import plan_vision_units, sp_encode_visual

WORLD = 2
TOL = dict(rtol=1e-6, atol=1e-6)
# image (1,4,6), video of 4 frame groups (4,4,4), image (1,6,4): 112 patches, 28 merged rows
ROW_GRID = [[1, 4, 6], [4, 4, 4], [1, 6, 4]]


def _tower(seed: int = 0) -> VisionTower:
    torch.manual_seed(seed)
    tower = VisionTower(preset("tiny").vision)
    for p in tower.parameters():  # visible LayerNorm/bias terms, so their gradients are checked too
        torch.nn.init.normal_(p, std=0.3)
    return tower


def _pixels(tower: VisionTower, grid: list[list[int]], seed: int = 1) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grid)
    return torch.randn(n, tower.cfg.patch_dim, generator=torch.Generator().manual_seed(seed))


def test_frame_groups_encode_like_separate_entries():
    tower = _tower()
    pixels = _pixels(tower, [[3, 4, 6]])
    embeds, deepstack = tower(pixels, torch.tensor([[3, 4, 6]]))
    embeds_split, deepstack_split = tower(pixels, torch.tensor([[1, 4, 6]] * 3))
    torch.testing.assert_close(embeds_split, embeds, rtol=0, atol=0)
    for a, b in zip(deepstack_split, deepstack, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("num_ranks", [2, 3, 4, 8])
def test_plan_covers_units_and_balances_patches(num_ranks):
    # a long video (60 frame groups of 16x16) between two images of different sizes
    grid = torch.tensor([[1, 8, 12], [60, 16, 16], [1, 20, 16]])
    shares = plan_vision_units(grid, merge=2, num_ranks=num_ranks)
    total, largest_unit = int(grid.prod(-1).sum()), 20 * 16
    assert len(shares) == num_ranks
    assert shares[0].patch_start == 0 and shares[-1].patch_end == total
    for a, b in zip(shares[:-1], shares[1:]):
        assert a.patch_end == b.patch_start and a.merged_end == b.merged_start
    for s in shares:
        assert s.num_patches <= total / num_ranks + largest_unit
        assert int(s.grid_thw.prod(-1).sum()) == s.num_patches
        assert s.merged_end - s.merged_start == s.num_patches // 4
    # frame groups of the video stay one (k, h, w) entry per run
    assert sum(int(s.grid_thw[:, 0].sum()) for s in shares) == 62


def test_plan_gives_every_rank_nothing_without_units():
    shares = plan_vision_units(torch.zeros(0, 3, dtype=torch.long), merge=2, num_ranks=2)
    assert [s.num_patches for s in shares] == [0, 0]


def _scenarios() -> list[tuple[str, list[list[int]], list[torch.Tensor]]]:
    """(name, grid, wanted rows of rank 0 and rank 1). M = 28 for ROW_GRID; the plan encodes
    merged rows [0, 14) on rank 0 and [14, 28) on rank 1."""
    perm = torch.randperm(28, generator=torch.Generator().manual_seed(3))
    return [
        ("split_in_first_video_group", ROW_GRID, [torch.arange(0, 9), torch.arange(9, 28)]),
        ("split_in_last_video_group", ROW_GRID, [torch.arange(0, 19), torch.arange(19, 28)]),
        ("interleaved_any_order", ROW_GRID, [perm[:11], perm[11:]]),
        ("rank1_wants_nothing", ROW_GRID, [torch.arange(0, 28), torch.arange(0)]),
        ("rank0_encodes_nothing", [[1, 4, 4]], [torch.arange(0, 3), torch.arange(3, 4)]),
    ]


def _check_scenario(rank: int, name: str, grid: list[list[int]], wanted: list[torch.Tensor]) -> None:
    tower = _tower()
    pixels = _pixels(tower, grid)
    grid_t = torch.tensor(grid)
    num_levels = len(tower.cfg.deepstack_visual_indexes)
    M, O = int(grid_t.prod(-1).sum()) // 4, tower.cfg.out_hidden_size
    weights = torch.randn(1 + num_levels, M, O, generator=torch.Generator().manual_seed(7))

    # one process, the whole tower
    embeds, deepstack = tower(pixels, grid_t)
    ref_loss = sum((f * w).sum() for f, w in zip([embeds, *deepstack], weights, strict=True))
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in tower.named_parameters()}
    tower.zero_grad(set_to_none=True)

    w = wanted[rank]
    calls = []  # ZeRO-3's gather hooks need exactly one tower forward per rank, also without units
    hook = tower.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    got_embeds, got_deepstack = sp_encode_visual(tower, pixels, grid_t, wanted_M=w, group=dist.group.WORLD)
    hook.remove()
    assert len(calls) == 1, f"{name}: {len(calls)} tower calls"
    num_patches = plan_vision_units(grid_t, merge=2, num_ranks=WORLD)[rank].num_patches
    assert calls[0] == (num_patches or 4), f"{name}: encoded {calls[0]} patches, planned {num_patches}"
    assert len(got_deepstack) == num_levels, name
    torch.testing.assert_close(got_embeds, embeds.detach()[w], **TOL, msg=lambda m: f"{name}: embeds {m}")
    for level, (got, ref) in enumerate(zip(got_deepstack, deepstack, strict=True)):
        torch.testing.assert_close(got, ref.detach()[w], **TOL, msg=lambda m: f"{name}: deepstack {level} {m}")
    loss = sum((f * wt[w]).sum() for f, wt in zip([got_embeds, *got_deepstack], weights, strict=True))
    loss.backward()
    for n, p in tower.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)
        # two partial sums instead of one: fp32 rounding, so 1e-6 of the gradient's scale
        scale = float(ref_grads[n].abs().max())
        torch.testing.assert_close(grad, ref_grads[n], rtol=1e-6, atol=1e-6 * scale, msg=lambda m: f"{name}: grad of {n} {m}")


def _worker(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        assert [s.merged_start for s in plan_vision_units(torch.tensor(ROW_GRID), merge=2, num_ranks=2)] == [0, 14]
        for scenario in _scenarios():
            _check_scenario(rank, *scenario)
    finally:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sp_encode_visual_matches_one_process():
    mp.spawn(_worker, args=(_port(),), nprocs=WORLD, join=True)
