"""Our LoRA -> PEFT files -> transformers + PeftModel (equal logits), attention-only export,
reload into ours, merge (in process and via launch/export.py) -> transformers equal logits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import Qwen3VLMoeForConditionalGeneration

from qvl_train.model import build_model, save_pretrained
from qvl_train.peft import (
    LoraSettings,
    apply_lora,
    load_adapter,
    merge_lora,
    save_adapter,
)

from ..model.reference import hf_twin, make_batch, ours_kwargs, tiny_config

ROOT = Path(__file__).resolve().parents[2]
ALL = ("attention", "dense_mlp", "experts", "router", "vision", "merger")
ROWS = [[3, ("image", (1, 4, 6)), 2, ("video", (2, 2, 4)), 5], [7, ("image", (1, 4, 4)), 4]]
ATOL = 2e-5


def _cfg():
    return tiny_config(mlp_only_layers=[1])  # one dense layer, so dense_mlp targets exist


def _perturb(model, seed=1, scale=0.05):
    """Training-like weights: every trainable tensor (LoRA B included) moved off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _logits(model, batch, hf=False):
    with torch.no_grad():
        out = model(**batch).logits if hf else model(**ours_kwargs(batch)).logits
    return out[batch["attention_mask"].bool()]  # padded positions are garbage in both


def _keys(path):
    with safe_open(str(Path(path) / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(cfg, base model copy for transformers, LoRA model with all targets + lm_head, batch, adapter dir)."""
    cfg = _cfg()
    base = build_model(cfg).eval()
    model = build_model(cfg).eval()
    apply_lora(model, LoraSettings(rank=4, alpha=8, dropout=0.1, targets=ALL, modules_to_save=("lm_head",)))
    _perturb(model)
    out = tmp_path_factory.mktemp("adapter")
    save_adapter(model, out, base_model_name_or_path="tiny-base")
    return cfg, base, model, make_batch(cfg, ROWS), out


def test_peft_roundtrip_all_targets_equal_logits(trained):
    cfg, base, model, batch, adapter = trained
    ours = _logits(model, batch)
    assert (ours - _logits(base, batch)).abs().max() > 0.05  # the adapter matters
    peft_model = PeftModel.from_pretrained(hf_twin(base), adapter).eval()
    torch.testing.assert_close(_logits(peft_model, batch, hf=True), ours, atol=ATOL, rtol=0)
    # every part is really adapted on the transformers side
    names = {n for n, _ in peft_model.named_parameters()}
    for part in ("self_attn.q_proj.lora_A", "mlp.gate_proj.lora_A", "mlp.experts.base_layer.lora_A",
                 "mlp.experts.lora_B", "mlp.gate.lora_A", "visual.blocks.0.attn.qkv.lora_A",
                 "visual.merger.linear_fc1.lora_A", "deepstack_merger_list.1.linear_fc2.lora_B",
                 "lm_head.modules_to_save"):
        assert any(part in n for n in names), part


def test_files_match_what_peft_itself_saves(trained, tmp_path):
    """Same key names and shapes as PEFT's get_peft_model(...).save_pretrained with our config."""
    cfg, base, model, batch, adapter = trained
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]
    assert config["base_model_name_or_path"] == "tiny-base" and config["lora_dropout"] == 0.0
    ref = get_peft_model(hf_twin(base), LoraConfig(**{k: config[k] for k in (
        "r", "lora_alpha", "target_modules", "target_parameters", "modules_to_save")}))
    ref.save_pretrained(tmp_path)
    assert _keys(adapter) == _keys(tmp_path)
    t = cfg.text
    E, D, I, r = t.num_experts, t.hidden_size, t.moe_intermediate_size, 4
    keys = _keys(adapter)
    p = "base_model.model.model.language_model.layers.0.mlp.experts."
    assert keys[p + "base_layer.lora_A.weight"] == (r * E, D) and keys[p + "base_layer.lora_B.weight"] == (2 * I, r * E)
    assert keys[p + "lora_A.weight"] == (r * E, I) and keys[p + "lora_B.weight"] == (D, r * E)


def test_load_adapter_into_ours_reproduces_logits(trained):
    cfg, base, model, batch, adapter = trained
    fresh = build_model(cfg).eval()
    load_adapter(fresh, adapter)
    torch.testing.assert_close(_logits(fresh, batch), _logits(model, batch), atol=1e-6, rtol=0)


def test_attention_only_export(trained, tmp_path):
    cfg, base, model, batch, _ = trained
    save_adapter(model, tmp_path, base_model_name_or_path="tiny-base", attention_only=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert not config["target_parameters"] and not config["modules_to_save"]
    keys = _keys(tmp_path)
    assert keys and all((".self_attn." in k or ".mlp.gate_proj." in k or ".mlp.up_proj." in k or ".mlp.down_proj." in k)
                        and "visual" not in k for k in keys)
    # equals our model with only the text attention / dense adapters kept
    expected = build_model(cfg).eval()
    apply_lora(expected, LoraSettings(rank=4, alpha=8, targets=("attention", "dense_mlp")))
    src = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in expected.named_parameters():
            if ".lora_" in n:
                p.copy_(src[n])
    peft_model = PeftModel.from_pretrained(hf_twin(base), tmp_path).eval()
    torch.testing.assert_close(_logits(peft_model, batch, hf=True), _logits(expected, batch), atol=ATOL, rtol=0)


def test_merge_in_place_equals_adapter_and_restores_plain_modules(trained):
    cfg, base, model, batch, adapter = trained
    merged = load_adapter(build_model(cfg).eval(), adapter)
    before = _logits(merged, batch)
    merge_lora(merged)
    assert not any(".lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    assert set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(_logits(merged, batch), before, atol=ATOL, rtol=0)


def test_export_cli_merged_checkpoint_loads_in_transformers(trained, tmp_path):
    cfg, base, model, batch, adapter = trained
    base_dir, out = tmp_path / "base", tmp_path / "merged"
    save_pretrained(base, base_dir, max_shard_bytes=300_000)
    (base_dir / "tokenizer_config.json").write_text("{}")
    res = subprocess.run([sys.executable, str(ROOT / "launch/export.py"), "--base", str(base_dir), "--adapter",
                          str(adapter), "--out", str(out), "--max-shard-gb", "0.0003"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "tokenizer_config.json").exists() and (out / "model.safetensors.index.json").exists()
    hf_merged = Qwen3VLMoeForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    peft_model = PeftModel.from_pretrained(hf_twin(base), adapter).eval()
    torch.testing.assert_close(_logits(hf_merged, batch, hf=True), _logits(peft_model, batch, hf=True), atol=ATOL, rtol=0)
