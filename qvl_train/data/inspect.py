"""Look at a dataset before training on it.

    python -m qvl_train.data.inspect FILE... [--model-dir DIR] [--data-config vqa_demo]
        [--max-length N] [--limit N] [--show K]

For each file: samples, text and visual tokens, a length histogram, how many samples are too
long for max_length, and how many are bad and why (with the first file:line of each reason).
Then one sample is rendered with its label mask: trained tokens are wrapped in [[ ]], runs of
vision placeholders are shortened to <|image_pad|>x16.

Design choices: it runs the training encoder itself (same options as training, from the data
config), so what it reports is what the loader will do; without --model-dir it builds the tiny
tokenizer in a temporary folder (2 s, no network).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from qvl_train.data.config import DataConfig, DatasetConfig, load_data_config
from qvl_train.data.loader import SampleEncoder
from qvl_train.data.packing import IGNORE_INDEX, sample_length
from qvl_train.data.sources import BadSample, RawSample, open_source

HIST_EDGES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclass
class FileStats:
    name: str
    samples: int = 0
    ok: int = 0
    text_tokens: int = 0
    visual_tokens: int = 0
    too_long: int = 0
    lengths: list[int] = field(default_factory=list)
    bad: Counter = field(default_factory=Counter)
    first_bad: dict[str, str] = field(default_factory=dict)


def inspect_file(
    path: str, encode: SampleEncoder, max_length: int, limit: int | None, show: int = -1
) -> tuple[FileStats, tuple[RawSample, dict[str, Any]] | None]:
    """Encode every record (up to limit); returns stats and the show-th encoded sample (if any).

    Only that one sample is kept, so memory stays flat on large files.
    """
    src = open_source(DatasetConfig(path=path))
    stats, shown = FileStats(src.name), None
    for i in range(len(src) if limit is None else min(limit, len(src))):
        stats.samples += 1
        try:
            raw = src[i]
        except BadSample as e:  # bad_json: the message already names file:line
            _count_bad(stats, e, str(e))
            continue
        try:
            sample = encode(raw)
        except BadSample as e:
            _count_bad(stats, e, f"{raw.where}: {getattr(e, 'message', e)}")
            continue
        n = sample_length(sample)
        stats.ok += 1
        stats.lengths.append(n)
        stats.text_tokens += int(sample.get("num_text_tokens", n))
        stats.visual_tokens += int(sample.get("num_visual_tokens", 0))
        stats.too_long += n > max_length
        if stats.ok - 1 == show:
            shown = (raw, sample)
    return stats, shown


def _count_bad(stats: FileStats, e: BadSample, where: str) -> None:
    stats.bad[e.reason] += 1
    stats.first_bad.setdefault(e.reason, where)


def histogram(lengths: list[int]) -> list[str]:
    counts = Counter(next((e for e in HIST_EDGES if n <= e), HIST_EDGES[-1] * 2) for n in lengths)
    width = max(counts.values(), default=0)
    return [f"  <= {edge:>6}: {counts[edge]:>6} {'#' * (40 * counts[edge] // width)}" for edge in sorted(counts)]


def report(stats: FileStats, max_length: int) -> str:
    n = max(stats.ok, 1)
    lines = [
        f"== {stats.name}: {stats.samples} samples, {stats.ok} encode, {sum(stats.bad.values())} bad",
        f"  text tokens {stats.text_tokens} (mean {stats.text_tokens / n:.1f}), "
        f"visual tokens {stats.visual_tokens} (mean {stats.visual_tokens / n:.1f})",
        f"  length min/mean/max {min(stats.lengths, default=0)}/{sum(stats.lengths) / n:.1f}/"
        f"{max(stats.lengths, default=0)}; longer than max_length={max_length} (truncated, or dropped as "
        f"too_long if no answer is left): {stats.too_long}",
        "  length histogram:",
        *histogram(stats.lengths),
    ]
    for reason, count in stats.bad.most_common():
        lines.append(f"  bad[{reason}] x{count}, first: {stats.first_bad[reason]}")
    return "\n".join(lines)


def render(sample: dict[str, Any], tokenizer: Any) -> str:
    """Decoded text with trained tokens (label != -100) inside [[ ]]."""
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    pieces, run, trained = [], [], None
    for tok, lab in zip(ids, labels):
        t = lab != IGNORE_INDEX
        if run and t != trained:
            pieces.append((trained, run))
            run = []
        run.append(tok)
        trained = t
    if run:
        pieces.append((trained, run))
    out = []
    for t, toks in pieces:
        text = tokenizer.decode(toks, skip_special_tokens=False)
        out.append(f"[[{text}]]" if t else text)
    return re.sub(
        r"(<\|(?:image|video)_pad\|>)(?:\1)+",
        lambda m: f"{m.group(1)}x{len(m.group(0)) // len(m.group(1))}",
        "".join(out),
    )


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str | None):
    from qvl_train.data.tokenizer import build_tiny_tokenizer, load_tokenizer

    if model_dir:
        return load_tokenizer(model_dir)
    return load_tokenizer(build_tiny_tokenizer(tempfile.mkdtemp(prefix="qvl_tiny_tok_")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qvl_train.data.inspect", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help=".jsonl or other local dataset files")
    ap.add_argument("--model-dir", help="model folder with the tokenizer (default: the tiny tokenizer)")
    ap.add_argument("--data-config", help="configs/data/<NAME>.yaml for media options and max_length")
    ap.add_argument("--max-length", type=int, help="override data.max_length")
    ap.add_argument("--limit", type=int, help="only the first N records of each file")
    ap.add_argument("--show", type=int, default=0, help="which encoded sample to render (index, -1 = none)")
    args = ap.parse_args(argv)

    cfg = load_data_config(args.data_config) if args.data_config else DataConfig()
    max_length = args.max_length or cfg.max_length
    tokenizer = _tokenizer(args.model_dir)
    # The encoder's own length check is lifted so that too-long samples are measured, not rejected.
    encode = SampleEncoder(tokenizer, {**cfg.media_options(), "max_length": None})
    show = args.show
    for path in args.files:
        stats, shown = inspect_file(path, encode, max_length, args.limit, show)
        print(report(stats, max_length))
        if shown is not None:  # one rendered sample in all: the first file that has it
            raw, sample = shown
            print(f"\n-- {raw.where} (trained tokens in [[ ]])\n{render(sample, tokenizer)}\n")
            show = -1
    return 0


if __name__ == "__main__":
    sys.exit(main())
