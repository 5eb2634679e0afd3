"""LoRA for our Qwen3-VL-MoE: which parts get adapters, injecting them, counting what trains.

nn.Linear targets (attention, dense MLP, vision, merger) use PEFT's own `lora.Linear` through
`inject_adapter_in_model`: it is the reference implementation (init, dropout, rslora, merge) and
gives exactly the parameter names PEFT saves and serving stacks load, and under ZeRO-3 it runs
the adapters through nn.Linear forwards, so no gather hooks are needed. The fused 3D experts and
the router get our own modules (experts.py) with PEFT's names and layout but a per-expert-group
computation instead of PEFT's per-forward full delta.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from qvl_train.model.moe import MoEBlock, Router

from .experts import ADAPTER, ExpertLora, RouterLora

if TYPE_CHECKING:
    from qvl_train.config.schema import PeftSection

TARGETS = ("attention", "dense_mlp", "experts", "router", "vision", "merger")

_LINEAR_PATTERNS = {
    "attention": r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "dense_mlp": r"model\.language_model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)",
    "vision": r"model\.visual\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.linear_fc1|mlp\.linear_fc2)",
    "merger": r"model\.visual\.(merger|deepstack_merger_list\.\d+)\.(linear_fc1|linear_fc2)",
}
EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # GroupedExperts' parameter order = PEFT's nesting order


@dataclass
class LoraSettings:
    """rank/alpha apply to every target; dropout only to the nn.Linear targets (PEFT cannot apply
    dropout on `target_parameters`, and neither do we on experts or router).

    targets: any of attention (q/k/v/o), dense_mlp (gate/up/down of dense decoder layers),
    experts (gate_up and down of every routed expert), router (mlp.gate), vision (ViT blocks:
    attn.qkv, attn.proj, mlp.linear_fc1/2), merger (merger + DeepStack mergers).
    modules_to_save: module names (or dotted suffixes, PEFT's matching) trained in full,
    e.g. ["lm_head"]; trained in place (no copy) and exported as PEFT modules_to_save."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention", "dense_mlp", "experts")
    modules_to_save: tuple[str, ...] = ()
    use_rslora: bool = False

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        self.modules_to_save = tuple(self.modules_to_save)
        unknown = set(self.targets) - set(TARGETS)
        if unknown:
            raise ValueError(f"Unknown LoRA targets {sorted(unknown)}; choose from {TARGETS}.")
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}.")

    @classmethod
    def from_section(cls, peft: PeftSection) -> LoraSettings:
        """The settings a run's `peft:` config section asks for (one target per true flag)."""
        flags = {"attention": peft.attention, "dense_mlp": peft.dense_mlp, "experts": peft.experts,
                 "router": peft.router, "vision": peft.vision, "merger": peft.merger}
        return cls(rank=peft.rank, alpha=peft.alpha, dropout=peft.dropout,
                   targets=tuple(k for k, v in flags.items() if v), modules_to_save=tuple(peft.modules_to_save))


@dataclass
class LoraPlan:
    """Exactly which modules get adapters (built from settings, or from an adapter's keys)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    linear: list[str] = field(default_factory=list)
    experts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # experts module -> adapted params
    router: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)


def plan_from_settings(model: nn.Module, settings: LoraSettings) -> LoraPlan:
    plan = LoraPlan(settings.rank, settings.alpha, settings.dropout, settings.use_rslora)
    pattern = "|".join(f"(?:{_LINEAR_PATTERNS[t]})" for t in settings.targets if t in _LINEAR_PATTERNS)
    for name, module in model.named_modules():
        if pattern and isinstance(module, nn.Linear) and re.fullmatch(pattern, name):
            plan.linear.append(name)
        if isinstance(module, MoEBlock):
            if "experts" in settings.targets:
                plan.experts[f"{name}.experts"] = EXPERT_PARAMS
            if "router" in settings.targets:
                plan.router.append(f"{name}.gate")
    plan.modules_to_save = _match_modules(model, settings.modules_to_save)
    return plan


def _match_modules(model: nn.Module, suffixes) -> list[str]:
    names = []
    for name, _ in model.named_modules():
        if name and any(name == s or name.endswith("." + s) for s in suffixes):
            names.append(name)
    missing = [s for s in suffixes if not any(n == s or n.endswith("." + s) for n in names)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of the model.")
    return names


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Freeze the model and add LoRA adapters (in place; returns the model)."""
    plan = plan_from_settings(model, settings)
    apply_plan(model, plan)
    model.lora_settings = settings
    return model


def apply_plan(model: nn.Module, plan: LoraPlan) -> nn.Module:
    if getattr(model, "lora_plan", None) is not None:
        raise ValueError("This model already has LoRA adapters (merge_lora it first).")
    for p in model.parameters():
        p.requires_grad_(False)
    if plan.linear:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=plan.rank, lora_alpha=plan.alpha, lora_dropout=plan.dropout, use_rslora=plan.use_rslora,
            target_modules=list(plan.linear),
        )
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        if hasattr(model, "peft_config"):  # PEFT leaves its config dict on the model; we keep our plan
            del model.peft_config
    for name, params in plan.experts.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        experts = getattr(parent, child)
        if not all(isinstance(getattr(experts, p, None), torch.Tensor) for p in EXPERT_PARAMS):
            raise TypeError(f"{name} is {type(experts).__name__}, not an experts module (GroupedExperts, ShardedExperts).")
        wrapped: nn.Module = experts
        for p in EXPERT_PARAMS:  # gate_up first (inner), as PEFT nests them
            if p in params:
                wrapped = ExpertLora(wrapped, p, r=plan.rank, alpha=plan.alpha, num_experts=parent.num_experts,
                                     use_rslora=plan.use_rslora)
        setattr(parent, child, wrapped)
    for name in plan.router:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        router = getattr(parent, child)
        if not isinstance(router, Router):
            raise TypeError(f"{name} is {type(router).__name__}, not Router.")
        setattr(parent, child, RouterLora(router, r=plan.rank, alpha=plan.alpha, use_rslora=plan.use_rslora))
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.requires_grad_(True)
    for name in plan.modules_to_save:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model.lora_plan = plan
    model.train(model.training)  # new modules (PEFT's dropout) start in train mode: follow the model's
    return model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


# ---- trainable parameter report -----------------------------------------------------------------

PARTS = ("vision", "merger", "attention", "experts", "router", "other")


def part_of(name: str) -> str:
    if name.startswith("model.visual."):
        return "merger" if (".merger." in name or ".deepstack_merger_list." in name) else "vision"
    if ".self_attn." in name:
        return "attention"
    if ".mlp.experts." in name:
        return "experts"
    if ".mlp.gate." in name or ".mlp.router." in name:  # ours / DeepSpeed AutoEP's layer
        return "router"
    return "other"  # embeddings, norms, lm_head, dense MLPs


class ParameterReport(dict):
    """{part: trainable parameter count}; `.total` holds all parameters per part, str() a table."""

    def __init__(self, trainable: dict[str, int], total: dict[str, int]) -> None:
        super().__init__(trainable)
        self.total = total

    def table(self) -> str:
        rows = [f"{'part':<10} {'trainable':>15} {'total':>15} {'%':>8}"]
        for part in PARTS + ("all",):
            t = sum(self.values()) if part == "all" else self[part]
            n = sum(self.total.values()) if part == "all" else self.total[part]
            rows.append(f"{part:<10} {t:>15,} {n:>15,} {100 * t / max(n, 1):>7.3f}%")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def trainable_parameter_report(model: nn.Module) -> ParameterReport:
    """Trainable (and total) parameter counts by part; shared tensors count once."""
    trainable, total = dict.fromkeys(PARTS, 0), dict.fromkeys(PARTS, 0)
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions keep the full size here
        part = part_of(name)
        total[part] += n
        if p.requires_grad:
            trainable[part] += n
    return ParameterReport(trainable, total)
