"""LoRA for Qwen3-VL-MoE that reaches the routed experts: injection, PEFT-format export, merge.

    model = apply_lora(model, LoraSettings(rank=16, alpha=32, targets=("attention", "experts")))
    print(trainable_parameter_report(model))           # trainable counts by part (a dict; str() = table)
    save_adapter(model, out_dir, base_model_name_or_path="Qwen/Qwen3-VL-30B-A3B-Instruct")
    merge_lora(model)                                   # fold adapters into the base weights in place
"""

from .experts import (
    ExpertLora,
    RouterLora,
    lora_experts_swiglu,
    zero3_leaf_module_classes,
)
from .export import load_adapter, merge_lora, save_adapter
from .lora import (
    PARTS,
    TARGETS,
    LoraPlan,
    LoraSettings,
    ParameterReport,
    apply_lora,
    lora_parameters,
    plan_from_settings,
    trainable_parameter_report,
)

__all__ = [
    "PARTS",
    "TARGETS",
    "ExpertLora",
    "LoraPlan",
    "LoraSettings",
    "ParameterReport",
    "RouterLora",
    "apply_lora",
    "load_adapter",
    "lora_experts_swiglu",
    "lora_parameters",
    "merge_lora",
    "plan_from_settings",
    "save_adapter",
    "trainable_parameter_report",
    "zero3_leaf_module_classes",
]
