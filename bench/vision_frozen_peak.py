"""A frozen vision tower's memory does not grow with its depth: the peak heap growth of its forward
(train mode, autograd on, as in a LoRA-on-the-text step) at 2 blocks and at every block of the
preset, on the same frames. What lets bench/bench_sp_memory.py stand for the 27-block tower with
fewer blocks, and why the plan (qvl_train.plan.vision_trains) counts nothing the frozen tower keeps,
only one block's forward.

    OMP_NUM_THREADS=2 python bench/vision_frozen_peak.py            # 30B-A3B width, 4 frame groups

Also prints the plan's one-block term, patches x (6 hidden + 2 intermediate) x 4 B, and, for
contrast, the same forward with the blocks trainable (what the tower then keeps for backward).
CPU only (glibc heap, bench/common.peak_mb).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import peak_mb  # noqa: E402
from qvl_train.model import preset  # noqa: E402
from qvl_train.model.build import init_weights  # noqa: E402
from qvl_train.model.vision import VisionTower  # noqa: E402


def tower_peak_mib(vision_cfg, *, depth: int, groups: int, frame: int, trainable: bool) -> float:
    cfg = dataclasses.replace(vision_cfg, depth=depth,
                              deepstack_visual_indexes=[i for i in vision_cfg.deepstack_visual_indexes if i < depth])
    torch.manual_seed(0)
    tower = VisionTower(cfg)
    init_weights(tower, 0.02)
    tower.requires_grad_(trainable)
    tower.train()
    grid = torch.tensor([[groups, frame, frame]])
    pixels = torch.randn(groups * frame * frame, cfg.patch_dim)

    def forward():
        merged, deepstack = tower(pixels, grid)
        del merged, deepstack  # what the step keeps of them is the text side's, not the tower's

    return peak_mb(forward)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="30B-A3B")
    p.add_argument("--groups", type=int, default=4, help="2-frame groups")
    p.add_argument("--frame", type=int, default=32, help="patches per frame side (32: 512x512 frames)")
    args = p.parse_args()
    v = preset(args.preset).vision
    patches = args.groups * args.frame**2
    print(f"{args.preset} vision tower (hidden {v.hidden_size}, intermediate {v.intermediate_size}), "
          f"{patches} patches, fp32, {torch.get_num_threads()} threads")
    # one forward first, not reported: the first call allocates what later calls reuse (caches)
    tower_peak_mib(v, depth=1, groups=args.groups, frame=args.frame, trainable=False)
    for depth in (2, v.depth):
        frozen = tower_peak_mib(v, depth=depth, groups=args.groups, frame=args.frame, trainable=False)
        print(f"{depth:>2} blocks, frozen: peak {frozen:.0f} MiB", flush=True)
    trained = tower_peak_mib(v, depth=2, groups=args.groups, frame=args.frame, trainable=True)
    print(f" 2 blocks, trainable: peak {trained:.0f} MiB (what it keeps for backward on top)")
    plan = patches * (6 * v.hidden_size + 2 * v.intermediate_size) * 4 / 2**20
    print(f"plan's one-block forward term: {plan:.0f} MiB")


if __name__ == "__main__":
    main()
