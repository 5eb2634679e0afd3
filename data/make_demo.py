"""Generate the bundled demo VQA set (deterministic): python data/make_demo.py [--out data/vqa_demo]

Images are small PNGs (64x64 to 128x96) of coloured shapes on light backgrounds; videos are
tiny MP4 clips of a ball moving in one direction. Questions have one-word answers drawn from a
small vocabulary, so a tiny model can learn them far above chance in a few CPU minutes. Media
paths in the JSONL files are relative to the JSONL's folder. {train,eval}.jsonl hold every task;
video_{train,eval}.jsonl only the video rows (configs/data/video_demo.yaml).

Tasks (chance level = 1 / number of answers):
  colour  "What colour is the shape?"            red / green / blue / yellow    (25%)
  shape   "What shape is this?"                  circle / square / triangle     (33%)
  count   "How many squares are there?"          1 / 2 / 3                      (33%)
  motion  "Which direction does the ball move?"  left / right / up / down (video) (25%)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((64, 64), (96, 64), (64, 96), (128, 96))
DIRECTIONS = ("left", "right", "up", "down")
SPLITS = {"train": (11, 300, 120, 60), "eval": (12, 40, 20, 16)}  # seed, shape images, count images, videos


def background(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(200, 250) for _ in range(3))


def draw_shape(d: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def shape_image(rng: random.Random) -> tuple[Image.Image, str, str]:
    w, h = rng.choice(SIZES)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    img = Image.new("RGB", (w, h), background(rng))
    side = rng.randint(int(0.5 * min(w, h)), int(0.8 * min(w, h)))
    x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + side - 1, y0 + side - 1), COLOURS[colour])
    return img, colour, shape


def count_image(rng: random.Random) -> tuple[Image.Image, int]:
    w, h = rng.choice(SIZES[1:])
    n = rng.randint(1, 3)
    img = Image.new("RGB", (w, h), background(rng))
    d = ImageDraw.Draw(img)
    cells = [(cx, cy) for cx in range(w // 32) for cy in range(h // 32)]  # one square per 32x32 cell
    for cx, cy in rng.sample(cells, n):
        side = rng.randint(14, 22)
        x0, y0 = cx * 32 + rng.randint(0, 31 - side), cy * 32 + rng.randint(0, 31 - side)
        d.rectangle((x0, y0, x0 + side, y0 + side), fill=COLOURS[rng.choice(list(COLOURS))])
    return img, n


def write_video(path: Path, rng: random.Random) -> str:
    import av

    direction, colour = rng.choice(DIRECTIONS), rng.choice(list(COLOURS))
    size, num_frames, r = 64, 8, 9
    bg = background(rng)
    start, end = rng.randint(14, 20), rng.randint(44, 50)
    if direction in ("left", "up"):
        start, end = end, start
    fixed = rng.randint(16, 48)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)  # 8 frames at 4 fps = 2 seconds
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}
        for k in range(num_frames):
            pos = round(start + (end - start) * k / (num_frames - 1))
            cx, cy = (pos, fixed) if direction in ("left", "right") else (fixed, pos)
            img = Image.new("RGB", (size, size), bg)
            ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return direction


def message(media_type: str, media: str, question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": [{"type": media_type, media_type: media}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer},
        ]
    }


def make_split(out: Path, split: str) -> list[dict]:
    seed, num_shapes, num_counts, num_videos = SPLITS[split]
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_shapes):
        img, colour, shape = shape_image(rng)
        rel = f"images/{split}_shape_{i:04d}.png"
        img.save(out / rel, optimize=True)
        rows.append(message("image", rel, "What colour is the shape?", colour))
        rows.append(message("image", rel, "What shape is this?", shape))
    for i in range(num_counts):
        img, n = count_image(rng)
        rel = f"images/{split}_count_{i:04d}.png"
        img.save(out / rel, optimize=True)
        rows.append(message("image", rel, "How many squares are there?", str(n)))
    for i in range(num_videos):
        rel = f"videos/{split}_ball_{i:04d}.mp4"
        direction = write_video(out / rel, rng)
        rows.append(message("video", rel, "Which direction does the ball move?", direction))
    random.Random(seed + 1).shuffle(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "vqa_demo"))
    args = ap.parse_args()
    out = Path(args.out)
    for split in SPLITS:
        rows = make_split(out, split)
        videos = [r for r in rows if r["messages"][0]["content"][0]["type"] == "video"]
        for name, subset in ((f"{split}.jsonl", rows), (f"video_{split}.jsonl", videos)):
            with open(out / name, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in subset)
            print(f"{len(subset)} samples -> {out / name}")


if __name__ == "__main__":
    main()
