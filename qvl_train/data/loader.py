"""Resumable, sharded, multi-worker loader over a dataset mixture.

Pipeline, per shard (one rank's worker): mixture samples for the epoch -> encode_sample ->
a buffer of ``buffer_size`` encoded samples -> packing / length grouping -> batches.

Design choices:
- Exact resume. The state of a shard is (epoch, position where its current buffer starts,
  batches already yielded from that buffer, bad-sample counts before the buffer). Everything after
  that is a pure function of (config, seed, epoch, shard), so resuming re-reads and re-encodes one
  buffer, skips the batches already yielded, and continues with exactly the batches an
  uninterrupted run would have produced. Nothing depends on wall time or on worker timing.
- Workers: torch's DataLoader (IterableDataset, batch_size=None), because it already gives
  worker processes, shared-memory tensor transfer, prefetch (prefetch_factor), pin_memory, and
  an error instead of a hang when a worker dies or raises. It returns batches from workers in
  strict round robin, so the loader records which (logical) worker comes next; after a resume,
  physical worker i plays logical worker (i + next) % num_workers, and the round robin continues
  where it stopped. Each batch carries its worker's state back to the main process (key
  "_loader", removed before the batch is yielded): state_dict() is only the state of batches the
  caller has received, never of batches still prefetched.
- The training stream is endless by default (num_epochs=None): ranks get different numbers of
  batches per epoch once samples are packed, and an endless stream means no rank runs dry while
  others wait in a collective. The trainer decides how many steps to run. Evaluation uses
  num_epochs=1.
- Bad samples: "error" re-raises BadSample with the file, line and reason; "skip" counts them per
  reason, logs the first of each reason (per process) with file:line, and exposes cumulative
  counts in ``bad_sample_counts``. Errors that are not BadSample always propagate (a bug is not
  a bad sample). A shard whose whole epoch yields no batch raises instead of spinning forever.
- Exact resume needs the same world_size, num_workers, seed and data config; load_state_dict
  checks the first three. With num_epochs set and workers > 0, a state saved after some worker
  has finished its last epoch resumes the remaining batches but not necessarily in the same
  order (the round robin skips finished workers); the endless training stream never hits this.
- A BadSample raised in a worker is sent to the main process as data and re-raised there as a
  BadSample (torch would turn it into a RuntimeError). A worker silent for worker_timeout_s raises.
- One live iterator per loader: iterating again continues from the current state.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any

import torch

from qvl_train.data.config import DataConfig, validate
from qvl_train.data.encode import encode_sample
from qvl_train.data.packing import collate, plan_batches, sample_length
from qvl_train.data.sources import BadSample, Mixture, RawSample, Shard, bad_sample, build_mixture

log = logging.getLogger(__name__)
STATE_VERSION = 1

EncodeFn = Callable[[RawSample], dict[str, Any]]


class SampleEncoder:
    """RawSample -> encoded tensors via ``encode_sample`` (a class so spawned workers can pickle it)."""

    def __init__(self, tokenizer: Any, media_options: dict[str, Any]):
        self.tokenizer = tokenizer
        self.media_options = media_options

    def __call__(self, raw: RawSample) -> dict[str, Any]:
        return encode_sample(raw.record, tokenizer=self.tokenizer, base_dir=raw.base_dir, **self.media_options)


@dataclass
class ShardState:
    epoch: int = 0
    buffer_start: int = 0  # shard-local position of the first sample of the current buffer
    yielded: int = 0  # batches of that buffer already yielded
    bad_before: dict[str, int] = field(default_factory=dict)  # cumulative bad counts before the buffer
    taken: list[int] = field(default_factory=list)  # buffer offsets of the samples in those batches (resharding)


class ShardPipeline:
    """One shard's samples -> batches, sequentially; runs in a worker or in the main process."""

    def __init__(
        self,
        mixture: Mixture,
        shard: Shard,
        encode: EncodeFn,
        cfg: DataConfig,
        *,
        pad_token_id: int,
        num_epochs: int | None,
        consumed: dict[int, Any] | None = None,
    ):
        self.mixture, self.shard, self.encode, self.cfg = mixture, shard, encode, cfg
        self.pad_token_id, self.num_epochs = pad_token_id, num_epochs
        self.consumed = consumed or {}  # epoch -> bool mask of epoch positions used before a reshard
        self._logged: set[str] = set()

    def run(self, state: ShardState) -> Iterator[tuple[dict[str, Any], ShardState]]:
        """Yields (batch, state after the batch); batch["bad_counts"] are cumulative for the shard.

        A finite stream ends with a marker ({"_no_batch": True}) that carries the final counts.
        """
        epoch, start, skip, bad = state.epoch, state.buffer_start, state.yielded, Counter(state.bad_before)
        while self.num_epochs is None or epoch < self.num_epochs:
            full_pass, num_read, produced = start == 0 and skip == 0, 0, 0
            samples_iter = self.mixture.iter_shard(epoch, self.shard, start, consumed=self.consumed.get(epoch))
            while items := list(islice(samples_iter, self.cfg.buffer_size)):
                encoded, window_bad, offsets = self._encode_buffer(items)
                total_bad = bad + window_bad
                plan = plan_batches(
                    [sample_length(s) for s in encoded],
                    packing=self.cfg.packing,
                    max_length=self.cfg.max_length,
                    tokens_per_batch=self.cfg.tokens_per_batch,
                )
                for b in range(skip, len(plan)):
                    batch = collate(
                        [[encoded[i] for i in row] for row in plan[b]],
                        pad_token_id=self.pad_token_id,
                        pad_to_multiple_of=self.cfg.pad_to_multiple_of,
                    )
                    # After the buffer's last batch, resume at the next buffer (no re-encoding).
                    after = (
                        ShardState(epoch, start + len(items), 0, dict(total_bad))
                        if b == len(plan) - 1
                        else ShardState(epoch, start, b + 1, dict(bad), sorted(offsets[i] for p in plan[: b + 1] for row in p for i in row))
                    )
                    batch["bad_counts"] = dict(total_bad)
                    produced += 1
                    yield batch, after
                start, skip, bad, num_read = start + len(items), 0, total_bad, num_read + len(items)
            if full_pass and produced == 0 and self.num_epochs is None and epoch not in self.consumed:
                # An endless stream that yields nothing would spin forever: fail loudly instead.
                raise ValueError(self._empty_epoch_message(epoch, num_read))
            epoch, start, skip = epoch + 1, 0, 0
        # End of a finite stream: report the last bad-sample counts even if no batch carried them.
        yield {"bad_counts": dict(bad), "_no_batch": True}, ShardState(epoch, 0, 0, dict(bad))

    def _encode_buffer(self, items: list[RawSample | BadSample]) -> tuple[list[dict[str, Any]], Counter, list[int]]:
        """(encoded samples, bad counts, each encoded sample's offset in items)."""
        encoded, bad, offsets = [], Counter(), []
        for offset, item in enumerate(items):
            try:
                encoded.append(self._encode_one(item))
                offsets.append(offset)
            except BadSample as e:
                if self.cfg.on_bad_sample == "error":
                    raise
                bad[e.reason] += 1
                if e.reason not in self._logged:
                    self._logged.add(e.reason)
                    log.warning(
                        "skipping bad sample (%s): %s (further %r samples are counted, not logged)",
                        e.reason,
                        e,
                        e.reason,
                    )
        return encoded, bad, offsets

    def _encode_one(self, item: RawSample | BadSample) -> dict[str, Any]:
        if isinstance(item, BadSample):
            raise item
        try:
            sample = self.encode(item)
        except BadSample as e:
            raise bad_sample(e.reason, item.where, getattr(e, "message", str(e))) from e
        except Exception as e:
            raise RuntimeError(f"{item.where}: encoding failed ({type(e).__name__}: {e})") from e
        n = sample_length(sample)
        if n > self.cfg.max_length:
            raise bad_sample(
                "too_long",
                item.where,
                f"{n} tokens > data.max_length={self.cfg.max_length}; raise max_length or shorten it.",
            )
        sample["sample_id"] = f"{item.dataset}:{item.index}"
        sample["source"] = item.where  # file:line, for messages about the batch (e.g. a diverged step)
        return sample

    def _empty_epoch_message(self, epoch: int, num_read: int) -> str:
        s = self.shard
        if num_read:
            return (
                f"rank {s.rank} worker {s.worker}: all {num_read} samples of epoch {epoch} were bad "
                f"(reasons logged above); fix the data or its paths."
            )
        return (
            f"rank {s.rank} worker {s.worker} got no samples in epoch {epoch}: the data has fewer samples "
            f"than world_size * num_workers = {s.world_size * s.num_workers}; lower data.num_workers or add data."
        )


class _WorkerStream(torch.utils.data.IterableDataset):
    """The DataLoader side: each worker runs the pipeline of its logical shard."""

    def __init__(self, loader: MixtureLoader, states: list[ShardState], rotation: int):
        self.loader, self.states, self.rotation = loader, states, rotation

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical, n = (0, 1) if info is None else (info.id, info.num_workers)
        logical = (physical + self.rotation) % n
        try:
            for batch, after in self.loader.pipeline(logical).run(self.states[logical]):
                batch["_loader"] = {"worker": logical, "state": asdict(after)}
                yield batch
        except BadSample as e:
            # Sent as data: torch would re-raise it in the main process as a RuntimeError.
            yield {"_bad_sample": (e.reason, getattr(e, "message", str(e)))}


def _identity(x: Any) -> Any:
    return x


class MixtureLoader:
    """Iterable over batches for one rank; resumable with state_dict()/load_state_dict().

    encode: RawSample -> encoded dict; defaults to encode_sample with ``tokenizer`` and the
      config's media options. pad_token_id defaults to tokenizer.pad_token_id.
    split: "train" (weights, shuffle, held-out records excluded) or "eval" (each eval record
      once: data.eval_datasets, else the held-out fraction of data.datasets).
    num_epochs: None = endless (training); 1 for evaluation. Ranks may then get different numbers
      of batches: the evaluator must not assume equal counts.
    Every rank has its own state: save and restore state_dict() per rank.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        tokenizer: Any = None,
        encode: EncodeFn | None = None,
        pad_token_id: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
        num_epochs: int | None = None,
    ):
        validate(cfg)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size}).")
        self.cfg, self.rank, self.world_size, self.split, self.num_epochs = cfg, rank, world_size, split, num_epochs
        if tokenizer is None and (encode is None or pad_token_id is None):
            raise ValueError("MixtureLoader needs a tokenizer (or both encode= and pad_token_id=).")
        self.encode = encode or SampleEncoder(tokenizer, cfg.media_options())
        self.pad_token_id = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
        self.mixture = _mixture_for(cfg, split)
        self.mixture.prepare()  # index files once here, not once per worker process
        self.num_workers = max(1, cfg.num_workers)
        self._states = [ShardState() for _ in range(self.num_workers)]
        self._bad = [dict() for _ in range(self.num_workers)]
        self._next_worker = 0
        self._consumed: dict[int, Any] = {}  # set by a resharded resume (qvl_train.checkpoint.data_position)

    def pipeline(self, worker: int) -> ShardPipeline:
        shard = Shard(self.rank, self.world_size, worker, self.num_workers)
        return ShardPipeline(
            self.mixture, shard, self.encode, self.cfg, pad_token_id=self.pad_token_id, num_epochs=self.num_epochs,
            consumed=self._consumed,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self._batches():
            if "_bad_sample" in batch:
                raise BadSample(*batch["_bad_sample"])
            meta = batch.pop("_loader")
            w = meta["worker"]
            self._states[w] = ShardState(**meta["state"])
            self._bad[w] = batch.pop("bad_counts")
            self._next_worker = (w + 1) % self.num_workers
            if not batch.pop("_no_batch", False):
                yield batch

    def _batches(self) -> Iterator[dict[str, Any]]:
        stream = _WorkerStream(self, list(self._states), self._next_worker)
        if self.cfg.num_workers == 0:
            return iter(stream)
        return iter(
            torch.utils.data.DataLoader(
                stream,
                batch_size=None,
                num_workers=self.cfg.num_workers,
                prefetch_factor=self.cfg.prefetch,
                collate_fn=_identity,
                pin_memory=torch.cuda.is_available(),
                timeout=self.cfg.worker_timeout_s,
            )
        )

    @property
    def bad_sample_counts(self) -> dict[str, int]:
        total: Counter = Counter()
        for counts in self._bad:
            total.update(counts)
        return dict(total)

    @property
    def epoch(self) -> int:
        """The epoch the slowest worker is in."""
        return min(s.epoch for s in self._states)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "seed": self.cfg.seed,
            "split": self.split,
            "next_worker": self._next_worker,
            "shards": [asdict(s) for s in self._states],
            "bad": list(self._bad),
            "consumed": {str(e): pack_mask(m) for e, m in self._consumed.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (
            ("world_size", self.world_size),
            ("num_workers", self.num_workers),
            ("seed", self.cfg.seed),
            ("rank", self.rank),
            ("split", self.split),
        ):
            if state[key] != mine:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]} but this loader has {mine}; "
                    f"resume with the same {key} (exact resume depends on it)."
                )
        self._states = [ShardState(**s) for s in state["shards"]]
        self._bad = [dict(b) for b in state["bad"]]
        self._next_worker = state["next_worker"]
        self._consumed = {int(e): unpack_mask(m) for e, m in state.get("consumed", {}).items()}


def pack_mask(mask) -> dict[str, Any]:
    """A bool mask as JSON/weights_only-safe values (bits packed, base64)."""
    import base64

    import numpy as np

    return {"n": int(len(mask)), "bits": base64.b64encode(np.packbits(mask).tobytes()).decode()}


def unpack_mask(packed: dict[str, Any]):
    import base64

    import numpy as np

    bits = np.frombuffer(base64.b64decode(packed["bits"]), dtype=np.uint8)
    return np.unpackbits(bits)[: packed["n"]].astype(bool)


def _mixture_for(cfg: DataConfig, split: str) -> Mixture:
    common = dict(seed=cfg.seed, eval_fraction=cfg.eval_fraction, buffer_size=cfg.shuffle_buffer)
    if split == "train":
        return build_mixture(cfg.datasets, shuffle=cfg.shuffle, keep="train", **common)
    if split != "eval":
        raise ValueError(f"split={split!r}: use 'train' or 'eval'.")
    if cfg.eval_datasets:
        return build_mixture(cfg.eval_datasets, shuffle=False, keep="all", use_weights=False, **common)
    if cfg.eval_fraction <= 0:
        raise ValueError("no evaluation data: set data.eval_datasets or data.eval_fraction > 0.")
    return build_mixture(cfg.datasets, shuffle=False, keep="eval", use_weights=False, **common)


def build_loader(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    split: str = "train",
    num_epochs: int | None = None,
) -> MixtureLoader:
    return MixtureLoader(cfg, tokenizer=tokenizer, rank=rank, world_size=world_size, split=split, num_epochs=num_epochs)
