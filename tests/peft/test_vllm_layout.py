"""Our adapter's routed-expert LoRA against the 3D fused-MoE LoRA layout vLLM reads for
Qwen3VLMoeForConditionalGeneration, checked offline against vLLM's own sources (vllm-project/vllm):

- vllm/model_executor/models/qwen3_vl_moe.py @ 055e47c28003156421365af985d676fc921cb075:
  `Qwen3VLMoeForConditionalGeneration.is_3d_moe_weight = True`, so its expert LoRA goes through
  FusedMoE3DWithLoRA and `_stack_moe_lora_weights`; its weights mapper (from Qwen3VL) turns
  `model.language_model.` into `language_model.model.`.
- vllm/lora/lora_model.py @ 0306474e9d1f26d8717aad457b9511f0c9e57d60: `from_local_checkpoint`
  accepts `...experts.base_layer` keys: "PEFT file format where experts.base_layer is the
  gate_up_proj and experts is the down_proj".
- vllm/lora/model_manager.py @ 01533aa8f9c07da9766323fbaf4c8b81bb2aa958 (`_stack_moe_lora_weights`,
  `_convert_3d_to_2d_moe_lora`): `{module}.base_layer.lora_{A,B}` = gate_up_proj with shapes
  (r*E, hidden) / (2*I, r*E); `{module}.lora_{A,B}` = down_proj with (r*E, I) / (hidden, r*E);
  A is read as reshape(E, r, in), B as reshape(out, r, E).permute(2, 0, 1); both must be present;
  the gate_up B rows are the gate half then the up half (only GPT-OSS interleaves).
- vllm/lora/layers/fused_moe.py @ 0002540ca51cbfdaf47fac94d875123ca6f30608: FusedMoE3DWithLoRA
  holds w13 B as (E, 2*I, r) and w2 B as (E, hidden, r).

The test reads our adapter file the way that code does and checks that each expert's delta
equals the one our model trained (the merge), so a layout change on either side shows here.
"""

import json
import re

import torch
from safetensors import safe_open

from qvl_train.model import build_model
from qvl_train.peft import LoraSettings, apply_lora, merge_lora, save_adapter

from ..model.reference import tiny_config

PREFIX = "base_model.model."
EXPERT_KEY = re.compile(r"model\.language_model\.layers\.(\d+)\.mlp\.experts(\.base_layer)?\.lora_([AB])\.weight")


def _vllm_module(key: str) -> str:
    """vLLM's module name for an adapter key (parse_fine_tuned_lora_name + Qwen3VL's mapper)."""
    name = key.removeprefix(PREFIX).replace("model.language_model.", "language_model.model.", 1)
    return name.rsplit(".lora_", 1)[0]


def _vllm_expert_delta(a: torch.Tensor, b: torch.Tensor, num_experts: int, scaling: float) -> torch.Tensor:
    """(E, out, in) per-expert delta as vLLM stacks the 3D tensors."""
    a_eri = a.reshape(num_experts, -1, a.shape[-1])
    b_eor = b.reshape(b.shape[0], -1, num_experts).permute(2, 0, 1)
    return scaling * torch.bmm(b_eor, a_eri)


def test_expert_lora_keys_shapes_and_deltas_match_vllm_3d_moe_layout(tmp_path):
    cfg = tiny_config()
    t = cfg.text
    E, H, I = t.num_experts, t.hidden_size, t.moe_intermediate_size
    model = build_model(cfg).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraSettings(rank=4, alpha=8, targets=("attention", "experts")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, tmp_path, base_model_name_or_path="base")
    adapter_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    r, scaling = adapter_cfg["r"], adapter_cfg["lora_alpha"] / adapter_cfg["r"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    merged = merge_lora(model).state_dict()

    expert_keys = [k for k in tensors if ".experts" in k]
    moe_layers = [i for i in range(t.num_hidden_layers) if i not in t.mlp_only_layers]
    assert len(expert_keys) == 4 * len(moe_layers)
    for layer in moe_layers:
        module = f"{PREFIX}model.language_model.layers.{layer}.mlp.experts"
        shapes = {name: tuple(tensors[f"{module}{name}.weight"].shape) for name in
                  (".base_layer.lora_A", ".base_layer.lora_B", ".lora_A", ".lora_B")}
        assert shapes == {".base_layer.lora_A": (r * E, H), ".base_layer.lora_B": (2 * I, r * E),
                          ".lora_A": (r * E, I), ".lora_B": (H, r * E)}
        assert _vllm_module(f"{module}.lora_A.weight") == f"language_model.model.layers.{layer}.mlp.experts"
        assert _vllm_module(f"{module}.base_layer.lora_A.weight").endswith("mlp.experts.base_layer")
        for name, param in ((".base_layer", "gate_up_proj"), ("", "down_proj")):
            delta = _vllm_expert_delta(tensors[f"{module}{name}.lora_A.weight"], tensors[f"{module}{name}.lora_B.weight"],
                                       E, scaling)
            key = f"model.language_model.layers.{layer}.mlp.experts.{param}"  # transformers' (E, out, in)
            torch.testing.assert_close(delta, merged[key] - base[key], atol=1e-6, rtol=0)
            assert delta.abs().max() > 1e-3
    assert all(EXPERT_KEY.fullmatch(k.removeprefix(PREFIX)) for k in expert_keys)
