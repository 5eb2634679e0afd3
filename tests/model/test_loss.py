"""The fused linear + cross-entropy equals today's loss (full logits + F.cross_entropy in fp32):
loss and gradients within 1e-5 in fp32, with ignored rows, packed segments, the global-batch
normaliser the trainer passes, and tied embeddings."""

import pytest
import torch
import torch.nn.functional as F

from qvl_train.model import build_model
from qvl_train.model.loss import IGNORE_INDEX, LMHead, fused_linear_cross_entropy
from qvl_train.model.model import causal_lm_loss, supervised_causal_lm_loss

from .reference import make_batch, tiny_config


def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*tensors)
    loss.backward()
    return loss.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("chunk_rows", [1, 7, None])
def test_fused_ce_matches_full_logits(chunk_rows):
    torch.manual_seed(0)
    N, D, V = 37, 16, 301
    hidden, weight = torch.randn(N, D), torch.randn(V, D) * 0.5
    targets = torch.randint(0, V, (N,))
    targets[::4] = IGNORE_INDEX
    ref, ref_g = _grads(lambda h, w: F.cross_entropy(h @ w.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum"),
                        hidden, weight)
    ours, ours_g = _grads(lambda h, w: fused_linear_cross_entropy(h, w, targets, chunk_rows=chunk_rows), hidden, weight)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # eval: same loss, no gradient buffers
        torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows), ref)


def test_supervised_loss_matches_full_path_with_segments_and_normaliser():
    torch.manual_seed(1)
    B, L, D, V = 2, 24, 16, 97
    head = LMHead(D, V, bias=False)
    hidden = torch.randn(B, L, D)
    labels = torch.randint(0, V, (B, L))
    labels[0, :5] = IGNORE_INDEX  # a prompt
    labels[1, 10:14] = IGNORE_INDEX
    segments = torch.tensor([[0] * 12 + [1] * 12, [0] * 3 + [1] * 20 + [2]])
    for normaliser in (None, 13.5, torch.tensor(7.0)):
        ref, (ref_h, ref_w) = _grads(
            lambda h, w: causal_lm_loss(F.linear(h, w), labels, segment_ids=segments, normalizer=normaliser),
            hidden, head.weight)
        ours, (h_g, w_g) = _grads(
            lambda h, w: supervised_causal_lm_loss(_with_weight(head, w), h, labels, segment_ids=segments,
                                                   normalizer=normaliser), hidden, head.weight)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h_g, ref_h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w_g, ref_w, rtol=1e-5, atol=1e-6)


def test_nothing_supervised_gives_zero_loss_and_zero_grads():
    head = LMHead(8, 11, bias=False)
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    loss = supervised_causal_lm_loss(head, hidden, torch.full((1, 5), IGNORE_INDEX), normalizer=3.0)
    loss.backward()
    assert loss.item() == 0.0
    assert not hidden.grad.any() and not head.weight.grad.any()


@pytest.mark.parametrize("tied", [False, True])
def test_model_fused_loss_equals_full_logits_loss(tied):
    """The trainer's path (return_logits=False) vs the full-logits path through the whole tiny
    model: CE and every parameter gradient (tied: lm_head is the embedding)."""
    cfg = tiny_config().replace(tie_word_embeddings=tied)
    model = build_model(cfg, seed=0)
    batch = make_batch(cfg, [[5, ("image", (1, 4, 4)), 7, 9, 11], [3, 4, 5, 6]], seed=4)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    grads = {}
    for fused in (False, True):
        model.zero_grad()
        out = model(**batch, loss_normalizer=5.0, return_logits=not fused)
        out.ce_loss.backward()
        grads[fused] = (out.ce_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-5, atol=1e-6)
    assert grads[True][1].keys() == grads[False][1].keys()
    for name, g in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def _with_weight(head: LMHead, weight: torch.Tensor):
    """head's forward with `weight` in place of its parameter (to take the gradient wrt a leaf)."""
    return lambda h, t: fused_linear_cross_entropy(h, weight, t) if t is not None else F.linear(h, weight)


@pytest.mark.parametrize("needs", ["hidden", "weight"])
def test_second_backward_through_the_fused_loss_is_refused(needs):
    """Backward scales the gradients stored in forward in place: a retained graph's second
    backward would scale them again, so it is an error, and the first one stays right."""
    torch.manual_seed(0)
    hidden = torch.randn(12, 8, requires_grad=needs == "hidden")
    weight = torch.randn(32, 8, requires_grad=needs == "weight")
    targets = torch.randint(0, 32, (12,))
    leaf = hidden if needs == "hidden" else weight
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=5)
    (3.0 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        (3.0 * loss).backward()
    expected = torch.autograd.grad(3.0 * F.cross_entropy(hidden @ weight.t(), targets, reduction="sum"), leaf)[0]
    torch.testing.assert_close(leaf.grad, expected)
