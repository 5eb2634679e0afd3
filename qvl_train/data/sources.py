"""Conversation sources, weighted mixtures, held-out splits and rank/worker sharding.

Sources yield raw records (dicts in messages or ShareGPT form; the encoder converts) with
provenance: dataset name, file, 1-based line (JSONL) or row index (HF), and base_dir (the
folder relative media paths resolve against).

Design choices:
- Two access modes. Indexed (default): a JSONL file is scanned once for line offsets, so
  any record can be read by index; HF datasets are memory-mapped Arrow. An epoch is then an
  explicit permutation, which makes shuffling, sharding and resuming exact and cheap.
  Streaming (``streaming: true``, for data larger than memory or disk-backed HF streams): records
  are read in file order; resume replays the stream and skips what was consumed (reading
  without parsing the skipped JSON lines, and without decoding media).
- Weights are repeat factors per epoch: floor(w) full copies plus a fraction frac(w) of the
  samples. Indexed mode picks exactly round(frac * n) samples per epoch (seeded by
  (seed, epoch, dataset)); streaming mode keeps each record with probability frac(w).
- Held-out split by hashing (dataset name, record index) with splitmix64: deterministic,
  independent of the seed and of the order of datasets, and computable per record in
  streaming mode. Appending records to a file keeps the earlier assignments.
- Streaming interleaves sources at rates proportional to their weights until each runs out (sizes
  are unknown up front), then shuffles through a buffer (shuffle_buffer records per shard). Every
  worker reads the whole stream and keeps its own positions: reading JSONL lines is cheap next to
  decoding media, and it keeps sharding identical to the indexed mode.
- Sharding: position p of the epoch's sample order goes to rank p % world_size; within a rank,
  the rank-local position q goes to worker q % num_workers. So a rank's samples do not depend on
  the number of workers, and each sample is used exactly once per epoch across ranks.
- A JSON line that does not parse raises BadSample("bad_json") naming file and line; it is
  raised when the record is read, so the loader's on_bad_sample policy applies to it.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qvl_train.data.config import DatasetConfig
from qvl_train.data.media import BadSample

REPO_ROOT = Path(__file__).resolve().parents[2]
_HF_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


def bad_sample(reason: str, where: str, detail: str) -> BadSample:
    """A BadSample whose message starts with the record's location (file:line)."""
    return BadSample(reason, f"{where}: {detail}")


@dataclass(frozen=True)
class RawSample:
    record: dict[str, Any]
    dataset: str
    path: str
    index: int  # 0-based record index in the dataset (blank lines do not count)
    line: int | None  # 1-based line for JSONL files
    base_dir: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}" if self.line is not None else f"{self.path}[row {self.index}]"


def resolve_path(path: str) -> Path:
    """Absolute, else relative to the working directory, else to the repository root."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]
    for c in candidates:
        if c.exists():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise ValueError(f"dataset path {path!r} not found (tried {tried}); fix data.datasets[].path.")


# ----------------------------------------------------------------------------- sources


class JsonlSource:
    """A .jsonl file; indexed by byte offsets of its non-blank lines."""

    def __init__(self, cfg: DatasetConfig):
        self.path = str(resolve_path(cfg.path))
        self.name = cfg.name or Path(self.path).stem
        self.base_dir = cfg.base_dir or str(Path(self.path).parent)
        self.streaming = cfg.streaming
        self._offsets: np.ndarray | None = None
        self._lines: np.ndarray | None = None
        self._fh = None
        self._fh_pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fh": None, "_fh_pid": -1}  # file handles do not cross processes

    def _build_index(self) -> None:
        offsets, lines, pos = [], [], 0
        with open(self.path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if raw.strip():
                    offsets.append(pos)
                    lines.append(line_no)
                pos += len(raw)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._lines = np.asarray(lines, dtype=np.int64)

    def __len__(self) -> int:
        if self._offsets is None:
            self._build_index()
        return len(self._offsets)

    def __getitem__(self, index: int) -> RawSample:
        if self._offsets is None:
            self._build_index()
        if self._fh_pid != os.getpid():  # one handle per process: workers must not share offsets
            self._fh, self._fh_pid = open(self.path, "rb"), os.getpid()
        self._fh.seek(int(self._offsets[index]))
        return self.parse(index, int(self._lines[index]), self._fh.readline())

    def iter_raw(self) -> Iterator[tuple[int, int | None, Any]]:
        """(index, line, payload) in file order, without parsing (cheap to skip)."""
        index = 0
        with open(self.path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if raw.strip():
                    yield index, line_no, raw
                    index += 1

    def parse(self, index: int, line: int | None, payload: Any) -> RawSample:
        where = f"{self.path}:{line}"
        try:
            record = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_sample("bad_json", where, f"line is not valid JSON ({e}); fix or delete the line.") from None
        if not isinstance(record, dict):
            raise bad_sample("bad_json", where, f"expected a JSON object, got {type(record).__name__}.")
        return RawSample(record, self.name, self.path, index, line, self.base_dir)


class HFSource:
    """A local dataset read by Hugging Face ``datasets`` (file, data folder, or save_to_disk)."""

    def __init__(self, cfg: DatasetConfig):
        p = resolve_path(cfg.path)
        self.path = str(p)
        self.name = cfg.name or (p.stem if p.is_file() else p.name)
        self.base_dir = cfg.base_dir or str(p.parent if p.is_file() else p)
        self.streaming = cfg.streaming
        self._split = cfg.split
        self._ds = None

    def _load(self):
        import datasets

        p = Path(self.path)
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()):
            ds = datasets.load_from_disk(self.path)
            ds = ds[self._split] if isinstance(ds, datasets.DatasetDict) else ds
            return ds.to_iterable_dataset() if self.streaming else ds
        if p.is_dir():
            return datasets.load_dataset(self.path, split=self._split, streaming=self.streaming)
        if p.suffix not in _HF_BUILDERS:
            raise ValueError(f"{self.path}: unknown data file type {p.suffix!r}; use one of {sorted(_HF_BUILDERS)}.")
        return datasets.load_dataset(
            _HF_BUILDERS[p.suffix], data_files=self.path, split="train", streaming=self.streaming
        )

    @property
    def ds(self):
        if self._ds is None:
            self._ds = self._load()
        return self._ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> RawSample:
        return self.parse(index, None, self.ds[int(index)])

    def iter_raw(self) -> Iterator[tuple[int, int | None, Any]]:
        for index, row in enumerate(self.ds):
            yield index, None, row

    def parse(self, index: int, line: int | None, payload: Any) -> RawSample:
        # Arrow unifies struct fields across rows (an image item gains "text": None): drop Nones.
        return RawSample(_drop_nones(payload), self.name, self.path, index, None, self.base_dir)


def _drop_nones(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _drop_nones(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_nones(v) for v in x]
    return x


Source = JsonlSource | HFSource


def open_source(cfg: DatasetConfig) -> Source:
    fmt = cfg.format
    if fmt == "auto":
        fmt = "jsonl" if cfg.path.endswith(".jsonl") else "hf"
    return JsonlSource(cfg) if fmt == "jsonl" else HFSource(cfg)


# ----------------------------------------------------------------------------- split / hashing

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def _salt(*parts: Any) -> np.uint64:
    digest = hashlib.sha1("\0".join(map(str, parts)).encode()).digest()
    return np.uint64(int.from_bytes(digest[:8], "little"))


def unit_hash(indices: np.ndarray, *salt_parts: Any) -> np.ndarray:
    """Deterministic uniform numbers in [0, 1) for record indices, salted by e.g. a dataset name."""
    x = np.asarray(indices, dtype=np.uint64) ^ _salt(*salt_parts)
    return (_splitmix64(x) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def in_split(indices: np.ndarray, dataset: str, eval_fraction: float, keep: str) -> np.ndarray:
    """Boolean mask of the records to keep: "all", "train" (not held out) or "eval" (held out)."""
    if keep == "all" or eval_fraction <= 0.0:
        return np.full(len(indices), keep != "eval")
    held_out = unit_hash(indices, "heldout", dataset) < eval_fraction
    return held_out if keep == "eval" else ~held_out


# ----------------------------------------------------------------------------- mixture


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    def take(self, positions: np.ndarray) -> np.ndarray:
        """This shard's slice of an epoch's sample order (see module docstring)."""
        return positions[self.rank :: self.world_size][self.worker :: self.num_workers]

    def owns(self, position: int) -> bool:
        return (
            position % self.world_size == self.rank and (position // self.world_size) % self.num_workers == self.worker
        )


class Mixture:
    """Weighted datasets; yields a shard's RawSamples for an epoch, from any start position.

    keep: "all" records, or the "train" / "eval" side of the hashed held-out split.
    """

    def __init__(
        self,
        sources: list[Source],
        weights: list[float],
        *,
        seed: int,
        shuffle: bool,
        keep: str = "all",
        eval_fraction: float = 0.0,
        buffer_size: int = 1024,
    ):
        if len(sources) != len(weights):
            raise ValueError("one weight per source")
        if keep not in ("all", "train", "eval"):
            raise ValueError(f"keep={keep!r}: use 'all', 'train' or 'eval'.")
        self.sources, self.weights, self.seed = sources, list(weights), seed
        self.shuffle, self.keep, self.eval_fraction = shuffle, keep, eval_fraction
        self.streaming = any(s.streaming for s in sources)
        self.shuffle_buffer = buffer_size
        self._members: dict[int, np.ndarray] = {}
        self._order_cache: tuple[int, np.ndarray] | None = None

    # ---- indexed mode

    def prepare(self) -> None:
        """Index every source now (in the parent process, before workers fork)."""
        if not self.streaming:
            for s in range(len(self.sources)):
                self.members(s)

    def members(self, s: int) -> np.ndarray:
        """Record indices of source s that belong to this split."""
        if s not in self._members:
            idx = np.arange(len(self.sources[s]), dtype=np.int64)
            self._members[s] = idx[in_split(idx, self.sources[s].name, self.eval_fraction, self.keep)]
        return self._members[s]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(N, 2) int64 rows of (source, record index) for one epoch, shuffled by (seed, epoch)."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        parts = []
        for s, w in enumerate(self.weights):
            members = self.members(s)
            whole, frac = int(w), w - int(w)
            picked = [members] * whole
            extra = int(round(frac * len(members)))
            if extra:
                rng = np.random.default_rng([self.seed, epoch, s, 1])
                picked.append(np.sort(rng.choice(members, size=extra, replace=False)))
            for p in picked:
                parts.append(np.stack([np.full(len(p), s, dtype=np.int64), p], axis=1))
        order = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, epoch, 0]).permutation(len(order))]
        self._order_cache = (epoch, order)
        return order

    # ---- both modes

    def iter_shard(self, epoch: int, shard: Shard, start: int = 0, consumed=None) -> Iterator[RawSample | BadSample]:
        """This shard's samples for ``epoch`` from shard-local position ``start``.

        A record that cannot be read is yielded as its BadSample (not raised) so that the caller
        applies the bad-sample policy and keeps its position count exact. ``consumed`` (a bool
        mask over the epoch's positions, after a resume on another world size): the shard takes
        its slice of the positions not yet used this epoch instead of all of them.
        """
        if self.streaming:
            if consumed is not None:
                raise ValueError("a streaming dataset's position cannot be resharded onto another world size or "
                                 "data.num_workers; resume with the saving layout.")
            yield from self._iter_stream_shard(epoch, shard, start)
            return
        order = self.epoch_order(epoch)
        for s, i in shard.take(order if consumed is None else order[~consumed])[start:]:
            try:
                yield self.sources[s][int(i)]
            except BadSample as e:
                yield e

    # ---- streaming mode

    def _iter_stream(self, epoch: int) -> Iterator[tuple[int, int, int | None, Any]]:
        """(source, index, line, payload): sources interleaved at rates proportional to their
        weights (seeded) until each runs out; each source is read in file order."""
        iters = {s: self._iter_source_passes(s, epoch) for s, w in enumerate(self.weights) if w > 0}
        rng = np.random.default_rng([self.seed, epoch, 2])
        while iters:
            keys = list(iters)
            cum = list(itertools.accumulate(self.weights[k] for k in keys))
            s = keys[min(bisect.bisect_right(cum, rng.random() * cum[-1]), len(keys) - 1)] if self.shuffle else keys[0]
            item = next(iters[s], None)
            if item is None:
                del iters[s]
                continue
            yield (s, *item)

    def _iter_source_passes(self, s: int, epoch: int) -> Iterator[tuple[int, int | None, Any]]:
        """floor(w) passes over source s, plus one pass keeping each record with probability frac(w)."""
        w, src = self.weights[s], self.sources[s]
        whole, frac = int(w), w - int(w)
        split_by_hash = self.keep != "all" and self.eval_fraction > 0
        for rep in range(whole + (frac > 0)):
            for index, line, payload in src.iter_raw():
                if split_by_hash and not in_split(np.asarray([index]), src.name, self.eval_fraction, self.keep)[0]:
                    continue
                if rep == whole and unit_hash(np.asarray([index]), self.seed, epoch, s, "keep")[0] >= frac:
                    continue
                yield index, line, payload

    def _iter_stream_shard(self, epoch: int, shard: Shard, start: int) -> Iterator[RawSample | BadSample]:
        owned = (item for pos, item in enumerate(self._iter_stream(epoch)) if shard.owns(pos))
        if self.shuffle:
            owned = _buffer_shuffle(
                owned, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, 3, shard.rank, shard.worker])
            )
        for k, (s, index, line, payload) in enumerate(owned):
            if k < start:
                continue  # replay for resume: skipped records are never parsed
            try:
                yield self.sources[s].parse(index, line, payload)
            except BadSample as e:
                yield e


def _buffer_shuffle(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def build_mixture(
    datasets: list[DatasetConfig],
    *,
    seed: int,
    shuffle: bool = True,
    keep: str = "all",
    eval_fraction: float = 0.0,
    use_weights: bool = True,
    buffer_size: int = 1024,
) -> Mixture:
    """Open the datasets; ``use_weights=False`` reads every record once (evaluation)."""
    sources = [open_source(d) for d in datasets]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset names must be unique (got {names}); set data.datasets[].name.")
    weights = [d.weight for d in datasets] if use_weights else [1.0] * len(datasets)
    return Mixture(
        sources, weights, seed=seed, shuffle=shuffle, keep=keep, eval_fraction=eval_fraction, buffer_size=buffer_size
    )
