"""Checks that an export serves as its run trained: transformers alone (its processor from the
export's files, its model, its generate) sees the inputs and the outputs the run saw."""

import json
from pathlib import Path

import torch

from qvl_train.data import encode_sample
from qvl_train.train import hf_eval
from qvl_train.train.evaluate import split_prompts


def assert_processor_files_match_training(export: Path, trainer, card_notes: bool = True) -> None:
    """card_notes: the model card lists the settings the files cannot carry (a merge made from an
    adapter dir only knows what the adapter's processor files say)."""
    image = json.loads((export / "preprocessor_config.json").read_text())
    video = json.loads((export / "video_preprocessor_config.json").read_text())
    m, d = trainer.media, trainer.cfg.data
    assert image["size"] == {"shortest_edge": d.image.min_pixels, "longest_edge": d.image.max_pixels} == {
        "shortest_edge": m.image_min_pixels, "longest_edge": m.image_max_pixels}
    assert video["size"] == {"shortest_edge": d.video.min_pixels, "longest_edge": d.video.max_pixels}
    assert (video["fps"], video["min_frames"], video["max_frames"]) == (d.video.fps, d.video.min_frames, d.video.max_frames)
    assert video["cap_pixels_per_frame"] and video["max_video_tokens"] * 32 * 32 == d.video.max_frame_pixels
    assert (export / "chat_template.jinja").read_text() == trainer.tokenizer.chat_template
    card = (export / "README.md").read_text()
    assert "vllm serve" in card and "from_pretrained" in card
    assert ("max_visual_tokens" in card) == card_notes


def _our_prompt(trainer, record: dict, base_dir: str) -> dict:
    enc = encode_sample(record, tokenizer=trainer.tokenizer, base_dir=base_dir, **trainer.cfg.data.media_options())
    batch = {k: enc[k][None] for k in ("input_ids", "labels", "attention_mask")}
    batch.update({k: enc.get(k) for k in ("pixel_values", "image_grid_thw")})
    return split_prompts(batch, trainer.tokenizer.pad_token_id)[0]


def assert_transformers_sees_what_training_saw(export: Path, trainer, hf_model) -> None:
    """For every held-out question: the export's processor gives our training pipeline's tokens
    and pixels, and transformers' model gives the trained model's next-token logits."""
    processor = hf_eval.load_processor(export)
    trainer.model.eval()
    records = list(hf_eval.eval_records(trainer.cfg.data, trainer.tokenizer))
    assert len(records) == 8
    for record, base_dir in records:
        messages, _ = hf_eval.prompt_and_reference(record, base_dir)
        theirs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        ours = _our_prompt(trainer, record, base_dir)
        assert torch.equal(theirs["input_ids"], ours["input_ids"])
        assert torch.equal(theirs["image_grid_thw"], ours["image_grid_thw"])
        torch.testing.assert_close(theirs["pixel_values"], ours["pixel_values"], atol=0, rtol=0)
        with torch.no_grad():
            ref = hf_model(**theirs).logits[0, -1]
            got = trainer.model(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"],
                                pixel_values=ours["pixel_values"], image_grid_thw=ours["image_grid_thw"]).logits[0, -1]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def assert_exact_match_within_one_sample(in_run: dict, served: dict) -> None:
    n = in_run["eval/generated_samples"]
    assert served["eval/transformers/samples"] == n == 8 and served["eval/transformers/skipped_videos"] == 0
    assert abs(in_run["eval/exact_match"] - served["eval/transformers/exact_match"]) * n <= 1 + 1e-9


def assert_generate_stops_at_im_end(export: Path, hf_model, trainer, max_new_tokens: int = 12) -> None:
    """The export's generation_config.json alone makes greedy generate end the turn at
    <|im_end|> (the trained model emits it; without it in eos_token_id generate runs on)."""
    tok = trainer.tokenizer
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"][:2] == [im_end, eot]
    processor = hf_eval.load_processor(export)
    for record, base_dir in list(hf_eval.eval_records(trainer.cfg.data, tok))[:2]:
        messages, _ = hf_eval.prompt_and_reference(record, base_dir)
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        new = hf_model.generate(**inputs, max_new_tokens=max_new_tokens)[0, inputs["input_ids"].shape[1]:].tolist()
        assert new[-1] == im_end and im_end not in new[:-1] and len(new) < max_new_tokens, new
