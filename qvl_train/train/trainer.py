"""The SFT trainer: one setup function in a fixed order, then a plain step loop.

Setup: runtime -> run dir -> tokenizer -> model (preset or local HF dir) -> freeze / activation
checkpointing / LoRA / expert parallelism -> DeepSpeed -> data -> resume. Each optimizer step
sums `grad_accum` micro-batches; the cross entropy is normalised by the supervised tokens of the
whole global batch (all ranks, all micro-batches), so every token weighs the same whatever rank
or micro-batch it landed in. The router aux loss is added with the model config's coefficient.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from qvl_train.checkpoint import state as ckpt
from qvl_train.checkpoint.export import export_hf, trainable_state_dict
from qvl_train.config.schema import RootConfig
from qvl_train.data import (
    build_loader,
    build_tiny_tokenizer,
    load_tokenizer,
    write_processor_configs,
)
from qvl_train.model import (
    ModelConfig,
    build_model,
    from_pretrained,
    load_config,
    preset,
    save_pretrained,
)
from qvl_train.model.model import IGNORE_INDEX
from qvl_train.parallel.deepspeed_config import deepspeed_config
from qvl_train.parallel.expert_parallel import (
    autoep_config,
    from_pretrained_ep,
    install_autoep_router_capture,
    shard_experts_for_ep,
)
from qvl_train.parallel.groups import (
    build_ep_groups,
    ep_info_from_deepspeed,
    validate_ep_size,
)
from qvl_train.parallel.runtime import Runtime, all_reduce_sum, broadcast_object
from qvl_train.parallel.zero3_load import DeferredExperts, from_pretrained_zero3, load_autoep_experts
from qvl_train.peft import (
    LoraSettings,
    apply_lora,
    save_adapter,
    trainable_parameter_report,
)
from qvl_train.plan import check_plan

from . import evaluate, metrics
from .logger import RunLogger
from .optim import apply_freeze, param_groups, warmup_cosine


def resolve_run_dir(cfg: RootConfig, rt: Runtime) -> Path:
    """Rank 0 names the run (a timestamp unless run_name is set) and every rank uses that name."""
    name = cfg.run_name or (time.strftime("%Y%m%d-%H%M%S") if rt.is_main else None)
    name = broadcast_object(name)
    run_dir = Path(cfg.output_dir) / name
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return run_dir


def model_dtype(cfg: RootConfig, rt: Runtime) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if rt.device.type == "cuda" else torch.float32
    return getattr(torch, cfg.model.dtype)


def prepare_tokenizer(cfg: RootConfig, run_dir: Path, rt: Runtime) -> tuple[object, Path]:
    """The tokenizer dir: the model's own, or (tiny preset) one built by the repo into the run."""
    src = cfg.model.tokenizer_path or cfg.model.path
    if src is None:
        if cfg.model.preset != "tiny":
            raise ValueError(f"model.preset={cfg.model.preset} needs model.tokenizer_path (a dir with the tokenizer).")
        src = run_dir / "tokenizer"
        if rt.is_main:
            build_tiny_tokenizer(src)
            write_processor_configs(src)
        dist.barrier()
    return load_tokenizer(src), Path(src)


def lora_settings(cfg: RootConfig) -> LoraSettings:
    p = cfg.peft
    flags = {"attention": p.attention, "dense_mlp": p.dense_mlp, "experts": p.experts, "router": p.router,
             "vision": p.vision, "merger": p.merger}
    return LoraSettings(rank=p.rank, alpha=p.alpha, dropout=p.dropout, targets=tuple(k for k, v in flags.items() if v),
                        modules_to_save=tuple(p.modules_to_save))


def check_parallel_layout(cfg: RootConfig, rt: Runtime) -> None:
    """A layout that cannot run stops here, before any work (run dir, tokenizer, weights)."""
    model_cfg = load_config(cfg.model.path) if cfg.model.path else preset(cfg.model.preset)
    validate_ep_size(cfg.parallel.ep_size, rt.world_size, model_cfg.text.num_experts)


def build_train_model(cfg: RootConfig, dtype: torch.dtype, rt: Runtime, run_dir: Path, ds_cfg: dict):
    """The model to hand to DeepSpeed, this rank's EP info (LoRA runs), and the base model dir a
    LoRA adapter applies to.

    Full SFT with ep_size > 1: DeepSpeed AutoEP shards the experts inside deepspeed.initialize;
    from a checkpoint under ZeRO-3 the experts are left out here (stand-ins) and each rank reads
    its slice after initialize (zero3_load.load_autoep_experts). LoRA freezes the experts, so
    each rank keeps only its EP slice (read straight from the checkpoint files for real models) and tokens travel by all-to-all.
    A real checkpoint under ZeRO-3 (without EP-sliced experts) loads straight into partitions.
    """
    m, lora, ep = cfg.model, cfg.peft.method == "lora", cfg.parallel.ep_size
    model_cfg = load_config(m.path) if m.path else preset(m.preset)
    num_experts = model_cfg.text.num_experts
    validate_ep_size(ep, rt.world_size, num_experts)
    ep_info = build_ep_groups(ep, num_experts=num_experts) if lora else None
    autoep = not lora and ep > 1
    into_partitions = cfg.parallel.zero_stage == 3 and rt.world_size > 1 and not model_cfg.tie_word_embeddings
    if m.path and lora and ep > 1:
        model = from_pretrained_ep(m.path, ep_info, dtype=dtype, expert_layout=m.expert_layout)
    elif m.path and into_partitions:  # AutoEP: experts come later, per rank (load_autoep_experts)
        model = from_pretrained_zero3(m.path, ds_config=ds_cfg, expert_layout=m.expert_layout, defer_experts=autoep)
        if rt.is_main:
            print("weights loaded straight into ZeRO-3 partitions", flush=True)
    elif m.path:
        model = from_pretrained(m.path, dtype=dtype, device="cpu", expert_layout=m.expert_layout)
    else:
        model = build_model(model_cfg, dtype=dtype, seed=m.init_seed)
    base_dir = m.path
    if lora and not m.path:  # the adapter needs a base that transformers can load: export it
        base_dir = str(run_dir / "base")
        if rt.is_main:
            save_pretrained(model, base_dir)
    if lora and ep > 1 and not m.path:
        shard_experts_for_ep(model, ep_info)
    if m.router_aux_loss_coef is not None:
        text = dataclasses.replace(model.config.text, router_aux_loss_coef=m.router_aux_loss_coef)
        model.config = model.config.replace(text=text)
    model.run_vision_always = True  # ranks without images must still run the vision tower
    if m.activation_checkpointing:
        model.set_activation_checkpointing(True)
    apply_freeze(model, cfg.optim)
    if lora:
        apply_lora(model, lora_settings(cfg))
    return model, ep_info, base_dir


class Trainer:
    def __init__(self, cfg: RootConfig, rt: Runtime) -> None:
        import deepspeed

        check_parallel_layout(cfg, rt)
        self.cfg, self.rt = cfg, rt
        torch.manual_seed(cfg.train.seed)
        self.run_dir = resolve_run_dir(cfg, rt)
        if rt.is_main:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        self.tokenizer, self.tokenizer_dir = prepare_tokenizer(cfg, self.run_dir, rt)
        self.dtype = model_dtype(cfg, rt)
        ds_cfg = deepspeed_config(cfg, dtype=self.dtype, on_gpu=rt.device.type == "cuda")
        model_cfg = load_config(cfg.model.path) if cfg.model.path else preset(cfg.model.preset)
        check_plan(cfg, model_cfg, world_size=rt.world_size, device=rt.device, dtype=self.dtype, ds_cfg=ds_cfg,
                   is_main=rt.is_main)  # prints the memory plan; refuses a run that cannot fit
        model, self.ep_info, self.base_dir = build_train_model(cfg, self.dtype, rt, self.run_dir, ds_cfg)
        self.model_cfg: ModelConfig = model.config
        self.lora = cfg.peft.method == "lora"
        _check_vocab(self.model_cfg, self.tokenizer)
        self.autoep = not self.lora and cfg.parallel.ep_size > 1
        if self.autoep:
            ds_cfg.update(autoep_config(self.model_cfg, cfg.parallel.ep_size, world_size=rt.world_size))
        deferred_experts = any(isinstance(mod, DeferredExperts) for mod in model.modules())
        o = cfg.optim
        schedule = lambda step: warmup_cosine(step, warmup_steps=o.warmup_steps, max_steps=cfg.train.max_steps,
                                              min_ratio=o.min_lr_ratio)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, o), config=ds_cfg,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        self.model = self.engine.module
        if deferred_experts:
            load_autoep_experts(self.engine, cfg.model.path, expert_layout=cfg.model.expert_layout)
        if self.autoep:
            install_autoep_router_capture(self.engine)
            self.ep_info = ep_info_from_deepspeed(cfg.parallel.ep_size)
        self.loader = build_loader(cfg.data, self.tokenizer, rank=rt.rank, world_size=rt.world_size)
        self.step = 0
        self.ckpt_root = self.run_dir / "checkpoints"
        self._eval_cache: list[dict] | None = None
        self._maybe_resume()
        self.active_params = metrics.active_parameters(self.model_cfg)
        self.peak = metrics.peak_tflops(cfg.train.peak_tflops)
        self.logger = RunLogger(cfg.logging, run_dir=self.run_dir, config=OmegaConf.to_container(OmegaConf.structured(cfg)),
                                total_steps=cfg.train.max_steps, start_step=self.step, enabled=rt.is_main)
        self._print_setup()

    # ---- setup helpers -----------------------------------------------------------------------
    def _maybe_resume(self) -> None:
        path = ckpt.resolve_resume(self.cfg.checkpoint.resume, self.ckpt_root)
        if path is None:
            return
        state = ckpt.load(self.engine, path, rank=self.rt.rank)
        self.loader.load_state_dict(state["loader"])
        self.step = state["step"]
        if self.rt.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def _print_setup(self) -> None:
        c = self.cfg
        self.logger.message(
            f"run dir {self.run_dir} | world {self.rt.world_size} on {self.rt.device.type} | {self.dtype} | "
            f"ZeRO-{c.parallel.zero_stage} | ep {c.parallel.ep_size}{' (AutoEP)' if self.autoep else ''} | "
            f"peft {c.peft.method} | active params per token {self.active_params:,}"
        )
        self.logger.message(str(trainable_parameter_report(self.model)))

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        batches = iter(self.loader)
        self.engine.train()
        while self.step < cfg.train.max_steps:
            t0 = time.perf_counter()
            acc = self._train_step(batches)
            total, load = acc.reduce(self.rt.device)
            seconds = time.perf_counter() - t0
            self.step += 1
            m = metrics.step_metrics(total, load, seconds=seconds, world=self.rt.world_size,
                                     active_params=self.active_params, peak=self.peak)
            m["perf/data_wait_fraction"] = acc.data_wait_s / seconds  # this rank's (rank 0 logs)
            m.update(self._optimizer_metrics())
            if self.step % cfg.train.log_every == 0 or self.step == 1:
                self.logger.log(m, self.step)
            if load is not None and cfg.logging.expert_heatmap_every and self.step % cfg.logging.expert_heatmap_every == 0:
                self.logger.log_expert_heatmap(load, self.step)
            self.logger.advance()
            self._periodic()
        return self._finish()

    def _train_step(self, batches) -> metrics.StepAccumulator:
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(self.cfg.optim.grad_accum)]
        data_wait = time.perf_counter() - t0
        local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        (global_tokens,) = all_reduce_sum([float(local)], self.rt.device)
        # DeepSpeed averages gradients over ranks and divides by grad_accum; this normaliser makes
        # the result sum(CE over the global batch) / (its supervised tokens)
        normaliser = max(global_tokens, 1.0) / (self.rt.world_size * self.cfg.optim.grad_accum)
        acc = metrics.StepAccumulator()
        acc.data_wait_s = data_wait
        for batch in micro:
            out = self.engine(**evaluate.to_device(batch, self.rt.device), loss_normalizer=normaliser, return_logits=False)
            self.engine.backward(out.loss)
            self.engine.step()
            acc.add(out, batch["stats"])
        return acc

    def _optimizer_metrics(self) -> dict[str, float]:
        m = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            m["train/grad_norm"] = float(norm)
        m["sys/peak_memory_gib"] = metrics.peak_memory_gib(self.rt.device)
        for reason, n in self.loader.bad_sample_counts.items():
            m[f"data/skipped/{reason}"] = n
        return m

    def _periodic(self) -> None:
        c, s = self.cfg, self.step
        if c.train.eval_every and s % c.train.eval_every == 0 and s < c.train.max_steps:
            self.logger.log({"eval/loss": self._eval_loss()}, s)
        if c.checkpoint.save_every and s % c.checkpoint.save_every == 0:
            self.save_checkpoint()
        if os.environ.get("QVL_FAULT_AFTER_STEP") == str(s):
            os._exit(137)  # fault injection for the kill-and-resume test: dies like SIGKILL, mid-run
        if c.checkpoint.export_every and s % c.checkpoint.export_every == 0 and s < c.train.max_steps:
            self.export(self.run_dir / "exports" / f"step_{s:08d}")

    def _eval_loss(self) -> float:
        if self._eval_cache is None:  # encoded once per run, reused at every eval
            self._eval_cache = evaluate.eval_batches(self.cfg.data, self.tokenizer, rank=self.rt.rank,
                                                     world=self.rt.world_size, max_batches=self.cfg.train.eval_max_batches)
        return evaluate.eval_loss(self.model, self._eval_cache, self.rt.device)

    def save_checkpoint(self) -> Path:
        return ckpt.save(self.engine, self.ckpt_root, step=self.step, rank=self.rt.rank,
                         extra={"loader": self.loader.state_dict()}, keep_last=self.cfg.checkpoint.keep_last)

    def export(self, out_dir: Path) -> Path | None:
        """Full runs: an HF checkpoint. LoRA runs: a PEFT adapter for the base in `base_dir`
        (and an attention-only one when asked); `launch/export.py` merges them."""
        if not self.lora:
            return export_hf(self.engine, out_dir, rank=self.rt.rank, ep_info=self.ep_info,
                             tokenizer=self.tokenizer, tokenizer_src=self.tokenizer_dir)
        state = trainable_state_dict(self.model, rank=self.rt.rank)
        if self.rt.is_main:
            save_adapter(self.model, out_dir, base_model_name_or_path=str(Path(self.base_dir).resolve()),
                         state_dict=state)
            self.tokenizer.save_pretrained(out_dir)
            if self.cfg.peft.export_attention_only:
                save_adapter(self.model, out_dir / "attention_only", attention_only=True,
                             base_model_name_or_path=str(Path(self.base_dir).resolve()), state_dict=state)
        dist.barrier()
        return out_dir if self.rt.is_main else None

    def _finish(self) -> dict:
        c = self.cfg
        summary: dict = {"step": self.step}
        if c.checkpoint.save_every and self.step % c.checkpoint.save_every:
            self.save_checkpoint()
        summary["eval/loss"] = self._eval_loss()
        if c.train.generate_eval:
            acc, n, examples = self._exact_match()
            summary.update({"eval/exact_match": acc, "eval/generated_samples": n})
            for pred, ref in examples[:4]:
                self.logger.message(f"  predicted {pred!r:>14}  reference {ref!r}")
        self.logger.log_summary(summary, self.step)
        if c.checkpoint.export_at_end:
            summary["export_dir"] = str(self.export(self.run_dir / "export"))
        if self.rt.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.logger.message(f"done: {json.dumps(summary)}")
        self.logger.finish(summary)
        return summary

    def _exact_match(self) -> tuple[float, int, list]:
        t = self.cfg.train
        batches = evaluate.eval_batches(self.cfg.data, self.tokenizer, rank=self.rt.rank, world=self.rt.world_size,
                                        max_samples=-(-t.generate_max_samples // self.rt.world_size))
        eos = self.model_cfg.text.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos)
        return evaluate.exact_match(self.model, batches, self.tokenizer, self.rt.device,
                                    max_new_tokens=t.generate_max_new_tokens, eos_ids=eos_ids)


def _check_vocab(cfg: ModelConfig, tokenizer) -> None:
    if len(tokenizer) > cfg.text.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {cfg.text.vocab_size}: "
            "they come from different models; point model.tokenizer_path at the model's own tokenizer."
        )
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    if image_id != cfg.image_token_id:
        raise ValueError(
            f"Tokenizer's <|image_pad|> is id {image_id} but the model's image_token_id is {cfg.image_token_id}."
        )
