"""`python -m qvl_train.data.inspect` on a large JSONL: the default sampled report vs a full
single-process pass (the old behaviour), in one process.

    python bench/bench_inspect.py [--lines 2000000] [--workers 2] [--file F.jsonl]

The file (unless --file): demo image conversations (data/vqa_demo, one 128-192 px image each, the
kind that encodes at ~500 records/s per core), 1% bad lines. Prints: the time to index the
file, the default report's wall time (10,000-record sample, --workers), the single-process
encode rate on the first 2,000 records, the full pass that rate implies, and the ratio. CPU
seconds (this process and its workers) are printed beside wall times: on a shared machine the
wall time of W workers is at best CPU / W.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qvl_train.data import inspect as data_inspect  # noqa: E402
from qvl_train.data.config import load_data_config  # noqa: E402
from qvl_train.data.loader import SampleEncoder  # noqa: E402


def make_file(path: Path, lines: int) -> None:
    demo = REPO / "data" / "vqa_demo"
    (path.parent / "images").symlink_to(demo / "images")
    images = [line for line in (demo / "train.jsonl").read_text().splitlines() if '"video"' not in line]
    bad = ["{not json", json.dumps({"messages": [{"role": "user", "content": "no answer"}]})]
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(lines):
            f.write((bad[i % 2] if rng.random() < 0.01 else images[i % len(images)]) + "\n")


def cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=2_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--file")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_inspect_"))
    path = Path(args.file) if args.file else tmp / "big.jsonl"
    if not args.file:
        make_file(path, args.lines)
    cfg = load_data_config("vqa_demo")
    encode = SampleEncoder(data_inspect._tokenizer(None), {**cfg.media_options(), "max_length": None})

    from qvl_train.data.config import DatasetConfig
    from qvl_train.data.sources import open_source

    t0 = time.perf_counter()
    num = len(open_source(DatasetConfig(path=str(path))))
    index_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), cpu_s()
    stats, _ = data_inspect.inspect_file(str(path), encode, cfg.max_length, workers=args.workers, progress=False)
    sampled_s, sampled_cpu = time.perf_counter() - t0, cpu_s() - c0
    t0, c0 = time.perf_counter(), cpu_s()
    data_inspect.inspect_file(str(path), encode, cfg.max_length, limit=2000, sample=None, workers=1, progress=False)
    one_s, one_cpu = time.perf_counter() - t0, cpu_s() - c0
    full_s, full_cpu = num / 2000 * one_s, num / 2000 * one_cpu
    print(f"{num:,} records; index {index_s:.1f} s")
    print(f"default report ({stats.samples:,}-record sample, {stats.workers} workers): {sampled_s:.1f} s wall, "
          f"{sampled_cpu:.1f} CPU s")
    print(f"one process, first 2,000 records: {2000 / one_s:.0f} records/s wall, {2000 / one_cpu:.0f} per CPU s: "
          f"a full single-process pass ~{full_s / 60:.0f} min wall, {full_cpu / 60:.0f} CPU min")
    print(f"full pass / default report: x{full_s / sampled_s:.0f} wall, x{full_cpu / sampled_cpu:.0f} CPU")


if __name__ == "__main__":
    main()
