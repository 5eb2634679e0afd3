"""Look at a dataset before training on it.

    python -m qvl_train.data.inspect FILE... [--model-dir DIR] [--data-config vqa_demo]
        [--max-length N] [--sample N | --all] [--seed S] [--workers N] [--limit N] [--show K]

For each file: records, text and visual tokens, a length histogram, how many samples are too
long for max_length, and how many are bad and why (with the first file:line of each reason).
Then one sample is rendered with its label mask: trained tokens are wrapped in [[ ]], runs of
vision placeholders are shortened to <|image_pad|>x16.

By default a file with more than --sample records (10,000) is not read whole: a seeded random
sample of its records is encoded and the whole file's numbers are estimated from it, each with a
95% interval (bad and too-long rates and histogram counts: Wilson intervals; token totals: the
sample mean x records, +- 1.96 standard errors; both with the finite-population correction).
`--all` encodes every record for exact numbers. Either way the records are encoded by --workers
processes (default: the CPUs this process may use, at most 8) with a progress bar on stderr.

Design choices: it runs the training encoder itself (same options as training, from the data
config), so what it reports is what the loader will do; without --model-dir it builds the tiny
tokenizer in a temporary folder (2 s, no network). Random records are read through the source's
byte-offset index (a JSONL file is scanned once for line starts, about 1 s per million lines, and
never parsed whole). Workers are forked (the encoder and the index are inherited, not rebuilt)
and take records in chunks of CHUNK; statistics are sums, merged in chunk order.
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qvl_train.data.config import DataConfig, DatasetConfig, load_data_config
from qvl_train.data.loader import SampleEncoder
from qvl_train.data.packing import IGNORE_INDEX, sample_length
from qvl_train.data.sources import BadSample, open_source

HIST_EDGES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_SAMPLE = 10_000
CHUNK = 64  # records per worker task: small enough for a smooth progress bar
Z95 = 1.959963984540054


@dataclass
class FileStats:
    """Sums over the records encoded (all of them, or the sample); merged across chunks."""

    name: str
    population: int = 0  # records the report describes: the file, or its first --limit
    samples: int = 0  # records read and encoded (ok or bad)
    ok: int = 0
    sums: Counter = field(default_factory=Counter)  # text/visual tokens and length: sum and sum of squares
    min_length: int | None = None
    max_length: int = 0
    too_long: int = 0
    hist: Counter = field(default_factory=Counter)  # histogram bin edge -> encoded samples
    bad: Counter = field(default_factory=Counter)
    first_bad: dict[str, tuple[int, str]] = field(default_factory=dict)  # reason -> (record index, where)
    workers: int = 1  # processes that encoded

    def add_ok(self, n: int, text: int, visual: int, max_length: int) -> None:
        self.ok += 1
        for key, v in (("text", text), ("visual", visual), ("length", n)):
            self.sums[key] += v
            self.sums[key + "_sq"] += v * v
        self.min_length = n if self.min_length is None else min(self.min_length, n)
        self.max_length = max(self.max_length, n)
        self.too_long += n > max_length
        self.hist[_bin(n)] += 1

    def add_bad(self, index: int, reason: str, where: str) -> None:
        self.bad[reason] += 1
        if reason not in self.first_bad or index < self.first_bad[reason][0]:
            self.first_bad[reason] = (index, where)

    def merge(self, o: FileStats) -> None:
        self.samples += o.samples
        self.ok += o.ok
        self.sums.update(o.sums)
        if o.min_length is not None:
            self.min_length = o.min_length if self.min_length is None else min(self.min_length, o.min_length)
        self.max_length = max(self.max_length, o.max_length)
        self.too_long += o.too_long
        self.hist.update(o.hist)
        self.bad.update(o.bad)
        for reason, (index, where) in o.first_bad.items():
            if reason not in self.first_bad or index < self.first_bad[reason][0]:
                self.first_bad[reason] = (index, where)

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    @property
    def exact(self) -> bool:
        return self.samples == self.population


def _bin(n: int) -> int:
    return next((e for e in HIST_EDGES if n <= e), HIST_EDGES[-1] * 2)


# ---- encoding: one chunk of record indices, in a worker or in this process ------------------


@dataclass
class _Job:
    src: Any
    encode: SampleEncoder
    max_length: int
    show: int  # render the show-th encoded sample (-1: none)


_JOB: _Job | None = None  # set in this process, inherited by forked workers


def _set_job(job: _Job) -> None:
    global _JOB
    _JOB = job


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # the pool is the parallelism


def _inspect_chunk(indices: np.ndarray) -> tuple[FileStats, list[tuple[str, str]]]:
    """Stats of the records `indices`, and (where, rendered) of its first show+1 encoded samples."""
    job = _JOB
    stats, shown = FileStats(job.src.name), []
    for i in indices.tolist():
        stats.samples += 1
        try:
            raw = job.src[i]
        except BadSample as e:  # bad_json: the message already names file:line
            stats.add_bad(i, e.reason, str(e))
            continue
        try:
            sample = job.encode(raw)
        except BadSample as e:
            stats.add_bad(i, e.reason, f"{raw.where}: {getattr(e, 'message', e)}")
            continue
        n = sample_length(sample)
        stats.add_ok(n, int(sample.get("num_text_tokens", n)), int(sample.get("num_visual_tokens", 0)), job.max_length)
        if len(shown) <= job.show:
            shown.append((raw.where, render(sample, job.encode.tokenizer)))
    return stats, shown


def inspect_file(path: str, encode: SampleEncoder, max_length: int, *, limit: int | None = None,
                 sample: int | None = DEFAULT_SAMPLE, seed: int = 0, workers: int = 1, show: int = -1,
                 progress: bool = True) -> tuple[FileStats, tuple[str, str] | None]:
    """Encode every record (sample=None, or when the file has no more than `sample`), else a seeded
    random sample of `sample` records. Returns the stats and the show-th encoded sample as
    (file:line, rendered text), if any."""
    src = open_source(DatasetConfig(path=path))
    if progress:
        print(f"{src.name}: indexing records ...", file=sys.stderr, flush=True)
    population = len(src) if limit is None else min(limit, len(src))
    if sample is None or population <= sample:
        indices = np.arange(population)
    else:  # sorted: the file is read front to back
        indices = np.sort(np.random.default_rng(seed).choice(population, size=sample, replace=False))
    chunks = [indices[i:i + CHUNK] for i in range(0, len(indices), CHUNK)]
    stats, shown = FileStats(src.name, population=population), []
    _set_job(_Job(src, encode, max_length, show))
    stats.workers = workers = max(1, min(workers, len(chunks)))
    what = "every record" if len(indices) == population else f"a random sample (seed {seed})"
    bar = _progress_bar(len(indices), f"{src.name}: encoding {what}", progress)
    try:
        for part, part_shown in _map(chunks, workers):
            stats.merge(part)
            shown += part_shown
            bar.update(part.samples)
    finally:
        bar.close()
        _set_job(None)
    return stats, (shown[show] if 0 <= show < len(shown) else None)


def _map(chunks: list[np.ndarray], workers: int):
    """_inspect_chunk over the chunks, in order; forked worker processes when workers > 1."""
    if workers == 1:
        yield from map(_inspect_chunk, chunks)
        return
    # A forked child inherits the tokenizer; the Rust tokenizers library warns (and turns off its
    # own threads) when its thread pool was used before the fork. The workers are the parallelism.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_worker_init) as pool:
        yield from pool.imap(_inspect_chunk, chunks)


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="rec", file=sys.stderr, disable=not enabled, mininterval=0.5,
                dynamic_ncols=True)


# ---- estimates ---------------------------------------------------------------------------------


def _fpc(n: int, population: int) -> float:
    """Finite-population correction of a variance: sampling without replacement."""
    return (population - n) / max(population - 1, 1)


def wilson_interval(k: int, n: int, population: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson interval of a proportion seen k times in a sample of n of `population` records
    (the sample's effective size is n / fpc: a sample of the whole file is exact)."""
    f = _fpc(n, population)
    if n == 0:
        return 0.0, 1.0
    p = k / n
    if f <= 0:
        return p, p
    n_eff = n / f
    denom = 1 + z * z / n_eff
    centre = (p + z * z / (2 * n_eff)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n_eff + z * z / (4 * n_eff * n_eff))
    return max(0.0, centre - half), min(1.0, centre + half)


def total_estimate(stats: FileStats, key: str, z: float = Z95) -> tuple[float, float]:
    """(estimated file total, 95% half-width) of a per-record quantity (0 for bad records)."""
    n, big_n = stats.samples, stats.population
    if n == 0:
        return 0.0, 0.0
    mean = stats.sums[key] / n
    var = max(stats.sums[key + "_sq"] / n - mean * mean, 0.0) * n / max(n - 1, 1)
    return big_n * mean, z * big_n * math.sqrt(var / n * _fpc(n, big_n))


# ---- the report --------------------------------------------------------------------------------


def histogram(stats: FileStats) -> list[str]:
    width = max(stats.hist.values(), default=0)
    lines = []
    for edge in sorted(stats.hist):
        count, bar = stats.hist[edge], "#" * (40 * stats.hist[edge] // width)
        if stats.exact:
            lines.append(f"  <= {edge:>6}: {count:>6} {bar}")
        else:
            lo, hi = wilson_interval(count, stats.samples, stats.population)
            est = stats.population * count / stats.samples
            lines.append(f"  <= {edge:>6}: ~{est:,.0f} ({lo * stats.population:,.0f}-{hi * stats.population:,.0f}) {bar}")
    return lines


def report(stats: FileStats, max_length: int) -> str:
    return _exact_report(stats, max_length) if stats.exact else _estimated_report(stats, max_length)


def _exact_report(stats: FileStats, max_length: int) -> str:
    n = max(stats.ok, 1)
    lines = [
        f"== {stats.name}: {stats.samples} samples, {stats.ok} encode, {stats.num_bad} bad",
        f"  text tokens {stats.sums['text']} (mean {stats.sums['text'] / n:.1f}), "
        f"visual tokens {stats.sums['visual']} (mean {stats.sums['visual'] / n:.1f})",
        f"  length min/mean/max {stats.min_length or 0}/{stats.sums['length'] / n:.1f}/{stats.max_length}; "
        f"longer than max_length={max_length} (truncated, or dropped as too_long if no answer is left): {stats.too_long}",
        "  length histogram:",
        *histogram(stats),
    ]
    for reason, count in stats.bad.most_common():
        lines.append(f"  bad[{reason}] x{count}, first: {stats.first_bad[reason][1]}")
    return "\n".join(lines)


def _rate(k: int, stats: FileStats) -> str:
    """'k in the sample: p% (lo-hi%), ~K (KLO-KHI) records in the file'."""
    n, big_n = stats.samples, stats.population
    lo, hi = wilson_interval(k, n, big_n)
    return (f"{k} in the sample: {100 * k / n:.2f}% (95% CI {100 * lo:.2f}-{100 * hi:.2f}%), "
            f"~{big_n * k / n:,.0f} ({big_n * lo:,.0f}-{big_n * hi:,.0f}) records in the file")


def _estimated_report(stats: FileStats, max_length: int) -> str:
    n = max(stats.ok, 1)
    text, text_ci = total_estimate(stats, "text")
    visual, visual_ci = total_estimate(stats, "visual")
    lines = [
        f"== {stats.name}: {stats.population:,} records; ESTIMATED from a random sample of {stats.samples:,} "
        "(--all for exact numbers), with 95% intervals",
        f"  bad: {_rate(stats.num_bad, stats)}",
        f"  text tokens ~{text:,.0f} +- {text_ci:,.0f}, visual tokens ~{visual:,.0f} +- {visual_ci:,.0f} "
        f"(means per encoded sample {stats.sums['text'] / n:.1f} and {stats.sums['visual'] / n:.1f})",
        f"  length min/mean/max in the sample {stats.min_length or 0}/{stats.sums['length'] / n:.1f}/{stats.max_length}",
        f"  longer than max_length={max_length} (truncated, or dropped as too_long if no answer is left): "
        f"{_rate(stats.too_long, stats)}",
        "  length histogram (records in the file, 95% CI):",
        *histogram(stats),
    ]
    for reason, count in stats.bad.most_common():
        lines.append(f"  bad[{reason}] {_rate(count, stats)}; first in the sample: {stats.first_bad[reason][1]}")
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


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qvl_train.data.inspect", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help=".jsonl or other local dataset files")
    ap.add_argument("--model-dir", help="model folder with the tokenizer (default: the tiny tokenizer)")
    ap.add_argument("--data-config", help="configs/data/<NAME>.yaml for media options and max_length")
    ap.add_argument("--max-length", type=int, help="override data.max_length")
    ap.add_argument("--sample", type=int, default=DEFAULT_SAMPLE,
                    help=f"encode a random sample of this many records and estimate the rest (default {DEFAULT_SAMPLE:,})")
    ap.add_argument("--all", action="store_true", help="encode every record: exact numbers")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random sample")
    ap.add_argument("--workers", type=int, default=default_workers(),
                    help="encoding processes (default: the usable CPUs, at most 8)")
    ap.add_argument("--limit", type=int, help="only the first N records of each file")
    ap.add_argument("--show", type=int, default=0, help="which encoded sample to render (index, -1 = none)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.sample < 1 or args.workers < 1:
        ap.error("--sample and --workers must be at least 1")

    cfg = load_data_config(args.data_config) if args.data_config else DataConfig()
    max_length = args.max_length or cfg.max_length
    tokenizer = _tokenizer(args.model_dir)
    # The encoder's own length check is lifted so that too-long samples are measured, not rejected.
    encode = SampleEncoder(tokenizer, {**cfg.media_options(), "max_length": None})
    show = args.show
    for path in args.files:
        t0 = time.perf_counter()
        stats, shown = inspect_file(path, encode, max_length, limit=args.limit, sample=None if args.all else args.sample,
                                    seed=args.seed, workers=args.workers, show=show, progress=not args.no_progress)
        print(report(stats, max_length))
        print(f"  ({stats.samples:,} records encoded in {time.perf_counter() - t0:.1f} s by {stats.workers} processes)")
        if shown is not None:  # one rendered sample in all: the first file that has it
            where, text = shown
            print(f"\n-- {where} (trained tokens in [[ ]])\n{text}\n")
            show = -1
    return 0


if __name__ == "__main__":
    sys.exit(main())
