"""Hub-format weights in and out, both expert layouts and both config spellings, presets."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen3VLMoeForConditionalGeneration

from qvl_train.model import ModelConfig, build_model, count_parameters, from_pretrained, save_pretrained

from .reference import make_batch, ours_kwargs, pair, tiny_config

ROWS = [[3, ("image", (1, 4, 6)), 2, ("video", (2, 2, 4)), 5]]


def _shapes(path):
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    shapes = {}
    for f in files:
        with safe_open(str(path / f), "pt") as st:
            shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    return shapes


def test_our_export_loads_in_transformers_with_equal_logits(tmp_path):
    cfg = tiny_config()
    model = build_model(cfg).eval()
    save_pretrained(model, tmp_path, max_shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    shapes = _shapes(tmp_path)
    t = cfg.text
    assert shapes["model.language_model.layers.0.mlp.experts.gate_up_proj"] == (t.num_experts, t.hidden_size, 2 * t.moe_intermediate_size)
    assert shapes["model.language_model.layers.0.mlp.experts.down_proj"] == (t.num_experts, t.moe_intermediate_size, t.hidden_size)
    assert shapes["model.visual.patch_embed.proj.weight"] == (cfg.vision.hidden_size, 3, 2, 16, 16)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "num_experts" in written["text_config"] and "rope_scaling" in written["text_config"]
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    batch = make_batch(cfg, ROWS)
    with torch.no_grad():
        torch.testing.assert_close(model(**ours_kwargs(batch)).logits, hf(**batch).logits, atol=1e-4, rtol=0)


def test_transformers_export_loads_in_ours_with_equal_logits(tmp_path):
    cfg = tiny_config()
    model, hf = pair(cfg, seed=3)
    hf.save_pretrained(tmp_path)
    hf_written = json.loads((tmp_path / "config.json").read_text())["text_config"]
    # transformers 5 writes its own spelling and its in-memory expert layout [E, 2I, D]
    assert hf_written["num_local_experts"] == cfg.text.num_experts and "rope_parameters" in hf_written
    t = cfg.text
    gate_up = _shapes(tmp_path)["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up == (t.num_experts, 2 * t.moe_intermediate_size, t.hidden_size)
    loaded = from_pretrained(tmp_path).eval()
    batch = make_batch(cfg, ROWS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ours_kwargs(batch)).logits, hf(**batch).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_both_expert_layouts_load(tmp_path, layout):
    cfg = tiny_config()
    model = build_model(cfg).eval()
    save_pretrained(model, tmp_path)
    if layout == "transformers5":  # rewrite the experts the way transformers 5 saves them
        _transpose_experts(tmp_path / "model.safetensors")
    loaded = from_pretrained(tmp_path)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def _transpose_experts(file):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    for k in tensors:
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            tensors[k] = tensors[k].transpose(1, 2).contiguous()
    save_file(tensors, str(file))


def test_ambiguous_expert_shape_is_refused_unless_layout_given(tmp_path):
    cfg = tiny_config(moe_intermediate_size=64)  # I == hidden_size: down_proj reads both ways
    model = build_model(cfg)
    save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="expert_layout='hub'"):
        from_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path, expert_layout="hub")
    name = "model.language_model.layers.1.mlp.experts.down_proj"
    assert torch.equal(loaded.state_dict()[name], model.state_dict()[name])


def test_both_config_spellings_read_the_same():
    cfg = tiny_config()
    hub = cfg.to_hf_dict()
    t5 = json.loads(json.dumps(hub))
    text = t5["text_config"]
    text["num_local_experts"] = text.pop("num_experts")
    text["rope_parameters"] = {**text.pop("rope_scaling"), "rope_theta": text.pop("rope_theta")}
    assert ModelConfig.from_hf_dict(hub) == ModelConfig.from_hf_dict(t5) == cfg


def test_missing_rope_theta_is_refused():
    hub = tiny_config().to_hf_dict()
    del hub["text_config"]["rope_theta"]
    with pytest.raises(ValueError, match="rope_theta"):
        ModelConfig.from_hf_dict(hub)


def test_tied_embeddings_round_trip(tmp_path):
    cfg = tiny_config().replace(tie_word_embeddings=True)
    model = build_model(cfg).eval()
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    save_pretrained(model, tmp_path)
    assert "lm_head.weight" not in _shapes(tmp_path)
    loaded = from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    batch = make_batch(cfg, ROWS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ours_kwargs(batch)).logits, hf(**batch).logits, atol=1e-4, rtol=0)


def test_real_presets_parameter_counts_on_meta():
    m30 = build_model("30B-A3B", device="meta", dtype=torch.bfloat16)
    assert count_parameters(m30) == 31_070_754_032
    m235 = build_model("235B-A22B", device="meta", dtype=torch.bfloat16)
    # the 235B text stack equals Qwen3-235B-A22B's published tensor total (470,187,269,120 bf16 bytes)
    text = count_parameters(m235.model.language_model) + m235.lm_head.weight.numel()
    assert text == 235_093_634_560
    assert all(p.device.type == "meta" for p in m235.parameters())
