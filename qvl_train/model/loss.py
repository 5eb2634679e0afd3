"""The vocabulary head and a fused linear + cross-entropy that never holds rows x vocab logits.

At Qwen3-VL's 151,936-token vocabulary, N supervised rows projected to fp32 logits plus their
gradient cost 2 x N x V x 4 bytes (about 35 GB for 16k fully supervised tokens). The fused loss
walks the rows in chunks: per chunk it computes the logits, their logsumexp, the summed CE and
the gradients with respect to the hidden rows and the head weight, keeps only those gradients
and drops the logits. Backward then only scales the stored gradients by the incoming one (in
place, so it runs once per forward: a second backward is refused).

Why the loss runs inside `LMHead.forward`: DeepSpeed ZeRO-3 gathers a module's weight in that
module's forward hooks. Calling the head module once with the targets means one gather per
micro-step (as before), and since the weight gradient is computed in that forward, nothing has
to re-gather it for a recompute in backward (the hurdle that ruled out checkpointing the head).

On CUDA with `liger_kernel` installed, Liger's fused kernel does the same work (its own Triton
kernels, also gradients-in-forward); elsewhere our chunked recompute (plain torch ops) does.

Legend: N rows, D hidden, V vocab, C rows in a chunk.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

IGNORE_INDEX = -100


class LMHead(nn.Linear):
    """nn.Linear(D, V) (state-dict name `weight`, as before) that, given `targets`, returns the
    SUMMED next-token cross entropy of `hidden` rows in fp32 instead of their logits."""

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        assert self.bias is None, "the fused loss head has no bias (Qwen3-VL's has none)"
        return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.weight, targets.reshape(-1))


def fused_linear_cross_entropy(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                               *, chunk_rows: int | None = None) -> torch.Tensor:
    """sum over rows with target != -100 of CE(hidden @ weight^T, target), in fp32, equal to
    F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")."""
    needs_grad = torch.is_grad_enabled() and (hidden_ND.requires_grad or weight_VD.requires_grad)
    if hidden_ND.is_cuda and needs_grad and chunk_rows is None and _liger_loss() is not None:
        out = _liger_loss()(weight_VD, hidden_ND, targets_N)
        return (out[0] if isinstance(out, tuple) else out).float()
    chunk = chunk_rows or default_chunk_rows(*hidden_ND.shape, weight_VD.shape[0])
    if not needs_grad:
        return _chunked_ce(hidden_ND, weight_VD, targets_N, chunk, None, None)
    return _ChunkedLinearCE.apply(hidden_ND, weight_VD, targets_N, chunk)


def default_chunk_rows(num_rows: int, hidden: int, vocab: int) -> int:
    """Chunks whose fp32 logits are about as large as the hidden rows themselves (Liger's rule),
    so the loss adds O(N x D) memory, never O(N x V); but at least 64 MiB of logits, because
    every chunk also pays fixed costs (a pass over the V x D weight gradient, per-op overheads)."""
    liger_rows = math.ceil(num_rows / max(1, math.ceil(vocab / hidden)))
    return max(1, min(num_rows, max(liger_rows, (64 << 20) // (4 * vocab))))


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, chunk):
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden_ND) if need_h else None
        # the weight gradient sums over every row: accumulate it in fp32 whatever the weight dtype
        grad_w = torch.zeros_like(weight_VD, dtype=torch.float32) if need_w else None
        loss = _chunked_ce(hidden_ND, weight_VD, targets_N, chunk, grad_h, grad_w)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight_VD.dtype))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        # The stored gradients are scaled in place (a V x D copy would double the head's peak;
        # grad_loss is a device scalar, so no host read), so a second backward through this node
        # would scale them again: refuse it, as torch does for freed graphs (hence RuntimeError).
        if getattr(ctx, "backward_done", False):
            raise RuntimeError(
                "The fused loss head's backward ran twice on one forward (backward with retain_graph=True, "
                "or torch.autograd.grad twice): its stored gradients are scaled in place, so a second pass "
                "would be wrong. Recompute the loss (call the head again) for each backward."
            )
        ctx.backward_done = True
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h.mul_(grad_loss.to(grad_h.dtype)),
                None if grad_w is None else grad_w.mul_(grad_loss.to(grad_w.dtype)), None, None)


def _chunked_ce(hidden_ND, weight_VD, targets_N, chunk, grad_h_ND, grad_w_VD) -> torch.Tensor:
    """Summed CE; fills grad_h (d loss / d hidden) and accumulates grad_w when they are given."""
    total = torch.zeros((), dtype=torch.float32, device=hidden_ND.device)
    for start in range(0, hidden_ND.shape[0], chunk):
        h_CD = hidden_ND[start:start + chunk]
        t_C = targets_N[start:start + chunk]
        valid_C = t_C != IGNORE_INDEX
        safe_t_C = t_C.masked_fill(~valid_C, 0)
        logits_CV = (h_CD @ weight_VD.t()).float()
        lse_C = torch.logsumexp(logits_CV, dim=-1)
        picked_C = logits_CV.gather(1, safe_t_C[:, None]).squeeze(1)
        total = total + torch.where(valid_C, lse_C - picked_C, 0.0).sum()
        if grad_h_ND is None and grad_w_VD is None:
            continue
        # d CE / d logits = softmax - onehot(target), zero on ignored rows; built in place
        grad_CV = logits_CV.sub_(lse_C[:, None]).exp_()
        grad_CV.scatter_add_(1, safe_t_C[:, None], torch.full_like(lse_C[:, None], -1.0))
        grad_CV.mul_(valid_C[:, None])
        grad_CV = grad_CV.to(h_CD.dtype)
        if grad_h_ND is not None:
            torch.mm(grad_CV, weight_VD, out=grad_h_ND[start:start + chunk])
        if grad_w_VD is None:
            continue
        if h_CD.dtype == torch.float32:
            grad_w_VD.addmm_(grad_CV.t(), h_CD)
        else:  # a low-precision matmul per chunk (fp32 inside), summed over chunks in fp32
            grad_w_VD.add_(grad_CV.t() @ h_CD)
    return total


@functools.cache
def _liger_loss():
    """Liger's fused linear + CE module (reduction="sum" needs liger-kernel >= 0.5), or None."""
    try:
        from importlib.metadata import version

        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        from packaging.version import Version
    except ImportError:
        return None
    if Version(version("liger-kernel")) < Version("0.5.0"):
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
