"""Checks that the demo data configs encode every sample exactly as with the per-frame cap and
per-sample budget they used to set (data.video.max_frame_pixels=4096, max_visual_tokens=64,
min_frame_pixels=1024, max_pixels=32768): the configs dropped them so that an export carries every
setting (docs/serving.md). Not a speed bench; ~10 s per config on 2 cores.

    python bench/demo_budgets.py [vqa_demo video_demo]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qvl_train.data.config import load_data_config  # noqa: E402
from qvl_train.data.loader import SampleEncoder  # noqa: E402
from qvl_train.data.sources import open_source  # noqa: E402
from qvl_train.data.tokenizer import build_tiny_tokenizer, load_tokenizer  # noqa: E402

OLD_BUDGETS = ["data.video.max_pixels=32768", "data.video.max_frame_pixels=4096", "data.video.min_frame_pixels=1024",
               "data.video.max_visual_tokens=64"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def main(names: list[str]) -> int:
    tokenizer = load_tokenizer(build_tiny_tokenizer(tempfile.mkdtemp()))
    failed = 0
    for name in names:
        now, before = load_data_config(name), load_data_config(name, OLD_BUDGETS)
        enc_now, enc_before = SampleEncoder(tokenizer, now.media_options()), SampleEncoder(tokenizer, before.media_options())
        total = differ = 0
        for ds in [*now.datasets, *now.eval_datasets]:
            src = open_source(ds)
            for i in range(len(src)):
                total += 1
                differ += not same(enc_now(src[i]), enc_before(src[i]))
        print(f"{name}: {total} samples, {differ} encode differently")
        failed += differ
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["vqa_demo", "video_demo"]))
