"""Packing and collation: MRoPE positions per segment, padding, vision tensor order, budgets."""

from __future__ import annotations

import json

import torch

from qvl_train.data.packing import (
    IGNORE_INDEX,
    PAD_SEGMENT_ID,
    collate,
    first_fit_decreasing,
    group_by_token_budget,
    model_inputs,
    plan_batches,
)
from qvl_train.model.rope import IMAGE, VIDEO, get_rope_index, sequence_positions, split_video_grids, token_types

IMG, VID, VS, VE, PAD = 1012, 1013, 1009, 1010, 1000
MERGE = 2


def make_sample(
    tag: int, text_lens: list[int], images: list[tuple[int, int]] = (), video: tuple[int, int, int] | None = None
):
    """A synthetic encoded sample: text runs around image placeholders (and one video).

    Pixel rows of image k are filled with tag * 100 + k so the order can be checked after collation.
    """
    ids, pix, grids = [], [], []
    for k, n in enumerate(text_lens):
        ids += [(tag * 7 + k + j) % 900 + 1 for j in range(n)]
        if k < len(images):
            h, w = images[k]
            ids += [VS] + [IMG] * (h * w // 4) + [VE]
            pix.append(torch.full((h * w, 1536), float(tag * 100 + k)))
            grids.append([1, h, w])
    vids, vgrid = None, None
    if video is not None:
        t, h, w = video
        for g in range(t):
            ids += [50 + g, VS] + [VID] * (h * w // 4) + [VE]
        vids, vgrid = torch.full((t * h * w, 1536), -float(tag)), torch.tensor([list(video)])
    input_ids = torch.tensor(ids)
    types = token_types(input_ids, image_token_id=IMG, video_token_id=VID)
    pos = sequence_positions(
        types, {IMAGE: list(grids), VIDEO: [] if vgrid is None else split_video_grids(vgrid).tolist()}, MERGE
    )
    labels = input_ids.clone()
    labels[: len(ids) // 2] = IGNORE_INDEX
    visual = int((types != 0).sum())
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": torch.ones_like(input_ids),
        "position_ids": pos,
        "pixel_values": torch.cat(pix) if pix else None,
        "image_grid_thw": torch.tensor(grids) if grids else None,
        "pixel_values_videos": vids,
        "video_grid_thw": vgrid,
        "num_text_tokens": len(ids) - visual,
        "num_visual_tokens": visual,
        "sample_id": f"s{tag}",
    }


def samples():
    return [
        make_sample(1, [5, 3], images=[(4, 4)]),
        make_sample(2, [7], video=(2, 4, 6)),
        make_sample(3, [2, 4, 3], images=[(4, 6), (8, 4)]),
        make_sample(4, [9]),
        make_sample(5, [3, 2], images=[(6, 4)], video=(4, 4, 4)),
    ]


def pack(ss, capacity, rows_per_batch=2):
    plan = plan_batches(
        [len(s["input_ids"]) for s in ss], packing=True, max_length=capacity, tokens_per_batch=capacity * rows_per_batch
    )
    return [collate([[ss[i] for i in row] for row in rows], pad_token_id=PAD) for rows in plan], plan



def rope_positions(batch):
    """The model's own 3D positions for a packed batch (every segment restarting at 0)."""
    return get_rope_index(
        batch["input_ids"],
        image_token_id=IMG,
        video_token_id=VID,
        spatial_merge_size=MERGE,
        image_grid_thw=batch["image_grid_thw"],
        video_grid_thw=batch["video_grid_thw"],
        attention_mask=batch["attention_mask"],
        segment_ids=batch["segment_ids"],
    )[0]

def test_positions_restart_per_segment_and_match_each_sample():
    ss = samples()
    batches, plan = pack(ss, capacity=48)
    for batch, rows in zip(batches, plan):
        for b, row in enumerate(rows):
            start = 0
            for seg, i in enumerate(row):
                n = len(ss[i]["input_ids"])
                assert torch.equal(batch["position_ids"][:, b, start : start + n], ss[i]["position_ids"])
                assert torch.equal(batch["segment_ids"][b, start : start + n], torch.full((n,), seg))
                assert batch["position_ids"][:, b, start].tolist() == [0, 0, 0]
                start += n


def test_packed_positions_equal_get_rope_index_so_grids_are_in_token_order():
    ss = samples()
    batches, _ = pack(ss, capacity=48)
    assert any(len(rows) > 1 for rows in _)  # something was actually packed
    for batch in batches:
        assert torch.equal(rope_positions(batch), batch["position_ids"])


def test_pixel_values_follow_placeholder_order():
    ss = samples()
    batches, plan = pack(ss, capacity=48)
    for batch, rows in zip(batches, plan):
        in_token_order = [ss[i] for row in rows for i in row]  # rows left to right, top to bottom
        expected = [
            g
            for s in in_token_order
            if s["pixel_values"] is not None
            for g in s["pixel_values"][:, 0].unique_consecutive().tolist()
        ]
        expected_videos = [
            s["pixel_values_videos"][0, 0].item() for s in in_token_order if s["pixel_values_videos"] is not None
        ]
        if batch["image_grid_thw"] is not None:
            sizes = batch["image_grid_thw"].prod(1)
            firsts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
            assert batch["pixel_values"][firsts, 0].tolist() == expected
            assert batch["pixel_values"].shape[0] == int(sizes.sum())
        if batch["video_grid_thw"] is not None:
            sizes = batch["video_grid_thw"].prod(1)
            firsts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
            assert batch["pixel_values_videos"][firsts, 0].tolist() == expected_videos


def test_padding_is_masked_and_first_token_of_each_segment_is_not_a_target():
    ss = samples()
    batches, plan = pack(ss, capacity=64)
    for batch, rows in zip(batches, plan):
        pad = batch["attention_mask"] == 0
        assert (batch["labels"][pad] == IGNORE_INDEX).all()
        assert (batch["segment_ids"][pad] == PAD_SEGMENT_ID).all()
        assert (batch["input_ids"][pad] == PAD).all()
        assert (batch["position_ids"][:, pad] == 0).all()
        starts = (
            batch["segment_ids"] != torch.nn.functional.pad(batch["segment_ids"], (1, 0), value=-2)[:, :-1]
        ) & ~pad
        assert (batch["labels"][starts] == IGNORE_INDEX).all()
        for b, row in enumerate(rows):  # every other label is the sample's own
            start = 0
            for i in row:
                n = len(ss[i]["input_ids"])
                assert torch.equal(batch["labels"][b, start + 1 : start + n], ss[i]["labels"][1:])
                start += n
        st = batch["stats"]
        assert st["real_tokens"] == int((~pad).sum()) and st["slots"] == pad.numel()
        assert st["packing_efficiency"] == st["real_tokens"] / st["slots"]


def test_first_fit_decreasing_respects_capacity_and_places_each_sample_once():
    lengths = [30, 10, 25, 5, 40, 12, 18, 7, 33, 2]
    rows = first_fit_decreasing(lengths, 50)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 50 for r in rows)
    assert len(rows) == 4  # 182 tokens -> ceil(182/50) = 4 rows is optimal here


def test_token_budget_batches_without_packing():
    lengths = [30, 10, 25, 5, 40, 12, 18, 7, 33, 2]
    batches = group_by_token_budget(lengths, 80)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 80 for b in batches)


def test_unpacked_collate_right_pads_to_longest_and_model_inputs_are_tensors():
    ss = samples()[:3]
    batch = collate([[s] for s in ss], pad_token_id=PAD, pad_to_multiple_of=8)
    L = max(len(s["input_ids"]) for s in ss)
    assert batch["input_ids"].shape == (3, -(-L // 8) * 8)
    for b, s in enumerate(ss):
        n = len(s["input_ids"])
        assert batch["attention_mask"][b, :n].all() and not batch["attention_mask"][b, n:].any()
    inputs = model_inputs(batch)
    assert set(inputs) >= {"input_ids", "position_ids", "segment_ids"} and "stats" not in inputs
    assert batch["position_ids"].shape == (3, *batch["input_ids"].shape)
    assert batch["sample_ids"] == [["s1"], ["s2"], ["s3"]]


def test_text_only_batch_has_no_vision_tensors():
    batch = collate([[make_sample(4, [9]), make_sample(6, [3])]], pad_token_id=PAD)
    assert batch["pixel_values"] is None and batch["video_grid_thw"] is None
    assert batch["segment_ids"].tolist() == [[0] * 9 + [1] * 3]


def test_real_encoded_demo_samples_pack_with_per_sample_positions(tmp_path):
    """encode_sample output (images and videos) packed: positions and grids still line up."""
    from pathlib import Path

    from qvl_train.data.config import DatasetConfig, load_data_config
    from qvl_train.data.loader import SampleEncoder
    from qvl_train.data.sources import open_source
    from qvl_train.data.tokenizer import build_tiny_tokenizer, load_tokenizer

    tok = load_tokenizer(build_tiny_tokenizer(tmp_path / "tok"))
    encode = SampleEncoder(tok, load_data_config("vqa_demo").media_options())
    src = open_source(DatasetConfig(path=str(Path(__file__).resolve().parents[2] / "data/vqa_demo/train.jsonl")))
    video_rows = [i for i in range(len(src)) if "video" in json.dumps(src[i].record)][:4]
    ss = [encode(src[i]) for i in [*range(12), *video_rows]]
    batches, plan = pack(ss, capacity=128, rows_per_batch=3)
    assert any(len(row) > 2 for rows in plan for row in rows)
    for batch, rows in zip(batches, plan):
        assert torch.equal(rope_positions(batch), batch["position_ids"])
        for b, row in enumerate(rows):
            start = 0
            for i in row:
                n = len(ss[i]["input_ids"])
                assert torch.equal(batch["position_ids"][:, b, start : start + n], ss[i]["position_ids"])
                start += n
    assert sum(b["video_grid_thw"] is not None for b in batches) >= 1
