"""Rotary embeddings: interleaved MRoPE for the decoder, 2D rope for the vision tower, and the
3D (t, h, w) position index of an interleaved image/video/text sequence.

Legend: B batch, L sequence, Dh head dim, F = Dh/2 rotary frequencies, N vision patches.
"""

from __future__ import annotations

import numpy as np
import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# ---- text: interleaved MRoPE ----------------------------------------------------------------


def text_inv_freq(*, head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def mrope_axis_of_frequency(*, head_dim: int, mrope_section: list[int]) -> torch.Tensor:
    """For each of the F frequencies, which position axis drives it (0 t, 1 h, 2 w).

    Interleaved layout: frequency j is driven by h if j % 3 == 1 and j < 3 * sec[1], by w if
    j % 3 == 2 and j < 3 * sec[2], else by t.
    """
    j = torch.arange(head_dim // 2)
    axis_F = torch.zeros_like(j)
    axis_F[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
    axis_F[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
    return axis_F


def mrope_cos_sin(
    position_ids_3BL: torch.Tensor, *, inv_freq_F: torch.Tensor, axis_F: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, L, Dh), computed in fp32 and cast to the activation dtype."""
    freqs_3BLF = position_ids_3BL[..., None].float() * inv_freq_F.float().to(position_ids_3BL.device)
    index = axis_F.to(position_ids_3BL.device).view(1, 1, 1, -1).expand(1, *freqs_3BLF.shape[1:])
    freqs_BLF = torch.gather(freqs_3BLF, 0, index)[0]
    emb_BLD = torch.cat((freqs_BLF, freqs_BLF), dim=-1)
    return emb_BLD.cos().to(dtype), emb_BLD.sin().to(dtype)


def apply_rope(x_BLHD: torch.Tensor, cos_BLD: torch.Tensor, sin_BLD: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BLD[:, :, None], sin_BLD[:, :, None]
    return x_BLHD * cos + rotate_half(x_BLHD) * sin


# ---- vision: 2D rope over (row, col) --------------------------------------------------------


def vision_patch_rows_cols(grid_thw: torch.Tensor, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every patch, in merge-block-major order (t, h/m, w/m, m, m)."""
    rows, cols = [], []
    for t, h, w in grid_thw.tolist():
        r = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
        c = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
        rows.append(r.transpose(1, 2).reshape(-1).repeat(t))
        cols.append(c.transpose(1, 2).reshape(-1).repeat(t))
    return torch.cat(rows), torch.cat(cols)


def vision_rope_cos_sin(
    rows_N: torch.Tensor, cols_N: torch.Tensor, *, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin (N, Dh): the first quarter of frequencies follows rows, the second columns."""
    quarter = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float32) / quarter))
    inv_freq = inv_freq.to(rows_N.device)
    freqs = torch.cat([rows_N[:, None].float() * inv_freq, cols_N[:, None].float() * inv_freq], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


# ---- 3D position index ----------------------------------------------------------------------


def token_types(input_ids: torch.Tensor, *, image_token_id: int, video_token_id: int) -> torch.Tensor:
    types = torch.zeros_like(input_ids)
    types[input_ids == image_token_id] = IMAGE
    types[input_ids == video_token_id] = VIDEO
    return types


def split_video_grids(video_grid_thw: torch.Tensor | None) -> torch.Tensor | None:
    """Each video frame group is its own vision run (timestamps sit between them): (t,h,w) -> t x (1,h,w)."""
    if video_grid_thw is None:
        return None
    grids = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)
    grids[:, 0] = 1
    return grids


def sequence_positions(types_L: torch.Tensor, grids: dict[int, list[list[int]]], merge: int) -> torch.Tensor:
    """Positions (3, L) of one unpadded sample; pops the grids it consumes from `grids`.

    Text runs advance all three axes together; a vision run of merged grid (t, h', w') gets
    t = cur + frame, h = cur + row, w = cur + col, and then cur += max(h', w').
    """
    return torch.from_numpy(sequence_positions_np(types_L.cpu().numpy(), grids, merge))


def sequence_positions_np(types: np.ndarray, grids: dict[int, list[list[int]]], merge: int) -> np.ndarray:
    """sequence_positions on numpy int arrays. A sample has a handful of runs, so per-op overhead
    dominates; numpy's is a fraction of torch's (this runs once per sample in data workers)."""
    L = len(types)
    out = np.empty((3, L), dtype=np.int64)
    starts = np.flatnonzero(np.diff(types, prepend=types[:1] - 1)) if L else np.zeros(0, np.int64)
    ends = [*starts[1:].tolist(), L]
    cur = 0
    for s, e, kind in zip(starts.tolist(), ends, types[starts].tolist()):
        n = e - s
        if kind == TEXT:
            out[:, s:e] = np.arange(cur, cur + n)
            cur += n
            continue
        if not grids[kind]:
            name = "image" if kind == IMAGE else "video"
            raise ValueError(f"More {name} placeholder runs in input_ids than {name} grids in *_grid_thw.")
        t, h, w = grids[kind].pop(0)
        h, w = h // merge, w // merge
        if n != t * h * w:
            raise ValueError(
                f"A vision placeholder run has {n} tokens but its grid (t={t}, h={h}, w={w} after merge) "
                f"needs {t * h * w}; the prompt and the *_grid_thw disagree."
            )
        thw = out[:, s:e].reshape(3, t, h, w)
        thw[0] = np.arange(cur, cur + t)[:, None, None]
        thw[1] = np.arange(cur, cur + h)[None, :, None]
        thw[2] = np.arange(cur, cur + w)[None, None, :]
        cur += max(h, w)
    return out


def get_rope_index(
    input_ids: torch.Tensor,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D positions (3, B, L) and rope_deltas (B, 1) for a batch.

    Padding (attention_mask == 0) is removed before computing and gets position 0. With
    `segment_ids` (B, L), every packed sample in a row restarts its positions at 0; grids are
    consumed in token order across the whole batch, as the processor emits them.
    rope_deltas = max position + 1 - number of real tokens (per row), used when decoding.
    """
    B, L = input_ids.shape
    types = token_types(input_ids, image_token_id=image_token_id, video_token_id=video_token_id).cpu()
    valid = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    segs = None if segment_ids is None else segment_ids.cpu()
    grids = {
        IMAGE: [] if image_grid_thw is None else image_grid_thw.tolist(),
        VIDEO: [] if video_grid_thw is None else split_video_grids(video_grid_thw).tolist(),
    }
    position_ids = torch.zeros(3, B, L, dtype=torch.long)
    deltas = torch.zeros(B, 1, dtype=torch.long)
    for b in range(B):
        idx = valid[b].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        bounds = _segment_bounds(segs[b, idx]) if segs is not None else [(0, idx.numel())]
        row = [sequence_positions(types[b, idx[s:e]], grids, spatial_merge_size) for s, e in bounds]
        pos = torch.cat(row, dim=1)
        position_ids[:, b, idx] = pos
        deltas[b] = pos.max() + 1 - idx.numel()
    _check_grids_used(grids)
    return position_ids.to(input_ids.device), deltas.to(input_ids.device)


def sample_positions(
    input_ids: np.ndarray,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    image_grid_thw: list[list[int]] | None = None,
    video_grid_thw: list[list[int]] | None = None,
) -> np.ndarray:
    """get_rope_index(input_ids[None], ...)[0][:, 0] for one unpadded, unpacked sample, in numpy.

    The per-sample encoder's path: no torch ops (each costs ~10x a numpy op once image
    processing has evicted the caches). Grids are lists of (t, h, w).
    """
    ids = np.asarray(input_ids)
    types = np.zeros(ids.shape, dtype=np.int64)
    types[ids == image_token_id] = IMAGE
    types[ids == video_token_id] = VIDEO
    video_runs = [[1, h, w] for t, h, w in video_grid_thw or [] for _ in range(t)]  # split_video_grids
    grids = {IMAGE: [list(g) for g in image_grid_thw or []], VIDEO: video_runs}
    pos = sequence_positions_np(types, grids, spatial_merge_size)
    _check_grids_used(grids)
    return pos


def _check_grids_used(grids: dict[int, list]) -> None:
    for kind, left in grids.items():
        if left:
            name = "image" if kind == IMAGE else "video"
            raise ValueError(f"{len(left)} {name} grid(s) in *_grid_thw have no placeholder run in input_ids.")


def _segment_bounds(seg_L: torch.Tensor) -> list[tuple[int, int]]:
    change = (seg_L[1:] != seg_L[:-1]).nonzero().squeeze(1) + 1
    edges = [0, *change.tolist(), seg_L.numel()]
    return list(zip(edges[:-1], edges[1:]))
