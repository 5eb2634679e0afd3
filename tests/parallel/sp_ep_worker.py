"""torchrun worker for tests/parallel/test_sequence_parallel.py: sequence parallelism with expert
parallelism under DeepSpeed ZeRO-3 (CPU, gloo, fp32), ep 2, STEPS steps, both expert-parallel
paths in one launch:
- full: trainable experts, DeepSpeed AutoEP (full SFT);
- lora: LoRA (attention, experts, router, vision, merger) over frozen experts sharded over EP with
  our all-to-all dispatcher (the trainer's LoRA path: shard_experts_for_ep, then apply_lora).

The same code runs sp 2 x ep 2 on 4 processes (`--sp 2`: SP groups {0,1} {2,3} = EP groups,
expert-data-parallel {0,2} {1,3}) and sp 1 x ep 2 on 2 processes (`run_all(1, ...)`, called by
sp_worker.py's launch: one EP group {0,1} carrying two data-parallel rows). Both have 2
data-parallel ranks, and data-parallel rank d trains the same 2-row batch in both (DP_ROWS[d],
different layouts and contents per rank and step), so the two runs must agree: the loss, aux loss,
ZeRO-3 grad norm and summed expert load of every step, every trainable parameter's full gradient
(ZeRO-3's averaged partitions, before clipping, gathered; AutoEP's expert shards concatenated over
the EP group) at every step, and every trainable parameter after the last AdamW step.

Rank 0 writes the scalars to result.json (through the caller) and the tensors to
`<out>/tensors.pt`; the test compares the two runs' files.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad  # noqa: E402

from qvl_train.model import build_model  # noqa: E402
from qvl_train.parallel.expert_parallel import (  # noqa: E402
    _gather_experts,
    autoep_config,
    install_autoep_router_capture,
    is_autoep_layer,
)
from qvl_train.parallel.groups import build_ep_groups  # noqa: E402
from qvl_train.parallel.sequence import SequenceParallel, build_sp_groups  # noqa: E402
from qvl_train.train.evaluate import to_device  # noqa: E402
from tests.model.reference import tiny_config  # noqa: E402
from tests.parallel.sp_worker import ROWS, finish, lora_model, packed_batch  # noqa: E402
from tests.parallel.zero3_worker import BETAS, CLIP, EPS, LR, WD  # noqa: E402

EP, STEPS = 2, 2
CPU = torch.device("cpu")
# Data-parallel rank 1's rows (rank 0 has sp_worker.ROWS): row 0 (56 tokens of 63): text doc
# 0..19, video doc 20..40 whose 2nd frame group (28..35) straddles the sp-2 split at 32, image doc,
# padding; row 1 (42): an image doc 0..35 across the split, a text-only doc, padding.
DP_ROWS = [ROWS, [[[20], [("video", (2, 4, 4)), 5], [3, ("image", (1, 4, 6)), 4]],
                  [[("image", (1, 4, 4)), 30], [6]]]]


def rows(cfg, step: int, dp_rank: int) -> dict:
    return packed_batch(cfg, seed=1000 * step + 100 * dp_rank, layout=DP_ROWS[dp_rank])


def full_tensors(engine, *, grads: bool) -> dict[str, torch.Tensor]:
    """Every trainable parameter's full gradient (ZeRO-3's reduced partitions, before clipping)
    or fp32 value, on rank 0 ({} elsewhere); AutoEP's expert shards concatenated over the EP group.
    A collective: every rank, same order."""
    rank = dist.get_rank()
    ep_group = {id(p): m.ep_group for m in engine.module.modules() if is_autoep_layer(m)
                for p in m.experts.parameters()}
    out = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        t = safe_get_full_grad(p) if grads else safe_get_full_fp32_param(p)
        if id(p) in ep_group:
            t = _gather_experts(t, ep_group[id(p)], rank)
        if rank == 0:
            out[name] = t.detach().cpu().clone()
    return out


def run(mode: str, cfg, sp_info) -> tuple[dict, dict]:
    """One mode on every rank: (scalars, tensors), both filled on rank 0 only."""
    world = dist.get_world_size()
    ep_info = build_ep_groups(EP, num_experts=cfg.text.num_experts) if mode == "lora" else None
    if mode == "lora":
        model = lora_model(cfg, ep_info)
    else:
        model = build_model(cfg, seed=0)
    model.run_vision_always = True
    ds_config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": LR, "betas": list(BETAS), "eps": EPS,
                                                   "weight_decay": WD}},
        "zero_allow_untested_optimizer": True, "gradient_clipping": CLIP,
        **(autoep_config(cfg, EP, world_size=world) if mode == "full" else {}),
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config)
    install_autoep_router_capture(engine)
    sp = SequenceParallel(sp_info, cfg, pad_token_id=0, device=CPU)
    res = {"losses": [], "aux": [], "grad_norms": [], "loads": [], "visual_tokens_per_rank": []}
    tensors = {"grads": []}
    for step in range(STEPS):  # the trainer's calls (Trainer._train_step)
        local = sp.shard(rows(cfg, step, sp_info.dp_rank))
        n = torch.tensor(float(sp.supervised_tokens(local)))
        dist.all_reduce(n)
        out = engine(**to_device(local, CPU), **sp.slice_inputs(local, CPU), loss_normalizer=n / world,
                     return_logits=False)
        engine.backward(out.loss)
        tensors["grads"].append(full_tensors(engine, grads=True))
        engine.step()
        res["grad_norms"].append(float(engine.get_global_grad_norm()))
        # the trainer's metrics: sums over the world / world; expert load summed
        vals = torch.stack([out.loss.detach(), out.aux_loss.detach()])
        dist.all_reduce(vals)
        load = out.expert_load.float()
        dist.all_reduce(load)
        res["losses"].append(float(vals[0]) / world)
        res["aux"].append(float(vals[1]) / world)
        res["loads"].append(load.tolist())
        visual = [torch.zeros(1) for _ in range(world)]
        mine = local["_slice"].visual_index_M.numel() if "_slice" in local else -1
        dist.all_gather(visual, torch.tensor([float(mine)]))
        res["visual_tokens_per_rank"].append([int(v) for v in visual])
    tensors["params"] = full_tensors(engine, grads=False)
    dist.barrier()
    return res, tensors


def run_all(sp_size: int, out_dir: str, modes=("full", "lora")) -> dict:
    """Every mode at sp_size x ep 2 over this world; rank 0 saves the tensors to
    out_dir/tensors.pt and returns {mode: scalars, "tensors": path} ({} elsewhere)."""
    cfg = tiny_config()
    sp_info = build_sp_groups(sp_size)
    res, tensors = {}, {}
    for mode in modes:
        res[mode], tensors[mode] = run(mode, cfg, sp_info)
    if dist.get_rank() != 0:
        return {}
    os.makedirs(out_dir, exist_ok=True)
    res["tensors"] = os.path.join(out_dir, "tensors.pt")
    torch.save(tensors, res["tensors"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sp", type=int, default=2)
    ap.add_argument("--modes", default="full,lora")
    args = ap.parse_args()
    deepspeed.init_distributed("gloo")
    finish(run_all(args.sp, args.out, args.modes.split(",")), args.out)


if __name__ == "__main__":
    main()
