"""The tiny tokenizer: id layout (docs/CONTRACTS.md), determinism, files, chat template."""

import hashlib
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qvl_train.data.tokenizer import (  # noqa: E402
    NUM_REGULAR_TOKENS,
    build_tiny_tokenizer,
    build_tokenizer_object,
)
from qvl_train.model.config import preset  # noqa: E402

CONTRACT_IDS = {
    "<|endoftext|>": 1000,
    "<|im_start|>": 1001,
    "<|im_end|>": 1002,
    "<|object_ref_start|>": 1003,
    "<|object_ref_end|>": 1004,
    "<|box_start|>": 1005,
    "<|box_end|>": 1006,
    "<|quad_start|>": 1007,
    "<|quad_end|>": 1008,
    "<|vision_start|>": 1009,
    "<|vision_end|>": 1010,
    "<|vision_pad|>": 1011,
    "<|image_pad|>": 1012,
    "<|video_pad|>": 1013,
}
EXTRA_IDS = {
    "<tool_call>": 1014,
    "</tool_call>": 1015,
    "<|fim_prefix|>": 1016,
    "<|fim_middle|>": 1017,
    "<|fim_suffix|>": 1018,
    "<|fim_pad|>": 1019,
    "<|repo_name|>": 1020,
    "<|file_sep|>": 1021,
    "<tool_response>": 1022,
    "</tool_response>": 1023,
}


def test_id_layout_matches_contract(tok):
    vocab = tok.get_vocab()
    assert len(tok) == 1024
    assert sorted(i for t, i in vocab.items() if i < NUM_REGULAR_TOKENS) == list(range(NUM_REGULAR_TOKENS))
    for text, i in {**CONTRACT_IDS, **EXTRA_IDS}.items():
        assert tok.convert_tokens_to_ids(text) == i, text
    assert "<think>" not in vocab  # would be id 1024, past the tiny vocab
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 1002
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 1000
    assert tok.bos_token is None


def test_ids_agree_with_tiny_model_preset(tok):
    cfg = preset("tiny")
    assert cfg.text.vocab_size == len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.text.eos_token_id == tok.eos_token_id
    assert cfg.text.pad_token_id == tok.pad_token_id


def test_specials_are_atomic_and_extras_are_not_special(tok):
    ids = tok("a<|image_pad|><|image_pad|>b<tool_call>", add_special_tokens=False).input_ids
    assert ids.count(1012) == 2 and 1014 in ids
    specials = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    assert set(CONTRACT_IDS) <= specials
    assert "<tool_call>" not in specials


def test_build_is_deterministic_across_processes(tmp_path):
    here = hashlib.md5(build_tokenizer_object().to_str().encode()).hexdigest()
    code = (
        "import hashlib; from qvl_train.data.tokenizer import build_tokenizer_object as b; "
        "print(hashlib.md5(b().to_str().encode()).hexdigest())"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root, "PYTHONHASHSEED": "123"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == here
    a, b = tmp_path / "a", tmp_path / "b"
    build_tiny_tokenizer(a)
    build_tiny_tokenizer(b)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_byte_level_round_trip(tok):
    for text in ["What colour is the circle? Red.", "  spaces\n\nand\ttabs ", "Ünïcödé 🙂 日本語", "<0.5 seconds>"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert max(ids) < NUM_REGULAR_TOKENS
        assert tok.decode(ids) == text


def test_files_load_offline_with_auto_tokenizer(model_dir):
    names = set(os.listdir(model_dir))
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"} <= names
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    assert t.chat_template and "<|video_pad|>" in t.chat_template


def test_chat_template_matches_qwen3_vl_instruct(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}, {"type": "video"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Count?"},
    ]
    out = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Colour?"
        "<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\nRed.<|im_end|>\n"
        "<|im_start|>user\nCount?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # No default system prompt; no generation prompt unless asked.
    plain = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert plain == "<|im_start|>user\nHi<|im_end|>\n"


def test_processor_configs_build_transformers_processors(model_dir):
    from transformers import AutoImageProcessor

    ip = AutoImageProcessor.from_pretrained(str(model_dir), local_files_only=True)
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (16, 2, 2)
    assert list(ip.image_mean) == [0.5] * 3 and list(ip.image_std) == [0.5] * 3
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (65_536, 16_777_216)
    video = json.loads((model_dir / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen3VLVideoProcessor"
    assert (video["fps"], video["min_frames"], video["max_frames"]) == (2, 4, 768)
