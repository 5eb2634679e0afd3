"""LoRA train step with expert LoRA: ours (grouped per-expert (x A^T) B^T) vs PEFT's
`target_parameters` on transformers' Qwen3VLMoeForConditionalGeneration (which folds W + B A
into a full copy of every expert stack on each forward and backpropagates through it).

    python bench/bench_lora.py                  # H 1024, I 384, 128 experts top-8, 2 MoE layers, 1x1024 tokens, r 16
    python bench/bench_lora.py --seq 2048 --hf-impl eager

The default is Qwen3-VL-30B-A3B's expert count and top-k at half its width (H 2048, I 768),
with a 1k-token micro-batch (64 routed rows per expert). PEFT's extra cost per layer is fixed
(the [E, out, in] fold, its full-size gradient, copies), so the gap narrows with more tokens per
expert and widens with fewer.

Same weights, same LoRA weights (copied across, non-zero B), same data, one process; the
variants take turns (interleaved) so machine noise hits them alike. Each step is forward +
backward + AdamW on the LoRA parameters. Memory, per variant, over one step: peak RSS growth
(CPU; sampled every ~0.5 ms with glibc's mmap threshold pinned so freed tensors leave RSS) or
peak CUDA memory, and the bytes autograd saves for backward.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import threading
import time
from pathlib import Path

if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    # pin the threshold (glibc otherwise raises it after frees and keeps freed tensors resident),
    # so RSS follows live tensors and the per-step peak can be sampled in one process
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cuda_peak_mb, rss_bytes, saved_mb, timed_interleaved  # noqa: E402  (bench/common.py)

from qvl_train.model import build_model, preset
from qvl_train.peft import LoraSettings, apply_lora, lora_parameters


def peak_growth_mb(fn, device: torch.device) -> float:
    gc.collect()
    if device.type == "cuda":
        return cuda_peak_mb(fn)
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.0005)

    t = threading.Thread(target=sample)
    t.start()
    fn()
    done.set()
    t.join()
    return (max(peak[0], rss_bytes()) - base) / 2**20


def bench_config(args):
    cfg = preset("tiny")
    text = dataclasses.replace(
        cfg.text, hidden_size=args.hidden, num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden // 8,
        moe_intermediate_size=args.inter, num_experts=args.experts, num_experts_per_tok=args.top_k,
        num_hidden_layers=args.layers, mrope_section=[args.hidden // 32, args.hidden // 64, args.hidden // 64],
    )
    return cfg.replace(text=text, vision=dataclasses.replace(cfg.vision, out_hidden_size=args.hidden))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=384)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--hf-impl", default="grouped_mm", choices=["grouped_mm", "eager"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1: stable timings on a shared machine; 0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    from peft import LoraConfig, get_peft_model

    from tests.model.reference import hf_twin

    cfg = bench_config(args)
    assert sum(cfg.text.mrope_section) == cfg.text.head_dim // 2, cfg.text.mrope_section
    base = build_model(cfg, dtype=dtype)
    hf = hf_twin(base).to(device).train()
    for mod in hf.modules():
        if hasattr(mod, "config") and hasattr(mod.config, "_experts_implementation"):
            mod.config._experts_implementation = args.hf_impl
    ours = base.to(device).train()
    apply_lora(ours, LoraSettings(rank=args.rank, alpha=2 * args.rank, targets=("attention", "experts")))
    peft = get_peft_model(hf, LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    ))
    g = torch.Generator().manual_seed(0)
    theirs = {n.removeprefix("base_model.model."): q for n, q in peft.named_parameters() if q.requires_grad}
    with torch.no_grad():  # same non-zero LoRA weights on both sides (same names, same layout)
        for n, q in lora_parameters(ours).items():
            q.copy_(torch.randn(q.shape, generator=g) * 0.02)
            theirs[n].copy_(q)
    assert len(theirs) == len(lora_parameters(ours))

    ids = torch.randint(0, 900, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    opt_ours = torch.optim.AdamW([q for q in ours.parameters() if q.requires_grad], lr=1e-5)
    opt_peft = torch.optim.AdamW([q for q in peft.parameters() if q.requires_grad], lr=0.0)

    with torch.no_grad():
        lo = ours(**batch, labels=ids).ce_loss
        lp = peft(**batch, labels=ids).loss
    print(f"same loss before timing: ours {lo.item():.6f}  peft {lp.item():.6f}")
    assert abs(lo.item() - lp.item()) < 1e-3 * max(1.0, abs(lp.item()))

    def step_ours():
        opt_ours.zero_grad(set_to_none=True)
        ours(**batch, labels=ids).loss.backward()
        opt_ours.step()

    def step_peft():
        opt_peft.zero_grad(set_to_none=True)
        peft(**batch, labels=ids).loss.backward()
        opt_peft.step()

    other = f"peft_{args.hf_impl}"
    fns = {"ours": step_ours, other: step_peft}
    print(f"torch {torch.__version__}, {device}, threads {torch.get_num_threads()}, {dtype}; "
          f"H={args.hidden} I={args.inter} E={args.experts} top-{args.top_k} layers={args.layers} "
          f"tokens={args.batch}x{args.seq} LoRA r={args.rank} on q/k/v/o + every expert's gate_up/down")
    times = timed_interleaved(fns, warmup=args.warmup, iters=args.iters)
    peaks = {n: statistics.median(peak_growth_mb(fn, device) for _ in range(2)) for n, fn in fns.items()}
    saved = {"ours": saved_mb(step_ours, ours), other: saved_mb(step_peft, peft)}
    med = {n: statistics.median(t) for n, t in times.items()}
    best = {n: min(t) for n, t in times.items()}
    for n in fns:
        print(f"  {n:18s} step {med[n] * 1e3:9.1f} ms (min {min(times[n]) * 1e3:.1f})   peak growth {peaks[n]:8.1f} MiB"
              f"   saved for backward {saved[n]:8.1f} MiB")
    print(f"  => ours is x{med[other] / med['ours']:.2f} faster (median; x{best[other] / best['ours']:.2f} by best step), peak memory x{peaks[other] / max(peaks['ours'], 1e-9):.2f} "
          f"lower, saved activations x{saved[other] / saved['ours']:.2f} lower")


if __name__ == "__main__":
    main()
