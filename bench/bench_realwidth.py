"""One 30B-A3B-width decoder layer (hidden 2048, 32/4 heads of 128, 128 experts top-8, I 768) on
packed rows of 512-2048-token samples: our document attention against today's dense-mask path and
transformers' Qwen3VLMoe text layer, plus the real-vocabulary head and loss, forward + backward.

    flock /tmp/bigmem.lock python bench/bench_realwidth.py --parts model --lengths 8192 --paths ours,today
    python bench/bench_realwidth.py --device cuda --dtype bfloat16 --json out.json   # GPU (gpu_check.sh)

Parts (each prints ratios against a baseline run in the same process):
  attention  fwd+bwd of the attention kernel alone: ours (attn_impl auto) vs the dense mask, on
             --attn-heads query heads per kv head group (cost is linear in heads, so the ratio is
             the full 32/4 one; the dense path's 32-head scores do not fit a 24 GB box at 16k);
  layer      one decoder layer fwd+bwd: ours vs transformers' layer (sdpa + the dense 4D mask,
             the only way it masks packed rows without flash-attn) and vs our dense-mask path
             (up to --dense-max tokens);
  model      the whole one-layer training step: embedding, the layer, final norm, the
             real-vocabulary head and the loss, forward + backward, for --paths: ours
             (Qwen3VLMoe.forward, return_logits=False: document attention + fused loss), today
             (same modules, dense mask + fp32 logits of the supervised rows) and transformers
             (its layer + norm + nn.Linear head over all rows + ForCausalLMLoss), on one set of
             weights (assigned, not copied); the embedding is tied to the head so the
             151,936 x 2048 table exists once; each path's CE is printed (they agree); peak
             growth per doubling, whole and less the parameters' gradients. On a 24 GB CPU box
             run one size per process (--lengths 4096, then 8192, ...).
Peak memory: CPU, peak RSS above the pre-step RSS (sampled every 2 ms; parameters excluded,
gradients included); CUDA, max_memory_allocated above the pre-step allocation.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qvl_train.model import ModelConfig, TextConfig, VisionConfig, build_model  # noqa: E402
from qvl_train.model.attention import resolve_attn_impl, text_attention  # noqa: E402
from qvl_train.model.rope import mrope_cos_sin  # noqa: E402

WIDTH = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
             num_experts_per_tok=8, moe_intermediate_size=768, vocab_size=151936)


# ---- measuring ------------------------------------------------------------------------------


class PeakMemory:
    """Peak bytes above the level at entry: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base, self.top, self.stop = _rss(), _rss(), False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.top = max(self.top, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.thread.join()
            self.peak = max(self.top, _rss()) - self.base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn, device: torch.device, *, warmup: int, iters: int) -> tuple[float, float]:
    """(median seconds, peak GiB) of fn(); the peak is taken on the first timed call."""
    for _ in range(warmup):
        fn()
    times, peak = [], 0.0
    for i in range(iters):
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = max(peak, mem.peak / 2**30)
    return sorted(times)[len(times) // 2], peak


# ---- data -----------------------------------------------------------------------------------


def packed_row(L: int, *, seed: int, supervised: float, vocab: int, device) -> dict:
    """One row of samples of 512-2048 tokens (the last that fits; the rest is padding), each with
    its last `supervised` fraction labelled (an assistant answer)."""
    rng = random.Random(seed)
    seg = torch.full((1, L), -1, dtype=torch.long)
    labels = torch.full((1, L), -100, dtype=torch.long)
    # ordinary text tokens only: Qwen3-VL's special tokens (image/video pads among them) start at 151,643
    ids = torch.randint(0, min(vocab, 151643), (1, L), generator=torch.Generator().manual_seed(seed))
    pos, i = 0, 0
    while True:
        n = rng.randint(512, 2048)
        if pos + n > L:
            break
        seg[0, pos : pos + n] = i
        answer = max(1, int(n * supervised))
        labels[0, pos + n - answer : pos + n] = ids[0, pos + n - answer : pos + n]
        pos, i = pos + n, i + 1
    mask = (seg >= 0).long()
    position_ids = torch.zeros(1, L, dtype=torch.long)
    for s in range(i):
        where = seg[0] == s
        position_ids[0, where] = torch.arange(int(where.sum()))
    row = dict(input_ids=ids, attention_mask=mask, segment_ids=seg, labels=labels, position_ids=position_ids)
    return {k: v.to(device) for k, v in row.items()}


# ---- parts ----------------------------------------------------------------------------------


def attention_part(args, L: int, device, dtype) -> dict:
    """Attention kernel alone on one kv head group: ours vs the dense mask."""
    row = packed_row(L, seed=L, supervised=0.25, vocab=1000, device=device)
    H, K, Dh = args.attn_heads, args.attn_kv_heads, 128
    g = torch.Generator(device=device).manual_seed(0)
    qkv = [torch.randn(1, L, n, Dh, generator=g, device=device, dtype=dtype) for n in (H, K, K)]
    out = {}
    kernels = {"ours": resolve_attn_impl("auto", device, dtype)}
    if L <= args.dense_attn_max:
        kernels["dense_mask"] = "sdpa_mask"
    for name, kernel in kernels.items():
        def step():
            q, k, v = (t.detach().requires_grad_() for t in qkv)
            plan = text_attention(kernel, attention_mask_BLk=row["attention_mask"], segment_ids_BL=row["segment_ids"],
                                  q_len=L, kv_len=L, device=device)
            plan(q, k, v).float().square().sum().backward()
        out[name] = measure(step, device, warmup=args.warmup, iters=args.iters)
    out["kernel"] = kernels["ours"]
    return out


def hf_layer(cfg: TextConfig, dtype, device):
    from transformers import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextDecoderLayer

    hcfg = Qwen3VLMoeTextConfig(**{k: v for k, v in dataclasses.asdict(cfg).items()
                                   if k not in ("mrope_section", "mrope_interleaved", "rope_theta")})
    hcfg._attn_implementation = "sdpa"
    hcfg._experts_implementation = "grouped_mm"  # its fastest on CPU and GPU (bench_moe.py)
    return Qwen3VLMoeTextDecoderLayer(hcfg, 0).to(device, dtype)


def layer_part(args, model, lengths, device, dtype) -> dict:
    """One decoder layer fwd+bwd: ours, our dense-mask path, transformers' layer (same weights)."""
    text = model.model.language_model
    ours = text.layers[0]
    ref = hf_layer(model.config.text, dtype, device)
    missing = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not missing.missing_keys and not missing.unexpected_keys, missing
    results = {}
    for L in lengths:
        row = packed_row(L, seed=L, supervised=args.supervised, vocab=1000, device=device)
        g = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(1, L, WIDTH["hidden_size"], generator=g, device=device, dtype=dtype)
        rope = mrope_cos_sin(row["position_ids"][None].expand(3, -1, -1), inv_freq_F=text.inv_freq,
                             axis_F=text.mrope_axis, dtype=dtype)

        def run_ours(kernel):
            def step():
                plan = text_attention(kernel, attention_mask_BLk=row["attention_mask"],
                                      segment_ids_BL=row["segment_ids"], q_len=L, kv_len=L, device=device)
                y = ours(x.detach().requires_grad_(), rope, plan, row["attention_mask"])[0]
                y.float().square().mean().backward()
                ours.zero_grad(set_to_none=True)
            return step

        def run_hf():
            from qvl_train.model.attention import build_attention_mask

            mask = build_attention_mask(attention_mask_BLk=row["attention_mask"], segment_ids_BL=row["segment_ids"],
                                        q_len=L, kv_len=L)
            y = ref(x.detach().requires_grad_(), attention_mask=mask, position_embeddings=rope)
            y.float().square().mean().backward()
            ref.zero_grad(set_to_none=True)

        res = {"ours": measure(run_ours(resolve_attn_impl("auto", device, dtype)), device,
                               warmup=args.warmup, iters=args.iters)}
        if L <= args.dense_max:
            res["dense_mask"] = measure(run_ours("sdpa_mask"), device, warmup=args.warmup, iters=args.iters)
        if L <= args.hf_max:
            try:
                res["transformers"] = measure(run_hf, device, warmup=args.warmup, iters=args.iters)
            except Exception as e:  # another transformers version: report, keep our figures
                print(f"transformers' layer failed at L={L}: {type(e).__name__}: {e}", flush=True)
        results[L] = res
        _print_row(f"layer L={L}", res)
    return results


def hf_step_modules(model, dtype, device):
    """transformers' text layer, final norm and head (nn.Linear) on OUR parameters (assigned, not
    copied: no second 4 GB of weights), so all paths compute the same function."""
    text = model.model.language_model
    with torch.device("meta"):
        layer = hf_layer(model.config.text, dtype, torch.device("meta"))
    missing = layer.load_state_dict(text.layers[0].state_dict(), strict=False, assign=True)
    assert not missing.missing_keys and not missing.unexpected_keys, missing
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextRMSNorm

    norm = Qwen3VLMoeTextRMSNorm(WIDTH["hidden_size"], eps=model.config.text.rms_norm_eps).to(device, dtype)
    norm.weight = text.norm.weight
    head = torch.nn.Linear(WIDTH["hidden_size"], WIDTH["vocab_size"], bias=False, device="meta")
    head.weight = model.lm_head.weight
    return layer.train(), norm, head


def model_part(args, model, lengths, device, dtype) -> dict:
    """The whole training step of one layer: embedding, layer, final norm, real-vocabulary head,
    loss; forward + backward. Paths (--paths):
      ours          Qwen3VLMoe.forward(labels, return_logits=False): document attention (auto) and
                    the fused linear + CE (LMHead), + the router aux loss;
      today         the pre-issue-9 path on the same modules: the dense (1, 1, L, L) mask through
                    SDPA and fp32 logits of the supervised rows + F.cross_entropy, + aux loss;
      transformers  its Qwen3VLMoe text layer (sdpa + the dense 4D mask, grouped_mm experts) +
                    its RMSNorm + nn.Linear head over all L rows + its ForCausalLMLoss (the
                    packed-row shift labels passed in, so the loss is the same number).
    All share one set of weights; each path's losses are printed (they must agree)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from qvl_train.model.attention import build_attention_mask
    from qvl_train.model.model import shifted_labels
    from qvl_train.model.moe import load_balancing_loss

    text, cfg = model.model.language_model, model.config.text
    paths = args.paths.split(",")
    hf = hf_step_modules(model, dtype, device) if "transformers" in paths else None
    grad_gib = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**30
    results = {}
    # untimed warm-up of every path on a short row (first calls pay one-off library set-up)
    for i, L in enumerate(([args.warmup_len] if args.warmup_len else []) + lengths):
        row = packed_row(L, seed=L, supervised=args.supervised, vocab=WIDTH["vocab_size"], device=device)
        kw = {k: row[k] for k in ("input_ids", "attention_mask", "segment_ids", "labels", "position_ids")}
        losses = {}

        def ours():
            model.set_attn_impl("auto")
            out = model(**kw, return_logits=False)
            out.loss.backward()
            losses["ours"] = float(out.ce_loss.detach())
            model.zero_grad(set_to_none=True)

        def today():
            model.set_attn_impl("sdpa_mask")
            embeds = text.embed_tokens(row["input_ids"])
            hidden, router_logits, _ = text(embeds, position_ids_3BL=row["position_ids"][None].expand(3, -1, -1),
                                            attention_mask_BLk=row["attention_mask"], segment_ids_BL=row["segment_ids"])
            targets = shifted_labels(row["labels"], row["segment_ids"]).reshape(-1)
            keep = (targets != -100).nonzero().squeeze(1)
            logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1])[keep], model.lm_head.weight)
            ce = torch.nn.functional.cross_entropy(logits.float(), targets[keep])
            aux = load_balancing_loss(router_logits, num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                                      token_mask_T=row["attention_mask"])
            (ce + cfg.router_aux_loss_coef * aux).backward()
            losses["today"] = float(ce.detach())
            model.set_attn_impl("auto")
            model.zero_grad(set_to_none=True)

        def transformers():
            layer, norm, head = hf
            x = torch.nn.functional.embedding(row["input_ids"], model.lm_head.weight)
            rope = mrope_cos_sin(row["position_ids"][None].expand(3, -1, -1), inv_freq_F=text.inv_freq,
                                 axis_F=text.mrope_axis, dtype=dtype)
            mask = build_attention_mask(attention_mask_BLk=row["attention_mask"], segment_ids_BL=row["segment_ids"],
                                        q_len=L, kv_len=L)
            logits = head(norm(layer(x, attention_mask=mask, position_embeddings=rope)))
            loss = ForCausalLMLoss(logits, row["labels"], WIDTH["vocab_size"],
                                   shift_labels=shifted_labels(row["labels"], row["segment_ids"]))
            loss.backward()
            losses["transformers"] = float(loss.detach())
            model.zero_grad(set_to_none=True)
            layer.zero_grad(set_to_none=True)

        steps = {"ours": ours, "today": today, "transformers": transformers}
        if i == 0 and args.warmup_len:
            for name in paths:
                steps[name]()
            continue
        res = {}
        for name in paths:
            limit = {"today": args.dense_max, "transformers": args.hf_max}.get(name, L)
            if L > limit:
                print(f"step L={L}: {name} skipped (--{'dense' if name == 'today' else 'hf'}-max {limit})", flush=True)
                continue
            res[name] = measure(steps[name], device, warmup=args.warmup, iters=args.iters)
            print(f"step L={L}: {name} {res[name][0]:.1f} s, peak {res[name][1]:.2f} GiB "
                  f"({res[name][1] - grad_gib:.2f} GiB above the {grad_gib:.2f} GiB of parameter gradients), "
                  f"CE {losses[name]:.5f}", flush=True)
        res["ce"] = dict(losses)
        res["grad_gib"] = grad_gib
        results[L] = res
        if "ours" in res:
            _print_row(f"step L={L}", {k: v for k, v in res.items() if isinstance(v, tuple)})
        if device.type == "cuda" and "ours" in res:
            t = res["ours"][0]
            supervised = int((row["labels"] != -100).sum())
            flops = layer_flops(L, avg_doc=1280) + 3 * 2 * supervised * WIDTH["hidden_size"] * WIDTH["vocab_size"]
            print(f"step L={L}: {L / t:,.0f} tokens/s, MFU {flops / t / (args.peak_tflops * 1e12):.1%}", flush=True)
    return results


def _print_row(title: str, res: dict) -> None:
    base_t, base_m = res["ours"]
    parts = [f"{title:14s} ours {base_t:8.2f} s {base_m:6.2f} GiB"]
    for name, (t, m) in res.items():
        if name != "ours" and isinstance(t, float):
            parts.append(f"{name} {t:8.2f} s {m:6.2f} GiB (ours x{t / base_t:.2f} faster, {m / max(base_m, 1e-9):.2f}x its memory)")
    print(" | ".join(parts), flush=True)


def layer_flops(L: int, avg_doc: float) -> float:
    """Model FLOPs of one layer fwd+bwd (x3 of forward): projections, causal in-document
    attention, routed experts, router; the head separately in head_flops."""
    D, H, K, Dh, I, k = 2048, 32, 4, 128, 768, 8
    proj = 2 * L * D * (2 * H * Dh + 2 * K * Dh)
    attn = 2 * 2 * L * (avg_doc / 2) * H * Dh
    experts = 2 * L * k * 3 * D * I
    return 3 * (proj + attn + experts + 2 * L * D * 128)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="4096,8192,16384")
    p.add_argument("--parts", default="attention,layer,model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--supervised", type=float, default=0.25, help="labelled fraction of each sample")
    p.add_argument("--attn-heads", type=int, default=8, help="query heads timed in the attention part")
    p.add_argument("--attn-kv-heads", type=int, default=1, help="kv heads there (default: one group of 8)")
    p.add_argument("--dense-attn-max", type=int, default=16384)
    p.add_argument("--dense-max", type=int, default=4096, help="longest row the dense-mask layer runs")
    p.add_argument("--hf-max", type=int, default=16384, help="longest row transformers' layer runs")
    p.add_argument("--experts", type=int, default=128,
                   help="fewer experts keep per-token work (top-8 of I 768) but not the parameter memory")
    p.add_argument("--vocab", type=int, default=151936, help="a small one suits --parts layer (no head there)")
    p.add_argument("--paths", default="ours,today,transformers", help="paths of the model part (see model_part)")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--warmup-len", type=int, default=1024, help="model part: one untimed step per path at this length first")
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H200 dense bf16)")
    p.add_argument("--json", default=None, help="write all figures here")
    args = p.parse_args()
    if args.device == "cpu":  # big blocks straight from mmap, so freed memory leaves the RSS
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    lengths = [int(x) for x in args.lengths.split(",")]
    WIDTH["num_experts"], WIDTH["vocab_size"] = args.experts, args.vocab
    parts = args.parts.split(",")
    print(f"torch {torch.__version__} on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{dtype}, text attention kernel: {resolve_attn_impl('auto', device, dtype)}", flush=True)
    figures: dict = {"device": str(device), "dtype": args.dtype, "kernel": resolve_attn_impl("auto", device, dtype)}

    if "attention" in parts:
        figures["attention"] = {}
        for L in lengths:
            res = attention_part(args, L, device, dtype)
            figures["attention"][L] = res
            _print_row(f"attn L={L}", {k: v for k, v in res.items() if k != "kernel"})

    if "layer" in parts or "model" in parts:
        cfg = ModelConfig(
            text=TextConfig(num_hidden_layers=1, **WIDTH),
            vision=VisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=2048,
                                deepstack_visual_indexes=[]),
            tie_word_embeddings=True,
        )
        model = build_model(cfg, dtype=dtype, device=device).train()
        model.model.visual.requires_grad_(False)
        if "model" in parts:
            figures["model"] = model_part(args, model, lengths, device, dtype)
            measured = [L for L in lengths if "ours" in figures["model"][L]]
            for a, b in zip(measured, measured[1:]):
                (ta, ma), (tb, mb) = figures["model"][a]["ours"], figures["model"][b]["ours"]
                g = figures["model"][a]["grad_gib"]
                print(f"ours {a} -> {b} tokens: time x{tb / ta:.2f}, peak x{mb / ma:.2f} "
                      f"(above the parameter gradients x{(mb - g) / max(ma - g, 1e-9):.2f})", flush=True)
        if "layer" in parts:
            figures["layer"] = layer_part(args, model, lengths, device, dtype)
            if device.type == "cuda":
                for L, res in figures["layer"].items():
                    t = res["ours"][0]
                    flops = layer_flops(L, avg_doc=1280)
                    print(f"layer L={L}: {L / t:,.0f} tokens/s, MFU {flops / t / (args.peak_tflops * 1e12):.1%} "
                          f"(of {args.peak_tflops} TFLOP/s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
