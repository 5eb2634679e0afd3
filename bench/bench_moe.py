"""MoE block and whole-train-step speed: ours vs transformers, same weights, same tokens, one process.

    python bench/bench_moe.py                 # MoE block (H 512, I 256, 64 experts, top-8, 4096 tokens)
    python bench/bench_moe.py --step          # also a whole tiny-model train step
    python bench/bench_moe.py --padding       # instead: our block with 0% / ~10% padding, padding
                                              # through expert 0 with weight 0 (before, the code
                                              # until 2026-12-02) vs never reaching an expert (after)

Prints median seconds per forward+backward and ratios against transformers' eager and
grouped_mm experts implementations, plus peak RSS growth (CPU) or peak CUDA memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import saved_mb, timed_interleaved  # noqa: E402  (bench/common.py)

from qvl_train.model import build_model, preset
from qvl_train.model.config import TextConfig
from qvl_train.model.moe import MoEBlock


def median_times(fns: dict, *, warmup: int, iters: int) -> dict[str, float]:
    return {n: statistics.median(ts) for n, ts in timed_interleaved(fns, warmup=warmup, iters=iters).items()}


def peak_mem_mb(fn, model, device) -> float:
    """Peak CUDA memory growth on GPU; on CPU the activations autograd saves for backward."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return saved_mb(fn, model)


def random_block(args, device, dtype) -> tuple[TextConfig, MoEBlock]:
    """The benched block: the --hidden/--inter/--experts/--top-k widths, seeded N(0, 0.02) weights."""
    cfg = TextConfig(hidden_size=args.hidden, moe_intermediate_size=args.inter, num_experts=args.experts,
                     num_experts_per_tok=args.top_k)
    torch.manual_seed(0)
    block = MoEBlock(cfg).to(device, dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return cfg, block


def moe_block_bench(args, device, dtype) -> None:
    from transformers import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

    _, ours = random_block(args, device, dtype)
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype)
    grad = torch.randn_like(x)

    def run(block, ours_api: bool):
        def fn():
            xi = x.detach().requires_grad_()
            y = block(xi, None)[0] if ours_api else block(xi)
            y.backward(grad)
        return fn

    results = {"ours": (run(ours, True), ours)}
    # batched_mm is left out: it gathers a weight copy per token (32 GiB at this size)
    for impl in ("eager", "grouped_mm"):
        hcfg = Qwen3VLMoeTextConfig(hidden_size=args.hidden, moe_intermediate_size=args.inter,
                                    num_experts=args.experts, num_experts_per_tok=args.top_k)
        hcfg._experts_implementation = impl
        ref = Qwen3VLMoeTextSparseMoeBlock(hcfg).to(device, dtype)
        ref.load_state_dict(ours.state_dict())  # same names, same layout
        results[f"hf_{impl}"] = (run(ref, False), ref)
    with torch.no_grad():  # same outputs first
        base = ours(x, None)[0]
        for name, (_, block) in results.items():
            out = block(x, None)[0] if name == "ours" else block(x)
            assert torch.allclose(out, base, atol=1e-4 if dtype == torch.float32 else 3e-2), name
    times = median_times({n: fn for n, (fn, _) in results.items()}, warmup=args.warmup, iters=args.iters)
    mems = {n: peak_mem_mb(fn, block, device) for n, (fn, block) in results.items()}
    print(f"MoE block fwd+bwd: H={args.hidden} I={args.inter} E={args.experts} top-{args.top_k} "
          f"tokens={args.tokens} {dtype} on {device}")
    for n in results:
        print(f"  {n:16s} {times[n] * 1e3:9.1f} ms   saved activations {mems[n]:8.1f} MiB   "
              f"ours speedup x{times[n] / times['ours']:.2f}")
    best = min(v for k, v in times.items() if k != "ours")
    print(f"  => ours vs transformers' best: x{best / times['ours']:.2f}")


class _DispatcherBefore:
    """LocalDispatcher as it was until 2026-12-02 (copied, for an in-process before/after)."""

    def dispatch(self, x_TD, top_w_Tk, top_i_Tk, num_experts):
        from qvl_train.model.moe import Dispatched, _GatherRows, expert_counts

        flat_S = top_i_Tk.reshape(-1)
        order_S = torch.argsort(flat_S, stable=True)
        counts_E = expert_counts(flat_S, num_experts)
        token_S = order_S // top_i_Tk.shape[1]
        x_SD = _GatherRows.apply(x_TD, token_S)
        return Dispatched(x_SD, top_w_Tk.reshape(-1)[order_S], counts_E, (token_S, order_S, x_TD.shape[0]))

    def combine(self, y_SD, d):
        token_S, order_S, T = d.ctx
        if y_SD.dtype == torch.float32:
            return y_SD.new_zeros(T, y_SD.shape[1]).index_add_(0, token_S, y_SD)
        y_TkD = torch.empty_like(y_SD).index_copy_(0, order_S, y_SD).view(T, -1, y_SD.shape[1])
        return y_TkD.float().sum(dim=1).to(y_SD.dtype)


class _BlockBefore(MoEBlock):
    """MoEBlock's routing until 2026-12-02: padding picks ran through expert 0 with router
    weight 0 (the experts code is unchanged)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.dispatcher = _DispatcherBefore()

    def forward(self, x_BLD, token_mask_BL):
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(-1, D)
        logits_TE, top_w_Tk, top_i_Tk = self.gate(x_TD)
        valid_T1 = token_mask_BL.reshape(-1, 1).bool()
        routed = self._route(x_TD, top_w_Tk * valid_T1, top_i_Tk.masked_fill(~valid_T1, 0))
        return routed.view(B, L, D), logits_TE, top_i_Tk.masked_fill(~valid_T1, self.num_experts)


def grouped_mm_rows(fn) -> int:
    """Rows the grouped matmuls of one fn() call compute on (the sum of offs[-1]): 0 when the
    experts take the padded_bmm fallback."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Spy(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.overloadpacket.__name__ == "_grouped_mm":
                Spy.rows += int(kwargs.get("offs", args[2] if len(args) > 2 else None)[-1])
            return func(*args, **kwargs)

    with Spy():
        fn()
    return Spy.rows


def padding_bench(args, device, dtype) -> None:
    """Block step (forward + backward) with 0% and ~10% padding (each of 4 rows ends in a padded
    tail, as a packed row does), before (padding through expert 0) vs after (never reaches an
    expert). At 0% the difference is the price of the padding bookkeeping."""
    cfg, after = random_block(args, device, dtype)
    before = _BlockBefore(cfg).to(device, dtype)
    before.load_state_dict(after.state_dict())
    B, L = 4, args.tokens // 4
    x = torch.randn(B, L, args.hidden, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    masks = {}
    for frac in (0.0, args.pad_fraction):
        m = torch.ones(B, L, dtype=torch.long, device=device)
        m[:, L - int(round(frac * L)):] = 0
        masks[frac] = m

    def run(block, mask):
        def fn():
            xi = x.detach().requires_grad_()
            block(xi, mask)[0].backward(grad)
        return fn

    fns = {f"{name} {int(frac * 100)}%": run(block, m) for frac, m in masks.items()
           for name, block in (("before", before), ("after", after))}
    with torch.no_grad():
        for m in masks.values():
            assert torch.allclose(before(x, m)[0], after(x, m)[0], atol=1e-5 if dtype == torch.float32 else 3e-2)
    rows = {n: grouped_mm_rows(fn) for n, fn in fns.items()}
    if device.type == "cpu":  # CPU seconds of this process: steadier than wall time on a shared box
        t = {n: statistics.median(ts) for n, ts in timed_interleaved(fns, warmup=args.warmup, iters=args.iters, clock=time.process_time).items()}
    else:
        t = median_times(fns, warmup=args.warmup, iters=args.iters)
    print(f"MoE block fwd+bwd with padding: H={args.hidden} I={args.inter} E={args.experts} top-{args.top_k} "
          f"{B}x{L} tokens, {dtype} on {device}, median of {args.iters} interleaved iterations"
          + (" (process CPU time)" if device.type == "cpu" else ""))
    for n, v in t.items():
        print(f"  {n:12s} {v * 1e3:9.1f} ms   rows through the expert matmuls {rows[n]:,}")
    p = f"{int(args.pad_fraction * 100)}%"
    print(f"  => before/after: 0% x{t['before 0%'] / t['after 0%']:.2f}, {p} x{t[f'before {p}'] / t[f'after {p}']:.2f}; "
          f"{p} vs 0% padding: before {t[f'before {p}'] / t['before 0%']:.2f}, after {t[f'after {p}'] / t['after 0%']:.2f}")


def train_step_bench(args, device, dtype) -> None:
    from tests.model.reference import hf_twin, make_batch, ours_kwargs

    cfg = preset("tiny")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_experts=32, num_experts_per_tok=4, hidden_size=128,
                                               num_attention_heads=8, head_dim=16, moe_intermediate_size=96,
                                               mrope_section=[4, 2, 2]),
                      vision=dataclasses.replace(cfg.vision, out_hidden_size=128))
    model = build_model(cfg, dtype=dtype, device=device).train()
    batch = make_batch(cfg, [[40, ("image", (1, 16, 16)), 60, ("image", (1, 12, 20)), 80]] * 4)
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for impl in ("eager", "grouped_mm"):
        hf = hf_twin(model.cpu()).to(device, dtype).train()
        hf.config.text_config._experts_implementation = impl
        for mod in hf.modules():
            if hasattr(mod, "config") and hasattr(mod.config, "_experts_implementation"):
                mod.config._experts_implementation = impl
        model.to(device)
        fns = {
            "ours": lambda: model(**ours_kwargs(batch), labels=labels).loss.backward(),
            f"hf_{impl}": lambda: hf(**batch, labels=labels, output_router_logits=True).loss.backward(),
        }
        t = median_times(fns, warmup=args.warmup, iters=args.iters)
        m = {n: peak_mem_mb(f, model if n == 'ours' else hf, torch.device(device)) for n, f in fns.items()}
        print(f"tiny train step (B=4, {int(batch['attention_mask'].sum())} tokens, {cfg.text.num_experts} experts) vs hf_{impl}: "
              f"ours {t['ours'] * 1e3:.1f} ms / {m['ours']:.1f} MiB, hf {t[f'hf_{impl}'] * 1e3:.1f} ms / "
              f"{m[f'hf_{impl}']:.1f} MiB => x{t[f'hf_{impl}'] / t['ours']:.2f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=256)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--step", action="store_true")
    p.add_argument("--padding", action="store_true")
    p.add_argument("--pad-fraction", type=float, default=0.1)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, ru_maxrss "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.padding:
        padding_bench(args, device, dtype)
        return
    moe_block_bench(args, device, dtype)
    if args.step:
        train_step_bench(args, device, dtype)


if __name__ == "__main__":
    main()
