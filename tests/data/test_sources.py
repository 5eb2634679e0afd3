"""Sources, mixtures, held-out split and sharding (no encoding involved)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from qvl_train.data.config import DatasetConfig
from qvl_train.data.sources import BadSample, Shard, build_mixture, in_split, open_source, resolve_path


def write_jsonl(path, n, *, tag="a", blank_every=0):
    with open(path, "w") as f:
        for i in range(n):
            if blank_every and i % blank_every == 0:
                f.write("\n")
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{tag}{i}"}]}) + "\n")
    return str(path)


def ids(mix, order):
    return [f"{mix.sources[s].name}:{i}" for s, i in order]


def test_jsonl_source_reads_by_index_with_line_numbers(tmp_path):
    src = open_source(DatasetConfig(path=write_jsonl(tmp_path / "d.jsonl", 5, blank_every=2)))
    assert len(src) == 5  # blank lines are not samples
    s = src[3]
    assert s.record["messages"][0]["content"] == "a3"
    assert s.line == 6 and s.where.endswith("d.jsonl:6")
    assert s.base_dir == str(tmp_path) and s.dataset == "d"


def test_bad_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"messages": []}\n{not json\n[1, 2]\n')
    src = open_source(DatasetConfig(path=str(p)))
    with pytest.raises(BadSample) as e:
        src[1]
    assert e.value.reason == "bad_json" and f"{p}:2" in str(e.value)
    with pytest.raises(BadSample, match=r"bad.jsonl:3.*JSON object"):
        src[2]


def test_missing_dataset_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not found.*data.datasets"):
        resolve_path(str(tmp_path / "nope.jsonl"))


def test_mixture_is_deterministic_per_seed_and_epoch(tmp_path):
    cfgs = [
        DatasetConfig(path=write_jsonl(tmp_path / "a.jsonl", 20)),
        DatasetConfig(path=write_jsonl(tmp_path / "b.jsonl", 10, tag="b")),
    ]
    m1, m2 = build_mixture(cfgs, seed=3), build_mixture(cfgs, seed=3)
    assert np.array_equal(m1.epoch_order(0), m2.epoch_order(0))
    assert not np.array_equal(m1.epoch_order(0), m1.epoch_order(1))
    assert not np.array_equal(m1.epoch_order(0), build_mixture(cfgs, seed=4).epoch_order(0))
    assert sorted(ids(m1, m1.epoch_order(0))) == sorted(ids(m1, m1.epoch_order(1)))


def test_weights_are_repeat_factors_per_epoch(tmp_path):
    cfgs = [
        DatasetConfig(path=write_jsonl(tmp_path / "a.jsonl", 20), weight=1.0),
        DatasetConfig(path=write_jsonl(tmp_path / "b.jsonl", 10), weight=2.5),
        DatasetConfig(path=write_jsonl(tmp_path / "c.jsonl", 10), weight=0.3),
    ]
    mix = build_mixture(cfgs, seed=0)
    for epoch in range(3):
        order = ids(mix, mix.epoch_order(epoch))
        per_ds = Counter(x.split(":")[0] for x in order)
        assert per_ds == {"a": 20, "b": 25, "c": 3}
        counts = Counter(order)
        assert all(counts[f"a:{i}"] == 1 for i in range(20))
        assert sorted(counts[f"b:{i}"] for i in range(10)) == [2] * 5 + [3] * 5
    subsets = {tuple(sorted(x for x in ids(mix, mix.epoch_order(e)) if x[0] == "c")) for e in range(5)}
    assert len(subsets) > 1  # the fractional part is re-drawn per epoch


def test_held_out_split_is_disjoint_deterministic_and_seed_independent(tmp_path):
    cfg = DatasetConfig(path=write_jsonl(tmp_path / "a.jsonl", 400))
    train = build_mixture([cfg], seed=0, keep="train", eval_fraction=0.1)
    train_other_seed = build_mixture([cfg], seed=9, keep="train", eval_fraction=0.1)
    ev = build_mixture([cfg], seed=0, keep="eval", eval_fraction=0.1, use_weights=False, shuffle=False)
    tr_ids, ev_ids = set(ids(train, train.epoch_order(0))), ids(ev, ev.epoch_order(0))
    assert tr_ids.isdisjoint(ev_ids) and len(tr_ids) + len(ev_ids) == 400
    assert 20 <= len(ev_ids) <= 60
    assert set(ids(train_other_seed, train_other_seed.epoch_order(0))) == tr_ids
    # appending records keeps earlier assignments (hash of dataset name and index)
    idx = np.arange(400)
    assert np.array_equal(in_split(idx, "a", 0.1, "eval"), in_split(np.arange(800), "a", 0.1, "eval")[:400])


@pytest.mark.parametrize("streaming", [False, True])
def test_shards_partition_each_epoch(tmp_path, streaming):
    cfgs = [
        DatasetConfig(path=write_jsonl(tmp_path / "a.jsonl", 23), streaming=streaming),
        DatasetConfig(path=write_jsonl(tmp_path / "b.jsonl", 12, tag="b"), streaming=streaming, weight=1.5),
    ]
    mix = build_mixture(cfgs, seed=1, buffer_size=8)
    for epoch in range(2):
        seen = []
        for rank in range(2):
            for worker in range(2):
                shard = Shard(rank, 2, worker, 2)
                seen += [f"{s.dataset}:{s.index}" for s in mix.iter_shard(epoch, shard)]
        counts = Counter(seen)
        assert all(counts[f"a:{i}"] == 1 for i in range(23)) and sum(counts.values()) >= 23 + 12
        if not streaming:
            assert sum(counts.values()) == 23 + 18


@pytest.mark.parametrize("streaming", [False, True])
def test_iter_shard_resumes_from_position(tmp_path, streaming):
    cfg = DatasetConfig(path=write_jsonl(tmp_path / "a.jsonl", 30), streaming=streaming)
    mix = build_mixture([cfg], seed=5, buffer_size=8)
    shard = Shard(1, 2, 0, 1)
    full = [s.index for s in mix.iter_shard(2, shard)]
    assert [s.index for s in mix.iter_shard(2, shard, start=6)] == full[6:]
    assert full != sorted(full)  # shuffled (buffer shuffle in streaming mode)


def test_bad_json_is_yielded_not_raised_by_iter_shard(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"messages": []}\n{oops\n{"messages": []}\n')
    mix = build_mixture([DatasetConfig(path=str(p))], seed=0, shuffle=False)
    items = list(mix.iter_shard(0, Shard()))
    assert [type(x).__name__ for x in items] == ["RawSample", "BadSample", "RawSample"]


def test_hf_source_reads_parquet_rows_and_drops_arrow_nones(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": f"q{i}"}]}
            ]
        }
        for i in range(6)
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for streaming in (False, True):
        mix = build_mixture(
            [DatasetConfig(path=str(tmp_path / "d.parquet"), streaming=streaming)], seed=0, shuffle=False
        )
        got = list(mix.iter_shard(0, Shard()))
        assert [s.index for s in got] == list(range(6))
        assert got[2].record == rows[2]  # {"type": "image", "image": ..., "text": None} -> None dropped
        assert got[2].where.endswith("d.parquet[row 2]") and got[2].base_dir == str(tmp_path)


@pytest.mark.parametrize("name", ["vqa_demo", "video_demo"])
def test_demo_configs_compose_into_the_schema(name):
    from qvl_train.checkpoint.serving import training_media, untranslated_settings
    from qvl_train.data.config import DataConfig, load_data_config, validate

    cfg = load_data_config(name)
    assert isinstance(cfg, DataConfig) and isinstance(cfg.datasets[0], DatasetConfig)
    validate(cfg)
    assert len(open_source(cfg.datasets[0])) > 0 and len(open_source(cfg.eval_datasets[0])) > 0
    # budgets an export carries exactly: a first run prints no note about settings it cannot carry
    assert untranslated_settings(training_media(cfg, None)) == []
    assert cfg.media_options()["video_max_pixels"] == 16384  # 4 frames of 64x64


def test_config_typos_and_bad_values_are_rejected():
    from qvl_train.data.config import DataConfig, load_data_config, validate

    with pytest.raises(Exception, match="max_lenght"):
        load_data_config("vqa_demo", ["data.max_lenght=3"])
    with pytest.raises(ValueError, match="on_bad_sample"):
        validate(DataConfig(datasets=[DatasetConfig(path="x.jsonl")], on_bad_sample="ignore"))
    with pytest.raises(ValueError, match="tokens_per_batch"):
        validate(DataConfig(datasets=[DatasetConfig(path="x.jsonl")], max_length=4096, tokens_per_batch=1024))
    with pytest.raises(ValueError, match="data.datasets is empty"):
        validate(DataConfig())
