"""Loader: exact resume, sharding across ranks and workers, bad-sample policies, no hangs.

Most tests use a fast text-only stand-in encoder (the loader's behaviour does not depend on
what encode_sample computes); the tests at the bottom run the real encode_sample on the demo set.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

from qvl_train.data.config import DataConfig, DatasetConfig, load_data_config
from qvl_train.data.loader import MixtureLoader
from qvl_train.data.sources import BadSample
from qvl_train.data.tokenizer import build_tiny_tokenizer, load_tokenizer


def fake_encode(raw):
    """Text-only encoding whose length depends on the record; 'bad' records raise like the encoder."""
    rec = raw.record
    if "bad" in rec:
        raise BadSample(rec["bad"], "stand-in encoder rejected the sample")
    n = rec["n"]
    ids = torch.arange(n) % 900 + rec["i"] % 50
    labels = ids.clone()
    labels[: n // 2] = -100
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": torch.ones(n, dtype=torch.long),
        "position_ids": torch.arange(n).expand(3, n),
        "num_text_tokens": n,
        "num_visual_tokens": 0,
    }


def write(path, n, *, tag, extra=None):
    with open(path, "w") as f:
        for i in range(n):
            rec = {"i": i, "tag": tag, "n": 3 + (i * 7) % 13}
            rec.update((extra or {}).get(i, {}))
            f.write(json.dumps(rec) + "\n")
    return str(path)


def make_cfg(tmp_path, *, n_a=37, n_b=14, streaming=False, **kw):
    datasets = [
        DatasetConfig(path=write(tmp_path / "a.jsonl", n_a, tag="a"), streaming=streaming),
        DatasetConfig(path=write(tmp_path / "b.jsonl", n_b, tag="b"), weight=1.5, streaming=streaming),
    ]
    base = dict(datasets=datasets, max_length=32, tokens_per_batch=64, buffer_size=8, seed=7)
    base.update(kw)
    return DataConfig(**base)


def loader(cfg, **kw):
    return MixtureLoader(cfg, encode=fake_encode, pad_token_id=1000, **kw)


def same(a, b):
    return all(
        torch.equal(x["input_ids"], y["input_ids"])
        and x["sample_ids"] == y["sample_ids"]
        and torch.equal(x["position_ids"], y["position_ids"])
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize(
    "num_workers,packing,streaming",
    [
        (0, True, False),
        (0, False, False),
        (2, True, False),
        (0, True, True),
        (2, False, True),
    ],
)
def test_resume_gives_exactly_the_next_batches(tmp_path, num_workers, packing, streaming):
    cfg = make_cfg(tmp_path, num_workers=num_workers, packing=packing, streaming=streaming)
    n_before, n_after = 7, 12  # odd n_before: resume lands mid round-robin with 2 workers; crosses epochs
    reference = list(islice(loader(cfg), n_before + n_after))
    first = loader(cfg)
    assert same(list(islice(first, n_before)), reference[:n_before])
    state = json.loads(json.dumps(first.state_dict()))  # plain data, survives torch.save/json
    resumed = loader(cfg)
    resumed.load_state_dict(state)
    assert same(list(islice(resumed, n_after)), reference[n_before:])
    assert resumed.epoch >= 1  # the reference run crossed an epoch boundary


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_cover_each_sample_exactly_once_per_epoch(tmp_path, num_workers):
    cfg = make_cfg(tmp_path, num_workers=num_workers)  # b has weight 1.5: 14 + 7 uses
    seen = Counter()
    for rank in range(2):
        for batch in loader(cfg, rank=rank, world_size=2, num_epochs=1):
            seen.update(sid for row in batch["sample_ids"] for sid in row)
    assert all(seen[f"a:{i}"] == 1 for i in range(37)) and sum(v for k, v in seen.items() if k[0] == "a") == 37
    assert sum(v for k, v in seen.items() if k[0] == "b") == 21 and set(seen.values()) <= {1, 2}


def test_epochs_are_reshuffled_and_batches_respect_token_budget(tmp_path):
    cfg = make_cfg(tmp_path)
    ld = loader(cfg, num_epochs=2)
    batches = list(ld)
    ids = [sid for b in batches for row in b["sample_ids"] for sid in row]
    a_ids = [i for i in ids if i.startswith("a:")]  # weight 1: each sample once per epoch
    half = len(a_ids) // 2
    assert sorted(a_ids[:half]) == sorted(a_ids[half:]) and a_ids[:half] != a_ids[half:]
    assert all(b["input_ids"].numel() <= cfg.tokens_per_batch for b in batches)
    eff = sum(b["stats"]["real_tokens"] for b in batches) / sum(b["stats"]["slots"] for b in batches)
    assert eff > 0.8


def test_eval_split_reads_held_out_records_once_in_order(tmp_path):
    cfg = make_cfg(tmp_path, eval_fraction=0.25)
    ev = [sid for b in loader(cfg, split="eval", num_epochs=1) for row in b["sample_ids"] for sid in row]
    tr = {sid for b in loader(cfg, num_epochs=1) for row in b["sample_ids"] for sid in row}
    assert ev and tr.isdisjoint(ev) and len(ev) == len(set(ev))
    assert ev == [sid for b in loader(cfg, split="eval", num_epochs=1) for row in b["sample_ids"] for sid in row]


BAD = {3: {"bad": "missing_media"}, 5: {"n": 200}, 9: {"bad": "missing_media"}}


def bad_cfg(tmp_path, policy, num_workers=0):
    path = tmp_path / "bad.jsonl"
    write(path, 20, tag="x", extra=BAD)
    with open(path, "a") as f:
        f.write("{this is not json\n")  # line 21
    return DataConfig(
        datasets=[DatasetConfig(path=str(path))],
        max_length=32,
        tokens_per_batch=64,
        buffer_size=8,
        on_bad_sample=policy,
        shuffle=False,
        num_workers=num_workers,
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_policy_counts_per_reason_and_logs_once(tmp_path, caplog, num_workers):
    cfg = bad_cfg(tmp_path, "skip", num_workers=num_workers)
    ld = loader(cfg, num_epochs=1)
    with caplog.at_level(logging.WARNING, logger="qvl_train.data.loader"):
        got = [sid for b in ld for row in b["sample_ids"] for sid in row]
    assert sorted(got) == sorted(f"bad:{i}" for i in range(20) if i not in BAD)
    assert ld.bad_sample_counts == {"missing_media": 2, "too_long": 1, "bad_json": 1}
    if num_workers == 0:  # worker processes log to their own stderr
        msgs = [r.getMessage() for r in caplog.records]
        assert len(msgs) == 3 and any("bad.jsonl:4" in m for m in msgs) and any("bad.jsonl:21" in m for m in msgs)


def test_skip_counts_survive_resume_without_double_counting(tmp_path):
    cfg = bad_cfg(tmp_path, "skip")
    reference = loader(cfg, num_epochs=1)
    list(reference)
    ld = loader(cfg, num_epochs=1)
    list(islice(ld, 1))
    resumed = loader(cfg, num_epochs=1)
    resumed.load_state_dict(ld.state_dict())
    list(resumed)
    assert resumed.bad_sample_counts == reference.bad_sample_counts


def test_endless_stream_of_only_bad_samples_raises_instead_of_hanging(tmp_path):
    path = tmp_path / "allbad.jsonl"
    write(path, 4, tag="x", extra={i: {"bad": "corrupt_media"} for i in range(4)})
    cfg = DataConfig(datasets=[DatasetConfig(path=str(path))], max_length=32, tokens_per_batch=64, on_bad_sample="skip")
    with pytest.raises(ValueError, match="were bad"):
        next(iter(loader(cfg)))


def test_too_few_samples_for_the_shards_raises(tmp_path):
    cfg = make_cfg(tmp_path, n_a=1, n_b=0)
    cfg.datasets = cfg.datasets[:1]
    with pytest.raises(ValueError, match="no samples"):
        next(iter(loader(cfg, rank=1, world_size=2)))


def test_state_from_another_world_size_is_refused(tmp_path):
    cfg = make_cfg(tmp_path)
    state = loader(cfg, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        loader(cfg, rank=0, world_size=4).load_state_dict(state)


# ---------------------------------------------------------------- the real encoder on demo data

DEMO = Path(__file__).resolve().parents[2] / "data" / "vqa_demo"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def demo_cfg(*overrides):
    return load_data_config("vqa_demo", ["data.buffer_size=32", *overrides])


def test_real_encoder_demo_resume_with_workers(tokenizer):
    cfg = demo_cfg("data.num_workers=2")
    reference = list(islice(MixtureLoader(cfg, tokenizer=tokenizer), 7))
    first = MixtureLoader(cfg, tokenizer=tokenizer)
    list(islice(first, 3))
    resumed = MixtureLoader(cfg, tokenizer=tokenizer)
    resumed.load_state_dict(first.state_dict())
    got = list(islice(resumed, 4))
    assert same(got, reference[3:])
    for a, b in zip(got, reference[3:]):
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key])
    assert any(b["pixel_values_videos"] is not None for b in reference)  # videos went through


def test_real_encoder_eval_split_is_the_eval_file_once(tokenizer):
    ev = MixtureLoader(demo_cfg(), tokenizer=tokenizer, split="eval", num_epochs=1)
    ids = [sid for b in ev for row in b["sample_ids"] for sid in row]
    n = sum(1 for line in open(DEMO / "eval.jsonl") if line.strip())
    assert sorted(ids) == sorted(f"vqa_demo_eval:{i}" for i in range(n))


def _conv(user_content, answer="a"):
    return {"messages": [{"role": "user", "content": user_content}, {"role": "assistant", "content": answer}]}


REAL_BAD = {  # reason -> the bad line (line 2 of its file; line 1 is a good sample)
    "missing_media": json.dumps(
        _conv([{"type": "image", "image": "images/missing.png"}, {"type": "text", "text": "q"}])
    ),
    "corrupt_media": json.dumps(
        _conv([{"type": "image", "image": "images/corrupt.png"}, {"type": "text", "text": "q"}])
    ),
    "no_assistant_turn": json.dumps({"messages": [{"role": "user", "content": "q"}]}),
    "unknown_content_type": json.dumps(_conv([{"type": "audio", "audio": "x.wav"}])),
    "too_long": json.dumps(_conv("word " * 300)),
    "bad_json": "{not json",
}


def real_bad_file(tmp_path, reasons):
    (tmp_path / "images").mkdir(exist_ok=True)
    shutil.copy(DEMO / "images" / "train_shape_0000.png", tmp_path / "images" / "ok.png")
    (tmp_path / "images" / "corrupt.png").write_bytes(b"not a png")
    good = json.dumps(_conv([{"type": "image", "image": "images/ok.png"}, {"type": "text", "text": "colour?"}], "red"))
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([good, *(REAL_BAD[r] for r in reasons), good]) + "\n")
    return path


@pytest.mark.parametrize("reason", sorted(REAL_BAD))
def test_real_bad_input_error_policy_names_file_line_and_reason(tokenizer, tmp_path, reason):
    path = real_bad_file(tmp_path, [reason])
    workers = 1 if reason == "missing_media" else 0  # from a worker process it is still a BadSample
    cfg = demo_cfg(f"data.datasets=[{{path: '{path}'}}]", "data.shuffle=false", f"data.num_workers={workers}")
    with pytest.raises(BadSample) as e:
        list(MixtureLoader(cfg, tokenizer=tokenizer, num_epochs=1))
    assert e.value.reason == reason and f"{path}:2" in str(e.value)


def test_real_bad_inputs_skip_policy_counts_each_reason(tokenizer, tmp_path):
    reasons = sorted(REAL_BAD)
    path = real_bad_file(tmp_path, reasons)
    cfg = demo_cfg(f"data.datasets=[{{path: '{path}'}}]", "data.shuffle=false", "data.on_bad_sample=skip")
    ld = MixtureLoader(cfg, tokenizer=tokenizer, num_epochs=1)
    got = [sid for b in ld for row in b["sample_ids"] for sid in row]
    assert sorted(got) == ["mixed:0", f"mixed:{len(reasons) + 1}"]
    assert ld.bad_sample_counts == {r: 1 for r in reasons}


def test_skip_counts_are_reported_even_when_no_batch_is_produced(tokenizer, tmp_path):
    path = tmp_path / "allbad.jsonl"
    path.write_text(REAL_BAD["bad_json"] + "\n" + REAL_BAD["no_assistant_turn"] + "\n")
    cfg = demo_cfg(f"data.datasets=[{{path: '{path}'}}]", "data.on_bad_sample=skip", "data.num_workers=1")
    ld = MixtureLoader(cfg, tokenizer=tokenizer, num_epochs=1)
    assert list(ld) == [] and ld.bad_sample_counts == {"bad_json": 1, "no_assistant_turn": 1}
