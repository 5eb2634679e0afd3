"""Save / load time and each rank's peak host memory of a training checkpoint at real width:
the resharding format (qvl_train.checkpoint.reshard) against DeepSpeed's own, same engine, same
process (CPU, gloo):

    flock /tmp/bigmem.lock torchrun --standalone --nproc_per_node 2 bench/reshard_checkpoint.py \
        --path DIR --mode lora --ep 2 --out OUT   # DIR: random_checkpoint --preset 30B-A3B --layers 1 --vision-layers 1
    (--mode full: DIR from `python bench/bench_plan.py --write-full-slice DIR`, 30B-A3B widths with 32
    experts and vocab 1,024, since full SFT of the slice above does not fit a 24 GB box)

Builds the engine as the trainer does (LoRA: frozen expert slices per EP rank, LoRA in ZeRO-3;
full: AutoEP), gives Adam its state (zeros: the values do not change what is written or read),
then saves and loads each format in turn (state.save / state.load: the files, manifest and
COMPLETE marker; `--repeats` times, alternating the formats, best time reported). Peak: VmHWM
minus the resident set before the phase, so it counts only what the save or load adds on top of
the live training state; compared with this rank's share of the checkpoint (its partitions of
the trainable tensors, fp32 master + 2 moments) and the largest trainable tensor (fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from qvl_train.checkpoint import reshard, state  # noqa: E402
from qvl_train.config.schema import OptimSection  # noqa: E402
from qvl_train.model import load_config  # noqa: E402
from qvl_train.parallel.expert_parallel import autoep_config  # noqa: E402
from qvl_train.parallel.groups import build_ep_groups  # noqa: E402
from qvl_train.parallel.zero3_load import from_pretrained_zero3, load_autoep_experts, release_host_memory  # noqa: E402
from qvl_train.peft import LoraSettings, apply_lora  # noqa: E402
from qvl_train.train.optim import param_groups  # noqa: E402

from common import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402  (bench/common.py)


def build(path: str, mode: str, ep: int):
    cfg = load_config(path)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e4},
                 "bf16": {"enabled": False},
                 "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": 1e-5}}}
    if mode == "lora":
        ep_info = build_ep_groups(ep, num_experts=cfg.text.num_experts)
        model = from_pretrained_zero3(path, ds_config=ds_config, ep_info=ep_info)
        for p in model.parameters():
            p.requires_grad_(False)
        apply_lora(model, LoraSettings(rank=16, alpha=32, targets=("attention", "dense_mlp", "experts")))
    else:
        model = from_pretrained_zero3(path, ds_config=ds_config, defer_experts=ep > 1)
        ds_config.update(autoep_config(cfg, ep, world_size=dist.get_world_size()))
    lr = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, OptimSection()), config=ds_config,
                                      lr_scheduler=lr)
    if mode == "full" and ep > 1:
        load_autoep_experts(engine, path)
    reshard._init_adam_state(engine.optimizer, 1)  # Adam's state as after a step
    release_host_memory(collect=True)
    return engine


def measure(fn) -> tuple[float, int]:
    dist.barrier()
    release_host_memory(collect=True)
    before = rss_bytes()
    reset_peak_rss()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0, peak_rss_bytes() - before


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", required=True)
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    engine = build(args.path, args.mode, args.ep)
    layout = {"world_size": world, "num_nodes": 1, "ep_size": args.ep, "zero_stage": 3, "peft": args.mode}
    root = Path(args.out) / "checkpoints"
    tgts = reshard.targets(engine.module)
    share = sum(reshard.partition(t.param)[1] for t in tgts) * 4 * 3
    largest = max(t.param.ds_numel for t in tgts) * 4
    counters = {"engine": state.engine_counters(engine, engine.lr_scheduler), "loaders": [{}] * world}
    res: dict = {"rank": rank, "checkpoint_share": share, "largest_trainable_tensor": largest,
                 "trainable_params": sum(t.param.ds_numel for t in tgts)}
    for i in range(args.repeats):
        for fmt, step in (("resharding", 2 * i + 1), ("deepspeed", 2 * i + 2)):
            kwargs = dict(step=step, rank=rank, extra={"loader": {}}, keep_last=0, layout=layout, fmt=fmt,
                          train_state=counters if fmt == "resharding" else None)
            seconds, peak = measure(lambda: state.save(engine, root, **kwargs))
            path = root / state.tag_for(step)
            size = sum(f.stat().st_size for f in path.iterdir())
            load_s, load_peak = measure(lambda: state.load(engine, path, rank=rank, layout=layout))
            best = res.setdefault(fmt, {})
            for key, value in (("save_s", seconds), ("save_peak", peak), ("load_s", load_s), ("load_peak", load_peak)):
                best[key] = min(best.get(key, value), value) if key.endswith("_s") else max(best.get(key, 0), value)
            best["bytes_on_disk"] = size  # (all ranks' files)
            dist.barrier()
            if rank == 0:
                shutil.rmtree(path)
    results: list = [None] * world
    dist.all_gather_object(results, res)
    if rank == 0:
        Path(args.out, "result.json").write_text(json.dumps({"mode": args.mode, "ep": args.ep, "ranks": results}, indent=1))
        for r in results:
            print(f"rank {r['rank']}: share {r['checkpoint_share'] / 2**20:.0f} MiB, largest tensor "
                  f"{r['largest_trainable_tensor'] / 2**20:.0f} MiB", flush=True)
            for fmt in ("resharding", "deepspeed"):
                b = r[fmt]
                print(f"  {fmt:>10}: save {b['save_s']:.2f} s peak +{b['save_peak'] / 2**20:.0f} MiB | load {b['load_s']:.2f} s "
                      f"peak +{b['load_peak'] / 2**20:.0f} MiB | {b['bytes_on_disk'] / 2**20:.0f} MiB on disk", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
