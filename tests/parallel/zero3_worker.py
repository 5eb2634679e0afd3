"""torchrun worker for tests/parallel/test_zero3_ep.py and test_zero3_lora_ep.py (2 processes,
CPU, gloo; one launch runs every case in turn: --cases autoep:1,autoep:2,a2a:2, and, in the
same launch, zero3_load_worker.py's, tests/peft/lora_ep_worker.py's and test_all_to_all.py's checks).

ZeRO-3 training of the tiny model for a few steps with ep 1 (plain ZeRO-3) or ep 2 (AutoEP,
trainable experts; a2a: frozen experts sharded over ep, the LoRA path), mixed batches (rank 1 text-only with padding at step 0, rank 0 images), then
a Hub export through iter_full_state_dict. Rank 0 also runs the single-process reference on the
union of the micro-batches and writes everything to --out/result.json ({"mode:ep": results})
for the tests to judge.

Loss normalisation: each rank's CE is sum over its tokens / (N_global / world), so DeepSpeed's
gradient average over the world gives d(sum CE / N_global) + mean of the per-rank aux losses;
the reference takes the mean over the ranks' micro-batch losses computed the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from qvl_train.model import build_model, from_pretrained  # noqa: E402
from qvl_train.parallel.expert_parallel import (  # noqa: E402
    autoep_config,
    install_autoep_router_capture,
    iter_full_state_dict,
    save_full_pretrained,
    shard_experts_for_ep,  # noqa: E402
)
from qvl_train.parallel.groups import build_ep_groups, ep_info_from_deepspeed  # noqa: E402
from tests.model.reference import (  # noqa: E402
    rank_batch,
    supervised_tokens,
    tiny_config,
)

# DeepSpeed 0.19.8 clips gradients to norm 1.0 BY DEFAULT; we set it explicitly and the reference
# clips the same way (torch.nn.utils.clip_grad_norm_), which also checks the global grad norm
# that AutoEP assembles from expert shards.
LR, BETAS, EPS, WD, CLIP = 1e-3, (0.9, 0.999), 1e-8, 0.0, 1.0


def freeze_experts(model) -> None:
    for n, p in model.named_parameters():
        if ".mlp.experts." in n:
            p.requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", required=True, help="comma list of MODE:EP. MODE autoep: trainable experts "
                    "(AutoEP when ep > 1); a2a: frozen experts sharded with shard_experts_for_ep + "
                    "AllToAllDispatcher (the LoRA path)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--zero3-load", metavar="CKPT", help="also run zero3_load_worker.py's check on CKPT")
    ap.add_argument("--lora-ep", action="store_true", help="also run tests/peft/lora_ep_worker.py's check")
    ap.add_argument("--all-to-all", metavar="DIR", help="also run test_all_to_all.py's checks (DIR: its files)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    deepspeed.init_distributed("gloo")
    results = {}
    for case in args.cases.split(","):
        mode, ep = case.split(":")
        out = os.path.join(args.out, f"{mode}_ep{ep}")
        os.makedirs(out, exist_ok=True)
        results[case] = run_case(argparse.Namespace(mode=mode, ep=int(ep), steps=args.steps, out=out))
        dist.barrier()
    # the other 2-process ZeRO-3 checks of the suite, in this same launch (CI time)
    if args.zero3_load:
        from tests.parallel import zero3_load_worker

        results["zero3_load"] = zero3_load_worker.run(args.zero3_load)
        dist.barrier()
    if args.lora_ep:
        from tests.peft import lora_ep_worker

        results["lora_ep"] = lora_ep_worker.run()
        dist.barrier()
    if args.all_to_all:
        from tests.parallel import test_all_to_all

        os.makedirs(args.all_to_all, exist_ok=True)
        results["all_to_all"] = test_all_to_all.run_checks(args.all_to_all)  # raises (the launch fails) on a failure
    if dist.get_rank() == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def run_case(args) -> dict | None:
    """One case on every rank; rank 0 returns its results (None elsewhere)."""
    t0 = time.time()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg, seed=0)
    model.run_vision_always = True
    ep_info = None
    if args.mode == "a2a":
        freeze_experts(model)
        ep_info = build_ep_groups(args.ep, num_experts=cfg.text.num_experts)
        shard_experts_for_ep(model, ep_info)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # threshold 0: even the tiny lm_head is partitioned, so the fused loss head must get its
        # weight from ZeRO-3's module hooks like the real model's
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD}},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": CLIP,
        **(autoep_config(cfg, args.ep, world_size=world) if args.mode == "autoep" else {}),
    }
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    hooked = install_autoep_router_capture(engine)
    if args.mode == "autoep" and args.ep > 1:
        ep_info = ep_info_from_deepspeed(args.ep)
    res = {"mode": args.mode, "ep": args.ep, "hooked": hooked, "losses": [], "aux": [], "ce": [], "aux_nonzero_coef": cfg.text.router_aux_loss_coef}
    head_w = engine.module.lm_head.weight
    res["lm_head_partitioned"] = (not head_w.ds_persist) and head_w.data.numel() == 0
    res["param_names"] = sorted(n for n, _ in engine.module.named_parameters())[:3]
    for step in range(args.steps):
        batches = [rank_batch(cfg, step, r) for r in range(world)]
        n_global = sum(supervised_tokens(b) for b in batches)
        # the trainer's path: the fused loss head (LMHead's chunked linear + CE under ZeRO-3);
        # the reference below takes the full-logits path
        out = engine(**batches[rank], loss_normalizer=n_global / world, return_logits=False)
        engine.backward(out.loss)
        engine.step()
        res.setdefault("grad_norms", []).append(float(engine.get_global_grad_norm()))
        vals = torch.tensor([out.loss.item(), out.aux_loss.item(), out.ce_loss.item(), float(out.expert_load.sum())])
        dist.all_reduce(vals)
        res["losses"].append(vals[0].item() / world)
        res["aux"].append(vals[1].item() / world)
        res["ce"].append(vals[2].item() / world)
        if step == 0:
            res["n_router_logits"] = len(out.router_logits)
            res["expert_load_total"] = vals[3].item()
            res["expected_load_total"] = float(
                sum(int(b["attention_mask"].sum()) for b in batches) * cfg.text.num_experts_per_tok * sum(
                    cfg.text.is_moe_layer(i) for i in range(cfg.text.num_hidden_layers)
                )
            )
    res["train_s"] = time.time() - t0
    # export and reload
    export_dir = os.path.join(args.out, "export")
    save_full_pretrained(engine, export_dir, ep_info=ep_info, max_shard_bytes=300_000)
    names = [n for n, _ in iter_full_state_dict(engine, ep_info=ep_info)]  # second pass: names/order
    engine.eval()
    eval_b = rank_batch(cfg, 1, 0)
    eval_b.pop("labels")
    with torch.no_grad():
        logits = engine(**eval_b).logits
    dist.barrier()
    if rank == 0:
        loaded = from_pretrained(export_dir).eval()
        with torch.no_grad():
            ref_logits = loaded(**eval_b).logits
        res["export_logits_maxdiff"] = (logits - ref_logits).abs().max().item()
        res["export_logits_scale"] = logits.abs().max().item()
        base = build_model(cfg, seed=0)
        res["names_match"] = names == list(base.state_dict().keys())
        # single-process reference on the union of the micro-batches
        ref = build_model(cfg, seed=0)
        ref.run_vision_always = True
        if args.mode == "a2a":
            freeze_experts(ref)
        opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        res["ref_losses"] = []
        for step in range(args.steps):
            batches = [rank_batch(cfg, step, r) for r in range(world)]
            n_global = sum(supervised_tokens(b) for b in batches)
            opt.zero_grad()
            outs = [ref(**b, loss_normalizer=n_global / world) for b in batches]
            loss = sum(o.loss for o in outs) / world
            loss.backward()
            trainable = [p for p in ref.parameters() if p.requires_grad]
            res.setdefault("ref_grad_norms", []).append(float(torch.nn.utils.clip_grad_norm_(trainable, CLIP)))
            opt.step()
            res["ref_losses"].append(loss.item())
        exported = loaded.state_dict()
        diffs = {n: (exported[n] - t).abs().max().item() for n, t in ref.state_dict().items()}
        res["param_maxdiff"] = max(diffs.values())
        res["param_maxdiff_name"] = max(diffs, key=diffs.get)
        res["total_s"] = time.time() - t0
        return res
    return None


if __name__ == "__main__":
    main()
