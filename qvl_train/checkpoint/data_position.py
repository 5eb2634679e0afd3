"""The data position of a checkpoint as a GLOBAL sample position, so a run resumed on another
world size (or data.num_workers) continues the same epoch order and still uses every sample once
per epoch.

Sharding rule (data.sources.Shard): position p of an epoch's order goes to rank p % world, and
within a rank to worker (p // world) % num_workers. Ranks pack samples into batches at their own
pace, so at a checkpoint they stand at different positions, and inside a buffer the samples of
the batches already yielded are not a prefix (length grouping reorders them). Each shard's state
therefore says which of its positions it used: everything before its buffer, plus the buffer
offsets of the samples it yielded (ShardState.taken). A checkpoint keeps every rank's loader
state (gathered; a few hundred bytes each). A resume with the same world size and workers takes
its own state back (exact resume, same batches). Any other layout computes, for each epoch a
shard was in, the mask of positions already used, and every new shard takes its slice (the same
rule) of the positions NOT used, in epoch order (MixtureLoader._consumed); later epochs are
sharded as usual. Bad-sample counts move to rank 0's first worker, so the global sums stay right.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import Any

import numpy as np
import torch.distributed as dist

from qvl_train.data.loader import MixtureLoader, ShardState, pack_mask, unpack_mask
from qvl_train.data.sources import Shard


def gather(loader: MixtureLoader) -> list[dict[str, Any]]:
    """Collective: every rank's loader.state_dict(), in rank order."""
    mine = loader.state_dict()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def restore(loader: MixtureLoader, state: dict[str, Any]) -> None:
    """Set this rank's loader from a checkpoint's state (state.load's result)."""
    saved = (state.get("train_state") or {}).get("loaders")
    if saved is None:  # DeepSpeed format: this rank's own state only (same layout, checked before)
        loader.load_state_dict(state["loader"])
        return
    first = saved[0]
    if len(saved) == loader.world_size and first["num_workers"] == loader.num_workers:
        loader.load_state_dict(saved[loader.rank])
        return
    loader.load_state_dict(resharded(loader, saved))


def used_masks(loader: MixtureLoader, saved: list[dict[str, Any]]) -> dict[int, np.ndarray]:
    """epoch -> bool mask of its positions already used by the saving ranks (epochs every saving
    shard has finished are left out: nothing of them remains)."""
    shards = [(st, r, w, s) for r, st in enumerate(saved) for w, s in enumerate(st["shards"])]
    first, last = min(s["epoch"] for *_, s in shards), max(s["epoch"] for *_, s in shards)
    masks: dict[int, np.ndarray] = {}
    for epoch in range(first, last + 1):
        n = len(loader.mixture.epoch_order(epoch))
        used = np.zeros(n, dtype=bool)
        for st, r, w, s in shards:
            before = st.get("consumed", {}).get(str(epoch))
            prior = unpack_mask(before) if before is not None else np.zeros(n, dtype=bool)
            used |= prior  # used before an earlier reshard
            free = np.flatnonzero(~prior)  # the positions this shard's slice was taken from
            mine = Shard(r, st["world_size"], w, st["num_workers"]).take(free)
            if s["epoch"] > epoch:
                used[mine] = True
            elif s["epoch"] == epoch:
                used[mine[: s["buffer_start"]]] = True
                if s["yielded"]:
                    used[mine[s["buffer_start"] + np.asarray(s.get("taken", []), dtype=np.int64)]] = True
        masks[epoch] = used
    return masks


def resharded(loader: MixtureLoader, saved: list[dict[str, Any]]) -> dict[str, Any]:
    """This rank's loader state continuing the saving ranks' epoch(s) on the loader's layout."""
    first = saved[0]
    if first["seed"] != loader.cfg.seed or first["split"] != loader.split:
        raise ValueError(f"the checkpoint's data position was saved with data.seed={first['seed']} "
                         f"({first['split']} split); this run has data.seed={loader.cfg.seed}: resume with the same seed.")
    if loader.mixture.streaming:
        raise ValueError(f"a streaming dataset's position cannot move from {len(saved)} ranks x {first['num_workers']} "
                         f"workers to {loader.world_size} x {loader.num_workers}; resume with the saving layout.")
    masks = used_masks(loader, saved)
    epoch = min(masks)
    bad: Counter = Counter()
    for st in saved:
        for counts in st["bad"]:
            bad.update(counts)
    bads = [dict(bad) if loader.rank == 0 and w == 0 else {} for w in range(loader.num_workers)]
    shards = [asdict(ShardState(epoch=epoch, bad_before=dict(b))) for b in bads]
    return {**first, "rank": loader.rank, "world_size": loader.world_size, "num_workers": loader.num_workers,
            "next_worker": 0, "shards": shards, "bad": bads,
            "consumed": {str(e): pack_mask(m) for e, m in masks.items()}}
