"""CUDA / bf16 parity checks with tolerances against fp32 references (run by bench/gpu_check.sh).

    python bench/gpu_parity.py                    # on the GPU machine
    python bench/gpu_parity.py --device cpu       # smoke run of the same checks here (CPU kernels)

Each check is a function registered with @check; it returns rows of (what, error, tolerance)
and passes when every error <= its tolerance. bf16 checks compare against the fp32 dense-mask
reference and allow a multiple of the error today's bf16 dense path makes, so the bound follows
bf16 itself rather than a guessed constant. Exit status 1 if any check fails.

To add a check: write `@check def my_check(device): return [("what", err, tol), ...]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_realwidth import packed_row  # noqa: E402

from qvl_train.model import build_model, generate, preset  # noqa: E402
from qvl_train.model.attention import (  # noqa: E402
    flash_attn_available,
    resolve_attn_impl,
    text_attention,
    vision_attention,
)

CHECKS = []
BF16_SLACK = 2.0  # a bf16 kernel may err up to this multiple of the bf16 dense path (+ FP32_TOL)
FP32_TOL = 2e-5


def check(fn):
    CHECKS.append(fn)
    return fn


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def text_kernels(device) -> list[str]:
    """The kernels to check here: the one auto picks in each dtype, plus every CUDA kernel present."""
    kernels = {resolve_attn_impl("auto", device, torch.float32), resolve_attn_impl("auto", device, torch.bfloat16)}
    if device.type == "cuda":
        kernels.add("flex")
    return sorted(kernels)


def _attend(kernel, row, qkv, dtype, *, causal_text=True, lengths=None, wrap=None):
    """Output and q/k/v gradients of one attention call in `dtype` (`wrap`: applied to the plan)."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in qkv)
    L, device = q.shape[1], q.device
    if causal_text:
        plan = text_attention(kernel, attention_mask_BLk=row["attention_mask"], segment_ids_BL=row["segment_ids"],
                              q_len=L, kv_len=L, device=device)
    else:
        plan = vision_attention(kernel, lengths, device)
    out = (wrap(plan) if wrap else plan)(q, k, v)
    valid = row["attention_mask"].bool() if causal_text else torch.ones(1, L, dtype=torch.bool, device=device)
    g = torch.Generator(device=device).manual_seed(3)
    grad = torch.randn(out.shape, generator=g, device=device).to(dtype) * valid[..., None, None]
    out.backward(grad)
    return [t.float() * valid[..., None, None] for t in (out, q.grad, k.grad, v.grad)]


def _qkv(L, H, K, Dh, device):
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(1, L, n, Dh, generator=g, device=device) for n in (H, K, K)]


@check
def text_attention_kernels(device):
    """Packed row with padding and 1-token samples at 32/4 heads of 128: each kernel vs the fp32
    dense mask, outputs and q/k/v gradients, fp32 and bf16."""
    L = 4096
    row = packed_row(L, seed=7, supervised=0.25, vocab=1000, device=device)
    row["segment_ids"][0, 100] = 1000  # a 1-token sample inside the first one: split it in three
    row["segment_ids"][0, 101:] = torch.where(row["segment_ids"][0, 101:] == 0, 1001, row["segment_ids"][0, 101:])
    qkv = _qkv(L, 32, 4, 128, device)
    ref = _attend("sdpa_mask", row, qkv, torch.float32)
    ref_bf16 = _attend("sdpa_mask", row, qkv, torch.bfloat16)
    rows = []
    for kernel in text_kernels(device):
        names = ("out", "dq", "dk", "dv")
        if kernel != "flash_varlen":  # fp16/bf16 only
            for name, a, b in zip(names, _attend(kernel, row, qkv, torch.float32), ref):
                rows.append((f"text {kernel} fp32 {name}", max_err(a, b), FP32_TOL * max(1.0, float(b.abs().max()))))
        for name, a, b, d in zip(names, _attend(kernel, row, qkv, torch.bfloat16), ref, ref_bf16):
            rows.append((f"text {kernel} bf16 {name}", max_err(a, b), BF16_SLACK * max_err(d, b) + FP32_TOL))
    return rows


@check
def vision_attention_one_call(device):
    """All images and frame groups in one call: vs the fp32 dense block-diagonal mask."""
    lengths = [1024, 1024, 1024, 256, 64, 576, 16]  # a 3-frame video, images of other sizes
    N = sum(lengths)
    row = {"attention_mask": torch.ones(1, N, dtype=torch.long, device=device)}
    qkv = _qkv(N, 16, 16, 72, device)
    kw = dict(causal_text=False, lengths=lengths)
    ref = _attend("sdpa_mask", row, qkv, torch.float32, **kw)
    ref_bf16 = _attend("sdpa_mask", row, qkv, torch.bfloat16, **kw)
    rows = []
    for kernel in text_kernels(device):
        if kernel != "flash_varlen":
            for name, a, b in zip(("out", "dq", "dk", "dv"), _attend(kernel, row, qkv, torch.float32, **kw), ref):
                rows.append((f"vision {kernel} fp32 {name}", max_err(a, b), FP32_TOL * max(1.0, float(b.abs().max()))))
        for name, a, b, d in zip(("out", "dq", "dk", "dv"), _attend(kernel, row, qkv, torch.bfloat16, **kw), ref, ref_bf16):
            rows.append((f"vision {kernel} bf16 {name}", max_err(a, b), BF16_SLACK * max_err(d, b) + FP32_TOL))
    return rows


@check
def ulysses_wrapper_sp1(device):
    """The Ulysses wrapper (qvl_train.parallel.sequence.UlyssesAttention) around each kernel, at
    sp=1 in a one-process group (its all-to-alls run; one GPU has no peer), on a packed row at
    32/4 heads of 128: vs the fp32 dense mask, bf16 within the bf16 slack of the plain kernels."""
    import torch.distributed as dist

    from qvl_train.parallel.sequence import UlyssesAttention

    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
    L = 2048
    row = packed_row(L, seed=5, supervised=0.25, vocab=1000, device=device)
    qkv = _qkv(L, 32, 4, 128, device)
    ref = _attend("sdpa_mask", row, qkv, torch.float32)
    ref_bf16 = _attend("sdpa_mask", row, qkv, torch.bfloat16)
    wrap = lambda plan: UlyssesAttention(plan, dist.group.WORLD, 1)
    rows = []
    for kernel in text_kernels(device):
        names = ("out", "dq", "dk", "dv")
        if kernel != "flash_varlen":  # fp16/bf16 only
            for name, a, b in zip(names, _attend(kernel, row, qkv, torch.float32, wrap=wrap), ref):
                rows.append((f"ulysses {kernel} fp32 {name}", max_err(a, b), FP32_TOL * max(1.0, float(b.abs().max()))))
        for name, a, b, d in zip(names, _attend(kernel, row, qkv, torch.bfloat16, wrap=wrap), ref, ref_bf16):
            rows.append((f"ulysses {kernel} bf16 {name}", max_err(a, b), BF16_SLACK * max_err(d, b) + FP32_TOL))
    return rows


def _tiny_packed_batch(cfg, device):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.model.test_attention import ROWS, _packed_rows

    return {k: v.to(device) for k, v in _packed_rows(cfg, ROWS).items()}


@check
def tiny_model_loss_and_grads(device):
    """The tiny model on packed image/video rows: auto kernels vs the fp32 dense mask (loss, logits,
    every gradient), and the bf16 model's loss vs fp32."""
    cfg = preset("tiny")
    batch = _tiny_packed_batch(cfg, device)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    results = {}
    for impl, dtype in (("sdpa_mask", torch.float32), ("auto", torch.float32), ("sdpa_mask", torch.bfloat16),
                        ("auto", torch.bfloat16)):
        model = build_model(cfg, dtype=dtype, device=device).train()
        model.set_attn_impl(impl)
        out = model(**batch, labels=labels)
        out.loss.backward()
        results[impl, dtype] = (out.loss.detach().float(), out.logits.detach().float(),
                                {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    ref, ours = results["sdpa_mask", torch.float32], results["auto", torch.float32]
    rows = [("tiny fp32 loss", max_err(ours[0], ref[0]), 1e-5), ("tiny fp32 logits", max_err(ours[1], ref[1]), 1e-4)]
    rows.append(("tiny fp32 grads (max over params)", max(max_err(ours[2][n], g) for n, g in ref[2].items()), 1e-4))
    dense_bf16, ours_bf16 = results["sdpa_mask", torch.bfloat16], results["auto", torch.bfloat16]
    rows.append(("tiny bf16 loss vs fp32", max_err(ours_bf16[0], ref[0]),
                 BF16_SLACK * max_err(dense_bf16[0], ref[0]) + 1e-3))
    return rows


@check
def generation_unchanged(device):
    """Greedy generation with the KV cache: auto kernels give the dense-mask path's tokens."""
    cfg = preset("tiny")
    model = build_model(cfg, device=device).eval()
    prompt = torch.randint(0, 900, (2, 12), device=device)
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0  # left padding
    tokens = {}
    for impl in ("sdpa_mask", "auto"):
        model.set_attn_impl(impl)
        tokens[impl] = generate(model, prompt, attention_mask=mask, max_new_tokens=8, stop_early=False)
    return [("generate: differing tokens", float((tokens["auto"] != tokens["sdpa_mask"]).sum()), 0.0)]


@check
def no_L_squared_memory(device):
    """Text attention fwd+bwd at 16k tokens, 32/4 heads, bf16: peak memory beyond q/k/v and their
    gradients stays below one L x L fp32 matrix."""
    if device.type != "cuda":
        return [("skipped on CPU (tests/model/test_attention.py covers it)", 0.0, 0.0)]
    L = 16384
    row = packed_row(L, seed=1, supervised=0.25, vocab=1000, device=device)
    qkv = [t.to(torch.bfloat16) for t in _qkv(L, 32, 4, 128, device)]
    kernel = resolve_attn_impl("auto", device, torch.bfloat16)
    _attend(kernel, row, qkv, torch.bfloat16)  # compile / warm up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _attend(kernel, row, qkv, torch.bfloat16)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return [(f"text {kernel} 16k peak bytes", float(peak), float(L * L * 4))]


# ---- fused loss head, host syncs, optimizer (issue 9 items 3-6) ------------------------------


@check
def fused_loss_head(device):
    """LMHead's fused linear + CE (Liger's kernel when installed, else our chunked recompute) at
    the real vocab, 4096 fully supervised rows of 2048: loss and hidden/weight gradients vs the fp32
    full-logits CE; on CUDA also its bf16 peak memory vs the bf16 full-logits path (<= 25%)."""
    import torch.nn.functional as F

    from qvl_train.model.loss import default_chunk_rows, fused_linear_cross_entropy

    N, D, V = (4096, 2048, 151936) if device.type == "cuda" else (256, 64, 4096)
    g = torch.Generator(device=device).manual_seed(0)
    h32 = torch.randn(N, D, generator=g, device=device)
    w32 = torch.randn(V, D, generator=g, device=device) * 0.02
    t = torch.randint(0, V, (N,), generator=g, device=device)
    t[::7] = -100

    def run(fn, dtype, **kw):
        h, w = (x.detach().to(dtype).requires_grad_() for x in (h32, w32))
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        loss = fn(h, w, **kw)
        loss.backward()
        peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
        return [loss.detach().float(), h.grad.float(), w.grad.float()], peak

    full = lambda h, w: F.cross_entropy((h @ w.t()).float(), t, ignore_index=-100, reduction="sum")
    fused = lambda h, w, **kw: fused_linear_cross_entropy(h, w, t, **kw)
    ref, _ = run(full, torch.float32)
    ref_bf16, peak_full = run(full, torch.bfloat16)
    rows = []
    ours32, _ = run(fused, torch.float32, chunk_rows=default_chunk_rows(N, D, V))  # our kernel, not Liger's
    ours16, peak_fused = run(fused, torch.bfloat16)
    for name, a, b, d in zip(("loss", "d hidden", "d weight"), ours16, ref, ref_bf16):
        scale = max(1.0, float(b.abs().max()))
        rows.append((f"fused fp32 {name}", max_err(ours32[("loss", "d hidden", "d weight").index(name)], b),
                     1e-5 * scale))
        rows.append((f"fused bf16 {name}", max_err(a, b), BF16_SLACK * max_err(d, b) + FP32_TOL * scale))
    if device.type == "cuda":
        rows.append(("fused bf16 peak / full-logits peak", peak_fused / peak_full, 0.25))
    return rows


@check
def moe_layer_never_syncs(device):
    """A bf16 MoE decoder layer's forward + backward with padding under CUDA's sync debug mode
    ("error"): any device-to-host wait raises (routing counts, splits, masks stay on the device)."""
    if device.type != "cuda":
        return [("skipped on CPU (tests/model/test_syncs.py covers it)", 0.0, 0.0)]
    from qvl_train.model.rope import mrope_cos_sin

    cfg = preset("tiny")
    model = build_model(cfg, dtype=torch.bfloat16, device=device)
    text = model.model.language_model
    layer = next(layer for layer in text.layers if layer.is_moe)
    B, L = 2, 512
    token_mask = torch.ones(B, L, dtype=torch.long, device=device)
    token_mask[1, 400:] = 0
    rope = mrope_cos_sin(torch.arange(L, device=device).expand(3, B, L), inv_freq_F=text.inv_freq,
                         axis_F=text.mrope_axis, dtype=torch.bfloat16)
    attend = text_attention(resolve_attn_impl("auto", device, torch.bfloat16), attention_mask_BLk=token_mask,
                            segment_ids_BL=None, q_len=L, kv_len=L, device=device)

    def step():
        x = torch.randn(B, L, cfg.text.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
        y, logits, _ = layer(x, rope, attend, token_mask)
        (y.float().square().sum() + logits.float().sum()).backward()

    step()  # warm-up: kernel selection / compilation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        syncs = 0.0
    except RuntimeError as e:
        print(f"      sync inside the layer: {e}", flush=True)
        syncs = 1.0
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [("MoE layer fwd+bwd host syncs", syncs, 0.0)]


@check
def moe_padding_never_reaches_an_expert(device):
    """A bf16 MoE block with 12% padding against the same block on only its valid tokens (both
    vs the fp32 valid-token block): padding rows exactly zero in the output and the input
    gradient, every torch._grouped_mm call (CUTLASS on Hopper, which leaves rows past offs[-1]
    unwritten) covering exactly the valid tokens' picks, and the bf16 errors of the padded block
    within BF16_SLACK of the unpadded one's (output, input, router and expert weight grads)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from qvl_train.model.moe import MoEBlock

    class Rows(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.overloadpacket.__name__ == "_grouped_mm":
                self.rows.append(kwargs.get("offs", args[2] if len(args) > 2 else None)[-1])
            return func(*args, **kwargs)

    cfg = preset("tiny").text
    torch.manual_seed(0)
    ref = MoEBlock(cfg).to(device)
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    B, L, D, k = 4, 256, cfg.hidden_size, cfg.num_experts_per_tok
    mask = torch.ones(B, L, dtype=torch.long, device=device)
    mask[:, 225:] = 0
    valid = mask.reshape(-1).bool()
    x0 = torch.randn(B, L, D, device=device)
    dy = torch.randn(B, L, D, device=device)

    def run(block, dtype, padded):
        block = block.to(dtype)
        block.zero_grad()
        x = (x0 if padded else x0.reshape(-1, D)[valid][None]).to(dtype).requires_grad_()
        with Rows() as spy:
            y, _, _ = block(x, mask if padded else None)
            y.backward((dy if padded else dy.reshape(-1, D)[valid][None]).to(dtype))
        grads = [p.grad.float().clone() for p in block.parameters()]
        return y.detach().float().reshape(-1, D), x.grad.float().reshape(-1, D), grads, [int(r) for r in spy.rows]

    import copy

    y32, gx32, gp32, _ = run(copy.deepcopy(ref), torch.float32, padded=False)
    yv, gxv, gpv, _ = run(copy.deepcopy(ref), torch.bfloat16, padded=False)
    yp, gxp, gpp, rows = run(copy.deepcopy(ref), torch.bfloat16, padded=True)
    out = [
        ("padding rows: output and input grad (max abs)", max(float(yp[~valid].abs().max()), float(gxp[~valid].abs().max())), 0.0),
        ("grouped_mm rows - valid picks (max abs; 0 calls on a fallback)",
         float(max((abs(r - int(valid.sum()) * k) for r in rows), default=0)), 0.0),
    ]
    for what, a, b, r in [("output", yp[valid], yv, y32), ("input grad", gxp[valid], gxv, gx32)] + [
        (f"grad {n}", a, b, r) for n, a, b, r in zip(("router", "gate_up", "down"), gpp, gpv, gp32)
    ]:
        out.append((f"bf16 padded block vs fp32: {what}", max_err(a, r), BF16_SLACK * max_err(b, r) + FP32_TOL))
    return out


@check
def fused_adamw_first_step(device):
    """The optimizer deepspeed_config asks for on GPU (torch AdamW, fused=True: prebuilt, no JIT):
    first-step seconds, and one step vs torch's unfused AdamW."""
    if device.type != "cuda":
        return [("skipped on CPU", 0.0, 0.0)]
    g = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(4096, 4096, generator=g, device=device) for _ in range(4)]
    grads = [torch.randn_like(p) for p in params]
    results = []
    for fused in (True, False):
        ps = [p.clone().requires_grad_() for p in params]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        opt = torch.optim.AdamW(ps, lr=1e-3, fused=fused, foreach=None if fused else True)
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        results.append((time.perf_counter() - t0, ps))
    err = max(max_err(a, b) for a, b in zip(results[0][1], results[1][1]))
    return [("fused AdamW first step seconds", results[0][0], 5.0), ("fused vs foreach AdamW params", err, 1e-6)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default=None, help="comma-separated check names")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__} on {device}; flash_attn installed: {flash_attn_available()}; "
          f"auto picks text/vision kernel fp32 -> {resolve_attn_impl('auto', device, torch.float32)}, "
          f"bf16 -> {resolve_attn_impl('auto', device, torch.bfloat16)}", flush=True)
    report, failed = [], 0
    for fn in CHECKS:
        if args.only and fn.__name__ not in args.only.split(","):
            continue
        t0 = time.perf_counter()
        try:
            rows = fn(device)
        except Exception:  # report and go on: one broken check must not hide the others
            traceback.print_exc()
            rows = [(f"{fn.__name__} raised", float("inf"), 0.0)]
        for what, err, tol in rows:
            ok = err <= tol
            failed += not ok
            report.append({"check": fn.__name__, "what": what, "error": err, "tolerance": tol, "ok": ok})
            print(f"{'PASS' if ok else 'FAIL'}  {fn.__name__:28s} {what:44s} err {err:.3g}  tol {tol:.3g}", flush=True)
        print(f"      {fn.__name__} took {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"{len(report) - failed}/{len(report)} passed", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
