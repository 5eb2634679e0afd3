"""The 3D position index against transformers' get_rope_index, plus packed sequences."""

import pytest
import torch

from qvl_train.model import get_rope_index

from .reference import make_batch, pair, tiny_config

ROWS = [
    [[12]],
    [[5, ("image", (1, 4, 6)), 7]],
    [[3, ("image", (1, 4, 6)), 2, ("image", (1, 6, 2)), 4]],
    [[3, ("video", (3, 4, 4)), 5]],
    [[3, ("image", (1, 4, 4)), 2, ("video", (2, 2, 4)), 5], [4, ("video", (2, 4, 2)), 6, ("image", (1, 2, 2)), 1]],
]


def _ours(cfg, batch, **kw):
    return get_rope_index(
        batch["input_ids"],
        image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id,
        spatial_merge_size=2,
        image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"),
        **kw,
    )


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_rope_index_matches_transformers(rows, padding):
    cfg = tiny_config()
    _, hf = pair(cfg)
    batch = make_batch(cfg, rows + [[2]], padding=padding)  # the short extra row forces padding
    pos, deltas = _ours(cfg, batch, attention_mask=batch["attention_mask"])
    ref_pos, ref_deltas = hf.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"),
        attention_mask=batch["attention_mask"],
    )
    mask = batch["attention_mask"].bool()
    assert torch.equal(pos[:, mask], ref_pos[:, mask])
    assert torch.equal(deltas, ref_deltas.reshape(deltas.shape))


def test_packed_segments_restart_positions():
    cfg = tiny_config()
    a = make_batch(cfg, [[5, ("image", (1, 4, 6)), 7]], seed=1)
    b = make_batch(cfg, [[3, ("video", (2, 2, 4)), 2]], seed=2)
    ids = torch.cat([a["input_ids"], b["input_ids"]], dim=1)
    seg = torch.cat([torch.zeros_like(a["input_ids"]), torch.ones_like(b["input_ids"])], dim=1)
    packed = {"input_ids": ids, "image_grid_thw": a["image_grid_thw"], "video_grid_thw": b["video_grid_thw"]}
    pos, _ = _ours(cfg, packed, segment_ids=seg)
    pos_a, _ = _ours(cfg, a)
    pos_b, _ = _ours(cfg, b)
    assert torch.equal(pos, torch.cat([pos_a, pos_b], dim=2))
    assert int(pos[0, 0, a["input_ids"].shape[1]]) == 0


def test_grid_placeholder_disagreement_is_a_value_error():
    cfg = tiny_config()
    batch = make_batch(cfg, [[5, ("image", (1, 4, 6)), 7]])
    with pytest.raises(ValueError, match="has 6 tokens .* needs 4"):
        _ours(cfg, {**batch, "image_grid_thw": torch.tensor([[1, 4, 4]])})
    with pytest.raises(ValueError, match="have no placeholder"):
        _ours(cfg, {**batch, "image_grid_thw": torch.tensor([[1, 4, 6], [1, 2, 2]])})


@pytest.mark.parametrize("rows", ROWS)
def test_sample_positions_equals_get_rope_index(rows):
    # The encoder's numpy path for one unpadded sample is get_rope_index on a batch of one.
    from qvl_train.model.rope import sample_positions

    cfg = tiny_config()
    for row in rows:
        batch = make_batch(cfg, [row])
        kw = {"image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id, "spatial_merge_size": 2}
        grids = {k: batch[k].tolist() if batch.get(k) is not None else None for k in ("image_grid_thw", "video_grid_thw")}
        pos = sample_positions(batch["input_ids"][0].numpy(), **kw, **grids)
        ref, _ = get_rope_index(batch["input_ids"], **kw, image_grid_thw=batch.get("image_grid_thw"),
                                video_grid_thw=batch.get("video_grid_thw"))
        assert pos.dtype.name == "int64" and torch.equal(torch.from_numpy(pos), ref[:, 0])


def test_sample_positions_grid_errors_match_get_rope_index():
    from qvl_train.model.rope import sample_positions

    cfg = tiny_config()
    batch = make_batch(cfg, [[3, ("image", (1, 4, 6)), 2]])
    ids = batch["input_ids"]
    kw = {"image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id, "spatial_merge_size": 2}
    for grids in ([[1, 4, 6], [1, 2, 2]], [], [[1, 4, 4]]):  # one too many, missing, wrong size
        with pytest.raises(ValueError) as ours:
            sample_positions(ids[0].numpy(), **kw, image_grid_thw=grids)
        with pytest.raises(ValueError) as ref:
            get_rope_index(ids, **kw, image_grid_thw=torch.tensor(grids, dtype=torch.long).reshape(-1, 3))
        assert str(ours.value) == str(ref.value)
