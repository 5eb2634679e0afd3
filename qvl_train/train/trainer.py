"""The SFT trainer: one setup function in a fixed order, then a plain step loop.

Setup: runtime -> run dir -> tokenizer -> model (preset or local HF dir) -> freeze / activation
checkpointing / LoRA / expert parallelism -> DeepSpeed -> data -> resume. Each optimizer step
sums `grad_accum` micro-batches; the cross entropy is normalised by the supervised tokens of the
whole global batch (all ranks, all micro-batches), so every token weighs the same whatever rank
or micro-batch it landed in. The router aux loss is added with the model config's coefficient.
Losses, expert load and the grad norm are read back to the host once per log interval (metrics
are averages over it), never per step, so a GPU step does not wait on the host.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from qvl_train.checkpoint import data_position, serving
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
from qvl_train.model.model_dir import check_model_dir, check_tokenizer_dir
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
from qvl_train.parallel.runtime import Runtime, broadcast_object, check_shared_dir
from qvl_train.parallel.sequence import SequenceParallel, build_sp_groups, validate_sp_size
from qvl_train.parallel.watchdog import Preempted, Preemption, Watchdog
from qvl_train.parallel.zero3_load import DeferredExperts, from_pretrained_zero3, load_autoep_experts
from qvl_train.peft import (
    LoraSettings,
    apply_lora,
    save_adapter,
    trainable_parameter_report,
)
from qvl_train.plan import check_plan

from . import evaluate, faults, hf_eval, metrics
from .logger import RunLogger
from .optim import apply_freeze, param_groups, warmup_cosine


def resolve_run_dir(cfg: RootConfig, rt: Runtime) -> Path:
    """Rank 0 names the run (a timestamp unless run_name is set) and every rank uses that name."""
    name = cfg.run_name or (time.strftime("%Y%m%d-%H%M%S") if rt.is_main else None)
    name = broadcast_object(name)
    run_dir = Path(cfg.output_dir) / name
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    check_shared_dir(run_dir, rt)  # multi-node: every node must see it
    return run_dir


def model_dtype(cfg: RootConfig, rt: Runtime) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if rt.device.type == "cuda" else torch.float32
    return getattr(torch, cfg.model.dtype)


def prepare_tokenizer(cfg: RootConfig, run_dir: Path, rt: Runtime) -> tuple[object, Path]:
    """The tokenizer dir: the model's own, or (tiny preset) one built by the repo into the run."""
    if cfg.model.path:
        check_model_dir(cfg.model.path)
    src = cfg.model.tokenizer_path or cfg.model.path
    if src is not None:
        check_tokenizer_dir(src, key="model.tokenizer_path" if cfg.model.tokenizer_path else "model.path")
    else:
        if cfg.model.preset != "tiny":
            raise ValueError(f"model.preset={cfg.model.preset} needs model.tokenizer_path (a dir with the tokenizer).")
        src = run_dir / "tokenizer"
        if rt.is_main:
            build_tiny_tokenizer(src)
            write_processor_configs(src)
        dist.barrier()
    return load_tokenizer(src), Path(src)


def read_model_config(cfg: RootConfig) -> ModelConfig:
    """The run's model config (config.json of model.path, or the preset): read once per run."""
    return load_config(cfg.model.path) if cfg.model.path else preset(cfg.model.preset)


def build_train_model(cfg: RootConfig, model_cfg: ModelConfig, dtype: torch.dtype, rt: Runtime, run_dir: Path,
                      ds_cfg: dict):
    """The model to hand to DeepSpeed, this rank's EP info (LoRA runs), and the base model dir a
    LoRA adapter applies to.

    Full SFT with ep_size > 1: DeepSpeed AutoEP shards the experts inside deepspeed.initialize;
    from a checkpoint under ZeRO-3 the experts are left out here (stand-ins) and each rank reads
    its slice after initialize (zero3_load.load_autoep_experts). LoRA freezes the experts, so
    each rank keeps only its EP slice (read straight from the checkpoint files for real models) and tokens travel by all-to-all.
    A real checkpoint under ZeRO-3 (without EP-sliced experts) loads straight into partitions.
    """
    m, lora, ep = cfg.model, cfg.peft.method == "lora", cfg.parallel.ep_size
    ep_info = build_ep_groups(ep, num_experts=model_cfg.text.num_experts) if lora else None  # ep checked by Trainer
    autoep = not lora and ep > 1
    into_partitions = cfg.parallel.zero_stage == 3 and rt.world_size > 1 and not model_cfg.tie_word_embeddings
    if m.path and lora and ep > 1 and into_partitions:  # each rank reads its ZeRO share and expert slice only
        model = from_pretrained_zero3(m.path, ds_config=ds_cfg, expert_layout=m.expert_layout, ep_info=ep_info)
    elif m.path and lora and ep > 1:
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
    model.set_attn_impl(m.attn_impl)
    if m.activation_checkpointing:
        model.set_activation_checkpointing(True)
    apply_freeze(model, cfg.optim)
    if lora:
        apply_lora(model, LoraSettings.from_section(cfg.peft))
    return model, ep_info, base_dir


class Trainer:
    def __init__(self, cfg: RootConfig, rt: Runtime, overrides: list[str] | None = None) -> None:
        """`overrides`: the command line (recipe and key=value), for the exports' model cards."""
        import deepspeed

        model_cfg = read_model_config(cfg)
        # a layout that cannot run stops here, before any work (run dir, tokenizer, weights)
        validate_ep_size(cfg.parallel.ep_size, rt.world_size, model_cfg.text.num_experts)
        t = model_cfg.text
        validate_sp_size(cfg.parallel.sp_size, world_size=rt.world_size, num_heads=t.num_attention_heads,
                         num_kv_heads=t.num_key_value_heads)
        sp_info = build_sp_groups(cfg.parallel.sp_size)
        self.cfg, self.rt, self.overrides = cfg, rt, overrides
        torch.manual_seed(cfg.train.seed)
        self.run_dir = resolve_run_dir(cfg, rt)
        if rt.is_main:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        self.tokenizer, self.tokenizer_dir = prepare_tokenizer(cfg, self.run_dir, rt)
        self.sp = SequenceParallel(sp_info, model_cfg, pad_token_id=self.tokenizer.pad_token_id, device=rt.device)
        self.dtype = model_dtype(cfg, rt)
        ds_cfg = deepspeed_config(cfg, dtype=self.dtype, on_gpu=rt.device.type == "cuda")
        check_plan(cfg, model_cfg, world_size=rt.world_size, device=rt.device, dtype=self.dtype, ds_cfg=ds_cfg,
                   is_main=rt.is_main)  # prints the memory plan; refuses a run that cannot fit
        model, self.ep_info, self.base_dir = build_train_model(cfg, model_cfg, self.dtype, rt, self.run_dir, ds_cfg)
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
        # rows are sharded by data-parallel rank: every rank of an SP group gets the same rows
        self.loader = build_loader(cfg.data, self.tokenizer, rank=sp_info.dp_rank, world_size=sp_info.dp_size)
        self.media = serving.training_media(cfg.data, self.tokenizer_dir)  # what exports' processor files say
        self.step = 0
        self.ckpt_root = self.run_dir / "checkpoints"
        self._eval_cache: list[dict] | None = None
        t = cfg.train
        self.divergence = faults.DivergenceGuard(max_nonfinite_steps=t.max_nonfinite_steps, dead_model_steps=t.dead_model_steps,
                                                 vocab_size=self.model_cfg.text.vocab_size)
        self.watchdog = Watchdog.with_heartbeat(t.stall_timeout_minutes, self.run_dir, rank=rt.rank, world_size=rt.world_size)
        self.preemption = Preemption(cfg.checkpoint.preempt_grace_s, self.watchdog)
        self._step_sources: list[str] = []  # file:line of this step's samples on this rank
        self._saved_step = -1
        self._maybe_resume()
        self.active_params = metrics.active_parameters(self.model_cfg)
        self.peak = metrics.peak_tflops(cfg.train.peak_tflops)
        self.logger = RunLogger(cfg.logging, run_dir=self.run_dir, config=OmegaConf.to_container(OmegaConf.structured(cfg)),
                                total_steps=cfg.train.max_steps, start_step=self.step, enabled=rt.is_main)
        self._print_setup()

    # ---- setup helpers -----------------------------------------------------------------------
    def _maybe_resume(self) -> None:
        warn = (lambda m: print(m, file=sys.stderr, flush=True)) if self.rt.is_main else (lambda m: None)
        path = ckpt.resolve_resume(self.cfg.checkpoint.resume, self.ckpt_root, warn=warn)
        if path is None:
            return
        self.sp.check_resume(ckpt.saved_layout(path).get("sp_size", 1), path)
        state = ckpt.load(self.engine, path, rank=self.rt.rank, layout=self.layout)
        data_position.restore(self.loader, state)
        self.step = self._saved_step = state["step"]
        if self.rt.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def _print_setup(self) -> None:
        c = self.cfg
        self.logger.message(
            f"run dir {self.run_dir} | world {self.rt.world_size} on {self.rt.device.type} | {self.dtype} | "
            f"ZeRO-{c.parallel.zero_stage} | ep {c.parallel.ep_size}{' (AutoEP)' if self.autoep else ''} | sp {self.sp.size} | "
            f"peft {c.peft.method} | active params per token {self.active_params:,} | "
            f"attention {self.model.attention_kernel(self.rt.device, self.dtype)}"
        )
        self.logger.message(str(trainable_parameter_report(self.model)))
        for note in serving.untranslated_settings(self.media):
            self.logger.message(f"WARNING: exports cannot carry this training setting: {note}")

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        """Trains to max_steps. Raises faults.DivergenceError after too many non-finite steps and
        Preempted (checkpoint written) after SIGTERM / SIGUSR1; see docs/reliability.md."""
        self.preemption.install()
        try:
            self._loop()
            self.watchdog.pause()  # final eval / export have no step to time
            return self._finish()
        finally:
            self.watchdog.stop()
            self.preemption.uninstall()

    def _loop(self) -> None:
        cfg = self.cfg
        batches = iter(self.loader)
        self.engine.train()
        acc = metrics.StepAccumulator()
        while self.step < cfg.train.max_steps:
            self.watchdog.beat(self.step + 1)
            self._train_step(batches, acc)
            self.step += 1
            # The global grad norm is already on the host (DeepSpeed read it for clipping and its
            # overflow check): the per-step divergence verdict costs no extra sync. The losses are
            # read back only when reporting.
            norm = self._grad_norm()
            nonfinite = norm is not None and not math.isfinite(norm)
            log_now = nonfinite or self.step % cfg.train.log_every == 0 or self.step == 1
            every = cfg.logging.expert_heatmap_every
            heatmap_now = bool(every) and self.step % every == 0
            m = self._report(acc, heatmap=heatmap_now) if log_now or heatmap_now else None
            if m is not None:  # the only host read-back of the steps' results
                acc = metrics.StepAccumulator()
            skipped = self._observe_divergence(norm, m)
            if log_now:
                m.update(faults.global_skip_counts(self.sp.once_per_group(self.loader.bad_sample_counts)))  # collective
                self.logger.log(m, self.step)
            self._stop_if_diverged(norm, m, skipped)
            self.logger.advance()
            self._periodic()
            faults.inject(self.step, self.rt.rank)
            if (signum := self.preemption.agreed(self.rt.device)) is not None:
                self._stop_for_preemption(signum)

    def _grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def _observe_divergence(self, norm: float | None, m: dict | None) -> bool:
        """Same verdict on every rank: the grad norm and the reported loss are global. The loss is
        only known on report steps (`m`); a non-finite loss makes a non-finite grad norm anyway."""
        skipped, warning = self.divergence.observe(step=self.step, grad_norm=norm,
                                                   loss=None if m is None else m["train/loss"])
        if m is not None:
            m["train/nonfinite_steps"] = self.divergence.nonfinite_total
        if warning:
            self.logger.message(warning)
        return skipped

    def _stop_if_diverged(self, norm: float | None, m: dict | None, skipped: bool) -> None:
        loss = "?" if m is None else m["train/loss"]
        if skipped and not getattr(self.optimizer, "overflow", False):
            raise faults.DivergenceError(
                f"step {self.step}: non-finite loss {loss} / grad norm {norm}, and this optimizer applied the update "
                "(ZeRO-1, 2 and 3 skip non-finite steps, ZeRO-0 does not); use parallel.zero_stage=3 or lower optim.lr.")
        if skipped:
            self.logger.message(f"step {self.step}: non-finite loss {loss} / grad norm {norm}: update skipped "
                                f"({self.divergence.consecutive} in a row)")
        if self.divergence.should_stop():
            sources = faults.all_sources(self._step_sources)
            raise faults.DivergenceError(self.divergence.stop_message(self.step, loss, norm, sources))

    def _stop_for_preemption(self, signum: int) -> None:
        waited = time.monotonic() - (self.preemption.received_at or time.monotonic())
        self.logger.message(f"preemption signal {signum} ({waited:.1f} s ago): saving a checkpoint at step {self.step}")
        if self._saved_step != self.step:
            self.save_checkpoint()
        if self.rt.is_main:
            (self.run_dir / "PREEMPTED").write_text(f"{self.step}\n")
        self.logger.finish({"preempted_at_step": self.step}, preempted=True)
        self.preemption.keep_torchrun_from_restarting()
        raise Preempted(self.step, signum)

    def _report(self, acc: metrics.StepAccumulator, *, heatmap: bool) -> dict:
        """Metrics of the steps since the last report (averages over the interval), unlogged."""
        total, load = acc.reduce(self.rt.device)
        m = metrics.step_metrics(total, load, seconds=acc.seconds, world=self.rt.world_size,
                                 active_params=self.active_params, peak=self.peak, steps=acc.steps)
        m["perf/data_wait_fraction"] = acc.data_wait_s / acc.seconds  # this rank's (rank 0 logs)
        m.update(self._optimizer_metrics())
        if heatmap and load is not None:
            self.logger.log_expert_heatmap(load, self.step)
        return m

    def _train_step(self, batches, acc: metrics.StepAccumulator) -> None:
        t0 = time.perf_counter()
        micro = [self.sp.shard(next(batches)) for _ in range(self.cfg.optim.grad_accum)]  # sp > 1: this rank's slice
        acc.data_wait_s += time.perf_counter() - t0
        self._step_sources = [w for b in micro for row in b.get("sources", []) for w in row]
        local = sum(self.sp.supervised_tokens(b) for b in micro)  # host tensors: no sync
        # DeepSpeed averages gradients over ranks and divides by grad_accum; this normaliser makes
        # the result sum(CE over the global batch) / (its supervised tokens). It stays on the
        # device: the loss divides by it without a host read.
        global_tokens = torch.tensor(float(local), device=self.rt.device)
        dist.all_reduce(global_tokens)
        normaliser = global_tokens.clamp(min=1.0) / (self.rt.world_size * self.cfg.optim.grad_accum)
        for batch in micro:
            inputs = evaluate.to_device(batch, self.rt.device) | self.sp.slice_inputs(batch, self.rt.device)
            out = self.engine(**inputs, loss_normalizer=normaliser, return_logits=False)
            self.engine.backward(out.loss)
            self.engine.step()
            acc.add(out, batch["stats"])
        acc.seconds += time.perf_counter() - t0
        acc.steps += 1

    def _optimizer_metrics(self) -> dict[str, float]:
        m = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            m["train/grad_norm"] = float(norm)
        m["sys/peak_memory_gib"] = metrics.peak_memory_gib(self.rt.device)
        return m

    def _periodic(self) -> None:
        c, s = self.cfg, self.step
        if c.train.eval_every and s % c.train.eval_every == 0 and s < c.train.max_steps:
            self.logger.log({"eval/loss": self._eval_loss()}, s)
        if c.checkpoint.save_every and s % c.checkpoint.save_every == 0:
            self.save_checkpoint()
        if c.checkpoint.export_every and s % c.checkpoint.export_every == 0 and s < c.train.max_steps:
            self.export(self.run_dir / "exports" / f"step_{s:08d}")

    def _eval_loss(self) -> float:
        if self._eval_cache is None:  # encoded once per run, reused at every eval
            self._eval_cache = evaluate.eval_batches(self.cfg.data, self.tokenizer, rank=self.rt.rank,
                                                     world=self.rt.world_size, max_batches=self.cfg.train.eval_max_batches)
        return evaluate.eval_loss(self.model, self._eval_cache, self.rt.device)

    def _weights_ok(self, what: str) -> bool:
        """Never save weights that are non-finite or that just produced a non-finite step (collective)."""
        if self.divergence.healthy and faults.weights_finite(self.model, self.rt.device):
            return True
        self.logger.message(f"WARNING: not writing the {what} at step {self.step}: the weights are non-finite "
                            "or produced a non-finite loss")
        return False

    def save_checkpoint(self) -> Path | None:
        if not self._weights_ok("checkpoint"):
            return None
        self._saved_step = self.step
        fmt = ckpt.resolve_format(self.cfg.checkpoint.format, self.cfg.parallel.zero_stage)
        # the ranks of an SP group share one loader state: each data-parallel rank's, once, in order
        train_state = {"engine": ckpt.engine_counters(self.engine, self.scheduler),
                       "loaders": data_position.gather(self.loader)[::self.sp.size]} if fmt == "resharding" else None
        return ckpt.save(self.engine, self.ckpt_root, step=self.step, rank=self.rt.rank, fmt=fmt, layout=self.layout,
                         extra={"loader": self.loader.state_dict()}, keep_last=self.cfg.checkpoint.keep_last,
                         train_state=train_state)

    @property
    def layout(self) -> dict:
        """What a checkpoint records of the run's parallel layout (state.check_layout compares it)."""
        c, rt = self.cfg, self.rt
        return {"world_size": rt.world_size, "num_nodes": max(1, rt.world_size // int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))),
                "ep_size": c.parallel.ep_size, "zero_stage": c.parallel.zero_stage, "peft": c.peft.method,
                "num_workers": self.loader.num_workers, "sp_size": self.sp.size}

    def export(self, out_dir: Path, eval_figures: dict | None = None) -> Path | None:
        """Full runs: an HF checkpoint. LoRA runs: a PEFT adapter for the base in `base_dir`
        (and an attention-only one when asked); `launch/export.py` merges them. Either way with
        the serving files of qvl_train.checkpoint.serving (processor configs of the training
        media settings, chat template, generation config, model card)."""
        if not self._weights_ok("export"):
            return None
        if not self.lora:
            export_hf(self.engine, out_dir, rank=self.rt.rank, ep_info=self.ep_info)
        else:
            state = trainable_state_dict(self.model, rank=self.rt.rank)
            if self.rt.is_main:
                save_adapter(self.model, out_dir, base_model_name_or_path=str(Path(self.base_dir).resolve()),
                             state_dict=state)
                if self.cfg.peft.export_attention_only:
                    save_adapter(self.model, out_dir / "attention_only", attention_only=True,
                                 base_model_name_or_path=str(Path(self.base_dir).resolve()), state_dict=state)
        if self.rt.is_main:
            self.write_serving_files(out_dir, eval_figures or {})
            if self.lora and self.cfg.peft.export_attention_only:
                self.write_serving_files(out_dir / "attention_only", eval_figures or {}, card=False)
        dist.barrier()
        return out_dir if self.rt.is_main else None

    def model_card(self, eval_figures: dict) -> serving.ModelCard:
        c = self.cfg
        held_out = build_loader(c.data, self.tokenizer, split="eval", num_epochs=1).mixture if (
            c.data.eval_datasets or c.data.eval_fraction > 0) else None
        base = c.model.path or (f"{Path(self.base_dir).resolve()} (tiny preset, random init)" if self.lora
                                else f"model.preset={c.model.preset} (random init)")
        return serving.ModelCard(
            kind="adapter" if self.lora else "full", base_model=base,
            datasets=serving.sample_counts(self.loader.mixture, c.data.datasets),
            eval_datasets=serving.sample_counts(held_out, c.data.eval_datasets or c.data.datasets) if held_out else [],
            overrides=self.overrides, steps=self.step, eval=eval_figures,
            lora_rank=c.peft.rank if self.lora else None, source=f"qvl_train run {self.run_dir.name}",
        )

    def write_serving_files(self, out_dir: Path, eval_figures: dict, card: bool = True) -> None:
        t = self.model_cfg.text
        serving.write_serving_files(out_dir, tokenizer=self.tokenizer, media=self.media,
                                    card=self.model_card(eval_figures) if card else None,
                                    bos_token_id=t.bos_token_id, model_eos=t.eos_token_id)

    def _finish(self) -> dict:
        c = self.cfg
        if not self.divergence.healthy:
            raise faults.DivergenceError(
                f"the run ended on {self.divergence.consecutive} non-finite step(s) (last: step {self.step}); no "
                "checkpoint or export of these weights is written. Lower optim.lr.")
        summary: dict = {"step": self.step, "train/nonfinite_steps": self.divergence.nonfinite_total}
        summary.update(faults.global_skip_counts(self.sp.once_per_group(self.loader.bad_sample_counts)))
        if c.checkpoint.save_every and self._saved_step != self.step:
            self.save_checkpoint()
        summary["eval/loss"] = self._eval_loss()
        if c.train.generate_eval:
            acc, n, examples = self._exact_match()
            summary.update({"eval/exact_match": acc, "eval/generated_samples": n})
            for pred, ref in examples[:4]:
                self.logger.message(f"  predicted {pred!r:>14}  reference {ref!r}")
        self.logger.log_summary(summary, self.step)
        figures = {k: v for k, v in summary.items() if k.startswith("eval/")}
        if c.checkpoint.export_at_end:
            export_dir = self.export(self.run_dir / "export", figures)
            summary["export_dir"] = str(export_dir)
            if c.eval.backend == "transformers":
                served = self._transformers_exact_match(export_dir, figures)
                self.logger.log_summary(served, self.step)
                summary.update(served)
        if self.rt.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.logger.message(f"done: {json.dumps(summary)}")
        self.logger.finish(summary)
        return summary

    def _exact_match(self) -> tuple[float, int, list]:
        t = self.cfg.train
        batches = evaluate.eval_batches(self.cfg.data, self.tokenizer, rank=self.rt.rank, world=self.rt.world_size,
                                        max_samples=-(-t.generate_max_samples // self.rt.world_size))
        # the ids the exports' generation_config.json ends a turn with, so both evals stop alike
        eos_ids = serving.chat_stop_ids(self.tokenizer, self.model_cfg.text.eos_token_id)
        return evaluate.exact_match(self.model, batches, self.tokenizer, self.rt.device,
                                    max_new_tokens=t.generate_max_new_tokens, eos_ids=eos_ids)

    def _transformers_exact_match(self, export_dir: Path | None, in_run: dict) -> dict:
        """eval.backend=transformers: rank 0 scores the export with transformers alone (the
        other ranks wait), then the model card gets the figures."""
        figures: dict = {}
        if self.rt.is_main:
            t = self.cfg.train
            result = hf_eval.score_export(export_dir, hf_eval.eval_records(self.cfg.data, self.tokenizer),
                                          max_new_tokens=t.generate_max_new_tokens, max_samples=t.generate_max_samples,
                                          device=self.rt.device, dtype=self.dtype)
            figures = result.metrics()
            if result.skipped_videos:
                self.logger.message(f"transformers eval: {result.skipped_videos} video samples not scored "
                                    "(transformers' video processor needs torchvision, which is not installed)")
            serving.write_card(export_dir, self.model_card(in_run | figures), self.media)
        dist.barrier()
        return figures


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
