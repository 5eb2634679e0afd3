"""Peak host memory per rank while loading a checkpoint for full SFT with AutoEP (CPU, gloo):

    flock /tmp/bigmem.lock torchrun --standalone --nproc_per_node 2 bench/autoep_load_memory.py \
        --path DIR --ep 2 --out OUT     # DIR: e.g. random_checkpoint --preset 30B-A3B --layers 1 --vision-layers 1

Loads a real-width checkpoint for full SFT with AutoEP the way the trainer does
(from_pretrained_zero3(defer_experts=True) -> deepspeed.initialize with AutoEP ->
load_autoep_experts) and reports this rank's peak host memory after each phase, next to its
share: its expert slice + its ZeRO share of everything else + the largest single tensor (fp32),
and the training state deepspeed.initialize allocates with the optimizer (its fp32 master
partitions, a copy even of fp32 weights, and its gradient partitions: bytes of those tensors).
`--no-optimizer` initializes without one (the load alone, as tests/parallel/test_load_memory.py).

Peak: VmHWM (the kernel's exact peak resident set) minus the resident set before loading. It
counts the safetensors pages a rank has mapped while reading, so it errs high.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from qvl_train.config.schema import OptimSection  # noqa: E402
from qvl_train.model import load_config  # noqa: E402
from qvl_train.parallel.expert_parallel import autoep_config  # noqa: E402
from qvl_train.parallel.zero3_load import from_pretrained_zero3, load_autoep_experts, load_share_bytes  # noqa: E402
from qvl_train.train.optim import param_groups  # noqa: E402

from common import peak_rss_bytes as peak_bytes, reset_peak_rss as reset_peak, rss_bytes  # noqa: E402  (bench/common.py)


def training_state_bytes(optimizer) -> dict[str, int]:
    """Bytes of the tensors DeepSpeed's ZeRO-3 optimizer allocates at initialize for training."""
    if optimizer is None or not hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return {"fp32_master": 0, "grad_partitions": 0}
    nbytes = lambda t: t.numel() * t.element_size()
    grads = getattr(optimizer, "grad_partitions_flat_buffer", None)
    return {"fp32_master": sum(nbytes(t) for t in optimizer.fp32_partitioned_groups_flat),
            "grad_partitions": nbytes(grads) if grads is not None else 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", required=True)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-optimizer", action="store_true", help="initialize without an optimizer (the load alone)")
    args = ap.parse_args()
    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(args.path)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e4},
        "bf16": {"enabled": False},
    }
    dist.barrier()
    before = rss_bytes()
    reset_peak()
    t0 = time.time()
    model = from_pretrained_zero3(args.path, ds_config=ds_config, defer_experts=True)
    after_build = peak_bytes() - before
    ds_config.update(autoep_config(cfg, args.ep, world_size=world))
    if args.no_optimizer:
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    else:
        ds_config["optimizer"] = {"type": "AdamW", "params": {"torch_adam": True, "lr": 1e-5}}
        groups = param_groups(model, OptimSection(weight_decay=0.1))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    after_init = peak_bytes() - before
    load_autoep_experts(engine, args.path)
    res = {"rank": rank, "peak": peak_bytes() - before, "peak_build": after_build, "peak_init": after_init,
           "rss_end": rss_bytes() - before, "seconds": time.time() - t0,
           **load_share_bytes(cfg, ep_size=args.ep, world_size=world, dtype=torch.float32),
           **training_state_bytes(engine.optimizer)}
    share = res["expert_slice"] + res["zero_share"] + res["largest_tensor"]
    res["peak_over_share"] = res["peak"] / share
    res["peak_less_training_state_over_share"] = (res["peak"] - res["fp32_master"] - res["grad_partitions"]) / share
    results = [None] * world
    dist.all_gather_object(results, res)
    if rank == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump({"ranks": results}, f, indent=1)
        for r in results:
            print(f"rank {r['rank']}: " + ", ".join(f"{k} {v / 1e9:.2f} GB" if isinstance(v, int) and k != "rank"
                                                   else f"{k} {v:.2f}" for k, v in r.items() if k != "rank"), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
