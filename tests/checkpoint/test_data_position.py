"""The data position reshards: ranks stopped at different places (mid-buffer, packed batches)
and resumed on another world size use every sample of the epoch exactly once, also after a
second reshard; the same layout takes its own state back."""

from collections import Counter

from qvl_train.checkpoint.data_position import restore

from ..data.test_loader import loader, make_cfg


def _epoch0(ld):
    """Run a loader to the end of epoch 0: the sample ids of its epoch-0 batches."""
    ids, it = [], iter(ld)
    while True:
        batch = next(it)
        if ld._states[0].epoch != 0:  # this batch already came from epoch 1
            return ids
        ids += [s for row in batch["sample_ids"] for s in row]


def _resume(cfg, saved, world):
    loaders = [loader(cfg, rank=r, world_size=world) for r in range(world)]
    for ld in loaders:
        restore(ld, {"train_state": {"loaders": saved}})
    return loaders


def test_resharded_data_position_uses_every_sample_once_per_epoch(tmp_path):
    cfg = make_cfg(tmp_path)
    whole = Counter(_epoch0(loader(cfg)))  # one rank, one epoch: the epoch's samples (b weighted 1.5)
    assert sum(whole.values()) > 50

    used: list[str] = []
    two = [loader(cfg, rank=r, world_size=2) for r in range(2)]
    for ld, n in zip(two, (3, 5)):  # different paces: rank 1 is further into the epoch
        it = iter(ld)
        for _ in range(n):
            used += [s for row in next(it)["sample_ids"] for s in row]
    assert any(s["yielded"] for ld in two for s in ld.state_dict()["shards"])  # stopped inside a buffer

    three = _resume(cfg, [ld.state_dict() for ld in two], 3)
    for ld in three:
        batch = next(iter(ld))
        if ld._states[0].epoch == 0:  # (a rank with little left may already be in epoch 1)
            used += [s for row in batch["sample_ids"] for s in row]
    assert any(ld._states[0].epoch == 0 and ld._states[0].yielded for ld in three)
    one = _resume(cfg, [ld.state_dict() for ld in three], 1)  # and again, onto one rank
    used += _epoch0(one[0])
    assert Counter(used) == whole

    # the same layout takes its own state back: the batches an uninterrupted rank would produce
    fresh = [loader(cfg, rank=r, world_size=2) for r in range(2)]
    for ld, n in zip(fresh, (3, 5)):
        it = iter(ld)
        for _ in range(n):
            next(it)
    again = _resume(cfg, [ld.state_dict() for ld in fresh], 2)
    for a, b in zip(again, fresh):
        assert next(iter(a))["sample_ids"] == next(iter(b))["sample_ids"]
