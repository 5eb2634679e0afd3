"""The demo data as the tests feed it to our model and to transformers'."""


def demo_image_batch(tokenizer, line: int, image_token_id: int) -> tuple[dict, dict]:
    """One held-out demo conversation encoded by the training pipeline: (our forward kwargs,
    the extra kwargs transformers' model needs: mm_token_type_ids)."""
    import json
    from pathlib import Path

    from qvl_train.data import encode_sample, load_data_config

    sample = json.loads(Path("data/vqa_demo/eval.jsonl").read_text().splitlines()[line])
    enc = encode_sample(sample, tokenizer=tokenizer, base_dir="data/vqa_demo", **load_data_config("vqa_demo").media_options())
    batch = {k: enc[k][None] for k in ("input_ids", "attention_mask")}
    batch.update({k: enc[k] for k in ("pixel_values", "image_grid_thw")})
    return batch, {"mm_token_type_ids": (batch["input_ids"] == image_token_id).int()}
