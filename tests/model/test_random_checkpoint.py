"""The random real-format checkpoint writer: Hub layout and sharding, loads in ours and in
transformers with equal logits, tokenizer ids equal the config's, the data pipeline runs on it."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import Qwen3VLMoeForConditionalGeneration

from qvl_train.data import encode_sample, load_tokenizer
from qvl_train.model import from_pretrained, preset
from qvl_train.model.random_checkpoint import cut_config, main, tensor_specs, write_random_checkpoint

from .reference import make_batch, ours_kwargs

ROWS = [[3, ("image", (1, 4, 6)), 2, ("video", (2, 2, 4)), 5]]


def _file_shapes(path):
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shapes = {}
    for f in sorted(set(weight_map.values())):
        with safe_open(str(path / f), "pt") as st:
            shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    assert set(shapes) == set(weight_map)
    return shapes, len(set(weight_map.values()))


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_tiny_dir_is_sharded_and_loads_in_ours_and_transformers_with_equal_logits(tmp_path, layout):
    main(["--preset", "tiny", "--out", str(tmp_path), "--shard-size", "300KB", "--layout", layout, "--seed", "3"])
    cfg, t = preset("tiny"), preset("tiny").text
    shapes, num_files = _file_shapes(tmp_path)
    assert num_files > 1
    gate_up = shapes["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    hub_shape, t5_shape = (t.num_experts, t.hidden_size, 2 * t.moe_intermediate_size), (t.num_experts, 2 * t.moe_intermediate_size, t.hidden_size)
    assert gate_up == (hub_shape if layout == "hub" else t5_shape)
    text_cfg = json.loads((tmp_path / "config.json").read_text())["text_config"]
    assert ("num_experts" in text_cfg) == (layout == "hub") and ("num_local_experts" in text_cfg) == (layout != "hub")
    for name in ("generation_config.json", "preprocessor_config.json", "video_preprocessor_config.json", "chat_template.jinja"):
        assert (tmp_path / name).is_file(), name
    ours = from_pretrained(tmp_path).eval()
    assert ours.config == cfg
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    batch = make_batch(cfg, ROWS)
    with torch.no_grad():
        torch.testing.assert_close(ours(**ours_kwargs(batch)).logits, hf(**batch).logits, atol=1e-4, rtol=0)


def _qwen_vocab_config():
    """Tiny widths with the real presets' vocabulary and token ids (151,936 and 151,643..)."""
    real, tiny = preset("30B-A3B"), preset("tiny")
    text = dataclasses.replace(tiny.text, vocab_size=real.text.vocab_size, bos_token_id=real.text.bos_token_id,
                               eos_token_id=real.text.eos_token_id, pad_token_id=real.text.pad_token_id)
    ids = {k: getattr(real, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    return tiny.replace(text=text, **ids)


def test_qwen_vocab_dir_has_qwen_token_ids_and_the_data_pipeline_runs_on_it(tmp_path):
    cfg = _qwen_vocab_config()
    write_random_checkpoint(cfg, tmp_path / "m", max_shard_bytes=20 * 10**6)
    tok = load_tokenizer(tmp_path / "m")
    assert len(tok) <= cfg.text.vocab_size
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                                      "<|image_pad|>", "<|video_pad|>", "<think>"]) == [
        151643, 151644, 151645, 151652, 151653, 151655, 151656, 151667]
    assert tok.eos_token_id == cfg.text.eos_token_id and tok.pad_token_id == 151643
    Image.fromarray(np.full((64, 96, 3), 200, dtype=np.uint8)).save(tmp_path / "a.png")
    sample = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What colour?"}]},
                           {"role": "assistant", "content": "grey"}]}
    enc = encode_sample(sample, tokenizer=tok, base_dir=tmp_path)
    assert (enc["input_ids"] == cfg.image_token_id).sum() == enc["image_grid_thw"].prod() // 4
    model = from_pretrained(tmp_path / "m").eval()
    labels = torch.as_tensor(enc["labels"])[None]
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(enc["input_ids"])[None], position_ids=torch.as_tensor(enc["position_ids"])[:, None],
                    pixel_values=torch.as_tensor(enc["pixel_values"]), image_grid_thw=torch.as_tensor(enc["image_grid_thw"]),
                    labels=labels)
    assert out.logits.shape[-1] == 151936 and torch.isfinite(out.loss)


def test_real_presets_keep_their_widths_and_parameter_count():
    full = sum(math.prod(s.shape) for s in tensor_specs(preset("30B-A3B")))
    assert full == 31_070_754_032  # the published total, as model/test_io checks for our module tree
    cut = cut_config(preset("30B-A3B"), layers=1, vision_layers=2)
    assert (cut.text.hidden_size, cut.text.num_experts, cut.text.vocab_size) == (2048, 128, 151936)
    assert cut.text.num_hidden_layers == 1 and cut.vision.depth == 2 and cut.vision.deepstack_visual_indexes == [0]
    specs = {s.name: s.shape for s in tensor_specs(cut)}
    assert specs["model.language_model.layers.0.mlp.experts.gate_up_proj"] == (128, 2048, 1536)  # Hub layout
    assert sum(math.prod(s) for s in specs.values()) == 1_341_722_912
