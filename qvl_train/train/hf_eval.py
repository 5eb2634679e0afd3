"""Exact match through the serving path: transformers' own model, processor and `generate` on an
export (a full checkpoint, or a PEFT adapter applied with PeftModel to its base), nothing of ours
between the conversation and the answer. `eval.backend=transformers` in the trainer and
`launch/chat.py --backend transformers` score this way; equal figures to the in-run eval mean the
export's processor files, chat template and generation config serve the model as it was trained.

Video: transformers 5.24 builds Qwen3VLVideoProcessor (and so AutoProcessor) only with
torchvision installed. Without it the processor is Qwen3VLProcessor with the export's image
processor alone (its PIL path) and samples with a video are counted as not scored
(`skipped_videos`), never dropped silently.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from qvl_train.data.encode import to_messages
from qvl_train.data.media import load_image, resolve_path


@dataclass
class HFScore:
    correct: int = 0
    scored: int = 0
    skipped_videos: int = 0
    predictions: list[tuple[str, str]] = field(default_factory=list)  # (prediction, reference) per scored sample

    @property
    def accuracy(self) -> float:
        return self.correct / self.scored if self.scored else 0.0

    def metrics(self, prefix: str = "eval/transformers/") -> dict[str, float]:
        return {f"{prefix}exact_match": self.accuracy, f"{prefix}samples": self.scored,
                f"{prefix}skipped_videos": self.skipped_videos}


def is_adapter(export_dir: str | os.PathLike) -> bool:
    return (Path(export_dir) / "adapter_config.json").is_file()


def load_model(export_dir: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """transformers' Qwen3VLMoeForConditionalGeneration from a full export, or PeftModel of the
    adapter on the base its adapter_config.json names."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    export_dir = Path(export_dir)
    if is_adapter(export_dir):
        from peft import PeftModel

        base = json.loads((export_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(Qwen3VLMoeForConditionalGeneration.from_pretrained(base, dtype=dtype), export_dir)
    else:
        model = Qwen3VLMoeForConditionalGeneration.from_pretrained(export_dir, dtype=dtype)
    return model.to(device).eval()


def load_processor(export_dir: str | os.PathLike):
    """AutoProcessor of the export; without torchvision, Qwen3VLProcessor without a video processor."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(export_dir))
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        # ProcessorMixin checks each sub-processor's class by name, and the video processor
        # class cannot even be looked up without torchvision
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    return ImageOnlyQwen3VLProcessor(image_processor=AutoImageProcessor.from_pretrained(str(export_dir)),
                                     tokenizer=tokenizer, video_processor=None, chat_template=tokenizer.chat_template)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def _servable(messages: list[dict], base_dir: str | None) -> list[dict]:
    """Media references as transformers loads them: paths made absolute, bytes decoded to PIL."""
    out = []
    for m in messages:
        if isinstance(m["content"], str):
            out.append(m)
            continue
        parts = []
        for p in m["content"]:
            if p["type"] in ("image", "video"):
                src = p[p["type"]]
                if isinstance(src, (str, os.PathLike)) and not str(src).startswith("data:"):
                    src = str(resolve_path(src, base_dir).resolve())
                elif p["type"] == "image":
                    src = load_image(src, base_dir)
                p = {**p, p["type"]: src}
            parts.append(p)
        out.append({**m, "content": parts})
    return out


def prompt_and_reference(record: dict, base_dir: str | None) -> tuple[list[dict], str]:
    """The conversation up to its last turn (the prompt) and that turn's text (the reference)."""
    messages = to_messages(record)
    if messages[-1]["role"] != "assistant":
        raise ValueError("an eval conversation must end with the assistant's answer (the reference)")
    return _servable(messages[:-1], base_dir), _text(messages[-1]["content"])


def has_video(messages: list[dict]) -> bool:
    return any(isinstance(m["content"], list) and any(p["type"] == "video" for p in m["content"]) for m in messages)


@torch.no_grad()
def answer(model, processor, messages: list[dict], *, max_new_tokens: int) -> str:
    """Greedy answer with the export's own generation config (its eos ids end the turn)."""
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt").to(model.device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def score(model, processor, samples: Iterable[tuple[dict, str | None]], *, max_new_tokens: int,
          max_samples: int = 0) -> HFScore:
    """Exact match (whitespace and case ignored, as the in-run eval) over (record, base_dir) pairs."""
    video_ok = getattr(processor, "video_processor", None) is not None
    result = HFScore()
    for record, base_dir in samples:
        if max_samples and result.scored + result.skipped_videos >= max_samples:
            break
        messages, ref = prompt_and_reference(record, base_dir)
        if has_video(messages) and not video_ok:
            result.skipped_videos += 1
            continue
        pred = answer(model, processor, messages, max_new_tokens=max_new_tokens)
        result.correct += pred.lower() == ref.strip().lower()
        result.scored += 1
        result.predictions.append((pred, ref.strip()))
    return result


def eval_records(data_cfg, tokenizer) -> Iterable[tuple[dict, str]]:
    """The raw records of the eval split, in the order the in-run eval reads them."""
    from qvl_train.data import Shard, build_loader

    mixture = build_loader(data_cfg, tokenizer, split="eval", num_epochs=1).mixture
    for raw in mixture.iter_shard(0, Shard()):
        if isinstance(raw, Exception):
            raise raw
        yield raw.record, raw.base_dir


def score_export(export_dir: str | os.PathLike, samples: Iterable[tuple[dict, str | None]], *, max_new_tokens: int,
                 max_samples: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> HFScore:
    model = load_model(export_dir, device=device, dtype=dtype)
    return score(model, load_processor(export_dir), samples, max_new_tokens=max_new_tokens, max_samples=max_samples)
