"""torchrun worker for tests/train/test_matrix.py: every {LoRA, full} x {ep sizes} x {tiny preset,
model.path} combination, run one after another in this process through the real Trainer (ZeRO-3,
CPU, gloo), each for a few steps and ending with its export (full: HF checkpoint; LoRA: PEFT
adapter). Rank 0 writes per run: the trained model's logits on a held-out demo batch (for the
parent to compare with what transformers / PEFT load), the export dir, and for AutoEP runs where
which optimizer param group steps each trainable parameter (AutoEP's replaced experts included),
and which parameters the run changed (each rank's own ZeRO-3 partition or expert slice compared
before and after training, OR-ed over the ranks) next to which ones were trainable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from qvl_train.config import compose, to_config  # noqa: E402
from qvl_train.parallel.runtime import init_runtime, shutdown  # noqa: E402
from tests.train.demo import demo_image_batch  # noqa: E402

LR, VISION_LR, MERGER_LR, WEIGHT_DECAY = 2e-2, 1e-3, 5e-3, 0.1
STEPS = 1


def overrides(method: str, ep: int, source: str, base: str, out: Path, name: str) -> list[str]:
    o = ["+recipe=vqa", f"parallel.ep_size={ep}", f"train.max_steps={STEPS}", "train.log_every=1",
         "train.eval_max_batches=1", "train.generate_eval=false", "checkpoint.save_every=0",
         "logging.progress_bar=false", "logging.wandb.mode=disabled", f"optim.lr={LR}",
         f"optim.vision_lr={VISION_LR}", f"optim.merger_lr={MERGER_LR}", "optim.warmup_steps=0", f"optim.weight_decay={WEIGHT_DECAY}",
         f"output_dir={out}", f"run_name={name}"]
    if method == "lora":
        o += ["peft=lora", "peft.router=true"]
    if source == "path":
        o += [f"model.path={base}", "model.preset=null"]
    else:  # the tiny preset's own tokenizer, already built into the base dir (saves building it per run)
        o += [f"model.tokenizer_path={base}"]
    return o


def optimizer_groups(trainer) -> dict:
    """For every trainable parameter of the trained model (AutoEP's replaced experts and router
    included): the optimizer param groups that step it (name, lr, weight decay), read off
    DeepSpeed's ZeRO-3 optimizer (its sub-groups of live parameters and their group ids), so it is
    what the optimizer really updates. `stale`: grouped parameters no longer in the model."""
    zero = trainer.engine.optimizer
    groups = zero.optimizer.param_groups
    where: dict[int, list[dict]] = {}
    for i, params in enumerate(zero.fp16_groups):
        for p in params:
            where.setdefault(id(p), []).append(groups[zero.sub_group_to_group_id[i]])
    rows = []
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            found = where.get(id(p), [])
            rows.append({"name": name, "ndim": len(getattr(p, "ds_shape", p.shape)), "groups": [g["name"] for g in found],
                         "lrs": [g["initial_lr"] for g in found], "decay": [g["weight_decay"] for g in found]})
    live = {id(p) for p in trainer.model.parameters()}
    return {"rows": rows, "stale": sum(1 for pid in where if pid not in live)}


def _local_values(model) -> dict[str, torch.Tensor]:
    """This rank's values of every parameter: its ZeRO-3 partition (ds_tensor), else the tensor."""
    return {n: getattr(p, "ds_tensor", p.data).detach().clone() for n, p in model.named_parameters()}


def weight_changes(model, before: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per parameter: trainable, and changed on any rank since `before` (collective)."""
    mine = {n: not torch.equal(getattr(p, "ds_tensor", p.data), before[n]) for n, p in model.named_parameters()}
    every: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(every, mine)
    return {n: {"trainable": p.requires_grad, "changed": any(r[n] for r in every)} for n, p in model.named_parameters()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="model dir written by transformers (model.path cases)")
    ap.add_argument("--combos", required=True, help="comma list of method:ep:source")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rt = init_runtime("gloo")
    from qvl_train.train.trainer import Trainer

    out = Path(args.out)
    results = {}
    try:
        for combo in args.combos.split(","):
            method, ep, source = combo.split(":")
            name = f"{method}_ep{ep}_{source}"
            t0 = time.perf_counter()
            cfg = to_config(compose(overrides(method, int(ep), source, args.base, out, name)))
            trainer = Trainer(cfg, rt)
            before = _local_values(trainer.model)  # after the load and AutoEP's expert swap, before step 1
            t1 = time.perf_counter()
            summary = trainer.fit()
            t2 = time.perf_counter()
            batch, _ = demo_image_batch(trainer.tokenizer, 3, trainer.model_cfg.image_token_id)
            trainer.model.eval()
            with torch.no_grad():  # a collective forward: every rank runs it
                logits = trainer.model(**batch).logits
            res = {"export_dir": summary.get("export_dir"), "steps": summary["step"], "autoep": trainer.autoep,
                   "base_dir": str(trainer.base_dir) if trainer.base_dir else None}
            res["seconds"] = [t1 - t0, t2 - t1, time.perf_counter() - t2]
            res["groups"] = optimizer_groups(trainer)
            res["changes"] = weight_changes(trainer.model, before)
            if rt.is_main:
                torch.save(logits, out / f"{name}.logits.pt")
                results[name] = res
            del trainer
            dist.barrier()
        if rt.is_main:
            (out / "result.json").write_text(json.dumps(results, indent=1))
    finally:
        shutdown()
    sys.stdout.flush()
    os._exit(0)  # see launch/sft.py: skip C++ static destructors after a clean teardown


if __name__ == "__main__":
    main()
