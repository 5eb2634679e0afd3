"""Attention over packed documents (text: causal per sample; vision: bidirectional per image or
video frame group) with no L x L tensor: a plan is built once per batch from the document layout
and shared by every layer.

The layout is host metadata where it can be: the loader knows each row's sample lengths when it
packs them (`DocumentLayout`, passed to the model's forward as `attention_layout`), and the vision
tower knows its image / frame-group sizes from the grids, which stay on the CPU. A plan made from
it reads no device data (no host sync on a GPU). Without it (hand-built batches, generation) the
text plan is derived from the masks on the device, at the cost of a few host reads per forward.

Kernels (`attn_impl`):
- flex: torch's FlexAttention with a document BlockMask made from per-block document ranges
  (no L x L mask is ever evaluated); compiled on CUDA. On CPU it runs eagerly, which is exact
  but materialises scores: it is there for tests only.
- flash_varlen: flash-attn's varlen kernel over cu_seqlens (CUDA, bf16/fp16, flash_attn installed).
- sdpa_docs: one SDPA call per run of equal-length documents (consecutive documents of one
  length are a free (G, n) view of the token stream); each call is a plain causal / full SDPA,
  which takes torch's blockwise flash kernel on CPU. Exact, and the default on CPU.
- sdpa_mask, eager: the dense boolean (B, 1, L, Lk) mask through SDPA or explicit softmax; the
  reference the others are tested against, and the path of cached decoding (L = 1).
auto: flash_varlen (when installed, half precision) or flex on CUDA; sdpa_docs elsewhere.

Padding positions are one-token documents (they attend only to themselves; their outputs are
never used), so a row never has an all-masked query.

Legend: B batch, L length, Lk key length, T = B*L tokens, H query heads, K kv heads, Dh head dim,
G documents in one run, n their length, nb blocks of BLOCK tokens.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTN_IMPLS = ("auto", "flex", "flash_varlen", "sdpa_docs", "sdpa_mask", "eager")
DENSE_IMPLS = ("sdpa_mask", "eager")
BLOCK = 128  # FlexAttention's sparse block size


# ---- kernel choice --------------------------------------------------------------------------


@functools.cache
def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def check_attn_impl(impl: str) -> None:
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl={impl!r} is not a kernel; choose one of {', '.join(ATTN_IMPLS)}.")


def resolve_attn_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel `impl` means on this device and dtype (auto picks; an explicit one is checked)."""
    check_attn_impl(impl)
    half = dtype in (torch.bfloat16, torch.float16)
    if impl == "auto":
        if device.type == "cuda":
            return "flash_varlen" if flash_attn_available() and half else "flex"
        return "sdpa_docs"
    if impl == "flash_varlen" and not (flash_attn_available() and device.type == "cuda" and half):
        raise ValueError(
            "attn_impl=flash_varlen needs the flash_attn package, a CUDA device and bf16/fp16 weights; "
            "use attn_impl=auto (flex on CUDA, sdpa_docs on CPU)."
        )
    return impl


# ---- document layout ------------------------------------------------------------------------


def document_ids(valid_BL: torch.Tensor, segment_ids_BL: torch.Tensor | None) -> torch.Tensor:
    """Per row, a non-decreasing document number: a new document starts where the segment id or
    validity changes, and every padding token is a document of its own."""
    start_BL = ~valid_BL
    start_BL[:, 0] = True
    start_BL[:, 1:] |= valid_BL[:, 1:] != valid_BL[:, :-1]
    if segment_ids_BL is not None:
        start_BL[:, 1:] |= segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]
    return start_BL.long().cumsum(1) - 1


def is_document_layout(valid_BL: torch.Tensor, segment_ids_BL: torch.Tensor | None, doc_BL: torch.Tensor) -> bool:
    """Whether every sample (segment id of a row) is one contiguous run of valid tokens: only then
    is the dense mask (same segment, valid key, causal) a per-document causal mask."""
    seg_BL = torch.zeros_like(doc_BL) if segment_ids_BL is None else segment_ids_BL
    row_BL = torch.arange(doc_BL.shape[0], device=doc_BL.device)[:, None].expand_as(doc_BL)
    num_runs = torch.unique(doc_BL[valid_BL] + row_BL[valid_BL] * doc_BL.shape[1]).numel()
    num_samples = torch.unique(torch.stack([row_BL[valid_BL], seg_BL[valid_BL]]), dim=1).shape[1]
    return num_runs == num_samples


def runs_of_documents(doc_BL: torch.Tensor, valid_BL: torch.Tensor) -> list[tuple[int, int, bool]]:
    """The flattened token stream as (n, G, padding) runs: G consecutive documents of length n, or
    a padding stretch of n tokens (G = 1) whose tokens attend only to themselves."""
    B, L = doc_BL.shape
    row = torch.arange(B, device=doc_BL.device)[:, None] * L
    key_T = torch.where(valid_BL, doc_BL + row, -1 - row).reshape(-1).cpu()
    keys, lengths = torch.unique_consecutive(key_T, return_counts=True)
    runs: list[tuple[int, int, bool]] = []
    for n, pad in zip(lengths.tolist(), (keys < 0).tolist()):
        if runs and not pad and not runs[-1][2] and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1, False)
        else:
            runs.append((n, 1, pad))
    return runs


def cu_seqlens(doc_BL: torch.Tensor) -> tuple[torch.Tensor, int]:
    """flash-attn's int32 cumulative document lengths over the flattened stream, and the longest."""
    B, L = doc_BL.shape
    key_T = (doc_BL + torch.arange(B, device=doc_BL.device)[:, None] * L).reshape(-1)
    _, lengths = torch.unique_consecutive(key_T, return_counts=True)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return cu, int(lengths.max())


def document_block_mask(doc_BL: torch.Tensor, *, causal: bool):
    """FlexAttention BlockMask for `doc_BL` (non-decreasing per row; L a multiple of BLOCK) built
    from each block's first and last document, O((L / BLOCK)^2) work instead of O(L^2).

    With non-decreasing ids two blocks share a document iff their id ranges overlap; a block pair
    inside one document (and below the diagonal when causal) needs no mask_mod at all."""
    from torch.nn.attention.flex_attention import BlockMask

    B, L = doc_BL.shape
    assert L % BLOCK == 0, "pad the sequence to a multiple of BLOCK first"
    blocks_Bnb = doc_BL.view(B, L // BLOCK, BLOCK)
    lo_Bq, hi_Bq = blocks_Bnb[..., 0], blocks_Bnb[..., -1]
    overlap_Bqk = (lo_Bq[:, :, None] <= hi_Bq[:, None, :]) & (lo_Bq[:, None, :] <= hi_Bq[:, :, None])
    one_doc_Bq = lo_Bq == hi_Bq
    full_Bqk = overlap_Bqk & one_doc_Bq[:, :, None] & one_doc_Bq[:, None, :]
    if causal:
        q_idx = torch.arange(L // BLOCK, device=doc_BL.device)
        overlap_Bqk &= q_idx[None, :] <= q_idx[:, None]
        full_Bqk &= q_idx[None, :] < q_idx[:, None]
    partial_Bqk = overlap_Bqk & ~full_Bqk

    def ordered(m_Bqk):  # counts and block indices, listed blocks first (BlockMask's layout)
        num = m_Bqk.sum(-1, dtype=torch.int32)[:, None]
        index = torch.argsort((~m_Bqk).to(torch.int32), dim=-1, stable=True).to(torch.int32)[:, None]
        return num.contiguous(), index.contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        same = doc_BL[b, q_idx] == doc_BL[b, kv_idx]
        return same & (q_idx >= kv_idx) if causal else same

    kv_num, kv_index = ordered(partial_Bqk)
    full_num, full_index = ordered(full_Bqk)
    return BlockMask.from_kv_blocks(
        kv_num, kv_index, full_num, full_index, BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(L, L)
    )


def pad_documents(doc_BL: torch.Tensor) -> torch.Tensor:
    """doc ids padded to a multiple of BLOCK with one-token documents (still non-decreasing)."""
    B, L = doc_BL.shape
    extra = -L % BLOCK
    if not extra:
        return doc_BL
    tail = L + torch.arange(extra, device=doc_BL.device).expand(B, extra)
    return torch.cat([doc_BL, tail], dim=1)


@functools.cache
def _flex_kernel(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=None) if compiled else flex_attention


# ---- the host-side layout ---------------------------------------------------------------------


@dataclass(frozen=True)
class DocumentLayout:
    """Where a batch's documents lie, as host integers: per row, runs of (length, padding) in
    token order; a padding run of n tokens is n one-token documents (as `document_ids` numbers
    them). The loader builds it from the sample lengths it packs (`from_sample_lengths`)."""

    rows: tuple[tuple[tuple[int, bool], ...], ...]

    @classmethod
    def from_sample_lengths(cls, rows: list[list[int]], length: int) -> DocumentLayout:
        """Rows of consecutive samples of these lengths, each padded at the end to `length`."""
        out = []
        for lengths in rows:
            assert sum(lengths) <= length, "a row is longer than the batch"
            pad = length - sum(lengths)
            out.append(tuple((n, False) for n in lengths if n > 0) + (((pad, True),) if pad else ()))
        return cls(tuple(out))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), sum(n for n, _ in self.rows[0]) if self.rows else 0

    def is_plain_causal(self) -> bool:
        """Every row one document, no padding: plain causal attention is exact."""
        return all(len(row) == 1 and not row[0][1] for row in self.rows)

    def runs(self) -> list[tuple[int, int, bool]]:
        """`runs_of_documents` of this layout: (n, G, padding) over the flattened token stream."""
        runs: list[tuple[int, int, bool]] = []
        for row in self.rows:
            for n, pad in row:
                if runs and not pad and not runs[-1][2] and runs[-1][0] == n:
                    runs[-1] = (n, runs[-1][1] + 1, False)
                else:
                    runs.append((n, 1, pad))
        return runs

    def document_lengths(self) -> list[int]:
        """Every document's length over the flattened stream (padding tokens: 1 each)."""
        return [m for row in self.rows for n, pad in row for m in ([1] * n if pad else [n])]

    def document_ids(self) -> torch.Tensor:
        """`document_ids` of this layout, (B, L) long, on the CPU."""
        ids = [[d for d, m in enumerate(m for n, pad in row for m in ([1] * n if pad else [n])) for _ in range(m)]
               for row in self.rows]
        return torch.tensor(ids, dtype=torch.long)


# ---- the plan -------------------------------------------------------------------------------


@dataclass
class DocumentAttention:
    """How one batch attends: built once, called by every layer with token-major q/k/v.

    Exactly one of the kernel fields is set (`kernel` says which)."""

    kernel: str
    causal: bool
    runs: list[tuple[int, int, bool]] | None = None  # sdpa_docs
    cu_seqlens: torch.Tensor | None = None  # flash_varlen
    max_seqlen: int = 0
    block_mask: object | None = None  # flex (a BlockMask over the padded length)
    mask_B1LLk: torch.Tensor | None = None  # sdpa_mask / eager; None with causal: plain causal

    def __call__(self, q_BLHD: torch.Tensor, k_BLKD: torch.Tensor, v_BLKD: torch.Tensor) -> torch.Tensor:
        if self.kernel == "sdpa_docs":
            return _sdpa_docs(q_BLHD, k_BLKD, v_BLKD, self.runs, causal=self.causal)
        if self.kernel == "flash_varlen":
            return _flash_varlen(q_BLHD, k_BLKD, v_BLKD, self.cu_seqlens, self.max_seqlen, causal=self.causal)
        if self.kernel == "flex":
            return _flex(q_BLHD, k_BLKD, v_BLKD, self.block_mask)
        if self.kernel == "causal":
            return _sdpa_bhld(q_BLHD, k_BLKD, v_BLKD, mask=None, causal=q_BLHD.shape[1] > 1)
        if self.kernel == "eager":
            return _eager(q_BLHD, k_BLKD, v_BLKD, self.mask_B1LLk, causal=self.causal)
        return _sdpa_bhld(q_BLHD, k_BLKD, v_BLKD, mask=self.mask_B1LLk,
                          causal=self.causal and self.mask_B1LLk is None and q_BLHD.shape[1] > 1)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for it: an asynchronous copy from pinned memory
    (from pageable memory CUDA may wait for the stream first)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def plan_layout(kernel: str, layout: DocumentLayout, device: torch.device, *, causal: bool) -> DocumentAttention:
    """The plan of a host-known layout for a document kernel; reads no device data (the index
    tensors it needs are copied to the device, which does not wait for the host)."""
    if kernel == "sdpa_docs":
        return DocumentAttention(kernel, causal, runs=layout.runs())
    if kernel == "flash_varlen":
        lengths = layout.document_lengths()
        cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
        return DocumentAttention(kernel, causal, cu_seqlens=host_to_device(cu, device), max_seqlen=max(lengths))
    if kernel == "flex":
        doc_BL = host_to_device(layout.document_ids(), device)
        return DocumentAttention(kernel, causal, block_mask=document_block_mask(pad_documents(doc_BL), causal=causal))
    raise AssertionError(kernel)


def plan_documents(kernel: str, doc_BL: torch.Tensor, valid_BL: torch.Tensor, *, causal: bool) -> DocumentAttention:
    if kernel == "sdpa_docs":
        return DocumentAttention(kernel, causal, runs=runs_of_documents(doc_BL, valid_BL))
    if kernel == "flash_varlen":
        cu, longest = cu_seqlens(doc_BL)
        return DocumentAttention(kernel, causal, cu_seqlens=cu, max_seqlen=longest)
    if kernel == "flex":
        return DocumentAttention(kernel, causal, block_mask=document_block_mask(pad_documents(doc_BL), causal=causal))
    raise AssertionError(kernel)


def text_attention(
    kernel: str,
    *,
    attention_mask_BLk: torch.Tensor | None,
    segment_ids_BL: torch.Tensor | None,
    q_len: int,
    kv_len: int,
    device: torch.device,
    layout: DocumentLayout | None = None,
) -> DocumentAttention:
    """The decoder's plan for one forward. Cached decoding (q_len < kv_len) uses the dense mask:
    it is (B, 1, q_len, kv_len), small when decoding token by token. With the batch's host
    `layout` (the loader's; it must describe the same masks) no device data is read."""
    if layout is not None and q_len == kv_len:
        assert layout.shape[1] == q_len, f"attention_layout is for rows of {layout.shape[1]} tokens, not {q_len}"
        if kernel not in DENSE_IMPLS:
            return DocumentAttention("causal", True) if layout.is_plain_causal() else plan_layout(
                kernel, layout, device, causal=True)
        mask = None if layout.is_plain_causal() else build_attention_mask(
            attention_mask_BLk=attention_mask_BLk, segment_ids_BL=segment_ids_BL, q_len=q_len, kv_len=kv_len,
            all_valid=False)
        if kernel == "eager" and mask is None:
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()[None, None]
        return DocumentAttention("eager" if kernel == "eager" else "sdpa_mask", True, mask_B1LLk=mask)
    all_valid = attention_mask_BLk is None or bool(attention_mask_BLk.all())
    if kernel not in DENSE_IMPLS and all_valid and segment_ids_BL is None and q_len == kv_len:
        return DocumentAttention("causal", True)
    if kernel in DENSE_IMPLS or q_len != kv_len:
        mask = build_attention_mask(attention_mask_BLk=attention_mask_BLk, segment_ids_BL=segment_ids_BL,
                                    q_len=q_len, kv_len=kv_len)
        if kernel == "eager" and mask is None:
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)[None, None]
        return DocumentAttention("eager" if kernel == "eager" else "sdpa_mask", True, mask_B1LLk=mask)
    valid_BL = (torch.ones(1, q_len, dtype=torch.bool, device=device) if attention_mask_BLk is None
                else attention_mask_BLk.bool())
    if segment_ids_BL is not None:
        valid_BL = valid_BL.expand_as(segment_ids_BL)
    doc_BL = document_ids(valid_BL, segment_ids_BL)
    if not is_document_layout(valid_BL, segment_ids_BL, doc_BL):
        warnings.warn("A sample is split by padding or repeats a segment id inside a row; attention falls "
                      "back to the dense (L x L) mask for this batch.", stacklevel=2)
        mask = build_attention_mask(attention_mask_BLk=attention_mask_BLk, segment_ids_BL=segment_ids_BL,
                                    q_len=q_len, kv_len=kv_len)
        return DocumentAttention("sdpa_mask", True, mask_B1LLk=mask)
    return plan_documents(kernel, doc_BL, valid_BL, causal=True)


def vision_attention(kernel: str, lengths: list[int], device: torch.device) -> DocumentAttention:
    """The vision tower's plan: bidirectional attention within each of `lengths` consecutive groups
    (one per image, one per temporal patch group of a video). `lengths` are host integers (from
    the grids), so no device data is read."""
    layout = DocumentLayout.from_sample_lengths([lengths], sum(lengths))
    if kernel in DENSE_IMPLS:
        doc_1N = host_to_device(layout.document_ids(), device)
        mask = (doc_1N[:, :, None] == doc_1N[:, None, :])[:, None]
        return DocumentAttention(kernel, False, mask_B1LLk=mask)
    return plan_layout(kernel, layout, device, causal=False)


def build_attention_mask(
    *, attention_mask_BLk: torch.Tensor | None, segment_ids_BL: torch.Tensor | None, q_len: int, kv_len: int,
    all_valid: bool | None = None,
) -> torch.Tensor | None:
    """Boolean (B, 1, L, Lk) mask: causal, keys not padding, same packed segment. Returns None
    when plain causal attention is exact (SDPA then takes its fastest causal kernel).
    `all_valid`: whether the attention mask has no padding, when the caller knows it on the host
    (otherwise it is read from the device).

    Every query may attend to itself, so padding rows never become all-masked (NaN in SDPA);
    their outputs are discarded anyway.
    """
    if all_valid is None:
        all_valid = attention_mask_BLk is None or bool(attention_mask_BLk.all())
    if all_valid and segment_ids_BL is None and q_len == kv_len:
        return None
    device = (attention_mask_BLk if attention_mask_BLk is not None else segment_ids_BL).device
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None]  # (1, L, Lk)
    if attention_mask_BLk is not None:
        mask = mask & attention_mask_BLk.bool()[:, None, :]
    if segment_ids_BL is not None:
        assert q_len == kv_len, "packed segments are a training-time (no cache) feature"
        mask = mask & (segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :])
    mask = mask | (k_pos[None, :] == q_pos[:, None])[None]
    return mask[:, None]


# ---- kernels --------------------------------------------------------------------------------


def _sdpa_docs(q_BLHD, k_BLKD, v_BLKD, runs, *, causal: bool) -> torch.Tensor:
    B, L, H, Dh = q_BLHD.shape
    sizes = [n * G for n, G, _ in runs]
    qs, ks, vs = (t.reshape(B * L, t.shape[2], Dh).split(sizes) for t in (q_BLHD, k_BLKD, v_BLKD))
    outs = []
    for (n, G, padding), q_THD, k_TKD, v_TKD in zip(runs, qs, ks, vs):
        if padding:  # one-token documents: softmax over a single key is 1
            outs.append(v_TKD.repeat_interleave(H // v_TKD.shape[1], dim=1))
            continue
        q, k, v = (t.view(G, n, t.shape[1], Dh).transpose(1, 2) for t in (q_THD, k_TKD, v_TKD))
        o_GHnD = F.scaled_dot_product_attention(q, k, v, is_causal=causal and n > 1, enable_gqa=True)
        outs.append(o_GHnD.transpose(1, 2).reshape(G * n, H, Dh))
    return torch.cat(outs).view(B, L, H, Dh)


def _flash_varlen(q_BLHD, k_BLKD, v_BLKD, cu, max_seqlen, *, causal: bool) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    B, L, H, Dh = q_BLHD.shape
    q, k, v = (t.reshape(B * L, t.shape[2], Dh) for t in (q_BLHD, k_BLKD, v_BLKD))
    out_THD = flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=causal)
    return out_THD.view(B, L, H, Dh)


def _flex(q_BLHD, k_BLKD, v_BLKD, block_mask) -> torch.Tensor:
    L = q_BLHD.shape[1]
    extra = block_mask.seq_lengths[0] - L
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, extra)).transpose(1, 2) for t in (q_BLHD, k_BLKD, v_BLKD))
    flex = _flex_kernel(q.device.type == "cuda")
    out_BHLD = flex(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    return out_BHLD.transpose(1, 2)[:, :L]


def _sdpa_bhld(q_BLHD, k_BLKD, v_BLKD, *, mask, causal: bool) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q_BLHD, k_BLKD, v_BLKD))
    out_BHLD = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    return out_BHLD.transpose(1, 2)


def _eager(q_BLHD, k_BLKD, v_BLKD, mask_B1LLk, *, causal: bool) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(Dh)) v in fp32 (transformers' eager attention)."""
    H, K = q_BLHD.shape[2], k_BLKD.shape[2]
    q = q_BLHD.transpose(1, 2)
    k, v = (t.transpose(1, 2).repeat_interleave(H // K, dim=1) for t in (k_BLKD, v_BLKD))
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask_B1LLk, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return (probs @ v).transpose(1, 2)
