"""LoRA adapters in PEFT's file format (for transformers + PeftModel, vLLM, SGLang), loading them
back into our model, and merging adapters into the base weights.

Files: adapter_config.json (written by PEFT's own LoraConfig) + adapter_model.safetensors with
PEFT's saved key names: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (the
adapter name dropped), full-trained modules under their plain names
(`base_model.model.lm_head.weight`). Expert LoRA uses `target_parameters`
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`; router `mlp.gate.weight`) with keys
`...mlp.experts.base_layer.lora_A.weight` (gate_up) and `...mlp.experts.lora_A.weight` (down)
when both are adapted, in PEFT's [r*E, in] / [out, r*E] layout (experts.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .experts import ADAPTER, ExpertLora, RouterLora
from .lora import _LINEAR_PATTERNS, EXPERT_PARAMS, LoraPlan, _match_modules, apply_plan

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_TEXT_LINEAR = re.compile(f"(?:{_LINEAR_PATTERNS['attention']})|(?:{_LINEAR_PATTERNS['dense_mlp']})")


def _saved_key(name: str) -> str:
    return PREFIX + name.replace(f".lora_A.{ADAPTER}.", ".lora_A.").replace(f".lora_B.{ADAPTER}.", ".lora_B.")


def _plan_of(model: nn.Module) -> LoraPlan:
    plan = getattr(model, "lora_plan", None)
    if plan is None:
        raise ValueError("The model has no LoRA adapters (apply_lora or load_adapter first).")
    return plan


def _target_modules(model: nn.Module, linear: list[str]) -> list[str]:
    """Short names (q_proj, ...) when they select exactly these modules (what vLLM/SGLang parse
    best), else the full module names (PEFT matches either exactly)."""
    short = {n.rpartition(".")[2] for n in linear}
    hits = {
        n for n, _ in model.named_modules()
        if n.rpartition(".")[2] in short and ".lora_" not in n and not n.endswith("base_layer")
    }
    return sorted(short) if hits == set(linear) else sorted(linear)


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None,
    attention_only: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors that
    `PeftModel.from_pretrained(Qwen3VLMoeForConditionalGeneration, out_dir)` loads.

    attention_only: export only the text attention and dense-MLP adapters (for stacks that
    cannot load expert/router/vision LoRA, e.g. vLLM); the other trained adapters are dropped,
    so the exported adapter is NOT the trained model (a warning says which parts were dropped).
    state_dict: our parameter names -> full tensors (e.g. gathered from ZeRO-3); default: the
    model's own parameters.
    """
    plan = _plan_of(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    linear = [n for n in plan.linear if not attention_only or _TEXT_LINEAR.fullmatch(n)]
    keep_modules = set(linear)
    if not attention_only:
        keep_modules |= set(plan.router)
        for name, params in plan.experts.items():
            keep_modules |= {name + ".base_layer" * i for i in range(len(params))}
    tensors: dict[str, torch.Tensor] = {}
    for name, t in source.items():
        if ".lora_A." in name or ".lora_B." in name:
            module = name.split(".lora_")[0]
            if module in keep_modules:
                tensors[_saved_key(name)] = t
    mts = [] if attention_only else list(plan.modules_to_save)
    for m in mts:
        for pname in (n for n in source if n.startswith(m + ".")):
            tensors[PREFIX + pname] = source[pname]
    if attention_only:
        parts = {"experts": plan.experts, "router": plan.router, "modules_to_save": plan.modules_to_save,
                 "vision/merger": len(linear) < len(plan.linear)}
        dropped = [part for part, present in parts.items() if present]
        if dropped:
            log.warning("attention_only export drops the trained %s adapters: the served model differs from the "
                        "trained one.", ", ".join(dropped))
    if not tensors:
        raise ValueError("Nothing to export: the selection holds no adapter weights.")
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})

    from peft import LoraConfig

    target_parameters = []
    if not attention_only:
        params = sorted({p for ps in plan.experts.values() for p in ps}, key=EXPERT_PARAMS.index)
        target_parameters = [f"mlp.experts.{p}" for p in params] + (["mlp.gate.weight"] if plan.router else [])
    config = LoraConfig(
        r=plan.rank,
        lora_alpha=plan.alpha,
        # PEFT refuses dropout on target_parameters, even for inference; dropout is train-only anyway
        lora_dropout=0.0 if target_parameters else plan.dropout,
        use_rslora=plan.use_rslora,
        target_modules=_target_modules(model, linear) if linear else [],
        target_parameters=target_parameters or None,
        modules_to_save=mts or None,
        base_model_name_or_path=base_model_name_or_path,
        task_type="CAUSAL_LM",
        bias="none",
    )
    config.save_pretrained(str(out))
    return out


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Add the adapters of a PEFT-format LoRA directory (ours, or PEFT-on-transformers with the
    same targets) to our model, with their weights. Returns the model."""
    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / CONFIG_FILE).read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{adapter_dir} holds a {cfg.get('peft_type')} adapter, not LoRA.")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise NotImplementedError(f"Adapters with {key} are not supported.")
    if cfg.get("use_dora") or cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
        raise NotImplementedError("DoRA / LoRA biases are not supported.")
    with safe_open(str(adapter_dir / WEIGHTS_FILE), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {(k.removeprefix(PREFIX)): v for k, v in tensors.items()}

    expert_params = [p for p in EXPERT_PARAMS if f"mlp.experts.{p}" in (cfg.get("target_parameters") or [])]
    # PEFT nests one wrapper per targeted param, the last in parameter order outermost
    by_path = {".base_layer" * (len(expert_params) - 1 - i): p for i, p in enumerate(expert_params)}
    plan = LoraPlan(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout") or 0.0),
                    use_rslora=bool(cfg.get("use_rslora")))
    modules = set()
    for key in tensors:
        if ".lora_A." in key or ".lora_B." in key:
            modules.add(key.split(".lora_")[0])
    for m in sorted(modules):
        hit = re.fullmatch(r"(.*\.mlp\.experts)((?:\.base_layer)*)", m)
        if hit:
            if hit.group(2) not in by_path:
                raise ValueError(f"{m}: cannot tell which expert parameter this adapter is for.")
            plan.experts.setdefault(hit.group(1), ())
            plan.experts[hit.group(1)] += (by_path[hit.group(2)],)
        elif m.endswith(".mlp.gate"):
            plan.router.append(m)
        else:
            plan.linear.append(m)
    plan.experts = {k: tuple(p for p in EXPERT_PARAMS if p in v) for k, v in plan.experts.items()}
    plan.modules_to_save = _match_modules(model, cfg.get("modules_to_save") or [])
    apply_plan(model, plan)

    params = dict(model.named_parameters())
    loaded = set()
    for key, tensor in tensors.items():
        name = key.replace(".lora_A.", f".lora_A.{ADAPTER}.").replace(".lora_B.", f".lora_B.{ADAPTER}.")
        if name not in params:
            raise ValueError(f"{adapter_dir}: adapter tensor {key!r} matches no parameter of the model.")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(f"{key}: adapter shape {tuple(tensor.shape)} != model {tuple(params[name].shape)}.")
        with torch.no_grad():
            params[name].copy_(tensor)
        loaded.add(name)
    missing = [n for n in params if (".lora_A." in n or ".lora_B." in n) and n not in loaded]
    if missing:
        raise ValueError(f"{adapter_dir} lacks {len(missing)} adapter tensors, e.g. {missing[:3]}.")
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place, and remove the adapter modules.

    Linear layers: PEFT's own merge (one [out, in] delta per layer). Experts: one expert's
    [out, in] delta at a time, never an [E, out, in] tensor. Full-trained modules stay as they are.
    """
    from peft.tuners.lora import LoraLayer

    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            module.merge()
            replacements.append((name, module.get_base_layer()))
        elif isinstance(module, ExpertLora) and not name.endswith(".base_layer"):
            base, loras = module.chain()
            for lora in loras.values():
                lora.merge_into_base()
            replacements.append((name, base))
        elif isinstance(module, RouterLora):
            module.merge_into_base()
            replacements.append((name, module.base_layer))
    for name, base in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    for attr in ("lora_plan", "lora_settings", "peft_config"):
        if attr in vars(model):
            delattr(model, attr)
    return model
