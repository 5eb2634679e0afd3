"""torchrun worker for tests/parallel/test_sequence_parallel.py: 4 processes, sp 2 x ep 2 under
DeepSpeed ZeRO-3 (CPU, gloo, fp32), two data-parallel rows per step (one per SP group), for both
expert-parallel paths in one launch:
- autoep: trainable experts, DeepSpeed AutoEP (full SFT);
- a2a: frozen experts sharded over EP with our all-to-all dispatcher (the LoRA path).
Rank 0 replays the same steps on one process without SP or EP (plain torch, AdamW, clipping): the
losses, aux losses, ZeRO-3's global grad norms and the exported weights must agree.

EP groups {0,1} {2,3} coincide with the SP groups here: the all-to-all of each MoE layer carries
both halves of one row; routing is per token, so SP does not change what EP does.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from qvl_train.data.packing import model_inputs  # noqa: E402
from qvl_train.model import build_model, from_pretrained  # noqa: E402
from qvl_train.parallel.expert_parallel import (  # noqa: E402
    autoep_config,
    install_autoep_router_capture,
    save_full_pretrained,
    shard_experts_for_ep,
)
from qvl_train.parallel.groups import build_ep_groups, ep_info_from_deepspeed  # noqa: E402
from qvl_train.parallel.sequence import SequenceParallel, build_sp_groups  # noqa: E402
from qvl_train.train.evaluate import to_device  # noqa: E402
from tests.model.reference import tiny_config  # noqa: E402
from tests.parallel.sp_worker import finish, packed_batch  # noqa: E402
from tests.parallel.zero3_worker import BETAS, CLIP, EPS, LR, WD, freeze_experts  # noqa: E402

SP, EP, STEPS = 2, 2, 2
CPU = torch.device("cpu")


def rows(cfg, step: int, dp_rank: int) -> dict:
    return packed_batch(cfg, seed=1000 * step + 100 * dp_rank)


def supervised(b: dict) -> int:
    return int((b["labels"][:, 1:] != -100).sum())


def run(mode: str, cfg, sp_info, out_dir: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(cfg, seed=0)
    model.run_vision_always = True
    ep_info = None
    if mode == "a2a":
        freeze_experts(model)
        ep_info = build_ep_groups(EP, num_experts=cfg.text.num_experts)
        shard_experts_for_ep(model, ep_info)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": LR, "betas": list(BETAS), "eps": EPS,
                                                   "weight_decay": WD}},
        "zero_allow_untested_optimizer": True, "gradient_clipping": CLIP,
        **(autoep_config(cfg, EP, world_size=world) if mode == "autoep" else {}),
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config)
    install_autoep_router_capture(engine)
    if mode == "autoep":
        ep_info = ep_info_from_deepspeed(EP)
    sp = SequenceParallel(sp_info, cfg, pad_token_id=0, device=CPU)
    res = {"losses": [], "aux": [], "grad_norms": [], "loads": []}
    for step in range(STEPS):
        local = sp.shard(rows(cfg, step, sp_info.dp_rank))
        n = torch.tensor(float(sp.supervised_tokens(local)))
        dist.all_reduce(n)
        out = engine(**to_device(local, CPU), **sp.slice_inputs(local, CPU), loss_normalizer=n / world,
                     return_logits=False)
        engine.backward(out.loss)
        engine.step()
        res["grad_norms"].append(float(engine.get_global_grad_norm()))
        vals = torch.stack([out.loss.detach(), out.aux_loss.detach()])
        dist.all_reduce(vals)
        load = out.expert_load.float()
        dist.all_reduce(load)
        res["losses"].append(float(vals[0]) / world)
        res["aux"].append(float(vals[1]) / world)
        res["loads"].append(load.tolist())
    export_dir = os.path.join(out_dir, f"export_{mode}")
    save_full_pretrained(engine, export_dir, ep_info=ep_info)
    dist.barrier()
    if rank == 0:
        res.update(reference(mode, cfg, export_dir))
    return res


def reference(mode: str, cfg, export_dir: str) -> dict:
    """sp 1, ep 1, one process: each step the mean over the 2 data-parallel rows' losses."""
    ref = build_model(cfg, seed=0)
    ref.run_vision_always = True
    if mode == "a2a":
        freeze_experts(ref)
    trainable = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    res = {"ref_losses": [], "ref_aux": [], "ref_grad_norms": [], "ref_loads": []}
    dp = 2
    for step in range(STEPS):
        batches = [rows(cfg, step, g) for g in range(dp)]
        n = sum(supervised(b) for b in batches)
        opt.zero_grad()
        outs = [ref(**model_inputs(b), loss_normalizer=n / dp, return_logits=False) for b in batches]
        loss = sum(o.loss for o in outs) / dp
        loss.backward()
        res["ref_grad_norms"].append(float(torch.nn.utils.clip_grad_norm_(trainable, CLIP)))
        opt.step()
        res["ref_losses"].append(loss.item())
        res["ref_aux"].append(sum(o.aux_loss.item() for o in outs) / dp)
        res["ref_loads"].append(sum(o.expert_load.float() for o in outs).tolist())
    exported = from_pretrained(export_dir).state_dict()
    diffs = {k: (exported[k] - t).abs().max().item() for k, t in ref.state_dict().items()}
    res["param_maxdiff"] = max(diffs.values())
    res["param_maxdiff_name"] = max(diffs, key=diffs.get)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--modes", default="autoep,a2a")
    args = ap.parse_args()
    deepspeed.init_distributed("gloo")
    cfg = tiny_config()
    sp_info = build_sp_groups(SP)
    finish({mode: run(mode, cfg, sp_info, args.out) for mode in args.modes.split(",")}, args.out)


if __name__ == "__main__":
    main()
