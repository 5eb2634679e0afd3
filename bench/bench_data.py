"""encode_sample vs transformers' Qwen3VLProcessor on the same image samples, same process.

Both sides start from the image files on disk and end with input_ids + pixel_values +
image_grid_thw; ours additionally builds labels and 3D position_ids. The reference is the
processor transformers builds here (Qwen2VLImageProcessorPil, as torchvision is absent).

    python bench/bench_data.py [--n 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from qvl_train.data import encode_sample, load_tokenizer  # noqa: E402
from qvl_train.data.tokenizer import build_tiny_tokenizer, write_processor_configs  # noqa: E402


def make_samples(root: Path, n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        w, h = int(rng.integers(200, 900)), int(rng.integers(200, 900))
        # Smooth content (not noise) so PNG decode cost is realistic.
        y, x = np.mgrid[0:h, 0:w]
        arr = np.stack([(x * (i + 1)) % 256, (y * 3) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)
        Image.fromarray(arr).save(root / f"img{i}.jpg", quality=90)
        samples.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"img{i}.jpg"},
                                         {"type": "text", "text": "What colour is the square?"}]},
            {"role": "assistant", "content": "The square is red."},
        ]})
    return samples


def reference_processor(model_dir: Path, tok):
    from transformers import AutoImageProcessor
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class Ref(Qwen3VLProcessor):  # no video processor: it needs torchvision
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" and arg is None else super().check_argument_for_proper_class(name, arg)

    ip = AutoImageProcessor.from_pretrained(str(model_dir), local_files_only=True)
    p = Ref(image_processor=ip, tokenizer=tok, video_processor=None, chat_template=tok.chat_template)
    p.video_processor = types.SimpleNamespace(merge_size=2, temporal_patch_size=2)
    return p


def run_ours(samples, tok, root):
    vis = 0
    for s in samples:
        vis += encode_sample(s, tokenizer=tok, base_dir=root)["num_visual_tokens"]
    return vis


def run_reference(samples, tok, proc, root):
    vis = 0
    for s in samples:
        msgs = s["messages"]
        view = [{**m, "content": [p if p["type"] == "text" else {"type": "image"} for p in m["content"]]}
                if isinstance(m["content"], list) else m for m in msgs]
        text = tok.apply_chat_template(view, tokenize=False)
        images = [Image.open(root / p["image"]).convert("RGB") for m in msgs if isinstance(m["content"], list)
                  for p in m["content"] if p["type"] == "image"]
        out = proc(text=[text], images=images, return_tensors="pt")
        vis += int(out["image_grid_thw"].prod(-1).sum()) // 4
    return vis


def timed_pair(fn_a, fn_b, repeat):
    """Best-of-`repeat` times of two functions, run alternately so load spikes hit both alike."""
    best, results = [float("inf"), float("inf")], [None, None]
    for _ in range(repeat):
        for i, fn in enumerate((fn_a, fn_b)):
            t = time.perf_counter()
            results[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best, results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # a data-loader worker's view of the machine
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        build_tiny_tokenizer(root / "model")
        write_processor_configs(root / "model")
        tok = load_tokenizer(root / "model")
        samples = make_samples(root, args.n)
        proc = reference_processor(root / "model", tok)
        run_ours(samples[:2], tok, root)  # warm caches / imports on both sides
        run_reference(samples[:2], tok, proc, root)
        (t_ours, t_ref), (vis_ours, vis_ref) = timed_pair(
            lambda: run_ours(samples, tok, root), lambda: run_reference(samples, tok, proc, root), args.repeat
        )
    assert vis_ours == vis_ref, (vis_ours, vis_ref)
    n = len(samples)
    print(f"{n} image samples, {vis_ours} visual tokens in all (best of {args.repeat})")
    print(f"encode_sample       : {n / t_ours:8.1f} samples/s  {vis_ours / t_ours:10.0f} visual tokens/s")
    print(f"Qwen3VLProcessor    : {n / t_ref:8.1f} samples/s  {vis_ref / t_ref:10.0f} visual tokens/s")
    print(f"ratio (ours / transformers): {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    main()
