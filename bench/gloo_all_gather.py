"""How much host memory a gloo all-gather takes beyond its output (the memory plan's "gloo
all-gather staging (CPU)" line, qvl_train.plan): gloo gathers into a flat buffer of the whole
output and then copies it out, so a ZeRO-3 gather on CPU peaks at twice the gathered size; NCCL
writes in place. Small (0.5 GiB gathered per rank), no lock needed:

    torchrun --standalone --nproc_per_node 2 bench/gloo_all_gather.py

Prints each collective's peak RSS increase (VmHWM after resetting it via /proc/self/clear_refs)
as a ratio of the output size, with broadcast (in place) as the baseline.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import peak_rss_bytes, reset_peak_rss, rss_bytes  # bench/common.py


def main() -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    part = torch.randn(2**28 // 2 // world)  # 0.5 GiB of fp32 gathered
    out = torch.zeros(part.numel() * world)  # allocated and touched before measuring
    calls = {
        "broadcast (baseline, in place)": lambda: dist.broadcast(out, 0),
        "all_gather_into_tensor (ZeRO-3's)": lambda: dist.all_gather_into_tensor(out, part),
        "all_gather into views": lambda: dist.all_gather(list(out.chunk(world)), part),
    }
    for name, call in calls.items():
        dist.barrier()
        reset_peak_rss()
        before = rss_bytes() / 2**30
        call()
        dist.barrier()
        extra = peak_rss_bytes() / 2**30 - before
        if dist.get_rank() == 0:
            print(f"{name:<36} peak +{extra:.3f} GiB = x{extra / (out.nbytes / 2**30):.2f} the output", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
