"""One conversation -> model-ready tensors (input_ids, labels, pixels, grids, 3D positions).

Design choices
- Text comes from the tokenizer's own chat template (Qwen3-VL-Instruct's for our dirs), rendered
  with one <|image_pad|> / <|video_pad|> per media item and tokenized once. Pads are then expanded
  in id space. That equals tokenizing the expanded string (what transformers' processor does)
  because pads and the tokens around an expansion are special tokens, which BPE never merges
  across; it avoids tokenizing thousands of pad tokens.
- Image: <|image_pad|> -> prod(grid_thw)/4 pads (inside the template's vision_start/vision_end).
- Video, as transformers 5.24's Qwen3VLProcessor does it: only the <|video_pad|> is replaced, so
  the template's outer <|vision_start|> ... <|vision_end|> stays, and inside it each temporal
  group t is `<{ts_t:.1f} seconds><|vision_start|><|video_pad|>*(h*w/4)<|vision_end|>`. (Older
  transformers / qwen-vl-utils replaced the whole wrapper; we follow 5.24, tested against it.)
- Labels: -100 everywhere except each assistant turn's content and its closing <|im_end|>.
  The "\n" the template emits after <|im_end|> is NOT trained: generation stops at <|im_end|>
  (eos), so the model never predicts it; it is glue before the next turn. Assistant spans come
  from rendering message prefixes (the ChatML template is prefix-stable) and token char offsets.
  train_on_prompt=True labels every template token; visual expansions (pads, and video
  timestamps / per-group wrappers) stay -100 either way.
- Samples without images have no pixel_values / image_grid_thw keys (same for videos): absent
  keys, not None, so `key in sample` is the test and nothing has to skip None in collation.
  Counts (num_text_tokens, num_visual_tokens, num_label_tokens) are Python ints.
- max_length truncates from the end but never inside a media item (an image from its
  <|vision_start|> to <|vision_end|>; a video with all its timestamps): the cut moves to before
  the item and the item's pixels are dropped. If no trainable label survives -> BadSample("too_long").
- Every problem of the sample itself raises BadSample(reason, message); problems of the setup
  (tokenizer without Qwen's special tokens, unsupported template) raise ValueError.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qvl_train.data.media import (
    BadSample,
    ImageItem,
    MediaConfig,
    VideoItem,
    fit_visual_budget,
    load_image,
    plan_video,
    probe_video,
    process_image,
    process_video,
)
from qvl_train.model.rope import sample_positions

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
MEDIA_ROLES = ("user", "tool")  # Qwen3-VL's template drops media anywhere else
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
    "function_call": "assistant",
}
_PLACEHOLDER_RE = re.compile(r"(<image>|<video>)")

__all__ = ["BadSample", "IGNORE_INDEX", "encode_sample", "to_messages"]


# ---- input normalisation --------------------------------------------------------------------


def _parse(sample: Any) -> dict:
    if isinstance(sample, (str, bytes, bytearray)):
        try:
            sample = json.loads(sample)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadSample("bad_json", f"sample is not valid JSON: {e}") from None
    if not isinstance(sample, dict):
        raise BadSample("bad_json", f"a sample must be a JSON object, got {type(sample).__name__}")
    return sample


def to_messages(sample: dict | str) -> list[dict]:
    """Normalise a sample (messages format or ShareGPT/LLaMA-Factory) to a list of messages.

    Each message is {"role", "content": str | [parts]} with parts {"type": "text", "text"},
    {"type": "image", "image"} or {"type": "video", "video", "fps"?}; "tool_calls" is kept.
    With top-level "images"/"videos" lists, <image>/<video> in text are their placeholders.
    """
    sample = _parse(sample)
    images, videos = _media_lists(sample)
    if "messages" in sample:
        raw = [_message_from_openai(m) for m in _as_list(sample["messages"], "messages")]
    elif "conversations" in sample:
        raw = _messages_from_sharegpt(sample)
    else:
        raise BadSample("bad_format", "sample needs a 'messages' or a 'conversations' list")
    # ShareGPT text's <image>/<video> are always placeholders: without an images/videos list they
    # are a placeholder_mismatch, never literal text to train on
    if images is not None or videos is not None or "messages" not in sample:
        raw = _expand_placeholders(raw, images or [], videos or [])
    return raw


def _as_list(x: Any, what: str) -> list:
    if not isinstance(x, list):
        raise BadSample("bad_format", f"'{what}' must be a list, got {type(x).__name__}")
    return x


def _media_lists(sample: dict) -> tuple[list | None, list | None]:
    out = []
    for key in ("images", "videos"):
        v = sample.get(key)
        if v is None:
            out.append(None)
        elif isinstance(v, (str, dict, bytes)):
            out.append([v])
        else:
            out.append(_as_list(v, key))
    return out[0], out[1]


def _message_from_openai(m: Any) -> dict:
    if not isinstance(m, dict):
        raise BadSample("bad_format", f"each message must be an object, got {type(m).__name__}")
    role = m.get("role")
    if role not in ROLES:
        raise BadSample("bad_format", f"message role must be one of {ROLES}, got {role!r}")
    content = m.get("content")
    if content is None:
        content = ""
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, (str, list)):
        raise BadSample("bad_format", f"message content must be a string or a list, got {type(content).__name__}")
    if isinstance(content, list):
        content = [_part(p) for p in content]
    out = {"role": role, "content": content}
    if m.get("tool_calls"):
        out["tool_calls"] = m["tool_calls"]
    return out


def _part(p: Any) -> dict:
    if isinstance(p, str):
        return {"type": "text", "text": p}
    if not isinstance(p, dict):
        raise BadSample("bad_format", f"a content part must be an object, got {type(p).__name__}")
    kind = p.get("type") or next((k for k in ("text", "image", "video") if k in p), None)
    if kind == "text":
        text = p.get("text")
        if not isinstance(text, str):
            raise BadSample("bad_format", "a text part needs a string 'text'")
        return {"type": "text", "text": text}
    if kind in ("image", "image_url"):
        return {"type": "image", "image": _media_ref(p, "image")}
    if kind in ("video", "video_url"):
        part = {"type": "video", "video": _media_ref(p, "video")}
        if p.get("fps") is not None:
            part["fps"] = float(p["fps"])
        return part
    raise BadSample("unknown_content_type", f"content part type {kind!r} is not text, image or video")


def _media_ref(p: dict, kind: str) -> Any:
    """The path / bytes / data URI of an image or video part (`image` or OpenAI-style `image_url`)."""
    ref = p.get(kind, p.get(f"{kind}_url"))
    ref = ref.get("url") if isinstance(ref, dict) and "url" in ref else ref
    if ref is None:
        raise BadSample("missing_media", f"{'an' if kind == 'image' else 'a'} {kind} part has no '{kind}' value")
    return ref


def _messages_from_sharegpt(sample: dict) -> list[dict]:
    msgs = []
    system = sample.get("system")
    if system:
        msgs.append({"role": "system", "content": str(system)})
    for turn in _as_list(sample["conversations"], "conversations"):
        if not isinstance(turn, dict):
            raise BadSample("bad_format", "each conversation turn must be an object with 'from' and 'value'")
        who = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if who not in SHAREGPT_ROLES:
            raise BadSample("bad_format", f"turn 'from' must be one of {sorted(SHAREGPT_ROLES)}, got {who!r}")
        if not isinstance(value, str):
            raise BadSample("bad_format", f"turn 'value' must be a string, got {type(value).__name__}")
        msgs.append({"role": SHAREGPT_ROLES[who], "content": value})
    return msgs


def _expand_placeholders(msgs: list[dict], images: list, videos: list) -> list[dict]:
    """Replace <image>/<video> in texts by the next item of the top-level images/videos lists."""
    queues = {"<image>": list(images), "<video>": list(videos)}
    out = []
    for m in msgs:
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not any(p["type"] == "text" and _PLACEHOLDER_RE.search(p["text"]) for p in parts):
            out.append(m)
            continue
        new_parts = []
        for p in parts:
            new_parts += _split_placeholders(p["text"], queues) if p["type"] == "text" else [p]
        out.append({**m, "content": new_parts})
    for tag, left in queues.items():
        if left:
            raise BadSample(
                "placeholder_mismatch",
                f"{len(left)} entries of '{tag[1:-1]}s' have no {tag} placeholder in the conversation",
            )
    return out


def _split_placeholders(text: str, queues: dict[str, list]) -> list[dict]:
    parts = []
    for piece in _PLACEHOLDER_RE.split(text):
        if piece in queues:
            kind = piece[1:-1]
            if not queues[piece]:
                raise BadSample("placeholder_mismatch",
                                f"more {piece} placeholders than entries in the '{kind}s' list (is the list missing?)")
            parts.append(_part({"type": kind, kind: queues[piece].pop(0)}))
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _validate(msgs: list[dict]) -> None:
    if not msgs:
        raise BadSample("bad_format", "the conversation is empty")
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i != 0:
            raise BadSample("bad_format", f"system message at position {i}; only the first message may be system")
        if m["role"] not in MEDIA_ROLES and isinstance(m["content"], list):
            if any(p["type"] != "text" for p in m["content"]):
                raise BadSample(
                    "placeholder_mismatch",
                    f"{m['role']} message {i} has an image/video; Qwen3-VL's template only shows media in user turns",
                )
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadSample("no_assistant_turn", "the conversation has no assistant turn, so nothing to train on")


def _media_in_order(msgs: list[dict]) -> tuple[list[dict], list[dict]]:
    images, videos = [], []
    for m in msgs:
        if isinstance(m["content"], list):
            for p in m["content"]:
                if p["type"] == "image":
                    images.append(p)
                elif p["type"] == "video":
                    videos.append(p)
    return images, videos


# ---- template rendering ---------------------------------------------------------------------


def _template_view(m: dict) -> dict:
    # The template needs only part types; drop media payloads (bytes) from what Jinja sees.
    if isinstance(m["content"], str):
        return m
    parts = [p if p["type"] == "text" else {"type": p["type"]} for p in m["content"]]
    return {**m, "content": parts}


def _render(tokenizer, msgs: list[dict], tools: Any) -> str:
    if not msgs:
        return ""
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False, **kwargs)


def _assistant_char_spans(tokenizer, msgs: list[dict], text: str, tools: Any, tok: "_Tokens") -> list[tuple[int, int]]:
    """Char spans [content start, end of <|im_end|>) of every assistant turn in `text`.

    Turn k's segment is render(msgs[:k+1]) minus render(msgs[:k]). Each prefix is rendered once
    even when it bounds two turns, and the full render `text` is reused, so a one-turn sample
    costs one extra render (template rendering is a large part of the text-side cost).
    """
    assistant = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    renders = {len(msgs): text}
    for cut in sorted({c for k in assistant for c in (k, k + 1)} - renders.keys()):
        renders[cut] = _render(tokenizer, msgs[:cut], tools)
    spans = []
    header = tok.im_start + "assistant"
    for k in assistant:
        before, through = renders[k], renders[k + 1]
        seg = through[len(before) :]
        close = seg.rfind(tok.im_end)
        stable = through.startswith(before) and text.startswith(through)
        if not stable or not seg.startswith(header) or close < 0 or "\n" not in seg[len(header) :]:
            raise ValueError(
                "the tokenizer's chat template is not ChatML-prefix-stable (each assistant turn must render "
                "as '<|im_start|>assistant\\n...<|im_end|>' after the turns before it); use the "
                "Qwen3-VL-Instruct template"
            )
        start = len(before)
        spans.append((start + seg.index("\n", len(header)) + 1, start + close + len(tok.im_end)))
    return spans


# ---- tokenizer facts ------------------------------------------------------------------------


@dataclass
class _Tokens:
    image: int
    video: int
    vision_start: int
    vision_end: int
    im_start: str = "<|im_start|>"
    im_end: str = "<|im_end|>"
    backend: Any = None
    text_cache: dict = field(default_factory=dict)

    def encode_text(self, s: str) -> list[int]:
        ids = self.text_cache.get(s)
        if ids is None:
            ids = self.backend.encode(s, add_special_tokens=False).ids
            self.text_cache[s] = ids
        return ids


@functools.lru_cache(maxsize=8)
def _tokens(tokenizer) -> _Tokens:
    ids = {}
    for name in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"):
        i = tokenizer.convert_tokens_to_ids(name)
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {name} token; it must be a Qwen3-VL tokenizer")
        ids[name] = i
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("encode_sample needs a fast (tokenizers-backed) tokenizer")
    return _Tokens(
        ids["<|image_pad|>"], ids["<|video_pad|>"], ids["<|vision_start|>"], ids["<|vision_end|>"], backend=backend
    )


def _media_config(tokenizer, media_config: MediaConfig | None, options: dict) -> MediaConfig:
    if media_config is None:
        model_dir = getattr(tokenizer, "name_or_path", "") or ""
        media_config = MediaConfig.from_model_dir(model_dir if os.path.isdir(model_dir) else None)
    try:
        return media_config.replace(**options)
    except TypeError as e:
        raise TypeError(f"unknown media option: {e}; valid options are the MediaConfig fields") from None


# ---- media ----------------------------------------------------------------------------------


def _process_media(
    images: list[dict], videos: list[dict], cfg: MediaConfig, base_dir
) -> tuple[list[ImageItem], list[VideoItem]]:
    image_items = [process_image(load_image(p["image"], base_dir), cfg) for p in images]
    plans = []
    for p in videos:
        info = probe_video(p["video"], base_dir, frame_list_fps=p.get("fps"))
        plans.append(plan_video(info, cfg, fps=None if info.is_frame_list else p.get("fps")))
    plans = fit_visual_budget(sum(i.num_tokens for i in image_items), plans, cfg)
    video_items = [process_video(plan, cfg, base_dir) for plan in plans]
    return image_items, video_items


def _video_ids(item: VideoItem, tok: _Tokens) -> np.ndarray:
    per_group = item.num_tokens // item.grid_thw[0]
    out: list[int] = []
    for ts in item.timestamps:
        out += tok.encode_text(f"<{ts:.1f} seconds>")
        out.append(tok.vision_start)
        out += [tok.video] * per_group
        out.append(tok.vision_end)
    return np.asarray(out, dtype=np.int64)


@dataclass
class _Span:
    start: int  # in the expanded sequence, including the surrounding vision_start/end
    end: int
    kind: str  # "image" | "video"
    index: int


def _expand(ids: np.ndarray, labels: np.ndarray, images: list[ImageItem], videos: list[VideoItem], tok: _Tokens):
    """Replace each single pad by its expansion; return new ids, labels and media spans."""
    is_pad = (ids == tok.image) | (ids == tok.video)
    pad_pos = np.flatnonzero(is_pad)
    n_img, n_vid = int((ids == tok.image).sum()), int((ids == tok.video).sum())
    if n_img != len(images) or n_vid != len(videos):
        raise BadSample(
            "placeholder_mismatch",
            f"rendered text has {n_img} image / {n_vid} video placeholders for {len(images)} images / "
            f"{len(videos)} videos (does a text contain a literal <|image_pad|> or <|video_pad|>?)",
        )
    id_parts, label_parts, spans = [], [], []
    prev, length, counters = 0, 0, {"image": 0, "video": 0}
    for pos in pad_pos:
        id_parts.append(ids[prev:pos])
        label_parts.append(labels[prev:pos])
        length += pos - prev
        kind = "image" if ids[pos] == tok.image else "video"
        k = counters[kind]
        counters[kind] += 1
        rep = np.full(images[k].num_tokens, tok.image, np.int64) if kind == "image" else _video_ids(videos[k], tok)
        id_parts.append(rep)
        label_parts.append(np.full(len(rep), IGNORE_INDEX, np.int64))
        wrapped = pos > 0 and ids[pos - 1] == tok.vision_start and pos + 1 < len(ids) and ids[pos + 1] == tok.vision_end
        spans.append(_Span(length - wrapped, length + len(rep) + wrapped, kind, k))
        length += len(rep)
        prev = pos + 1
    id_parts.append(ids[prev:])
    label_parts.append(labels[prev:])
    return np.concatenate(id_parts), np.concatenate(label_parts), spans


def _truncate(ids, labels, spans: list[_Span], max_length: int | None):
    if max_length is None or len(ids) <= max_length:
        return ids, labels, spans
    cut, full = max_length, len(ids)
    for s in spans:
        if s.start < cut < s.end:
            cut = s.start
    kept = [s for s in spans if s.end <= cut]
    ids, labels = ids[:cut], labels[:cut]
    if not (labels != IGNORE_INDEX).any():
        raise BadSample(
            "too_long",
            f"no trainable token is left within max_length={max_length} (full length {full}); "
            "raise max_length or lower the image/video pixel limits",
        )
    return ids, labels, kept


# ---- public ---------------------------------------------------------------------------------


def encode_sample(
    sample: dict | str,
    *,
    tokenizer,
    base_dir: str | os.PathLike | None = None,
    media_config: MediaConfig | None = None,
    max_length: int | None = None,
    train_on_prompt: bool = False,
    **media_options: Any,
) -> dict[str, Any]:
    """Encode one conversation (a dict, or its JSON text) for training.

    Returns input_ids, labels, attention_mask (L,), position_ids (3, L); pixel_values (N, 1536)
    and image_grid_thw (n, 3) only when there are images; pixel_values_videos and video_grid_thw
    only when there are videos; num_text_tokens, num_visual_tokens, num_label_tokens (ints).
    `media_options` override MediaConfig fields (e.g. image_max_pixels=..., fps=...); the
    config defaults to the tokenizer's model dir's processor configs. Raises BadSample.
    """
    sample = _parse(sample)
    msgs = to_messages(sample)
    _validate(msgs)
    tok = _tokens(tokenizer)
    cfg = _media_config(tokenizer, media_config, media_options)
    tools = sample.get("tools")

    view = [_template_view(m) for m in msgs]
    text = _render(tokenizer, view, tools)
    enc = tok.backend.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int64)
    offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    labels = _labels(ids, offsets, tokenizer, view, text, tools, tok, train_on_prompt)

    image_parts, video_parts = _media_in_order(msgs)
    images, videos = _process_media(image_parts, video_parts, cfg, base_dir)
    ids, labels, spans = _expand(ids, labels, images, videos, tok)
    ids, labels, spans = _truncate(ids, labels, spans, max_length)
    return _assemble(ids, labels, spans, images, videos, cfg, tok)


def _labels(ids, offsets, tokenizer, view, text, tools, tok: _Tokens, train_on_prompt: bool) -> np.ndarray:
    if train_on_prompt:
        return ids.copy()
    trained = np.zeros(len(ids), dtype=bool)
    for a, b in _assistant_char_spans(tokenizer, view, text, tools, tok):
        trained |= (offsets[:, 1] > a) & (offsets[:, 0] < b)
    return np.where(trained, ids, IGNORE_INDEX)


def _assemble(ids, labels, spans, images, videos, cfg: MediaConfig, tok: _Tokens) -> dict[str, Any]:
    # Built in numpy and wrapped with torch.from_numpy at the end: per sample, torch's per-op
    # overhead (several times numpy's once image work has evicted the caches) adds up.
    kept_images = [images[s.index] for s in spans if s.kind == "image"]
    kept_videos = [videos[s.index] for s in spans if s.kind == "video"]
    image_grids = [list(i.grid_thw) for i in kept_images]
    video_grids = [list(v.grid_thw) for v in kept_videos]
    positions = sample_positions(
        ids,
        image_token_id=tok.image,
        video_token_id=tok.video,
        spatial_merge_size=cfg.merge_size,
        image_grid_thw=image_grids,
        video_grid_thw=video_grids,
    )
    out: dict[str, Any] = {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(np.ones(len(ids), dtype=np.int64)),
    }
    if kept_images:
        out["pixel_values"] = torch.from_numpy(_cat([i.pixel_values for i in kept_images]))
        out["image_grid_thw"] = torch.from_numpy(np.asarray(image_grids, dtype=np.int64))
    if kept_videos:
        out["pixel_values_videos"] = torch.from_numpy(_cat([v.pixel_values for v in kept_videos]))
        out["video_grid_thw"] = torch.from_numpy(np.asarray(video_grids, dtype=np.int64))
    out["position_ids"] = torch.from_numpy(positions)
    visual = sum(i.num_tokens for i in kept_images) + sum(v.num_tokens for v in kept_videos)
    out["num_visual_tokens"] = visual
    out["num_text_tokens"] = len(ids) - visual
    out["num_label_tokens"] = int((labels != IGNORE_INDEX).sum())
    return out


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
