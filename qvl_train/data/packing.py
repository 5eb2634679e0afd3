"""Packing and collation of encoded samples into model batches.

Design choices:
- Packing is first-fit-decreasing over a small buffer of samples (the loader's buffer_size):
  sort by length (longest first, ties by arrival), put each sample in the first row with room
  for it, open a new row otherwise. Rows hold at most ``max_length`` tokens; a batch holds at most
  ``tokens_per_batch // max_length`` rows (at least one), and a buffer's rows are spread evenly
  over the batches they fill, so a buffer's last batch is not a small remainder. FFD over a buffer of 64 typically
  fills rows to >95% while keeping the data order local (the buffer is the only reordering).
- Without packing, the same buffer is sorted by length and cut greedily so that
  (samples in batch) * (longest sample) <= tokens_per_batch: batches carry near-constant token
  counts and little padding. Right padding to the longest row.
- Every packed sample keeps its own position_ids (3, l) from the encoder, which start at 0, so
  MRoPE positions restart per segment (complaint: packing that breaks mRoPE positions).
  segment_ids number samples 0, 1, 2... within a row; padding has segment id -1,
  attention_mask 0 (never routed into the aux loss), label -100, input id = pad id, position 0.
- The first token of every segment gets label -100. The model shifts labels, so without this the
  last token of sample k would be trained to predict the first token of sample k+1. An unpacked
  sample never uses its first label either, so packed and per-sample losses agree.
- Vision tensors are concatenated reading rows left to right, top to bottom, which is the order in
  which the placeholders appear, so pixel_values and *_grid_thw line up with the tokens.
- Non-tensor entries: ``stats`` (python numbers), ``sample_ids`` and ``sources`` (file:line) per row,
  and the host metadata the model plans with (no device read): ``attention_layout`` (each row's
  sample lengths, attention.DocumentLayout) and ``num_targets`` (next-token targets in the batch).
  Use ``model_inputs(batch)`` to get only what the model takes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qvl_train.model.attention import DocumentLayout

IGNORE_INDEX = -100
PAD_SEGMENT_ID = -1
# host metadata the model takes when present (built here, never read back from a device):
# the attention layout and the number of next-token targets
HOST_PLAN_KEYS = ("attention_layout", "num_targets")
MODEL_KEYS = (
    "input_ids",
    "labels",
    "attention_mask",
    "position_ids",
    "segment_ids",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
)


def sample_length(sample: dict[str, Any]) -> int:
    return int(sample["input_ids"].numel())


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of sample indices; each row's total length <= capacity."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"sample of {lengths[i]} tokens does not fit a row of {capacity}; raise max_length.")
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def group_by_token_budget(lengths: list[int], tokens_per_batch: int) -> list[list[int]]:
    """Unpacked batches (lists of sample indices) with len(batch) * longest <= tokens_per_batch."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if current and max(longest, lengths[i]) * (len(current) + 1) > tokens_per_batch:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        batches.append(current)
    return batches


def plan_batches(lengths: list[int], *, packing: bool, max_length: int, tokens_per_batch: int) -> list[list[list[int]]]:
    """Batches -> rows -> sample indices, for one buffer of samples."""
    if not packing:
        return [[[i] for i in batch] for batch in group_by_token_budget(lengths, tokens_per_batch)]
    rows = first_fit_decreasing(lengths, max_length)
    per_batch = max(1, tokens_per_batch // max_length)
    # Spread the buffer's rows evenly over the batches it needs (20 rows at 8 per batch -> 7, 7, 6
    # rather than 8, 8, 4) so that batch token counts stay close to each other.
    num_batches = -(-len(rows) // per_batch)
    if num_batches == 0:
        return []
    bounds = [len(rows) * k // num_batches for k in range(num_batches + 1)]
    return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _positions(sample: dict[str, Any]) -> torch.Tensor:
    pos = sample.get("position_ids")
    if pos is None:  # text-only samples from a minimal encoder: all three axes are arange
        pos = torch.arange(sample_length(sample)).expand(3, -1)
    return pos


def _cat_optional(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [t for t in tensors if t is not None and t.numel() > 0]
    if len(present) <= 1:
        return present[0] if present else None
    # numpy's concatenate is a single-threaded memcpy; torch.cat's intra-op threads stall when the
    # CPUs are busy (measured on a loaded 2-core machine: 300 ms vs 1.4 ms for 7 MB of pixels).
    if all(t.device.type == "cpu" and t.dtype != torch.bfloat16 for t in present):
        return torch.from_numpy(np.concatenate([t.numpy() for t in present]))
    return torch.cat(present)


def collate(rows: list[list[dict[str, Any]]], *, pad_token_id: int, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Rows of encoded samples -> batch dict (see module docstring). One sample per row = unpacked."""
    lengths = [sum(sample_length(s) for s in row) for row in rows]
    L = -(-max(lengths) // pad_to_multiple_of) * pad_to_multiple_of
    B = len(rows)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    position_ids = torch.zeros((3, B, L), dtype=torch.long)
    segment_ids = torch.full((B, L), PAD_SEGMENT_ID, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for seg, s in enumerate(row):
            n = sample_length(s)
            span = slice(start, start + n)
            input_ids[b, span] = s["input_ids"]
            labels[b, span] = s["labels"]
            labels[b, start] = IGNORE_INDEX  # never predict a segment's first token from the previous one
            attention_mask[b, span] = s["attention_mask"]
            position_ids[:, b, span] = _positions(s)
            segment_ids[b, span] = seg
            start += n
    samples = [s for row in rows for s in row]
    # every sample a contiguous run of valid tokens (the encoder's masks are all ones): then the
    # layout is each row's sample lengths, and the model's attention plan needs no device read
    contiguous = all(bool(s["attention_mask"].all()) for s in samples)
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "pixel_values": _cat_optional([s.get("pixel_values") for s in samples]),
        "image_grid_thw": _cat_optional([s.get("image_grid_thw") for s in samples]),
        "pixel_values_videos": _cat_optional([s.get("pixel_values_videos") for s in samples]),
        "video_grid_thw": _cat_optional([s.get("video_grid_thw") for s in samples]),
        "attention_layout": DocumentLayout.from_sample_lengths([[sample_length(s) for s in row] for row in rows], L)
        if contiguous else None,
        # next-token targets: a segment's first label is -100 (above), so no target crosses samples
        "num_targets": int((labels[:, 1:] != IGNORE_INDEX).sum()),
    }
    batch["stats"] = batch_stats(batch, samples)
    batch["sample_ids"] = [[s.get("sample_id", "") for s in row] for row in rows]
    batch["sources"] = [[s.get("source", "") for s in row] for row in rows]
    return batch


def batch_stats(batch: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, float]:
    real = int(batch["attention_mask"].sum())
    slots = batch["input_ids"].numel()
    return {
        "num_samples": len(samples),
        "num_rows": batch["input_ids"].shape[0],
        "real_tokens": real,
        "slots": slots,
        "packing_efficiency": real / slots if slots else 0.0,
        "trained_tokens": int((batch["labels"] != IGNORE_INDEX).sum()),
        "text_tokens": sum(int(s.get("num_text_tokens", 0)) for s in samples),
        "visual_tokens": sum(int(s.get("num_visual_tokens", 0)) for s in samples),
    }


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """Only what ``forward`` takes (drops stats and sample_ids): the tensors, and the host plan
    keys where the batch has them (collate's batches do)."""
    return {k: batch[k] for k in MODEL_KEYS} | {k: batch[k] for k in HOST_PLAN_KEYS if k in batch}
