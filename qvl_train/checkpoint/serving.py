"""The files around exported weights that make a serving stack see what training saw: the one
writer every export uses (the trainer's full export and LoRA adapter, launch/export.py's merge
and DeepSpeed-checkpoint conversion).

- preprocessor_config.json / video_preprocessor_config.json: the media settings training used
  (data.image / data.video over the model dir's own files), in the spelling transformers 5.24's
  Qwen2VLImageProcessor(Pil) and Qwen3VLVideoProcessor read: `size.shortest_edge` /
  `size.longest_edge` are min/max pixels (video: over all sampled frames, t*h*w), `fps`,
  `min_frames`, `max_frames`, patch/merge sizes, and the per-frame cap as
  `cap_pixels_per_frame` + `max_video_tokens` (per-frame tokens). vLLM and SGLang build the
  same transformers processors from these files.
- chat_template.jinja (+ the legacy chat_template.json, same text): the tokenizer's template,
  the one the data was rendered with.
- generation_config.json: eos ids that end a chat turn (<|im_end|>, <|endoftext|>), so a plain
  `generate` stops where training's answers stopped.
- README.md: the model card (what was trained on what, eval figures, load and serve commands).

Settings with no transformers equivalent (the per-sample visual-token budget, or a per-frame cap
transformers applies with a different floor) are listed by `untranslated_settings`: the trainer
warns at start and the card lists them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from qvl_train.data.media import MediaConfig

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"
GENERATION_FILE = "generation_config.json"
CARD_FILE = "README.md"
CHAT_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # the end of an assistant turn, then end of text


# ---- media settings -------------------------------------------------------------------------


def training_media(data_cfg, tokenizer_dir: str | os.PathLike | None) -> MediaConfig:
    """The MediaConfig the data pipeline encodes with: the model dir's processor files (as
    qvl_train.data.encode reads them) overridden by the data config's image/video settings."""
    options = data_cfg.media_options()
    for key in ("max_length", "train_on_prompt"):  # encode_sample options, not media settings
        options.pop(key, None)
    return MediaConfig.from_model_dir(tokenizer_dir, **options)


def _common(media: MediaConfig) -> dict:
    return {
        "processor_class": "Qwen3VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,  # PIL bicubic, as qvl_train.data.media resizes
        "rescale_factor": media.rescale_factor,
        "image_mean": list(media.image_mean),
        "image_std": list(media.image_std),
        "patch_size": media.patch_size,
        "temporal_patch_size": media.temporal_patch_size,
        "merge_size": media.merge_size,
    }


def processor_configs(media: MediaConfig) -> tuple[dict, dict]:
    """(preprocessor_config.json, video_preprocessor_config.json) contents for `media`."""
    image = {
        "image_processor_type": "Qwen2VLImageProcessor",
        **_common(media),
        "size": {"shortest_edge": media.image_min_pixels, "longest_edge": media.image_max_pixels},
    }
    video = {
        "video_processor_type": "Qwen3VLVideoProcessor",
        **_common(media),
        "do_sample_frames": True,
        "fps": media.fps,
        "min_frames": media.min_frames,
        "max_frames": media.max_frames,
        "size": {"shortest_edge": media.video_min_pixels, "longest_edge": media.video_max_pixels},
        # False = transformers' uncapped rule, which is ours without a per-frame cap (and it
        # silences transformers' warning about the default changing)
        "cap_pixels_per_frame": media.video_max_frame_pixels is not None,
    }
    if media.video_max_frame_pixels is not None:
        video["max_video_tokens"] = max(1, media.video_max_frame_pixels // media.tokens_per_pixel_block)
    return image, video


def untranslated_settings(media: MediaConfig) -> list[str]:
    """Training media settings that the processor files cannot carry exactly (one line each)."""
    notes = []
    if media.max_visual_tokens is not None:
        notes.append(
            f"data.video.max_visual_tokens={media.max_visual_tokens}: a per-sample visual-token budget "
            f"(videos shrink to fit, down to data.video.min_frame_pixels={media.video_min_frame_pixels} px per "
            "frame, then fewer frames). transformers, vLLM and SGLang have no per-sample budget: they "
            "encode each video with the per-video settings below, so a sample that training shrank is "
            "served larger than it was trained."
        )
    cap = media.video_max_frame_pixels
    if cap is not None:
        tokens = max(1, cap // media.tokens_per_pixel_block)
        floor = int(media.video_min_pixels * 1.05)
        notes.append(
            f"data.video.max_frame_pixels={cap}: written as cap_pixels_per_frame=true, max_video_tokens={tokens} "
            f"({tokens * media.tokens_per_pixel_block} px per frame). For n sampled frames transformers allows "
            f"max(min(cap, size.longest_edge // n), {floor}) px per frame (its floor is 1.05 x size.shortest_edge); "
            "training allows min(cap x n, size.longest_edge) px over all frames. They agree while "
            f"{floor} <= min(cap, size.longest_edge // n); otherwise the served video is slightly larger."
        )
    return notes


# ---- generation and chat template ----------------------------------------------------------


def chat_stop_ids(tokenizer, model_eos: int | list[int] | None = None) -> list[int]:
    """<|im_end|>, <|endoftext|> (those the tokenizer has), then any other eos the model declares."""
    ids = []
    for token in CHAT_STOP_TOKENS:
        i = tokenizer.convert_tokens_to_ids(token)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i not in ids:
            ids.append(i)
    extra = [] if model_eos is None else [model_eos] if isinstance(model_eos, int) else list(model_eos)
    ids += [i for i in extra if i not in ids]
    if not ids:
        raise ValueError("The tokenizer has neither <|im_end|> nor <|endoftext|>: it is not a Qwen chat tokenizer.")
    return ids


def write_generation_config(out_dir: Path, tokenizer, *, bos_token_id: int | None, model_eos) -> Path:
    gen = {
        "bos_token_id": bos_token_id,
        "eos_token_id": chat_stop_ids(tokenizer, model_eos),
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": False,  # greedy unless the caller asks otherwise (what our evals score)
    }
    path = out_dir / GENERATION_FILE
    path.write_text(json.dumps(gen, indent=2) + "\n")
    return path


def write_chat_template(out_dir: Path, tokenizer) -> None:
    """The template the data was rendered with, for the tokenizer and the processor alike."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise ValueError("The tokenizer has no chat template; training renders every sample with it.")
    (out_dir / CHAT_TEMPLATE_FILE).write_text(template)
    (out_dir / LEGACY_CHAT_TEMPLATE_FILE).write_text(json.dumps({"chat_template": template}, indent=2) + "\n")


# ---- model card -----------------------------------------------------------------------------


@dataclass
class ModelCard:
    """What the README of an export says. kind: full | adapter | merged."""

    kind: str
    base_model: str
    datasets: list[tuple[str, int | None]] = field(default_factory=list)
    eval_datasets: list[tuple[str, int | None]] = field(default_factory=list)
    overrides: list[str] | None = None
    steps: int | None = None
    eval: dict[str, float] = field(default_factory=dict)
    lora_rank: int | None = None
    source: str = ""  # how this export was made (e.g. "launch/export.py --adapter ...")


def sample_counts(mixture, datasets) -> list[tuple[str, int | None]]:
    """(path, samples in the mixture's split) per dataset; None for streamed ones (not indexed)."""
    return [(d.path, None if mixture.streaming else len(mixture.members(i))) for i, d in enumerate(datasets)]


def _dataset_lines(rows: list[tuple[str, int | None]]) -> list[str]:
    if not rows:
        return ["- (none)"]
    return [f"- `{p}`: {n:,} samples" if n is not None else f"- `{p}`" for p, n in rows]


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def render_card(card: ModelCard, media: MediaConfig, out_dir: Path) -> str:
    d = str(out_dir.resolve())
    image, video = processor_configs(media)
    lines = [f"# Qwen3-VL-MoE {'LoRA adapter' if card.kind == 'adapter' else 'checkpoint'} trained with qvl_train", ""]
    lines += [f"- Kind: **{card.kind}**" + (f" (LoRA rank {card.lora_rank})" if card.lora_rank else ""),
              f"- Base model: `{card.base_model}`"]
    if card.steps is not None:
        lines.append(f"- Optimizer steps: {card.steps}")
    if card.source:
        lines.append(f"- Made by: {card.source}")
    lines.append("- Recipe and overrides: " + (" ".join(f"`{o}`" for o in card.overrides) if card.overrides
                                               else "not recorded (see the run's config.yaml)"))
    lines += ["", "## Data", "", "Training:"] + _dataset_lines(card.datasets)
    lines += ["", "Held-out evaluation:"] + _dataset_lines(card.eval_datasets)
    lines += ["", "## Evaluation", ""]
    if card.eval:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in sorted(card.eval.items())]
        lines += ["", "`eval/exact_match` is scored in the run by our model; `eval/transformers/*` by transformers'",
                  "own model, processor and `generate` on this export (`eval.backend=transformers`)."]
    else:
        lines.append("No evaluation was run for this export.")
    lines += ["", "## Media settings used in training (written to the processor files)", "",
              f"- images: {image['size']['shortest_edge']:,} to {image['size']['longest_edge']:,} pixels per image",
              f"- videos: {video['fps']} fps, {video['min_frames']} to {video['max_frames']} frames, "
              f"{video['size']['shortest_edge']:,} to {video['size']['longest_edge']:,} pixels over all frames"
              + (f", at most {video['max_video_tokens']} tokens per frame" if video["cap_pixels_per_frame"] else ""),
              f"- patch {image['patch_size']}, merge {image['merge_size']}, temporal patch {image['temporal_patch_size']}"]
    notes = untranslated_settings(media)
    if notes:
        lines += ["", "Training settings serving stacks cannot reproduce:"] + [f"- {n}" for n in notes]
    lines += ["", "## Use it", ""] + _usage(card, d)
    return "\n".join(lines) + "\n"


_CHAT_SNIPPET = """messages = [{{"role": "user", "content": [
    {{"type": "image", "image": "/path/to/image.png"}},
    {{"type": "text", "text": "What colour is the shape?"}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt").to(model.device)
out = model.generate(**inputs, max_new_tokens=64)  # greedy; stops at <|im_end|> (generation_config.json)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))"""


def _usage(card: ModelCard, d: str) -> list[str]:
    if card.kind == "adapter":
        load = (f'base = Qwen3VLMoeForConditionalGeneration.from_pretrained("{card.base_model}", dtype="auto", '
                f'device_map="auto")\nmodel = PeftModel.from_pretrained(base, "{d}").eval()\n'
                f'processor = AutoProcessor.from_pretrained("{d}")')
        imports = "from peft import PeftModel\nfrom transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration"
        serve = (f"vllm serve {card.base_model} --enable-lora --max-lora-rank {card.lora_rank or 16} \\\n"
                 f"    --lora-modules adapter={d}\n"
                 f"# or merge first and serve the merged checkpoint (works with every stack):\n"
                 f"python launch/export.py --base {card.base_model} --adapter {d} --out {d}-merged && "
                 f"vllm serve {d}-merged")
    else:
        load = (f'model = Qwen3VLMoeForConditionalGeneration.from_pretrained("{d}", dtype="auto", device_map="auto")\n'
                f'processor = AutoProcessor.from_pretrained("{d}")')
        imports = "from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration"
        serve = f"vllm serve {d}"
    return [
        "With transformers" + (" and PEFT" if card.kind == "adapter" else "") + ":", "", "```python", imports, "",
        load, _CHAT_SNIPPET.format(), "```", "",
        "With vLLM (which LoRA targets each vLLM version serves: docs/serving.md of qvl_train):", "",
        "```bash", serve, "```", "",
        "Exact match on a JSONL of conversations, scored by transformers alone:", "", "```bash",
        f"python launch/chat.py --model {d} --eval EVAL.jsonl --backend transformers", "```",
    ]


# ---- the one writer -------------------------------------------------------------------------


def write_serving_files(out_dir: str | os.PathLike, *, tokenizer, media: MediaConfig, card: ModelCard | None,
                        bos_token_id: int | None, model_eos) -> Path:
    """Tokenizer, chat template, processor configs, generation config and model card into
    `out_dir` (beside weights or an adapter already written there)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    write_chat_template(out, tokenizer)
    image, video = processor_configs(media)
    (out / IMAGE_PROCESSOR_FILE).write_text(json.dumps(image, indent=2, sort_keys=True) + "\n")
    (out / VIDEO_PROCESSOR_FILE).write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")
    write_generation_config(out, tokenizer, bos_token_id=bos_token_id, model_eos=model_eos)
    if card is not None:
        write_card(out, card, media)
    return out


def write_card(out_dir: str | os.PathLike, card: ModelCard, media: MediaConfig) -> Path:
    path = Path(out_dir) / CARD_FILE
    path.write_text(render_card(card, media, Path(out_dir)))
    return path


def media_from_export(export_dir: str | os.PathLike) -> MediaConfig:
    """The MediaConfig an export's processor files describe (the inverse of processor_configs)."""
    export_dir = Path(export_dir)
    media = MediaConfig.from_model_dir(export_dir)
    video = json.loads((export_dir / VIDEO_PROCESSOR_FILE).read_text()) if (export_dir / VIDEO_PROCESSOR_FILE).is_file() else {}
    if video.get("cap_pixels_per_frame") and video.get("max_video_tokens"):
        media = dataclasses.replace(media, video_max_frame_pixels=int(video["max_video_tokens"]) * media.tokens_per_pixel_block)
    return media
