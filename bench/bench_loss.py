"""The training loss head: full logits + CE (transformers' way) vs our supervised-only projection
(`return_logits=False`), at the real vocabulary size. One process, interleaved timing; memory is
what autograd saves for backward (parameters excluded) plus the logits the forward returns.

    python bench/bench_loss.py --tokens 4096 --supervised 0.25
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import saved_mb, timed_interleaved  # noqa: E402  (bench/common.py)

from qvl_train.model.model import causal_lm_loss, supervised_causal_lm_loss  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--supervised", type=float, default=0.25, help="fraction of positions with a target")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    head = nn.Linear(args.hidden, args.vocab, bias=False)
    hidden = torch.randn(1, args.tokens, args.hidden)
    labels = torch.randint(0, args.vocab, (1, args.tokens))
    labels[:, : int(args.tokens * (1 - args.supervised))] = -100  # prompt and image tokens

    def full():
        h = hidden.detach().requires_grad_()
        causal_lm_loss(head(h), labels).backward()

    def ours():
        h = hidden.detach().requires_grad_()
        supervised_causal_lm_loss(head, h, labels).backward()

    with torch.no_grad():
        a = causal_lm_loss(head(hidden), labels)
        b = supervised_causal_lm_loss(head, hidden, labels)
    assert torch.allclose(a, b, atol=1e-5), (a, b)
    times = timed_interleaved({"full": full, "ours": ours}, warmup=1, iters=args.iters)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {"full": saved_mb(full, head), "ours": saved_mb(ours, head)}
    print(f"loss head: {args.tokens} tokens, {args.supervised:.0%} supervised, hidden {args.hidden}, vocab {args.vocab}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for k in ("full", "ours"):
        print(f"  {k:5s} {med[k] * 1e3:8.1f} ms   saved for backward {mem[k]:8.1f} MiB")
    print(f"  => ours x{med['full'] / med['ours']:.2f} faster, x{mem['full'] / max(mem['ours'], 1e-9):.2f} less saved memory")


if __name__ == "__main__":
    main()
