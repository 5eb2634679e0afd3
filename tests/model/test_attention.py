"""Document attention (qvl_train.model.attention) against today's dense-mask path, and the
guarantee that text attention never allocates an L x L tensor."""

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from qvl_train.model import build_model
from qvl_train.model.attention import (
    ATTN_IMPLS,
    document_block_mask,
    document_ids,
    pad_documents,
    resolve_attn_impl,
    text_attention,
)
from qvl_train.model.text import Attention

from .reference import make_batch, tiny_config

PAD_SEGMENT = -1


def _packed_rows(cfg, rows: list[list[list]], seed: int = 0) -> dict:
    """Rows of packed samples (each sample a make_batch row spec), right-padded to one length with
    segment id -1; pixels and grids in token order across the batch, as the packer emits them."""
    parts, r = [], []
    for b, row in enumerate(rows):
        samples = [make_batch(cfg, [spec], seed=seed + 10 * b + i) for i, spec in enumerate(row)]
        parts.append(samples)
    L = max(sum(s["input_ids"].shape[1] for s in row) for row in parts) + 5
    ids = torch.full((len(rows), L), cfg.text.pad_token_id)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    seg = torch.full((len(rows), L), PAD_SEGMENT)
    for b, samples in enumerate(parts):
        pos = 0
        for i, s in enumerate(samples):
            n = s["input_ids"].shape[1]
            ids[b, pos : pos + n], mask[b, pos : pos + n], seg[b, pos : pos + n] = s["input_ids"][0], 1, i
            pos += n
        r += samples
    batch = {"input_ids": ids, "attention_mask": mask, "segment_ids": seg}
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        with_media = [s for s in r if grid in s]
        if with_media:
            batch[pix] = torch.cat([s[pix] for s in with_media])
            batch[grid] = torch.cat([s[grid] for s in with_media])
    return batch


ROWS = [
    [[3, ("image", (1, 4, 6)), 7], [1], [2, ("video", (2, 4, 4)), 3]],  # 1-token sample in the middle
    [[9], [4, ("image", (1, 2, 4)), 2], [1]],  # 1-token sample last, before the padding
]


def _loss_and_grads(model, batch):
    model.zero_grad()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_images_videos_padding_match_dense_mask_outputs_and_gradients():
    cfg = tiny_config()
    model = build_model(cfg).train()
    batch = _packed_rows(cfg, ROWS)
    model.set_attn_impl("sdpa_mask")
    ref_logits, ref_grads = _loss_and_grads(model, batch)
    model.set_attn_impl("sdpa_docs")
    logits, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("impl", ["flex", "eager"])
def test_packed_logits_match_dense_mask(impl):
    """flex runs eagerly here (math, forward only on CPU): what it checks is our BlockMask and
    mask_mod; bench/gpu_parity.py checks its gradients on CUDA."""
    cfg = tiny_config()
    model = build_model(cfg).eval()
    batch = _packed_rows(cfg, ROWS)
    with torch.no_grad():
        model.set_attn_impl("sdpa_mask")
        ref = model(**batch).logits
        model.set_attn_impl(impl)
        torch.testing.assert_close(model(**batch).logits, ref, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_vision_groups_in_one_call_match_dense_mask():
    """Equal-length frame groups run as one batched call, other lengths alone."""
    cfg = tiny_config()
    tower = build_model(cfg).model.visual
    grid = torch.tensor([[2, 4, 4], [1, 4, 6], [3, 2, 2], [1, 4, 4]])
    pixels = torch.randn(int(grid.prod(-1).sum()), cfg.vision.patch_dim)
    results = []
    for impl in ("sdpa_mask", "sdpa_docs"):
        tower.attn_impl = impl
        tower.zero_grad()
        embeds, deepstack = tower(pixels, grid)
        (embeds.square().sum() + sum(d.sum() for d in deepstack)).backward()
        results.append((embeds.detach(), [p.grad.clone() for p in tower.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=0)
    for g, g_ref in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=0)
    tower.attn_impl = "flex"  # forward only on CPU
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels, grid)[0], results[0][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_block_mask_equals_the_one_flex_builds_from_mask_mod(causal):
    lengths = [300, 1, 200, 1, 1, 17, 300]  # spans, fills and ends inside blocks; 1-token documents
    doc_BL = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    doc_BL = pad_documents(torch.cat([doc_BL, doc_BL.flip(1).neg() + doc_BL.max()], dim=0))
    ours = document_block_mask(doc_BL, causal=causal)

    def mask_mod(b, h, q, kv):
        same = doc_BL[b, q] == doc_BL[b, kv]
        return same & (q >= kv) if causal else same

    ref = create_block_mask(mask_mod, doc_BL.shape[0], None, doc_BL.shape[1], doc_BL.shape[1], device="cpu")
    for mask in (ours, ref):  # the blocks that need mask_mod and those that do not, separately
        mask.partial_B1qk = BlockMask.from_kv_blocks(mask.kv_num_blocks, mask.kv_indices).to_dense()
        mask.full_B1qk = BlockMask.from_kv_blocks(mask.full_kv_num_blocks, mask.full_kv_indices).to_dense()
    assert torch.equal(ours.partial_B1qk, ref.partial_B1qk)
    assert torch.equal(ours.full_B1qk, ref.full_B1qk)
    assert ours.full_B1qk.any() and ours.partial_B1qk.any()


def test_padding_inside_a_sample_falls_back_to_the_exact_dense_mask():
    mask = torch.tensor([[1, 1, 0, 1, 1]])
    with pytest.warns(UserWarning, match="dense"):
        plan = text_attention("sdpa_docs", attention_mask_BLk=mask, segment_ids_BL=None, q_len=5, kv_len=5,
                              device=torch.device("cpu"))
    assert plan.kernel == "sdpa_mask"


def test_document_ids_give_padding_its_own_documents():
    valid = torch.tensor([[True, True, True, True, False, False]])
    seg = torch.tensor([[0, 0, 1, 2, -1, -1]])
    assert document_ids(valid, seg).tolist() == [[0, 0, 1, 2, 3, 4]]


def test_attn_impl_choice():
    cpu = torch.device("cpu")
    assert resolve_attn_impl("auto", cpu, torch.float32) == "sdpa_docs"
    assert resolve_attn_impl("auto", torch.device("cuda"), torch.bfloat16) in ("flex", "flash_varlen")
    with pytest.raises(ValueError, match="choose one of"):
        resolve_attn_impl("flash", cpu, torch.float32)
    with pytest.raises(ValueError, match="flash_attn"):
        resolve_attn_impl("flash_varlen", cpu, torch.bfloat16)
    assert set(ATTN_IMPLS) >= {"auto", "flex", "flash_varlen", "sdpa_docs", "sdpa_mask", "eager"}


# ---- no L x L tensor --------------------------------------------------------------------------


class LargestOutputs(TorchDispatchMode):
    """Records every op whose output has at least `limit` elements (every tensor an op allocates
    is one of its outputs; views are counted too, which only makes the check stricter)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.big = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.limit:
                self.big.append((str(func), tuple(t.shape)))
        return out


def _text_attention_step(impl: str, L: int, backward: bool) -> list:
    """Plan + one decoder attention forward (and backward) on a packed row of L tokens: a long
    sample, short ones, 1-token ones and a padded tail."""
    cfg = tiny_config()
    torch.manual_seed(0)
    attn = Attention(cfg.text, layer_idx=0)
    lengths = [3000, 1, 700, 1, 300]
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((L - sum(lengths),), -1)])[None]
    valid = (seg >= 0).long()
    x = torch.randn(1, L, cfg.text.hidden_size, requires_grad=True)
    rope = (torch.randn(1, L, cfg.text.head_dim), torch.randn(1, L, cfg.text.head_dim))
    with LargestOutputs(limit=L * L) as rec:
        plan = text_attention(impl, attention_mask_BLk=valid, segment_ids_BL=seg, q_len=L, kv_len=L,
                              device=x.device)
        out = attn(x, rope, plan)
        if backward:
            out.square().sum().backward()
    return rec.big


def test_text_attention_allocates_no_L_squared_tensor_forward_or_backward():
    assert _text_attention_step("sdpa_docs", L=4096, backward=True) == []


def test_the_L_squared_check_catches_the_dense_mask_path():
    assert _text_attention_step("sdpa_mask", L=4096, backward=False)


@pytest.mark.parametrize("rows", [[[3, 5], [4], [2, 2, 2]], [[9], [9]], [[4, 5], [9]]], ids=["packed", "plain", "no_padding"])
def test_host_layout_plans_equal_the_plans_read_from_the_masks(rows):
    """The loader's DocumentLayout (sample lengths per row, host integers) gives every kernel the
    plan that the masks on the device give: same runs, cu_seqlens, block-mask documents, dense mask."""
    from qvl_train.model.attention import DocumentLayout

    L = 9
    layout = DocumentLayout.from_sample_lengths(rows, L)
    seg = torch.full((len(rows), L), PAD_SEGMENT)
    for b, lengths in enumerate(rows):
        seg[b, : sum(lengths)] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    valid = seg != PAD_SEGMENT
    assert torch.equal(layout.document_ids(), document_ids(valid, seg))
    kwargs = dict(attention_mask_BLk=valid.long(), segment_ids_BL=seg, q_len=L, kv_len=L, device=torch.device("cpu"))
    q, k, v = torch.randn(len(rows), L, 4, 8), torch.randn(len(rows), L, 2, 8), torch.randn(len(rows), L, 2, 8)
    for kernel in ("sdpa_docs", "flash_varlen", "flex", "sdpa_mask", "eager"):
        ours, ref = text_attention(kernel, layout=layout, **kwargs), text_attention(kernel, **kwargs)
        if layout.is_plain_causal():  # one document per row, no padding: plain causal attention is exact
            if kernel not in ("flash_varlen", "flex"):  # (flash-attn needs CUDA; flex is slow on CPU)
                torch.testing.assert_close(ours(q, k, v), ref(q, k, v))
            continue
        assert ours.kernel == ref.kernel and ours.runs == ref.runs and ours.max_seqlen == ref.max_seqlen
        for a, b in ((ours.cu_seqlens, ref.cu_seqlens), (ours.mask_B1LLk, ref.mask_B1LLk)):
            assert (a is None and b is None) or torch.equal(a, b)
        if kernel == "flex":
            for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
                assert torch.equal(getattr(ours.block_mask, name), getattr(ref.block_mask, name)), name
