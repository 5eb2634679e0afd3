"""Typed run configuration: one small dataclass per concern, composed by Hydra.

Every section is a dataclass registered with Hydra's ConfigStore, so a typo in a YAML key or a
command-line override fails with Hydra's message naming the key. `validate` then checks the
values a schema cannot (ValueError saying what is wrong and how to fix it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from qvl_train.data.config import DataConfig
from qvl_train.model.attention import ATTN_IMPLS, DENSE_IMPLS


@dataclass
class ModelSection:
    """Which model to train. `path` (a local Hugging Face model dir) wins over `preset`; a preset
    builds a randomly initialised model (tiny: tests and the bundled demo)."""

    preset: str | None = "tiny"
    path: str | None = None
    tokenizer_path: str | None = None  # default: `path`, or the repo-built tokenizer for `tiny`
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    expert_layout: str | None = None  # only for checkpoints whose expert shapes are ambiguous
    activation_checkpointing: bool = False
    # attention kernel: auto (flash_varlen or flex on CUDA, sdpa_docs on CPU), flex, flash_varlen,
    # sdpa_docs, or the dense-mask references sdpa_mask / eager (see qvl_train/model/attention.py)
    attn_impl: str = "auto"
    router_aux_loss_coef: float | None = None  # None: the model config's value; 0 disables
    init_seed: int = 0


@dataclass
class ParallelSection:
    zero_stage: int = 3
    ep_size: int = 1
    # Ulysses sequence parallelism: ranks that train one row together (contiguous ranks, inside a
    # node); data.max_length / tokens_per_batch are then per SP group (qvl_train/parallel/sequence.py)
    sp_size: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    backend: str = "auto"  # auto = nccl on GPU, gloo on CPU
    timeout_minutes: float = 10.0  # any collective waiting longer fails the run (process group + DeepSpeed)


@dataclass
class OptimSection:
    lr: float = 1e-4  # language model
    vision_lr: float | None = None  # vision tower blocks (None: lr)
    merger_lr: float | None = None  # merger + DeepStack mergers (None: lr)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    freeze_vision: bool = False
    freeze_merger: bool = False
    freeze_llm: bool = False


@dataclass
class PeftSection:
    method: str = "none"  # none | lora
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    attention: bool = True
    dense_mlp: bool = True
    experts: bool = True
    router: bool = False
    vision: bool = False
    merger: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    export_attention_only: bool = False  # also write an attention-only adapter for vLLM


@dataclass
class TrainSection:
    max_steps: int = 100
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # eval loss on the held-out split every N steps (0: only at the end)
    eval_max_batches: int = 0  # 0: the whole eval split
    generate_eval: bool = True  # exact-match accuracy by generation at the end
    generate_max_new_tokens: int = 8
    generate_max_samples: int = 0  # 0: all eval samples
    peak_tflops: float | None = None  # per device, for MFU; None: known GPUs only
    max_nonfinite_steps: int = 3  # stop after this many non-finite (skipped) steps in a row; 0: never
    dead_model_steps: int = 20  # warn when the loss sits at ln(vocab) with zero grad norm this long; 0: off
    stall_timeout_minutes: float = 30.0  # no step (incl. its periodic eval/save) this long: dump stacks, exit; 0: off


@dataclass
class EvalSection:
    # native: the final exact match only in the run (our model). transformers: also score the
    # end-of-run export with transformers' own model, processor and generate (PeftModel on the
    # base for adapters): what serving stacks see (qvl_train.train.hf_eval)
    backend: str = "native"


@dataclass
class CheckpointSection:
    save_every: int = 0  # DeepSpeed checkpoint + loader + RNG every N steps (0: off)
    keep_last: int = 2
    resume: str = "auto"  # auto: newest complete checkpoint in the run dir; none; or a path
    export_every: int = 0  # HF export every N steps (0: only at the end)
    export_at_end: bool = True
    preempt_grace_s: float = 60.0  # SIGTERM/SIGUSR1: checkpoint and exit within this, else exit anyway
    # auto: "resharding" under ZeRO-3 (any world size / ep_size resumes it), else "deepspeed" (same layout only)
    format: str = "auto"


@dataclass
class WandbSection:
    mode: str = "offline"  # offline | online | disabled
    project: str = "qvl_train"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingSection:
    wandb: WandbSection = field(default_factory=WandbSection)
    progress_bar: bool = True
    expert_heatmap_every: int = 50  # steps between expert-load charts (W&B, runs/<run>/expert_load.png); 0: none


@dataclass
class PlanSection:
    """The memory plan (qvl_train.plan): the hardware a recipe is planned for, and the launch check.
    `gpus` / `gpu_mem_gib` name the recipe's target for `python -m qvl_train.plan`. The trainer
    plans for the world and device it runs on: on CUDA the device's total as torch reports it
    (an "80 GB" H100: 79.6 GiB); on CPU host RAM / local ranks, or `gpu_mem_gib` when set."""

    gpus: int | None = None  # GPUs the recipe is planned for (python -m qvl_train.plan uses it)
    gpu_mem_gib: float | None = None  # GiB (2**30 bytes) per GPU of the target; see above
    gpu_mem_gb: float | None = None  # the old name of gpu_mem_gib (always read as GiB): warns, then moves there
    enforce: bool = True  # false: run even when the plan says it cannot fit
    supervised_fraction: float = 1.0  # tokens with labels, for the loss term (1: every token)
    visual_fraction: float = 0.5  # visual tokens per batch token, for the vision tower's activations

    def __post_init__(self) -> None:
        if self.gpu_mem_gb is None:
            return
        if self.gpu_mem_gib is not None:
            raise ValueError("plan.gpu_mem_gb is the old name of plan.gpu_mem_gib: set only plan.gpu_mem_gib.")
        warnings.warn(f"plan.gpu_mem_gb={self.gpu_mem_gb} is read as GiB (2**30 bytes), as before; the key is now "
                      "plan.gpu_mem_gib. Note that an '80 GB' GPU has less: an H100 reports 79.6 GiB.",
                      FutureWarning, stacklevel=2)
        self.gpu_mem_gib, self.gpu_mem_gb = self.gpu_mem_gb, None


@dataclass
class RootConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    peft: PeftSection = field(default_factory=PeftSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    plan: PlanSection = field(default_factory=PlanSection)
    output_dir: str = "runs"
    run_name: str | None = None  # None: a new timestamped dir; set it to resume a run


GROUP_SCHEMAS = {
    "model": ModelSection,
    "parallel": ParallelSection,
    "optim": OptimSection,
    "peft": PeftSection,
    "train": TrainSection,
    "checkpoint": CheckpointSection,
    "logging": LoggingSection,
}


def validate(cfg: RootConfig) -> None:
    if cfg.model.path is None and cfg.model.preset is None:
        raise ValueError("Set model.path=/local/hf/model/dir or model.preset=tiny.")
    if cfg.model.dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"model.dtype={cfg.model.dtype!r}: use auto, float32 or bfloat16.")
    if cfg.model.attn_impl not in ATTN_IMPLS:
        raise ValueError(f"model.attn_impl={cfg.model.attn_impl!r}: use one of {', '.join(ATTN_IMPLS)}.")
    if cfg.parallel.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage={cfg.parallel.zero_stage}: use 0, 1, 2 or 3.")
    if cfg.parallel.ep_size < 1:
        raise ValueError("parallel.ep_size must be >= 1.")
    if cfg.parallel.sp_size < 1:
        raise ValueError("parallel.sp_size must be >= 1 (1: no sequence parallelism).")
    if cfg.parallel.sp_size > 1 and cfg.model.attn_impl in DENSE_IMPLS:
        raise ValueError(f"model.attn_impl={cfg.model.attn_impl} builds an L x L mask, which sequence parallelism never "
                         "does; use model.attn_impl=auto (or flex, flash_varlen, sdpa_docs) with parallel.sp_size > 1.")
    if cfg.peft.method not in ("none", "lora"):
        raise ValueError(f"peft.method={cfg.peft.method!r}: use none or lora.")
    if cfg.logging.wandb.mode not in ("offline", "online", "disabled"):
        raise ValueError(f"logging.wandb.mode={cfg.logging.wandb.mode!r}: use offline, online or disabled.")
    if cfg.optim.grad_accum < 1 or cfg.train.max_steps < 1:
        raise ValueError("optim.grad_accum and train.max_steps must be >= 1.")
    for key, value in (("parallel.timeout_minutes", cfg.parallel.timeout_minutes),
                       ("train.max_nonfinite_steps", cfg.train.max_nonfinite_steps),
                       ("train.dead_model_steps", cfg.train.dead_model_steps),
                       ("train.stall_timeout_minutes", cfg.train.stall_timeout_minutes),
                       ("checkpoint.preempt_grace_s", cfg.checkpoint.preempt_grace_s)):
        if value < 0:
            raise ValueError(f"{key}={value} must be >= 0.")
    if cfg.parallel.timeout_minutes == 0:
        raise ValueError("parallel.timeout_minutes=0 would fail every collective; use a positive number of minutes.")
    if cfg.eval.backend not in ("native", "transformers"):
        raise ValueError(f"eval.backend={cfg.eval.backend!r}: use native or transformers.")
    if cfg.eval.backend == "transformers" and not cfg.checkpoint.export_at_end:
        raise ValueError("eval.backend=transformers scores the end-of-run export: set checkpoint.export_at_end=true.")
    if not (0.0 <= cfg.plan.supervised_fraction <= 1.0 and 0.0 <= cfg.plan.visual_fraction <= 1.0):
        raise ValueError("plan.supervised_fraction and plan.visual_fraction are shares of the batch tokens: use 0..1.")
    if cfg.optim.freeze_vision and cfg.optim.freeze_merger and cfg.optim.freeze_llm and cfg.peft.method == "none":
        raise ValueError("Every part is frozen and peft.method=none: nothing would train.")
