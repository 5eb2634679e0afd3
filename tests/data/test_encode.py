"""encode_sample: parity with transformers' Qwen3VLProcessor, video layout, labels, bad samples."""

import base64
import io
import json
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers.models.qwen3_vl.video_processing_qwen3_vl as ref_video  # noqa: E402
from transformers import AutoImageProcessor  # noqa: E402
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor  # noqa: E402
from transformers.video_utils import VideoMetadata  # noqa: E402

from qvl_train.data import IGNORE_INDEX, BadSample, encode_sample, to_messages  # noqa: E402
from qvl_train.data.tokenizer import (  # noqa: E402
    build_tiny_tokenizer,
    load_tokenizer,
    write_processor_configs,
)
from qvl_train.model.rope import get_rope_index  # noqa: E402

from .clips import write_clip  # noqa: E402

IMAGE, VIDEO, VS, VE, IM_END = 1012, 1013, 1009, 1010, 1002


class ReferenceProcessor(Qwen3VLProcessor):
    """transformers' Qwen3VLProcessor without a video processor (that one needs torchvision,
    which this CPU environment lacks); everything else is the stock class."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


@pytest.fixture(scope="module")
def ref(model_dir, tok):
    ip = AutoImageProcessor.from_pretrained(str(model_dir), local_files_only=True)
    p = ReferenceProcessor(image_processor=ip, tokenizer=tok, video_processor=None, chat_template=tok.chat_template)
    p.video_processor = types.SimpleNamespace(merge_size=2, temporal_patch_size=2)  # for replace_video_token
    return p


@pytest.fixture()
def media(tmp_path):
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a.png": (90, 50), "b.png": (64, 200), "c.jpg": (47, 33), "d.png": (300, 120)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name, quality=95)
    write_clip(tmp_path / "clip.mkv")
    return tmp_path


def template_text(tok, sample):
    view = [
        {**m, "content": [p if p["type"] == "text" else {"type": p["type"]} for p in m["content"]]}
        if isinstance(m["content"], list) else m
        for m in to_messages(sample)
    ]
    return tok.apply_chat_template(view, tokenize=False)


def user(*parts):
    return {"role": "user", "content": list(parts)}


def img(ref):
    return {"type": "image", "image": ref}


def txt(t):
    return {"type": "text", "text": t}


# ---- parity with transformers ---------------------------------------------------------------

PARITY_SAMPLES = [
    {"messages": [user(img("a.png"), txt("What colour?")), {"role": "assistant", "content": "Red."}]},
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            user(img("a.png"), img("b.png"), txt("Compare the two images.")),
            {"role": "assistant", "content": "Both show noise."},
            user(txt("And this one?"), img("c.jpg")),
            {"role": "assistant", "content": [txt("It is small.")]},
            user(img("d.png"), txt("Last one.")),
            {"role": "assistant", "content": "Wide."},
        ]
    },
]


@pytest.mark.parametrize("sample", PARITY_SAMPLES)
def test_image_parity_with_transformers_processor(tok, ref, media, sample):
    ours = encode_sample(sample, tokenizer=tok, base_dir=media)
    images = [Image.open(media / p["image"]).convert("RGB") for m in sample["messages"] if isinstance(m["content"], list)
              for p in m["content"] if p["type"] == "image"]
    theirs = ref(text=[template_text(tok, sample)], images=images, return_tensors="pt")
    assert ours["input_ids"].tolist() == theirs["input_ids"][0].tolist()
    assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"].float(), rtol=0, atol=1e-6)
    assert len({tuple(g) for g in ours["image_grid_thw"].tolist()}) == len(images)  # all different sizes


def test_video_token_layout_matches_transformers(tok, ref, media):
    sample = {"messages": [user(txt("Watch:"), {"type": "video", "video": "clip.mkv"}, txt("What moves?")),
                           {"role": "assistant", "content": "The ball."}]}
    ours = encode_sample(sample, tokenizer=tok, base_dir=media)

    # transformers' own pieces: frame sampling, resize rule, timestamps and placeholder text.
    ns = types.SimpleNamespace(fps=2, min_frames=4, max_frames=768)
    md = VideoMetadata(total_num_frames=16, fps=4.0, height=48, width=64)
    indices = ref_video.Qwen3VLVideoProcessor.sample_frames(ns, md)
    md.frames_indices = indices
    h, w = ref_video.smart_resize(len(indices), 48, 64, 2, 32, 128 * 32 * 32, 768 * 32 * 32)
    grid = torch.tensor([[(len(indices) + 1) // 2, h // 16, w // 16]])
    placeholder = ref.replace_video_token({"video_grid_thw": grid, "video_metadata": [md]}, video_idx=0)
    (expanded,), _ = ref.get_text_with_replacements([template_text(tok, sample)], [], [placeholder])
    theirs = tok(expanded).input_ids

    assert torch.equal(ours["video_grid_thw"], grid)
    assert ours["input_ids"].tolist() == theirs
    assert ours["pixel_values_videos"].shape == (int(grid.prod()), 1536)
    assert "pixel_values" not in ours and "image_grid_thw" not in ours

    # The documented rule, spelled out: outer wrapper kept, one timestamped group per 2 frames.
    per_group = int(grid[0, 1] * grid[0, 2]) // 4
    group = "<|vision_start|>" + "<|video_pad|>" * per_group + "<|vision_end|>"
    body = "".join(f"<{t:.1f} seconds>{group}" for t in (0.25, 1.25, 2.5, 3.5))
    assert f"<|vision_start|>{body}<|vision_end|>" in expanded
    assert ours["num_visual_tokens"] == int(grid.prod()) // 4


def test_mixed_image_and_video_positions(tok, media):
    sample = {"messages": [user(img("a.png"), {"type": "video", "video": "clip.mkv"}, txt("Same?")),
                           {"role": "assistant", "content": "No."}]}
    out = encode_sample(sample, tokenizer=tok, base_dir=media)
    expected, _ = get_rope_index(out["input_ids"][None], image_token_id=IMAGE, video_token_id=VIDEO, spatial_merge_size=2,
                                 image_grid_thw=out["image_grid_thw"], video_grid_thw=out["video_grid_thw"])
    assert torch.equal(out["position_ids"], expected[:, 0])
    assert out["position_ids"].shape == (3, len(out["input_ids"]))
    n_vis = int((out["input_ids"] == IMAGE).sum() + (out["input_ids"] == VIDEO).sum())
    assert out["num_visual_tokens"] == n_vis
    assert out["num_text_tokens"] == len(out["input_ids"]) - n_vis


# ---- labels ---------------------------------------------------------------------------------


def test_label_mask_on_multi_turn_conversation(tok):
    sample = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Red."},
    ]}
    out = encode_sample(sample, tokenizer=tok)

    def ids(s):
        return tok(s, add_special_tokens=False).input_ids

    prompt1 = ids("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    answer1 = ids("Hello.") + [IM_END]
    prompt2 = ids("\n<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n")
    answer2 = ids("Red.") + [IM_END]
    tail = ids("\n")
    assert out["input_ids"].tolist() == prompt1 + answer1 + prompt2 + answer2 + tail
    ignore = [IGNORE_INDEX]
    expected = ignore * len(prompt1) + answer1 + ignore * len(prompt2) + answer2 + ignore * len(tail)
    assert out["labels"].tolist() == expected
    assert out["num_label_tokens"] == len(answer1) + len(answer2)
    assert torch.equal(out["attention_mask"], torch.ones_like(out["input_ids"]))
    assert torch.equal(out["position_ids"], torch.arange(len(expected)).expand(3, -1))
    assert not {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"} & out.keys()


def test_train_on_prompt_labels_everything_but_visual_tokens(tok, media):
    sample = {"messages": [user(img("c.jpg"), txt("Hi")), {"role": "assistant", "content": "Yo."}]}
    out = encode_sample(sample, tokenizer=tok, base_dir=media, train_on_prompt=True)
    ids, labels = out["input_ids"], out["labels"]
    assert torch.equal(labels[ids != IMAGE], ids[ids != IMAGE])
    assert (labels[ids == IMAGE] == IGNORE_INDEX).all()
    masked = encode_sample(sample, tokenizer=tok, base_dir=media)
    assert (masked["labels"][ids == IMAGE] == IGNORE_INDEX).all()
    assert tok.decode(masked["labels"][masked["labels"] != IGNORE_INDEX]) == "Yo.<|im_end|>"


def test_tool_call_turn_is_trained(tok):
    call = {"type": "function", "function": {"name": "count", "arguments": {"shape": "star"}}}
    sample = {"messages": [{"role": "user", "content": "How many stars?"},
                           {"role": "assistant", "content": "", "tool_calls": [call]},
                           {"role": "tool", "content": "3"},
                           {"role": "assistant", "content": "Three."}]}
    out = encode_sample(sample, tokenizer=tok)
    trained = tok.decode(out["labels"][out["labels"] != IGNORE_INDEX])
    assert trained == '<tool_call>\n{"name": "count", "arguments": {"shape": "star"}}\n</tool_call><|im_end|>Three.<|im_end|>'


# ---- input forms ----------------------------------------------------------------------------


def test_sharegpt_form_equals_messages_form(tok, media):
    sharegpt = {
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "<image>What colour?<image>"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Now <video>"},
            {"from": "gpt", "value": "Moving."},
        ],
        "images": ["a.png", "c.jpg"],
        "videos": ["clip.mkv"],
    }
    messages = {"messages": [
        {"role": "system", "content": "Be brief."},
        user(img("a.png"), txt("What colour?"), img("c.jpg")),
        {"role": "assistant", "content": "Red."},
        user(txt("Now "), {"type": "video", "video": "clip.mkv"}),
        {"role": "assistant", "content": "Moving."},
    ]}
    assert to_messages(sharegpt) == to_messages(messages)
    a = encode_sample(json.dumps(sharegpt), tokenizer=tok, base_dir=media)
    b = encode_sample(messages, tokenizer=tok, base_dir=media)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]


def test_bytes_data_uri_and_exif_inputs(tok, media):
    raw = (media / "a.png").read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(raw).decode()
    by_path = encode_sample({"messages": [user(img("a.png")), {"role": "assistant", "content": "x"}]}, tokenizer=tok, base_dir=media)
    for ref_ in (raw, uri, str(media / "a.png")):
        out = encode_sample({"messages": [user(img(ref_)), {"role": "assistant", "content": "x"}]}, tokenizer=tok)
        assert torch.equal(out["pixel_values"], by_path["pixel_values"])
        assert torch.equal(out["input_ids"], by_path["input_ids"])
    # EXIF orientation 6 swaps the sides of a 90x50 image -> grid follows the rotated 50x90 image.
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.open(media / "a.png").save(buf, format="JPEG", exif=exif)
    rotated = encode_sample({"messages": [user(img(buf.getvalue())), {"role": "assistant", "content": "x"}]}, tokenizer=tok)
    g, g0 = rotated["image_grid_thw"][0].tolist(), by_path["image_grid_thw"][0].tolist()
    assert (g[1], g[2]) == (g0[2], g0[1]) and g[1] > g[2]


def test_media_options_and_model_dir_defaults(tok, media, tmp_path):
    sample = {"messages": [user(img("d.png")), {"role": "assistant", "content": "x"}]}
    default = encode_sample(sample, tokenizer=tok, base_dir=media)
    small = encode_sample(sample, tokenizer=tok, base_dir=media, image_min_pixels=1024, image_max_pixels=64 * 64)
    assert small["image_grid_thw"].prod() < default["image_grid_thw"].prod()
    d = tmp_path / "m"
    build_tiny_tokenizer(d)
    write_processor_configs(d, image={"size": {"shortest_edge": 1024, "longest_edge": 64 * 64}})
    from_dir = encode_sample(sample, tokenizer=load_tokenizer(d), base_dir=media)
    assert torch.equal(from_dir["image_grid_thw"], small["image_grid_thw"])
    with pytest.raises(TypeError):
        encode_sample(sample, tokenizer=tok, base_dir=media, not_an_option=1)


# ---- truncation -----------------------------------------------------------------------------


def test_truncation_never_cuts_inside_an_image(tok, media):
    sample = {"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        user(img("a.png"), txt("Colour?")),
        {"role": "assistant", "content": "Red."},
    ]}
    full = encode_sample(sample, tokenizer=tok, base_dir=media)
    start = int((full["input_ids"] == VS).nonzero()[0])
    out = encode_sample(sample, tokenizer=tok, base_dir=media, max_length=start + 5)
    assert len(out["input_ids"]) == start  # cut moved to before <|vision_start|>
    assert "pixel_values" not in out and out["num_visual_tokens"] == 0
    assert torch.equal(out["input_ids"], full["input_ids"][:start])
    assert torch.equal(out["labels"], full["labels"][:start])
    assert out["position_ids"].shape == (3, start)


# ---- bad samples ----------------------------------------------------------------------------

ANSWER = {"role": "assistant", "content": "ok"}
BAD = {
    "bad_json": '{"messages": [',
    "bad_format": {"prompt": "hi"},
    "unknown_content_type": {"messages": [user({"type": "audio", "audio": "a.wav"}), ANSWER]},
    "no_assistant_turn": {"messages": [user(txt("hi"))]},
    "placeholder_mismatch": {"conversations": [{"from": "human", "value": "<image><image>"},
                                               {"from": "gpt", "value": "ok"}], "images": ["a.png"]},
    "missing_media": {"messages": [user(img("nope.png")), ANSWER]},
    "corrupt_media": {"messages": [user(img(b"garbage bytes")), ANSWER]},
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_every_bad_sample_reason(tok, media, reason):
    with pytest.raises(BadSample) as e:
        encode_sample(BAD[reason], tokenizer=tok, base_dir=media)
    assert e.value.reason == reason
    assert isinstance(e.value, ValueError) and e.value.message


@pytest.mark.parametrize("sample", [
    {"messages": [user(txt("<|image_pad|> literal")), ANSWER]},
    {"messages": [user(txt("hi")), {"role": "assistant", "content": [img("a.png")]}]},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}], "images": ["a.png"]},
])
def test_placeholder_mismatch_variants(tok, media, sample):
    with pytest.raises(BadSample) as e:
        encode_sample(sample, tokenizer=tok, base_dir=media)
    assert e.value.reason == "placeholder_mismatch"


@pytest.mark.parametrize("sample", [
    ["not", "an", "object"],
    {"messages": [{"role": "narrator", "content": "x"}, ANSWER]},
    {"messages": [user(txt("a")), ANSWER, {"role": "system", "content": "late system"}]},
    {"messages": []},
])
def test_bad_format_variants(tok, sample):
    with pytest.raises(BadSample) as e:
        encode_sample(sample, tokenizer=tok)
    assert e.value.reason in ("bad_format", "bad_json")


def test_too_long(tok, media):
    sample = {"messages": [user(img("a.png"), txt("Colour?")), {"role": "assistant", "content": "Red."}]}
    with pytest.raises(BadSample) as e:
        encode_sample(sample, tokenizer=tok, base_dir=media, max_length=10)
    assert e.value.reason == "too_long"
    with pytest.raises(BadSample) as e:
        encode_sample(sample, tokenizer=tok, base_dir=media, max_visual_tokens=8)
    assert e.value.reason == "too_long"


def test_placeholders_in_text_parts_and_bad_sample_pickles(tok, media):
    import pickle

    sample = {"messages": [user(txt("Look <image> here")), ANSWER], "images": ["a.png"]}
    assert to_messages(sample)[0]["content"] == [txt("Look "), img("a.png"), txt(" here")]
    err = pickle.loads(pickle.dumps(BadSample("missing_media", "gone")))
    assert (err.reason, err.message, str(err)) == ("missing_media", "gone", "[missing_media] gone")


def test_labels_with_unicode_and_leading_newlines(tok):
    sample = {"messages": [{"role": "user", "content": "Farbe? 🙂"},
                           {"role": "assistant", "content": "Rot — ünd blau 🙂."},
                           {"role": "user", "content": "\n\nnoch?"},
                           {"role": "assistant", "content": "Ja."}]}
    out = encode_sample(sample, tokenizer=tok)
    trained = out["labels"][out["labels"] != IGNORE_INDEX]
    assert tok.decode(trained) == "Rot — ünd blau 🙂.<|im_end|>Ja.<|im_end|>"


def test_template_that_is_not_chatml_is_a_setup_error(model_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    with pytest.raises(ValueError) as e:
        encode_sample({"messages": [{"role": "user", "content": "a"}, ANSWER]}, tokenizer=load_tokenizer(d))
    assert not isinstance(e.value, BadSample)
