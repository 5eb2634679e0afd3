"""torchrun worker for tests/peft/test_lora_ep.py (2 processes, CPU, gloo; its run() also runs
inside tests/parallel/zero3_worker.py's launch, which the suite uses).

LoRA (attention + every expert + router) under DeepSpeed ZeRO-3 with the experts sharded over
ep 2 (shard_experts_for_ep: each rank holds experts [e0, e1) as frozen buffers, AllToAllDispatcher)
while the expert LoRA tensors of all E experts live in ZeRO-3. Step 0's full gradients of every
LoRA tensor (deepspeed.utils.safe_get_full_grad) and the losses of a few steps go to rank 0,
which runs the single-process reference (all experts local) on the union of the micro-batches.
Rank 1's first batch is text-only and padded (no hang: run_vision_always, empty expert groups).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from qvl_train.model import build_model
from qvl_train.parallel.expert_parallel import shard_experts_for_ep
from qvl_train.parallel.groups import build_ep_groups
from qvl_train.peft import LoraSettings, apply_lora, lora_parameters
from tests.model.reference import (
    rank_batch,
    supervised_tokens,
    tiny_config,
)

LR = 1e-3
SETTINGS = LoraSettings(rank=4, alpha=8, targets=("attention", "experts", "router"))


def lora_model(cfg, ep_info=None):
    model = build_model(cfg, seed=0)
    model.run_vision_always = True
    if ep_info is not None:
        shard_experts_for_ep(model, ep_info)
    apply_lora(model, SETTINGS)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # identical, training-like (non-zero B) LoRA weights on every rank
        for _, p in sorted(lora_parameters(model).items()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    deepspeed.init_distributed("gloo")
    res = run(args.steps)
    if dist.get_rank() == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(res, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def run(steps: int = 3) -> dict | None:
    """On every rank of an initialized group; rank 0 returns the results."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_config()
    ep_info = build_ep_groups(2, num_experts=cfg.text.num_experts)
    model = lora_model(cfg, ep_info)
    # no set_z3_leaf_modules call: the LoRA wrappers carry DeepSpeed's _z3_leaf flag themselves
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": LR, "weight_decay": 0.0}},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1e9,
    }
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    names = sorted(lora_parameters(engine.module))
    named = dict(engine.module.named_parameters())
    res = {"losses": [], "grads": {}}
    for step in range(steps):
        batches = [rank_batch(cfg, step, r) for r in range(world)]
        n_global = sum(supervised_tokens(b) for b in batches)
        out = engine(**batches[rank], loss_normalizer=n_global / world)
        engine.backward(out.loss)
        if step == 0:
            for n in names:  # collective: every rank, same order
                g = safe_get_full_grad(named[n])
                if rank == 0:
                    res["grads"][n] = g.detach().cpu().clone()
        engine.step()
        loss = torch.tensor([out.loss.item()])
        dist.all_reduce(loss)
        res["losses"].append(loss.item() / world)
    dist.barrier()
    if rank == 0:
        ref = lora_model(cfg)
        opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
        ref_params = lora_parameters(ref)
        res["ref_losses"], diffs = [], {}
        for step in range(steps):
            batches = [rank_batch(cfg, step, r) for r in range(world)]
            n_global = sum(supervised_tokens(b) for b in batches)
            opt.zero_grad()
            loss = sum(ref(**b, loss_normalizer=n_global / world).loss for b in batches) / world
            loss.backward()
            if step == 0:
                for n in names:
                    want, got = ref_params[n].grad, res["grads"][n]
                    diffs[n] = [(got - want).abs().max().item(), want.abs().max().item()]
            opt.step()
            res["ref_losses"].append(loss.item())
        res["grads"] = diffs
    dist.barrier()
    return res if rank == 0 else None


if __name__ == "__main__":
    main()
