"""Cutting packed rows into sequence-parallel slices (host side, no communication).

Every rank of an SP group holds the same batch (the loader shards rows by data-parallel rank).
Each rank keeps one CONTIGUOUS slice of every row: tokens [r * L/sp, (r+1) * L/sp), the row first
padded to a multiple of sp with padding tokens (attention mask 0, segment -1, label -100).
What depends on the whole row is computed BEFORE cutting:
- the 3D MRoPE positions (text positions continue after each visual block, so a slice cannot
  compute its own); the loader's encoder already gives them per sample, else get_rope_index;
- the next-token targets (the last token of a slice predicts the first of the next one);
- for each visual token of the slice, its row in the vision tower's output for the whole pixel
  values (images first, then videos), so the tower's rows can be handed to the right rank;
- the pad-token / feature count check (a slice alone cannot tell a mismatch).

Contiguous, not zigzag: zigzag (slices r and 2sp-1-r) balances CAUSAL work for ring attention,
where rank r only attends to keys of its own slice and earlier ones. With Ulysses each rank
attends over the whole row for its heads, so the attention work is identical on every rank
whatever the split; contiguous slices keep documents whole on as few ranks as possible and need
no reordering of positions, targets or visual rows.

Legend: B rows, L row length (padded to a multiple of sp), l = L / sp slice length, M visual
tokens of a slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qvl_train.data.packing import IGNORE_INDEX, PAD_SEGMENT_ID
from qvl_train.model.attention import DocumentLayout
from qvl_train.model.config import ModelConfig
from qvl_train.model.model import shifted_labels
from qvl_train.model.rope import get_rope_index

ROW_KEYS = ("input_ids", "labels", "attention_mask", "segment_ids")  # (B, L) tensors cut along L
WHOLE_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")  # every slice gets all


@dataclass
class RowSlices:
    """One rank's slice of a batch: `inputs` are model keyword tensors (the slice's, the pixels
    whole), plus what the slice needs from its whole rows."""

    inputs: dict[str, Any]
    targets_Bl: torch.Tensor  # next-token targets, shifted on the whole row
    visual_index_M: torch.Tensor  # tower output rows of the slice's visual tokens (token order)
    row_attention_mask_BL: torch.Tensor  # the whole (padded) rows' layout, for the attention plan
    row_segment_ids_BL: torch.Tensor | None
    row_layout: DocumentLayout | None = None  # the loader's host layout of the whole (padded) rows
    num_targets: int = 0  # len of targets_Bl != IGNORE_INDEX, counted on the host


def slice_rows(batch: dict[str, Any], *, sp_size: int, sp_rank: int, model_cfg: ModelConfig,
               pad_token_id: int) -> RowSlices:
    """Rank `sp_rank`'s slice of `batch` (model keys as collate() makes them; `labels` required)."""
    ids_BL = batch["input_ids"]
    B, L0 = ids_BL.shape
    mask_BL = batch.get("attention_mask")
    mask_BL = torch.ones_like(ids_BL) if mask_BL is None else mask_BL
    seg_BL = batch.get("segment_ids")
    check_visual_counts(batch, model_cfg)
    pos_3BL = batch.get("position_ids")
    if pos_3BL is None:
        pos_3BL, _ = get_rope_index(
            ids_BL, image_token_id=model_cfg.image_token_id, video_token_id=model_cfg.video_token_id,
            spatial_merge_size=model_cfg.vision.spatial_merge_size, image_grid_thw=batch.get("image_grid_thw"),
            video_grid_thw=batch.get("video_grid_thw"), attention_mask=mask_BL, segment_ids=seg_BL)
    elif pos_3BL.ndim == 2:
        pos_3BL = pos_3BL[None].expand(3, -1, -1)
    targets_BL = shifted_labels(batch["labels"], seg_BL)
    visual_BL = _visual_rows(ids_BL, model_cfg)

    extra = -L0 % sp_size  # padding documents up to a multiple of sp
    def pad(t, value):
        return F.pad(t, (0, extra), value=value) if extra else t
    row = {"input_ids": pad(ids_BL, pad_token_id), "labels": pad(batch["labels"], IGNORE_INDEX),
           "attention_mask": pad(mask_BL, 0)}
    if seg_BL is not None:
        row["segment_ids"] = pad(seg_BL, PAD_SEGMENT_ID)
    targets_BL, visual_BL = pad(targets_BL, IGNORE_INDEX), pad(visual_BL, -1)
    pos_3BL = pad(pos_3BL, 0)

    l = (L0 + extra) // sp_size
    cut = slice(sp_rank * l, (sp_rank + 1) * l)
    inputs = {k: v[:, cut] for k, v in row.items()}
    inputs.setdefault("segment_ids", None)
    inputs["position_ids"] = pos_3BL[:, :, cut]
    inputs.update({k: batch.get(k) for k in WHOLE_KEYS})
    visual_Bl = visual_BL[:, cut].reshape(-1)
    layout = batch.get("attention_layout")
    targets_Bl = targets_BL[:, cut]
    return RowSlices(inputs=inputs, targets_Bl=targets_Bl, visual_index_M=visual_Bl[visual_Bl >= 0],
                     row_attention_mask_BL=row["attention_mask"], row_segment_ids_BL=row.get("segment_ids"),
                     row_layout=None if layout is None else padded_layout(layout, extra),
                     num_targets=int((targets_Bl != IGNORE_INDEX).sum()))


def padded_layout(layout: DocumentLayout, extra: int) -> DocumentLayout:
    """`layout` with `extra` more padding tokens at the end of every row (one padding run)."""
    if not extra:
        return layout
    rows = []
    for row in layout.rows:
        if row and row[-1][1]:
            rows.append(row[:-1] + ((row[-1][0] + extra, True),))
        else:
            rows.append(row + ((extra, True),))
    return DocumentLayout(tuple(rows))


def _visual_rows(ids_BL: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Per token, its row in the tower's output over the batch's pixels (images in token order,
    then videos in token order, as the model concatenates them), -1 for non-visual tokens."""
    img_T, vid_T = (ids_BL == cfg.image_token_id).reshape(-1), (ids_BL == cfg.video_token_id).reshape(-1)
    img_rank_T = img_T.long().cumsum(0) - 1
    vid_rank_T = int(img_T.sum()) + vid_T.long().cumsum(0) - 1
    rows_T = torch.where(img_T, img_rank_T, torch.where(vid_T, vid_rank_T, -1))
    return rows_T.view(ids_BL.shape)


def check_visual_counts(batch: dict[str, Any], cfg: ModelConfig) -> None:
    """The model checks this per forward; a slice cannot, so it is checked on the whole rows."""
    merge = cfg.vision.spatial_merge_size ** 2
    for name, token_id, pixels, grid in (("image", cfg.image_token_id, "pixel_values", "image_grid_thw"),
                                          ("video", cfg.video_token_id, "pixel_values_videos", "video_grid_thw")):
        n_tokens = int((batch["input_ids"] == token_id).sum())
        if batch.get(pixels) is None:
            if n_tokens:
                raise ValueError(f"input_ids contain {name} tokens but no {name} pixels were given.")
            continue
        n_feats = int(batch[grid].prod(-1).sum()) // merge
        if n_tokens != n_feats:
            raise ValueError(
                f"{name.capitalize()} features and {name} tokens do not match: {n_tokens} <|{name}_pad|> tokens in "
                f"input_ids but {n_feats} features from {name}_grid_thw. Each {name} needs prod(grid_thw)/{merge} "
                "pad tokens.")


def slice_stats(stats: dict[str, float], sp_rank: int) -> dict[str, float]:
    """The batch's statistics counted once per SP group (on its first rank; the others report
    zeros), so that sums over all ranks (tokens/s, samples) count every row once."""
    return dict(stats) if sp_rank == 0 else {k: (v if k == "num_rows" else 0) for k, v in stats.items()}
