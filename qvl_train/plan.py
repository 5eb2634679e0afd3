"""The memory plan: what one rank holds when a run trains, checked before any work.

    python -m qvl_train.plan +recipe=30b_a3b_lora --gpus 8 --gpu-mem 79.6 [key=value overrides]

prints, per GPU: weights, gradients, optimizer states, the EP expert slice, activations with
checkpointing, the loss, ZeRO-3 gathers and buffers (read from the DeepSpeed config the trainer
uses), the CUDA context, and the total against the device; then the host RAM per rank (loading,
offloaded states). The trainer prints the same plan at start (rank 0) and refuses a run that
cannot fit (ValueError naming the knobs that would make it fit); `plan.enforce=false` runs anyway.

docs/scale.md lists the terms, the model sizes they start from, the tables and how the plan was
calibrated. Parameter counts come from a meta-device build of our model with the run's
freeze and LoRA settings (accelerate's init_empty_weights catches the parameters PEFT adds), one
decoder layer per layer kind standing for all layers of that kind (PEFT on 94 layers is slow).

On CPU the "device" is host RAM: each rank gets MemTotal / local ranks (not MemAvailable, which
moves with other jobs), training and loading happen in the same memory, so the total is the larger
of the two, only the touched pages of DeepSpeed's preallocated buckets count, and gloo's
all-gather stages a copy of its output (NCCL's does not).
All sizes are GiB (2**30 bytes; nvidia-smi's MiB / 1024): an "80 GB" H100 holds 79.6 GiB in total.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qvl_train.config.schema import RootConfig
from qvl_train.model.config import ModelConfig, preset

GIB = 2**30
BACKWARD_TRANSIENT = "backward transient of one layer"
CUDA_CONTEXT_GIB = 2.0  # CUDA + NCCL context per GPU, about 1-3 GB (docs/scale.md)
_EXPERT_BASE = re.compile(r"mlp\.experts\.(base_layer\.)*(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.")


@dataclass
class Counts:
    """Parameter counts of the whole model (numels), split the way memory is held."""

    total: int = 0
    expert_base: int = 0  # routed experts' base weights (all layers, all experts)
    expert_base_trainable: bool = False
    trainable: int = 0  # everything the optimizer updates (LoRA, or the model)
    frozen_other: int = 0  # frozen, not routed-expert base (e.g. LoRA's base attention, embeddings)
    persistent: int = 0  # params ZeRO-3 keeps whole on every rank (below the persistence threshold)
    largest_module: int = 0  # most parameters one non-expert module owns (ZeRO-3 gathers a module at a time)
    largest_trainable_module: int = 0  # its gradient is whole until reduce-scattered
    moe_layer_experts: int = 0  # one MoE layer's expert base weights
    largest_tensor: int = 0
    num_moe_layers: int = 0
    frozen_input_embedding: int = 0  # the token embedding when frozen: ZeRO-3 releases it after its forward


@dataclass
class Line:
    name: str
    gib: float
    note: str = ""


@dataclass
class Plan:
    device: str  # "gpu" or "cpu"
    world_size: int
    device_gib: float
    lines: list[Line] = field(default_factory=list)  # per rank, on the device (training)
    load_gib: float = 0.0  # host RAM per rank while the weights load
    host_states_gib: float = 0.0  # host RAM per rank for offloaded optimizer states
    notes: list[str] = field(default_factory=list)

    @property
    def train_gib(self) -> float:
        return sum(line.gib for line in self.lines)

    @property
    def total_gib(self) -> float:
        """What the device must hold; on CPU loading uses the same memory."""
        return max(self.train_gib, self.load_gib) if self.device == "cpu" else self.train_gib

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.device_gib

    @property
    def headroom(self) -> float:
        return 1.0 - self.total_gib / self.device_gib

    def table(self) -> str:
        where = "GPU" if self.device == "gpu" else "rank (CPU: host RAM)"
        rows = [f"memory plan per {where}, world size {self.world_size}:"]
        rows += [f"  {line.name:<38}{line.gib:8.2f} GiB  {line.note}" for line in self.lines]
        rows.append(f"  {'training total':<38}{self.train_gib:8.2f} GiB")
        rows.append(f"  {'loading (host RAM, per rank)':<38}{self.load_gib:8.2f} GiB")
        if self.host_states_gib:
            rows.append(f"  {'offloaded states (host, per rank)':<38}{self.host_states_gib:8.2f} GiB")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        rows.append(f"  {'total vs device':<38}{self.total_gib:8.2f} / {self.device_gib:.1f} GiB: {verdict} "
                    f"({100 * self.headroom:.0f}% headroom)")
        rows += [f"  note: {n}" for n in self.notes]
        return "\n".join(rows)


# ---- parameter counts -----------------------------------------------------------------------


_COUNTS: dict[str, Counts] = {}


def parameter_counts(model_cfg: ModelConfig, cfg: RootConfig, *, persistence_threshold: int) -> Counts:
    """Counts for `model_cfg` with the run's freeze and LoRA settings, from a meta build in which
    one decoder layer of each kind (MoE, dense) stands for every layer of its kind. Cached: the
    knobs the refusal message tries change none of these inputs."""
    key = repr((model_cfg, cfg.optim.freeze_vision, cfg.optim.freeze_merger, cfg.optim.freeze_llm, cfg.peft,
                persistence_threshold))
    if key not in _COUNTS:
        _COUNTS[key] = _parameter_counts(model_cfg, cfg, persistence_threshold=persistence_threshold)
    return dataclasses.replace(_COUNTS[key])


def _parameter_counts(model_cfg: ModelConfig, cfg: RootConfig, *, persistence_threshold: int) -> Counts:
    from accelerate import init_empty_weights

    from qvl_train.model import Qwen3VLMoe
    from qvl_train.train.optim import apply_freeze

    t = model_cfg.text
    kinds = [t.is_moe_layer(i) for i in range(t.num_hidden_layers)]
    num_moe, num_dense = sum(kinds), len(kinds) - sum(kinds)
    # layer 0 dense (if the model has dense layers), layer 1 MoE (if it has MoE layers); enough
    # layers for every DeepStack level so the vision side is the model's own
    num_rep = max(2, len(model_cfg.vision.deepstack_visual_indexes))
    rep_text = dataclasses.replace(t, num_hidden_layers=num_rep, decoder_sparse_step=1,
                                   mlp_only_layers=[0] if num_dense else [], num_experts=t.num_experts if num_moe else 0)
    rep_cfg = model_cfg.replace(text=rep_text)
    weight_of_layer = {0: num_dense if num_dense else 0, 1: num_moe}
    with init_empty_weights():
        model = Qwen3VLMoe(rep_cfg)
        apply_freeze(model, cfg.optim)
        if cfg.peft.method == "lora":
            from qvl_train.peft import LoraSettings, apply_lora

            apply_lora(model, LoraSettings.from_section(cfg.peft))
    c = Counts(num_moe_layers=num_moe)
    embedding = model.get_submodule("model.language_model.embed_tokens").weight
    if not embedding.requires_grad and not model_cfg.tie_word_embeddings:
        c.frozen_input_embedding = embedding.numel()
    for mod_name, module in model.named_modules():
        own = [p.numel() for n, p in module.named_parameters(recurse=False) if not _EXPERT_BASE.search(f"{mod_name}.{n}")]
        c.largest_module = max(c.largest_module, sum(own))
        trainable = [p.numel() for p in module.parameters(recurse=False) if p.requires_grad]
        c.largest_trainable_module = max(c.largest_trainable_module, sum(trainable))
    for name, p in model.named_parameters():
        m = _LAYER.match(name)
        weight = 1 if m is None else weight_of_layer.get(int(m.group(1)), 0)
        n = p.numel() * weight
        if not n:
            continue
        c.total += n
        c.largest_tensor = max(c.largest_tensor, p.numel())
        if p.numel() < persistence_threshold:
            c.persistent += n
        if _EXPERT_BASE.search(name):
            c.expert_base += n
            c.expert_base_trainable = p.requires_grad
            c.moe_layer_experts += p.numel() if int(m.group(1)) == 1 else 0
        elif p.requires_grad:
            c.trainable += n
        else:
            c.frozen_other += n
    if c.expert_base_trainable:
        c.trainable += c.expert_base
    return c


# ---- the plan -------------------------------------------------------------------------------


def _zero_settings(ds_cfg: dict) -> dict:
    """Stage-3 sizes (in elements) from the DeepSpeed config, DeepSpeed's defaults filled in."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    z = DeepSpeedZeroConfig(**ds_cfg.get("zero_optimization", {}))
    return {"reduce_bucket": int(z.reduce_bucket_size), "prefetch_bucket": int(z.prefetch_bucket_size),
            "max_live": int(z.max_live_parameters), "persistence": int(z.param_persistence_threshold),
            "sub_group": int(z.sub_group_size)}


def make_plan(
    cfg: RootConfig,
    model_cfg: ModelConfig,
    *,
    world_size: int,
    device: str,
    device_gib: float,
    dtype: torch.dtype | None = None,
    ds_cfg: dict | None = None,
) -> Plan:
    """Per-rank memory of `cfg` on `world_size` ranks of `device_gib` each ("gpu" or "cpu")."""
    from qvl_train.parallel.deepspeed_config import deepspeed_config

    on_gpu = device == "gpu"
    dtype = dtype or _run_dtype(cfg, on_gpu)
    ds_cfg = ds_cfg if ds_cfg is not None else deepspeed_config(cfg, dtype=dtype, on_gpu=on_gpu)
    z = _zero_settings(ds_cfg)
    c = parameter_counts(model_cfg, cfg, persistence_threshold=z["persistence"])
    t, p = model_cfg.text, cfg.parallel
    N, ep, b = world_size, p.ep_size, dtype.itemsize
    lora = cfg.peft.method == "lora"
    sharded_frozen_experts = lora and ep > 1  # ShardedExperts: E/ep experts whole, outside ZeRO
    plan = Plan(device=device, world_size=N, device_gib=device_gib)
    L = plan.lines

    # ZeRO stage s partitions the optimizer states (s >= 1), gradients (s >= 2) and weights (s = 3)
    n_opt, n_grad, n_w = (N if p.zero_stage >= s else 1 for s in (1, 2, 3))
    zero_params = c.total - (c.expert_base if sharded_frozen_experts else 0)
    L.append(Line(f"weights (ZeRO-{p.zero_stage} share)", ((zero_params - c.persistent) / n_w + c.persistent) * b / GIB,
                  f"{zero_params / 1e9:.2f} B params / {n_w} ranks, {b} B each"))
    if sharded_frozen_experts:
        L.append(Line("EP expert slice (frozen, whole)", c.expert_base / ep * b / GIB,
                      f"{t.num_experts // ep} of {t.num_experts} experts x {c.num_moe_layers} layers"))
    elif ep > 1:
        L.append(Line("EP expert slice", 0.0, f"{t.num_experts // ep} experts per rank, partitioned over "
                      f"{N // ep} EDP ranks: counted in weights/grads/optimizer"))
    L.append(Line("gradients", c.trainable / n_grad * b / GIB, f"{c.trainable / 1e9:.3f} B trainable / {n_grad} ranks"))
    optim_bytes = 12 * c.trainable / n_opt  # fp32 master + Adam m + v
    if p.offload_optimizer:
        plan.host_states_gib = (optim_bytes + 4 * c.trainable / n_opt) / GIB
        L.append(Line("optimizer states", 0.0, "offloaded to host RAM (parallel.offload_optimizer)"))
    else:
        # the step upcasts one sub-group of gradient partitions to fp32 at a time
        step_fp32 = min(z["sub_group"], c.trainable / n_opt) * 4 if b < 4 else 0
        L.append(Line("optimizer states (fp32 master, m, v)", (optim_bytes + step_fp32) / GIB, "AdamW, 12 B per param / ranks"))
    L += slice_lines(cfg, model_cfg, b=b, ep=ep)  # activations and loss (of this rank's slice at sp > 1)
    transient = sum(line.gib for line in L if line.name == BACKWARD_TRANSIENT)
    L += buffer_lines(c, z, b=b, on_gpu=on_gpu, ep=ep, lora=lora, stage3=p.zero_stage == 3, world_size=N,
                      transient_gib=transient)
    if on_gpu:
        L.append(Line("CUDA / NCCL context", CUDA_CONTEXT_GIB, "about 1-3 GB per GPU"))
    plan.load_gib = load_gib(cfg, c, N=N, ep=ep, b=b, tied=model_cfg.tie_word_embeddings)
    if p.offload_params:
        plan.notes.append("parallel.offload_params=true: ZeRO-3 weights live in host RAM; the weights line is an upper bound")
    return plan


def activation_lines(cfg: RootConfig, model_cfg: ModelConfig, *, b: int, ep: int) -> list[Line]:
    """One micro-batch of data.tokens_per_batch tokens on this rank."""
    t, v = model_cfg.text, model_cfg.vision
    T = cfg.data.tokens_per_batch
    patches = 4 * T * cfg.plan.visual_fraction  # each visual token merges 2x2 patches
    heads = (2 * t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim  # q, k, v, attention out
    moe = t.num_experts_per_tok * (2 * t.hidden_size + 4 * t.moe_intermediate_size) if t.num_experts else 4 * t.intermediate_size
    one_layer = T * (4 * t.hidden_size + heads + moe + t.num_experts) * b  # a layer's forward + its backward
    if ep > 1:
        one_layer += 2 * T * t.num_experts_per_tok * (t.hidden_size + 1) * b  # all-to-all send + receive
    vision_layer = patches * (6 * v.hidden_size + 2 * v.intermediate_size) * b  # one block's forward
    blocks_train, mergers_train = vision_trains(cfg)
    # what the tower keeps for backward: with nothing in it trainable its forward builds no graph
    # (measured); with only the mergers training, their inputs, about 3 hidden-wide rows a patch
    # for each merger (a count, not measured); with the blocks training, each block's input
    mergers = patches * (1 + len(v.deepstack_visual_indexes)) * 3 * v.hidden_size * b if mergers_train else 0
    mergers = 0 if blocks_train else mergers
    if cfg.model.activation_checkpointing:
        saved = T * t.num_hidden_layers * (t.hidden_size + t.num_experts) * b  # layer inputs + router logits
        saved += (patches * v.depth * v.hidden_size * b if blocks_train else 0) + mergers
        return [Line("activations (checkpointed)", (saved + max(one_layer, vision_layer)) / GIB,
                     f"{T} tokens: saved layer inputs + one layer recomputed" + _tower_note(blocks_train, mergers_train))]
    layers = one_layer * t.num_hidden_layers
    tower = vision_layer * v.depth if blocks_train else max(vision_layer - layers, 0) + mergers  # frozen: before them
    total = layers + tower
    return [Line("activations (no checkpointing)", total / GIB,
                 f"{T} tokens; model.activation_checkpointing=true keeps one layer's" + _tower_note(blocks_train, mergers_train))]


def vision_trains(cfg: RootConfig) -> tuple[bool, bool]:
    """(the vision blocks train, the mergers train): what makes the vision tower keep activations
    for backward. Frozen (the long-video recipes: LoRA on the text only), the tower's forward
    builds no autograd graph and holds only one block's forward at a time, whatever its depth
    (bench/vision_frozen_peak.py at 2 and 27 blocks; docs/benchmarks.md). A module trained in full
    (peft.modules_to_save) under the visual tower counts as training it."""
    if cfg.peft.method == "lora":
        saved = list(cfg.peft.modules_to_save)
        blocks = cfg.peft.vision or any(m.endswith("visual") or "blocks" in m or "patch_embed" in m for m in saved)
        return blocks, blocks or cfg.peft.merger or any("merger" in m for m in saved)
    blocks = not cfg.optim.freeze_vision
    return blocks, blocks or not cfg.optim.freeze_merger


def _tower_note(blocks_train: bool, mergers_train: bool) -> str:
    if blocks_train:
        return ""
    return "; vision blocks frozen: only the mergers' inputs kept" if mergers_train else "; vision tower frozen: keeps nothing"


# ---- sequence parallelism (parallel.sp_size) ---------------------------------------------------


def slice_lines(cfg: RootConfig, model_cfg: ModelConfig, *, b: int, ep: int) -> list[Line]:
    """Activations and the loss head for the tokens this rank holds. With sequence parallelism
    (sp > 1) a row of data.tokens_per_batch tokens is cut into sp slices: every token-local term
    (layer activations, MoE, the loss head, the saved checkpoints) and the vision tower's patches
    (qvl_train.parallel.sp_vision encodes about 1/sp of them per rank) are those of T/sp tokens,
    and the Ulysses all-to-all adds `ulysses_line`."""
    sp = cfg.parallel.sp_size
    if sp == 1:
        freed = loss_chunk_bytes(cfg, model_cfg, b=b) / GIB
        return [*activation_lines(cfg, model_cfg, b=b, ep=ep), loss_line(cfg, model_cfg, b=b),
                backward_transient_line(cfg, model_cfg, b=b, freed_gib=freed)]
    local = _with(cfg, data={"tokens_per_batch": cfg.data.tokens_per_batch // sp})
    lines = [*activation_lines(local, model_cfg, b=b, ep=ep), loss_line(local, model_cfg, b=b)]
    for line in lines:
        line.note = f"1/{sp} of the row (sp {sp}): {line.note}"
    freed = (loss_chunk_bytes(local, model_cfg, b=b) + ulysses_staging_elems(cfg, model_cfg) * b) / GIB
    return [*lines, ulysses_line(cfg, model_cfg, b=b), backward_transient_line(cfg, model_cfg, b=b, freed_gib=freed)]


def backward_transient_line(cfg: RootConfig, model_cfg: ModelConfig, *, b: int, freed_gib: float) -> Line:
    """What the backward of one decoder layer allocates on top of that layer's saved (or, with
    checkpointing, recomputed) forward tensors, which activation_lines counts: the step's memory
    peak (bench/bench_sp_memory.py). Per rank, for its T = tokens_per_batch / sp tokens:
    - MoE layers: the experts' backward holds, for each of the T x k routed rows, about 4 D-wide
      tensors (the incoming gradient, the input gradients and their accumulation) and 7 I-wide
      ones (the SwiGLU's recomputed activations and gradients, the gate/up gradient): a count
      fitted to bench/sp_memory_phases.py on CPU fp32 at 30B-A3B widths with LoRA on the
      experts, 848 MiB predicted vs 868 measured (2,048 tokens) and 1,696 vs 1,687 MiB (4,096);
      without LoRA (peft none) the 2,048-token rise was the same 868 MiB. Not measured for
      DeepSpeed AutoEP's expert layer (full SFT, ep > 1), which the same count stands for.
    - dense MLP layers: the same with k = 1 and the dense intermediate size;
    - attention: the gradients of the q, k, v and output the kernel saved (with Ulysses: of the
      whole row for this rank's H/sp query and K/sp KV heads) and their all-to-all copies; never
      the larger term for the Qwen3-VL-MoE presets, kept for narrow-expert configs.
    The loss head's logits chunk and the Ulysses staging buffers (`freed_gib`) are freed before a
    layer's backward starts, so this line adds only what exceeds them."""
    t = model_cfg.text
    sp = cfg.parallel.sp_size
    T = cfg.data.tokens_per_batch // sp
    if t.num_experts:
        rows, inter = T * t.num_experts_per_tok, t.moe_intermediate_size
    else:
        rows, inter = T, t.intermediate_size
    mlp = rows * (4 * t.hidden_size + 7 * inter)
    h, k = ulysses_heads(model_cfg, sp) if sp > 1 else (t.num_attention_heads, t.num_key_value_heads)
    attention = 2 * (T * sp) * (2 * h + 2 * k) * t.head_dim
    total = max(mlp, attention) * b / GIB
    return Line(BACKWARD_TRANSIENT, max(total - freed_gib, 0.0),
                f"{rows} {'routed rows' if t.num_experts else 'rows'} x (4 D + 7 I): the experts' backward "
                f"gradients ({total:.2f} GiB) less the loss chunk / all-to-all staging freed before it")


def ulysses_heads(model_cfg: ModelConfig, sp: int) -> tuple[int, int]:
    """(query heads, KV heads) each rank attends with over the whole row: H/sp, and K/sp or, when
    there are fewer KV heads than ranks, one replicated KV head (parallel/sequence.py repeats each
    KV head sp/K times before the all-to-all)."""
    t = model_cfg.text
    return t.num_attention_heads // sp, max(t.num_key_value_heads // sp, 1)


def ulysses_line(cfg: RootConfig, model_cfg: ModelConfig, *, b: int) -> Line:
    """What sequence parallelism adds on a rank, for a row of T tokens:
    - per kept layer (every layer without activation checkpointing, the recomputed one with it):
      q, k, v and the attention output of the WHOLE row for this rank's heads, which the kernel
      saves: T * (2 H/sp + 2 K_local) * Dh;
    - one layer's all-to-all staging on top: the contiguous send copy and the receive buffer of
      the same size;
    - the vision rows' exchange (merger + DeepStack features of this slice's visual tokens, sent
      and received once per step)."""
    t = model_cfg.text
    sp = cfg.parallel.sp_size
    h, k = ulysses_heads(model_cfg, sp)
    kept = 1 if cfg.model.activation_checkpointing else t.num_hidden_layers
    per_layer = _ulysses_per_layer(cfg, model_cfg)
    replicated = f", KV heads replicated x{sp // t.num_key_value_heads}" if t.num_key_value_heads < sp else ""
    return Line("Ulysses all-to-all buffers", (kept * per_layer + ulysses_staging_elems(cfg, model_cfg)) * b / GIB,
                f"whole row x ({h} q + {k} kv heads) for {kept} layer(s) + staging{replicated}")


def _ulysses_per_layer(cfg: RootConfig, model_cfg: ModelConfig) -> int:
    """Elements of one layer's whole-row q, k, v and attention output for this rank's heads."""
    h, k = ulysses_heads(model_cfg, cfg.parallel.sp_size)
    return cfg.data.tokens_per_batch * (2 * h + 2 * k) * model_cfg.text.head_dim


def ulysses_staging_elems(cfg: RootConfig, model_cfg: ModelConfig) -> float:
    """Elements of the all-to-all staging (one layer's send copy and receive buffer) and of the
    vision rows' exchange: live only around the all-to-alls, not during a layer's backward."""
    v, sp = model_cfg.vision, cfg.parallel.sp_size
    visual_rows = cfg.data.tokens_per_batch / sp * cfg.plan.visual_fraction
    vision_exchange = 2 * visual_rows * v.out_hidden_size * (1 + len(v.deepstack_visual_indexes))
    return 2 * _ulysses_per_layer(cfg, model_cfg) + vision_exchange


def sp_tries(cfg: RootConfig, model_cfg: ModelConfig, world_size: int) -> list[tuple[str, RootConfig, int]]:
    """Bigger sp_size values the run could take (for the refusal's suggestions): dividing the world
    and the query heads, KV heads split or replicated evenly, and at most the GPUs of a node
    (LOCAL_WORLD_SIZE, else 8) so the SP all-to-alls stay inside it."""
    t = model_cfg.text
    node = int(os.environ.get("LOCAL_WORLD_SIZE", 8))
    sizes = [s for s in range(cfg.parallel.sp_size + 1, min(world_size, node) + 1)
             if world_size % s == 0 and t.num_attention_heads % s == 0
             and (t.num_key_value_heads % s == 0 or s % t.num_key_value_heads == 0)]
    return [(f"parallel.sp_size={s}", _with(cfg, parallel={"sp_size": s}), world_size) for s in sizes]


def loss_line(cfg: RootConfig, model_cfg: ModelConfig, *, b: int) -> Line:
    """The fused chunked loss head (qvl_train.model.loss): one chunk of fp32 logits and its
    gradient (plus its low-precision copy), the hidden rows' gradient, and, when the head trains,
    the V x D weight gradient it accumulates in fp32 (and keeps in the model dtype). Never rows x V."""
    from qvl_train.model.loss import default_chunk_rows

    V, D = model_cfg.text.vocab_size, model_cfg.text.hidden_size
    rows = int(cfg.data.tokens_per_batch * cfg.plan.supervised_fraction)
    low = b if b < 4 else 0
    chunk = default_chunk_rows(rows, D, V) if rows else 0
    total = loss_chunk_bytes(cfg, model_cfg, b=b) + rows * D * b
    head_trains = cfg.peft.method != "lora" and not cfg.optim.freeze_llm
    if head_trains:
        total += V * D * (4 + low)
    return Line("loss (fused, chunked)", total / GIB,
                f"{rows} supervised rows (plan.supervised_fraction={cfg.plan.supervised_fraction}) in chunks of "
                f"{chunk}" + ("; + the head's fp32 weight gradient" if head_trains else ""))


def loss_chunk_bytes(cfg: RootConfig, model_cfg: ModelConfig, *, b: int) -> int:
    """One chunk of the loss head's fp32 logits and gradient (and low-precision copy): freed once
    the head's backward is done."""
    from qvl_train.model.loss import default_chunk_rows

    V, D = model_cfg.text.vocab_size, model_cfg.text.hidden_size
    rows = int(cfg.data.tokens_per_batch * cfg.plan.supervised_fraction)
    chunk = default_chunk_rows(rows, D, V) if rows else 0
    return chunk * V * (4 + (b if b < 4 else 0))


def buffer_lines(c: Counts, z: dict, *, b: int, on_gpu: bool, ep: int, lora: bool, stage3: bool,
                 world_size: int, transient_gib: float) -> list[Line]:
    autoep = ep > 1 and not lora  # DeepSpeed AutoEP: E/ep experts per rank, ZeRO-3-partitioned over N/ep ranks
    # the experts' base weights ZeRO-3 gathers, in one layer and in all layers: every expert with
    # ep 1; none with LoRA ep > 1 (ShardedExperts: whole, outside ZeRO) or AutoEP with ep = N (each
    # rank's partition of its experts is the whole tensor: bench_plan.py found only the non-expert
    # parameters gathered); a rank's E/ep with AutoEP over N/ep > 1 ranks
    if (lora and ep > 1) or (autoep and world_size // ep == 1):
        layer_experts, all_experts = 0, 0
    else:
        layer_experts, all_experts = c.moe_layer_experts // ep, c.expert_base // ep
    # ZeRO-3 keeps up to max_live_parameters gathered (params it will reuse soon stay gathered);
    # that cap holds back prefetching, not the module being run, so the largest module (the
    # embedding, or a MoE layer's experts) comes on top
    # (LoRA ep 1 on the 30B slice peaks while its 128 experts are gathered; docs/benchmarks.md)
    largest_gather = max(c.largest_module, layer_experts)  # one module's parameters, fetched in one call
    gathered = z["max_live"] + largest_gather + z["prefetch_bucket"]
    # a frozen token embedding is used once per step (its backward needs no weight), so
    # stage3_max_reuse_distance does not keep it: it is never gathered together with the rest
    reusable = max(c.total - c.expert_base + all_experts - c.frozen_input_embedding, largest_gather)
    # the bucket is flushed when a gradient of another partition group comes (AutoEP's experts
    # reduce over their N/ep ranks), so on CPU, where only its touched pages are resident, it holds
    # at most the longest run of one group's gradients: with AutoEP the larger of the non-expert
    # gradients (an upper bound: they come in several runs) and a rank's experts
    run = max(c.trainable - c.expert_base, c.expert_base // ep) if autoep and c.expert_base_trainable else c.trainable
    grad_elems = z["reduce_bucket"] if on_gpu else min(z["reduce_bucket"], run)
    # a module's gradient is whole until DeepSpeed copies it into the bucket (counted above) and
    # frees it
    whole_grad = c.largest_trainable_module // (ep if c.expert_base_trainable else 1)
    lines = [Line("reduce bucket", grad_elems * b / GIB, f"reduce_bucket_size={z['reduce_bucket']:.0e} elements"
                  + ("" if on_gpu else ", the touched part (CPU)")),
             Line("largest module's whole gradient", whole_grad * b / GIB, "before its copy into the bucket")]
    if stage3:
        lines.insert(0, Line("ZeRO-3 gathered params + prefetch", min(gathered, reusable) * b / GIB,
                             f"stage3_max_live_parameters={z['max_live']:.0e}, prefetch {z['prefetch_bucket']:.0e}"))
        if not on_gpu:
            # gloo's all-gather stages its whole output in a flat buffer, then copies it out
            # (bench/gloo_all_gather.py: a 0.5 GiB gather peaks at 1 GiB); NCCL writes in place.
            # The staging is freed when the gather returns, before the gathered module computes,
            # so it never coincides with a layer's backward transient: only what exceeds that
            # counts (LoRA ep 2 at real width peaks at the head's gather in the forward, not
            # at the sum of both; docs/benchmarks.md, "Memory plan vs measured")
            staging = largest_gather * b / GIB
            lines.insert(1, Line("gloo all-gather staging (CPU)", max(staging - transient_gib, 0.0),
                                 f"the largest single gather once more ({staging:.2f} GiB), less the "
                                 "backward transient it never coincides with"))
    return lines


def load_gib(cfg: RootConfig, c: Counts, *, N: int, ep: int, b: int, tied: bool = False) -> float:
    """Host RAM per rank while the weights load (the trainer's build paths, qvl_train.train.trainer)."""
    lora, path = cfg.peft.method == "lora", cfg.model.path
    if not path:  # build_model: the whole model on every rank, then DeepSpeed partitions it
        return c.total * b / GIB
    if not (cfg.parallel.zero_stage == 3 and N > 1 and not tied):
        # from_pretrained(_ep) through safe_open: checkpoint pages a rank reads stay mapped
        # (file-backed RSS) until its shard file is closed
        shard = _largest_shard_bytes(path)
        if lora and ep > 1:  # everything but the experts whole, plus the expert slice
            held = c.total - c.expert_base + c.expert_base / ep
            return (held * b + min(shard, held * 2)) / GIB
        return (c.total * b + shard) / GIB
    # zero3_load: a meta build, then each rank reads only its ZeRO partition (and, with LoRA ep > 1,
    # its frozen expert slice) with plain reads, one tensor at a time; the largest transient is one
    # tensor read whole, or for AutoEP one layer's local experts
    held = (c.total - c.expert_base) / N + c.expert_base / ep if lora and ep > 1 else c.total / N
    transient = max(c.largest_tensor, c.moe_layer_experts // ep if not lora and ep > 1 else 0)
    return (held + transient) * b / GIB


def _largest_shard_bytes(path: str) -> int:
    """The biggest safetensors file of the model dir; 4 GB (the Hub's shards) when it is not here."""
    files = sorted(Path(path).glob("*.safetensors"))
    return max(f.stat().st_size for f in files) if files else 4 * 10**9


def _run_dtype(cfg: RootConfig, on_gpu: bool) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, cfg.model.dtype)


# ---- model config without the weights -------------------------------------------------------


def model_config_for(cfg: RootConfig) -> ModelConfig:
    """config.json of model.path, or the preset; a model.path that is not on this machine (a
    recipe planned elsewhere) falls back to the preset its name contains."""
    from qvl_train.model.io import load_config

    m = cfg.model
    if m.path and (Path(m.path) / "config.json").is_file():
        return load_config(m.path)
    if m.path:
        for name in ("235B-A22B", "30B-A3B"):
            if name.lower() in Path(m.path).name.lower():
                return preset(name)
        raise ValueError(f"model.path={m.path} has no config.json here and names no preset; "
                         "plan it on a machine that has the model dir.")
    return preset(m.preset)


# ---- what the trainer calls -----------------------------------------------------------------


def device_memory_gib(cfg: RootConfig, device: torch.device, local_world_size: int) -> float:
    """What the run's device holds: on CUDA its real total from torch (plan.gpu_mem_gib names a
    recipe's target, not this device); on CPU plan.gpu_mem_gib or host RAM / local ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    if cfg.plan.gpu_mem_gib is not None:
        return cfg.plan.gpu_mem_gib
    return _mem_total_gib() / max(1, local_world_size)


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError("no MemTotal in /proc/meminfo")


def check_plan(cfg: RootConfig, model_cfg: ModelConfig, *, world_size: int, device: torch.device,
               dtype: torch.dtype, ds_cfg: dict, is_main: bool) -> Plan:
    """Print the plan (rank 0) and refuse a run that cannot fit unless plan.enforce=false."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    kind = "gpu" if device.type == "cuda" else "cpu"
    plan = make_plan(cfg, model_cfg, world_size=world_size, device=kind,
                     device_gib=device_memory_gib(cfg, device, local), dtype=dtype, ds_cfg=ds_cfg)
    if is_main:
        print(plan.table(), flush=True)
    if not plan.fits:
        message = refusal(cfg, model_cfg, plan, dtype=dtype)
        if cfg.plan.enforce:
            raise ValueError(message)
        if is_main:
            print(f"WARNING (plan.enforce=false): {message}", flush=True)
    return plan


def refusal(cfg: RootConfig, model_cfg: ModelConfig, plan: Plan, *, dtype: torch.dtype) -> str:
    lines = [f"The memory plan needs {plan.total_gib:.1f} GiB per {'GPU' if plan.device == 'gpu' else 'rank'} "
             f"but the device has {plan.device_gib:.1f} GiB. Knobs that would make it fit:"]
    for knob, new_total in suggestions(cfg, model_cfg, plan, dtype=dtype):
        lines.append(f"  {knob}: {new_total:.1f} GiB")
    lines.append("or set plan.enforce=false to run anyway (on CPU: plan.gpu_mem_gib=... if each rank may use more).")
    return "\n".join(lines)


def suggestions(cfg: RootConfig, model_cfg: ModelConfig, plan: Plan, *, dtype: torch.dtype) -> list[tuple[str, float]]:
    """Single-knob changes (ep_size, sp_size, offload, tokens per batch, more GPUs) and their totals."""
    from qvl_train.parallel.groups import valid_ep_sizes

    N, E = plan.world_size, model_cfg.text.num_experts
    tries: list[tuple[str, RootConfig, int]] = []
    for ep in valid_ep_sizes(N, E):
        if ep > cfg.parallel.ep_size:
            tries.append((f"parallel.ep_size={ep}", _with(cfg, parallel={"ep_size": ep}), N))
    tries += sp_tries(cfg, model_cfg, N)
    if plan.device == "gpu" and not cfg.parallel.offload_optimizer:
        tries.append(("parallel.offload_optimizer=true", _with(cfg, parallel={"offload_optimizer": True}), N))
    tokens = cfg.data.tokens_per_batch // 2
    while tokens >= 1024:
        data = {"tokens_per_batch": tokens, "max_length": min(cfg.data.max_length, tokens)}
        tries.append((f"data.tokens_per_batch={tokens}" + (f" data.max_length={tokens}" if tokens < cfg.data.max_length else ""),
                      _with(cfg, data=data), N))
        tokens //= 2
    unit = "GPUs" if plan.device == "gpu" else "ranks"
    for more in (2 * N, 4 * N):
        tries.append((f"{more} {unit}", cfg, more))
        ep = cfg.parallel.ep_size * more // N
        if ep in valid_ep_sizes(more, E):
            tries.append((f"{more} {unit} with parallel.ep_size={ep}", _with(cfg, parallel={"ep_size": ep}), more))
    out = []
    for knob, new_cfg, world in tries:
        new = make_plan(new_cfg, model_cfg, world_size=world, device=plan.device, device_gib=plan.device_gib, dtype=dtype)
        if new.fits:
            out.append((knob, new.total_gib))
    return out or [("none of ep_size / sp_size / offload / tokens per batch / 4x the GPUs alone", plan.total_gib)]


def _with(cfg: RootConfig, **sections: dict) -> RootConfig:
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})


# ---- command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Plan:
    import argparse

    from qvl_train.config import compose, to_config

    p = argparse.ArgumentParser(description="Per-GPU memory plan of a run (hydra overrides after the options).")
    p.add_argument("--gpus", type=int, default=None, help="world size (default: the recipe's plan.gpus)")
    p.add_argument("--gpu-mem", type=float, default=None, help="GiB (2**30 bytes) per GPU (default: the recipe's plan.gpu_mem_gib)")
    p.add_argument("--cpu", action="store_true", help="plan CPU ranks (fp32, device = host RAM)")
    args, overrides = p.parse_known_args(argv)
    cfg = to_config(compose(overrides))
    gpus = args.gpus or cfg.plan.gpus
    mem = args.gpu_mem or cfg.plan.gpu_mem_gib
    if gpus is None or mem is None:
        raise SystemExit("Pass --gpus and --gpu-mem (this config names no plan.gpus / plan.gpu_mem_gib).")
    model_cfg = model_config_for(cfg)
    device = "cpu" if args.cpu else "gpu"
    dtype = _run_dtype(cfg, not args.cpu)
    plan = make_plan(cfg, model_cfg, world_size=gpus, device=device, device_gib=mem, dtype=dtype)
    print(plan.table())
    if not plan.fits:
        print(refusal(cfg, model_cfg, plan, dtype=dtype))
    return plan


if __name__ == "__main__":
    main(sys.argv[1:])
