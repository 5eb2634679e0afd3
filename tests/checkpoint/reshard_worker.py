"""torchrun worker for tests/checkpoint/test_reshard.py: the demo recipe's Trainer, saved on one
layout and resumed on others, in one launch per world size.

    save:   for each mode, train 2 steps (checkpoint at step 2), check the checkpoint against
            DeepSpeed's own gathers, then one more step on a fixed global batch B and a
            checkpoint at step 3 (the uninterrupted run); losses to result.json; then the
            resume phase for --eps in the same launch
    resume: for each (mode, ep), resume the step-2 checkpoint on this layout, check every
            partition equals the checkpoint exactly, step on B (same loss), checkpoint at step 3
            and compare with the uninterrupted one, then train on to step 4 (finite loss)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from qvl_train.checkpoint import reshard  # noqa: E402
from qvl_train.checkpoint.state import tag_for  # noqa: E402
from qvl_train.config import compose, to_config  # noqa: E402
from qvl_train.train import metrics  # noqa: E402

GLOBAL_MICRO = 4  # micro-batches in the global batch B, whatever the world size


def config(mode: str, ep: int, out: Path, name: str, *, world: int, resume: str = "none", max_steps: int = 2,
           extra: tuple[str, ...] = ()):
    return to_config(compose([
        "+recipe=vqa", f"train.max_steps={max_steps}", "train.log_every=1", "train.generate_eval=false",
        "train.eval_max_batches=1", "checkpoint.save_every=2", "checkpoint.keep_last=5", "checkpoint.export_at_end=false",
        "logging.progress_bar=false", "logging.wandb.mode=disabled", "data.num_workers=0", "train.eval_every=0",
        f"parallel.ep_size={ep}", f"optim.grad_accum={GLOBAL_MICRO // world}", f"checkpoint.resume={resume}",
        f"output_dir={out}", f"run_name={name}",
        *(["peft=lora", "optim.lr=1e-2"] if mode == "lora" else []), *extra,
    ]))


def global_batch(trainer) -> list[dict]:
    """This rank's micro-batches of B: B is the first GLOBAL_MICRO batches of a one-rank loader."""
    from qvl_train.data import build_loader

    it = iter(build_loader(trainer.cfg.data, trainer.tokenizer, rank=0, world_size=1))
    batches = [next(it) for _ in range(GLOBAL_MICRO)]
    per = GLOBAL_MICRO // trainer.rt.world_size
    return batches[trainer.rt.rank * per:(trainer.rt.rank + 1) * per]


def step_on_b(trainer) -> float:
    acc = metrics.StepAccumulator()
    trainer._train_step(iter(global_batch(trainer)), acc)
    total, _ = acc.reduce(trainer.rt.device)
    trainer.step += 1
    return total["loss"] / total["micro"]


def check_against_deepspeed(trainer, path: Path) -> int:
    """The saved logical tensors equal DeepSpeed's own gathers of the live state (an independent
    path: safe_get_full_* gather a parameter over its partition group). Returns tensors checked."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    reader, n = reshard.Reader(path), 0
    for t in reshard.targets(trainer.engine.module):
        for kind in reshard.KINDS:
            full = safe_get_full_fp32_param(t.param) if kind == "param" else safe_get_full_optimizer_state(t.param, kind)
            saved = reader.read(kind, t.name)
            name = t.name
            if ".experts." in name and tuple(full.shape) != tuple(saved.shape):  # AutoEP: this rank's experts, w1/w3/w2
                layer = trainer.engine.module.get_submodule(name.rsplit(".experts.", 1)[0])
                e0, el = layer.ep_rank * layer.num_local_experts, layer.num_local_experts
                rows = full.shape[1]
                which = t.param is layer.experts.w3
                saved = saved[e0:e0 + el, rows:] if which else saved[e0:e0 + el, :rows]
            assert torch.equal(full.cpu().float(), saved), (kind, name)
            n += 1
    return n


def check_loaded(trainer, path: Path) -> int:
    """Every partition of this rank (fp32 master, both moments, the model's own copy) equals the
    checkpoint's elements at the same logical positions, exactly. Returns elements compared."""
    reader, opt, n = reshard.Reader(path), trainer.engine.optimizer, 0
    assert reshard.adam_step(opt) == reader.index["adam_step"] == 2
    for t in reshard.targets(trainer.engine.module):
        start, count = reshard.partition(t.param)
        full = {k: reader.read(k, t.name).reshape(-1) for k in reshard.KINDS}
        for kind in reshard.KINDS:
            local = reshard.local_state(opt, t.param, kind)
            for off, logical, m in t.to_logical(start, count):
                assert torch.equal(local[off:off + m], full[kind][logical:logical + m]), (kind, t.name, logical)
                n += m
        master = reshard.local_state(opt, t.param, "param")
        assert torch.equal(t.param.ds_tensor[:count], master.to(t.param.ds_tensor.dtype)), t.name  # bf16: rounded once
    return n


def compare_checkpoints(a: Path, b: Path) -> float:
    """Largest difference between two checkpoints' tensors (same names required)."""
    ra, rb = reshard.Reader(a), reshard.Reader(b)
    assert sorted(ra.names) == sorted(rb.names)
    worst = 0.0
    for name in ra.names:
        for kind in reshard.KINDS:
            x, y = ra.read(kind, name), rb.read(kind, name)
            scale = 1e-12 + y.abs().max().item()
            worst = max(worst, ((x - y).abs().max() / scale).item() if kind == "exp_avg_sq" else (x - y).abs().max().item())
    return worst


def save_phase(rt, out: Path, modes: list[str]) -> dict:
    from qvl_train.train.trainer import Trainer

    result = {}
    for mode in modes:
        trainer = Trainer(config(mode, 2, out, f"{mode}_saved", world=rt.world_size), rt)
        trainer.fit()
        ckpt = trainer.ckpt_root / tag_for(2)
        checked = check_against_deepspeed(trainer, ckpt)
        loss = step_on_b(trainer)
        trainer.save_checkpoint()
        result[mode] = {"loss_b": loss, "checked_tensors": checked}
    return result


def resume_phase(rt, out: Path, modes: list[str], eps: list[int], saved: Path, references: dict) -> dict:
    from qvl_train.train.trainer import Trainer

    result = {}
    for mode in modes:
        reference = references[mode]
        for ep in eps:
            name = f"{mode}_w{rt.world_size}_ep{ep}"
            src = saved / f"{mode}_saved" / "checkpoints"
            trainer = Trainer(config(mode, ep, out, name, world=rt.world_size, resume=str(src / tag_for(2)), max_steps=4), rt)
            assert trainer.step == 2
            compared = check_loaded(trainer, src / tag_for(2))
            loss = step_on_b(trainer)
            trainer.save_checkpoint()
            worst = compare_checkpoints(trainer.ckpt_root / tag_for(3), src / tag_for(3))
            summary = trainer.fit()  # on to step 4 from the resharded data position
            result[name] = {"compared_elements": compared, "loss_b": loss, "reference_loss_b": reference["loss_b"],
                            "worst_step3_difference": worst, "final_step": summary["step"],
                            "final_loss_finite": math.isfinite(summary["eval/loss"])}
    return result


def resume_bf16(rt, out: Path, mode: str, saved: Path) -> dict:
    """A bf16 run (as on GPU) resumes the fp32 run's checkpoint: the fp32 masters and moments load
    exactly, the model's bf16 partitions are their rounding, and training continues."""
    from qvl_train.train.trainer import Trainer

    src = saved / f"{mode}_saved" / "checkpoints" / tag_for(2)
    name = f"{mode}_w{rt.world_size}_ep1_bf16"
    trainer = Trainer(config(mode, 1, out, name, world=rt.world_size, resume=str(src), max_steps=3,
                             extra=("model.dtype=bfloat16",)), rt)
    assert next(p for p in trainer.engine.module.parameters() if p.requires_grad).ds_tensor.dtype == torch.bfloat16
    compared = check_loaded(trainer, src)
    summary = trainer.fit()
    return {name: {"compared_elements": compared, "final_step": summary["step"],
                   "final_loss_finite": math.isfinite(summary["eval/loss"])}}


def refused(rt, out: Path, saved: Path) -> dict:
    """A full-SFT run pointed at the LoRA run's checkpoint: refused before any tensor is read,
    with a ValueError naming the saving layout (not a state_dict error). The message, for the test."""
    from qvl_train.train.trainer import Trainer

    src = saved / "lora_saved" / "checkpoints" / tag_for(2)
    try:
        Trainer(config("full", 1, out, "refused", world=rt.world_size, resume=str(src)), rt)
    except ValueError as e:
        return {"refused": str(e)}
    raise AssertionError("a full-SFT run resumed a LoRA checkpoint")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--phase", choices=["save", "resume"], required=True)
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--eps", default="1", help="ep sizes to resume with (save: after saving, in the same launch)")
    p.add_argument("--saved", type=Path)
    p.add_argument("--bf16", default="", help="modes to also resume in a bf16 run (resume phase)")
    p.add_argument("--refusal", action="store_true", help="also try a full-SFT resume of the LoRA checkpoint")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    from qvl_train.parallel.runtime import init_runtime, shutdown

    rt = init_runtime("gloo")
    modes = a.modes.split(",")
    eps = [int(e) for e in a.eps.split(",") if e]
    if a.phase == "save":
        result = save_phase(rt, a.out, modes)
        result.update(resume_phase(rt, a.out, modes, eps, a.out, result))  # the same launch: one torchrun less
    else:
        references = json.loads((a.saved / "result.json").read_text())
        result = resume_phase(rt, a.out, modes, eps, a.saved, references)
        for mode in filter(None, a.bf16.split(",")):
            result.update(resume_bf16(rt, a.out, mode, a.saved))
        if a.refusal:
            result.update(refused(rt, a.out, a.saved))
    if rt.is_main:
        (a.out / "result.json").write_text(json.dumps(result, indent=1))
    shutdown()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
