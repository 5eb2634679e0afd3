"""The training loss head at the real vocabulary size: full logits + fp32 CE (transformers'
way), the previous supervised-only projection (logits of the supervised rows only), and the fused
chunked linear + CE the trainer uses now (`LMHead`, qvl_train/model/loss.py). One process,
interleaved timing; memory is the peak heap growth of forward + backward (CPU, mallinfo2).

    flock /tmp/bigmem.lock python bench/bench_loss.py --tokens 2048 --hidden 1024 --supervised 1.0
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import peak_mb, timed_interleaved  # noqa: E402  (bench/common.py)

from qvl_train.model.loss import IGNORE_INDEX, LMHead  # noqa: E402
from qvl_train.model.model import causal_lm_loss, shifted_labels, supervised_causal_lm_loss  # noqa: E402


def previous_supervised_loss(head, hidden_BLD, labels_BL):
    """What the trainer ran before the fused head: project the supervised rows, fp32 CE."""
    targets = shifted_labels(labels_BL, None).reshape(-1)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    logits = F.linear(hidden_BLD.reshape(-1, hidden_BLD.shape[-1])[keep], head.weight).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum") / len(keep)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--supervised", type=float, default=1.0, help="fraction of positions with a target")
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    head = LMHead(args.hidden, args.vocab, bias=False)
    hidden = torch.randn(1, args.tokens, args.hidden)
    labels = torch.randint(0, args.vocab, (1, args.tokens))
    labels[:, : int(args.tokens * (1 - args.supervised))] = -100  # prompt and image tokens

    def run(loss_fn):
        def step():
            h = hidden.detach().requires_grad_()
            head.weight.grad = None
            loss_fn(h).backward()
        return step

    cands = {
        "full": run(lambda h: causal_lm_loss(head(h), labels)),
        "previous": run(lambda h: previous_supervised_loss(head, h, labels)),
        "fused": run(lambda h: supervised_causal_lm_loss(head, h, labels)),
    }
    with torch.no_grad():
        ref = causal_lm_loss(head(hidden), labels)
        for name, fn in (("previous", previous_supervised_loss), ("fused", supervised_causal_lm_loss)):
            got = fn(head, hidden, labels)
            assert torch.allclose(ref, got, atol=1e-5), (name, ref, got)
    mem = {}
    for k, fn in cands.items():
        head.weight.grad = None
        mem[k] = peak_mb(fn)
    times = timed_interleaved(cands, warmup=1, iters=args.iters)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"loss head: {args.tokens} tokens, {args.supervised:.0%} supervised, hidden {args.hidden}, vocab {args.vocab}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for k in cands:
        print(f"  {k:8s} {med[k] * 1e3:9.1f} ms   peak {mem[k]:9.1f} MiB")
    for base in ("full", "previous"):
        print(f"  => fused vs {base}: x{med[base] / med['fused']:.2f} speed, peak {mem['fused'] / mem[base]:.1%} of {base}'s")


if __name__ == "__main__":
    main()
