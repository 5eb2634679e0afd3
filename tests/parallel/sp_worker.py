"""torchrun worker for tests/parallel/test_sequence_parallel.py (2 processes, CPU, gloo, fp32).

One launch checks:
- ulysses: UlyssesAttention (2 ranks) against the unsplit attention plan, forward and q/k/v
  gradients, with KV heads split (K=2) and replicated (K=1 < sp), documents crossing the split;
- full / lora: sp=2 (this launch's 2 ranks, one packed batch) against sp=1 (one process, the whole
  batch, run on rank 0): loss, aux loss, expert load and every parameter gradient. The SP side is
  what the trainer does: SequenceParallel.shard / supervised_tokens / model_inputs, the loss
  normalised by (global supervised tokens / world), then gradients averaged over the world
  (what ZeRO does). Full SFT runs a model with 1 KV head (replicated over the 2 ranks);
- sp1_ep2 (--sp1-ep2): sp_ep_worker.run_all at sp 1 x ep 2 under ZeRO-3, the reference of the
  4-process sp 2 x ep 2 test (one launch instead of two: the 2-process startup is paid once).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from qvl_train.data.packing import collate, model_inputs  # noqa: E402
from qvl_train.model import build_model  # noqa: E402
from qvl_train.model.attention import text_attention  # noqa: E402
from qvl_train.model.rope import get_rope_index  # noqa: E402
from qvl_train.parallel.expert_parallel import shard_experts_for_ep  # noqa: E402
from qvl_train.parallel.sequence import SequenceParallel, UlyssesAttention, build_sp_groups  # noqa: E402
from qvl_train.peft import LoraSettings, apply_lora  # noqa: E402
from qvl_train.train.evaluate import to_device  # noqa: E402
from tests.model.reference import make_batch, tiny_config  # noqa: E402

# Rows of documents; each document a list of make_batch items. Row 0 (63 tokens, padded to 64 for
# sp 2; split at 32): image doc 0..13, video doc 14..41 whose 3 frame groups straddle the split,
# text-only doc 42..48, padding. Row 1: text doc, image doc, a text-only doc across the split.
ROWS = [
    [[5, ("image", (1, 4, 4)), 3], [("video", (3, 4, 4)), 4], [7]],
    [[9], [3, ("image", (1, 4, 6)), 6], [20]],
]
ROW_LENGTH = 63


def packed_batch(cfg, seed: int = 0, layout: list = ROWS) -> dict:
    """`layout` as ROWS (one entry per row), padded to ROW_LENGTH."""
    rows = []
    for r, docs in enumerate(layout):
        row = []
        for d, items in enumerate(docs):
            b = make_batch(cfg, [items], seed=seed + 10 * r + d)
            pos, _ = get_rope_index(b["input_ids"], image_token_id=cfg.image_token_id,
                                    video_token_id=cfg.video_token_id,
                                    spatial_merge_size=cfg.vision.spatial_merge_size,
                                    image_grid_thw=b.get("image_grid_thw"), video_grid_thw=b.get("video_grid_thw"))
            labels = b["input_ids"][0].clone()
            labels[:2] = -100  # an unsupervised prompt
            row.append({"input_ids": b["input_ids"][0], "labels": labels, "attention_mask": b["attention_mask"][0],
                        "position_ids": pos[:, 0], "pixel_values": b.get("pixel_values"),
                        "image_grid_thw": b.get("image_grid_thw"), "pixel_values_videos": b.get("pixel_values_videos"),
                        "video_grid_thw": b.get("video_grid_thw")})
        rows.append(row)
    return collate(rows, pad_token_id=0, pad_to_multiple_of=ROW_LENGTH)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm())


def check_ulysses(info) -> dict:
    """UlyssesAttention vs the unsplit plan on a 2-row batch with documents across the split."""
    res = {}
    B, L, H, Dh = 2, 12, 4, 8
    seg = torch.tensor([[0] * 4 + [1] * 6 + [-1] * 2, [0] * 7 + [1] * 5])
    mask = (seg >= 0).long()
    sp, r = info.sp_size, info.sp_rank
    cut = slice(r * L // sp, (r + 1) * L // sp)
    for K in (2, 1):
        g = torch.Generator().manual_seed(K)
        q, k, v, up = (torch.randn(B, L, n, Dh, generator=g) for n in (H, K, K, H))
        plan = text_attention("sdpa_docs", attention_mask_BLk=mask, segment_ids_BL=seg, q_len=L, kv_len=L,
                              device=q.device)
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = plan(*ref_in)
        (ref * up).sum().backward()
        mine = [t[:, cut].clone().requires_grad_() for t in (q, k, v)]
        out = UlyssesAttention(plan, info.group, sp)(*mine)
        (out * up[:, cut]).sum().backward()
        res[f"ulysses_K{K}_out"] = rel(out, ref[:, cut])
        res[f"ulysses_K{K}_grads"] = max(rel(m.grad, t.grad[:, cut]) for m, t in zip(mine, ref_in))
    return res


def lora_model(cfg, ep_info=None):
    """With ep_info: the trainer's LoRA path under EP (experts sharded, then the adapters)."""
    model = build_model(cfg, seed=0)
    if ep_info is not None:
        shard_experts_for_ep(model, ep_info)
    torch.manual_seed(1)
    apply_lora(model, LoraSettings(rank=4, alpha=8.0, targets=("attention", "experts", "router", "vision", "merger")))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B = 0 at init would leave every A gradient zero: nothing to compare
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def run_mode(mode: str, info, world: int) -> dict:
    cfg = tiny_config(num_key_value_heads=1) if mode == "full" else tiny_config()
    make = (lambda: build_model(cfg, seed=0)) if mode == "full" else (lambda: lora_model(cfg))
    batch = packed_batch(cfg)
    res = {}
    # sp = 2 (the trainer's calls)
    model = make()
    model.run_vision_always = True
    sp = SequenceParallel(info, cfg, pad_token_id=0, device=torch.device("cpu"))
    local = sp.shard(batch)
    n = torch.tensor(float(sp.supervised_tokens(local)))
    dist.all_reduce(n)
    cpu = torch.device("cpu")
    out = model(**to_device(local, cpu), **sp.slice_inputs(local, cpu), loss_normalizer=n / world, return_logits=False)
    out.loss.backward()
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    grads = {k: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for k, p in named}
    for g in grads.values():  # ZeRO's average over the world
        dist.all_reduce(g)
        g /= world
    # the reported metrics: the trainer's accumulator sums over ranks, divides by micro-batches
    vals = torch.stack([out.loss.detach(), out.ce_loss.detach(), out.aux_loss.detach()])
    dist.all_reduce(vals)
    load = out.expert_load.clone()
    dist.all_reduce(load)
    aux_all = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(aux_all, out.aux_loss.detach())
    if info.sp_rank == 0 and dist.get_rank() == 0:
        ref = make()
        ref.run_vision_always = True
        n_ref = int((batch["labels"][:, 1:] != -100).sum())
        ref_out = ref(**model_inputs(batch), loss_normalizer=n_ref, return_logits=False)
        ref_out.loss.backward()
        ref_grads = {k: p.grad if p.grad is not None else torch.zeros_like(p)
                     for k, p in ref.named_parameters() if p.requires_grad}
        res.update({
            "n_global": float(n), "n_ref": n_ref,
            "loss": float(vals[0] / world), "ref_loss": float(ref_out.loss),
            "ce": float(vals[1] / world), "ref_ce": float(ref_out.ce_loss),
            "aux": [float(a) for a in aux_all], "ref_aux": float(ref_out.aux_loss),
            "load": load.tolist(), "ref_load": ref_out.expert_load.tolist(),
            "num_grads": len(grads), "same_names": sorted(grads) == sorted(ref_grads),
            "ref_zero_grads": sorted(k for k, g in ref_grads.items() if g.norm() == 0),
        })
        errs = {k: rel(grads[k], ref_grads[k]) for k in ref_grads}
        res["grad_rel_max"] = max(errs.values())
        res["grad_rel_worst"] = max(errs, key=errs.get)
        res["visual_tokens_per_rank"] = None
    counts = torch.tensor([float(len(local["_slice"].visual_index_M))])
    got = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(got, counts)
    res["visual_tokens_per_rank"] = [float(c) for c in got]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--sp1-ep2", action="store_true", help="also run sp_ep_worker.py at sp 1 x ep 2 (the "
                    "reference of the 4-process sp 2 x ep 2 test) in this launch")
    args = ap.parse_args()
    deepspeed.init_distributed("gloo")
    torch.manual_seed(0)
    world = dist.get_world_size()
    info = build_sp_groups(world)
    res = check_ulysses(info)
    for mode in args.modes.split(","):
        res[mode] = run_mode(mode, info, world)
    if args.sp1_ep2:
        from tests.parallel.sp_ep_worker import run_all

        res["sp1_ep2"] = run_all(1, os.path.join(args.out, "sp1_ep2"))
    finish(res, args.out)


def finish(res: dict, out_dir: str) -> None:
    """Rank 0 writes result.json; every rank leaves the process group."""
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(res, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
