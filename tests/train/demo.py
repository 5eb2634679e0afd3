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


# Image budgets that are neither the model dir's defaults (65,536+ px) nor the vqa recipe's
# (16,384-36,864 px), so an export that carried either instead would encode differently.
SERVING_IMAGE_BUDGETS = ("data.image.min_pixels=8192", "data.image.max_pixels=20480")
# Video budgets the export's files cannot carry exactly (a per-frame cap, a per-sample budget;
# the demo itself has neither): the model card must list them.
SERVING_VIDEO_BUDGETS = ("data.video.max_pixels=32768", "data.video.max_frame_pixels=4096",
                         "data.video.min_frame_pixels=1024", "data.video.max_visual_tokens=64")


def serving_overrides(tmp_dir, num_samples: int = 8) -> list[str]:
    """Overrides for a run whose end-of-run eval is also scored by transformers on the export:
    the non-default image and video budgets and a held-out set of the first `num_samples` demo image
    questions (absolute paths; transformers cannot build a video processor without torchvision)."""
    import json
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    samples = []
    for line in (repo / "data/vqa_demo/eval.jsonl").read_text().splitlines():
        sample = json.loads(line)
        parts = sample["messages"][0]["content"]
        if any(p["type"] == "video" for p in parts):
            continue
        for p in parts:
            if p["type"] == "image":
                p["image"] = str(repo / "data/vqa_demo" / p["image"])
        samples.append(sample)
        if len(samples) == num_samples:
            break
    path = Path(tmp_dir) / "image_eval.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in samples) + "\n")
    return [*SERVING_IMAGE_BUDGETS, *SERVING_VIDEO_BUDGETS, f"data.eval_datasets=[{{path: {path}, name: image_eval}}]",
            "train.generate_max_samples=0", "eval.backend=transformers"]
