"""Grouped experts, dispatch, padding never routed, and the aux loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qvl_train.model import build_model
from qvl_train.model.moe import experts_swiglu, load_balancing_loss, padded_bmm

from .reference import make_batch, ours_kwargs, tiny_config


def _loop_reference(x, w, counts):
    return torch.cat([xe @ w[e].T for e, xe in enumerate(torch.split(x, counts.tolist()))])


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 9, 0]])
def test_padded_bmm_matches_per_expert_loop_with_grads(counts):
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 8, requires_grad=True)
    w = torch.randn(4, 12, 8, requires_grad=True)
    g = torch.randn(x.shape[0], 12)
    out = padded_bmm(x, w, counts)
    (out * g).sum().backward()
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    ref = _loop_reference(x, w, counts)
    (ref * g).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def test_no_tokens_keeps_expert_weights_in_the_graph():
    # a rank whose tokens all went elsewhere must still produce (zero) expert grads
    x = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(4, 12, 8, requires_grad=True)
    out = padded_bmm(x, w, torch.zeros(4, dtype=torch.long))
    assert out.shape == (0, 12)
    out.sum().backward()
    assert w.grad is not None and not w.grad.any()


def test_fused_experts_backward_accepts_expanded_gradients():
    # .sum() hands backward a stride-0 gradient, which torch._grouped_mm rejects unless made contiguous
    counts = torch.tensor([2, 3])
    x = torch.randn(5, 8, requires_grad=True)
    w, w_gu, w_d = torch.rand(5), torch.randn(2, 8, 8, requires_grad=True), torch.randn(2, 8, 4, requires_grad=True)
    experts_swiglu(x, w, w_gu, w_d, counts).sum().backward()
    got = [t.grad for t in (x, w_gu, w_d)]
    for t in (x, w_gu, w_d):
        t.grad = None
    _swiglu_reference(x, w, w_gu, w_d, counts).sum().backward()
    for a, t in zip(got, (x, w_gu, w_d)):
        torch.testing.assert_close(a, t.grad, atol=1e-5, rtol=1e-4)


def test_padding_contributes_nothing_and_is_not_in_aux_or_load():
    cfg = tiny_config()
    model = build_model(cfg).eval()
    short = make_batch(cfg, [[5, ("image", (1, 4, 4)), 6]])
    padded = make_batch(cfg, [[5, ("image", (1, 4, 4)), 6], [40]])  # row 0 now right-padded
    padded["pixel_values"] = short["pixel_values"]
    with torch.no_grad():
        a = model(**ours_kwargs(short))
        b = model(**ours_kwargs(padded))
    n = short["input_ids"].shape[1]
    torch.testing.assert_close(a.logits[0], b.logits[0, :n], atol=1e-5, rtol=0)
    valid = int(padded["attention_mask"].sum())
    assert b.expert_load.shape == (cfg.text.num_hidden_layers, cfg.text.num_experts)
    assert (b.expert_load.sum(-1) == valid * cfg.text.num_experts_per_tok).all()
    # the aux loss of the padded batch equals the loss over its real tokens alone
    mask = padded["attention_mask"].reshape(-1).bool()
    only_real = [lg[mask] for lg in b.router_logits]
    ref = load_balancing_loss(only_real, num_experts=cfg.text.num_experts, top_k=cfg.text.num_experts_per_tok)
    got = load_balancing_loss(
        b.router_logits, num_experts=cfg.text.num_experts, top_k=cfg.text.num_experts_per_tok,
        token_mask_T=padded["attention_mask"],
    )
    torch.testing.assert_close(got, ref)


def test_uniform_router_gives_aux_loss_of_top_k():
    # perfectly balanced routing: f_e = k/E, P_e = 1/E -> aux = E * E * (k/E) * (1/E) = k
    E, k, T = 4, 2, 8
    logits = torch.zeros(T, E)
    logits[torch.arange(T), torch.arange(T) % E] = 1e-3  # break ties evenly
    logits[torch.arange(T), (torch.arange(T) + 1) % E] = 1e-3
    aux = load_balancing_loss([logits], num_experts=E, top_k=k)
    torch.testing.assert_close(aux, torch.tensor(float(k)), atol=1e-3, rtol=0)


def _swiglu_reference(x, w, w_gu, w_d, counts):
    outs = []
    for e, (xe, we) in enumerate(zip(torch.split(x, counts.tolist()), torch.split(w, counts.tolist()))):
        g, u = (xe @ w_gu[e].T).chunk(2, dim=-1)
        outs.append((torch.nn.functional.silu(g) * u * we[:, None]) @ w_d[e].T)
    return torch.cat(outs)


@pytest.mark.parametrize("frozen_experts", [False, True])
def test_fused_experts_match_per_expert_reference_with_grads(frozen_experts):
    from qvl_train.model.moe import _grouped_mm_ok, experts_swiglu

    counts = torch.tensor([5, 0, 7, 4])
    S, D, I = int(counts.sum()), 16, 8
    x = torch.randn(S, D, requires_grad=True)
    w = torch.rand(S, requires_grad=True)
    w_gu = torch.randn(4, 2 * I, D, requires_grad=not frozen_experts)
    w_d = torch.randn(4, D, I, requires_grad=not frozen_experts)
    assert _grouped_mm_ok(x, w_gu, w_d)  # the fused path is what runs on this machine
    dy = torch.randn(S, D)
    out = experts_swiglu(x, w, w_gu, w_d, counts)
    out.backward(dy)
    got = [t.grad for t in (x, w, w_gu, w_d)]
    for t in (x, w, w_gu, w_d):
        t.grad = None
    ref = _swiglu_reference(x, w, w_gu, w_d, counts)
    ref.backward(dy)
    torch.testing.assert_close(out, ref)
    for a, t in zip(got, (x, w, w_gu, w_d)):
        if t.requires_grad:
            torch.testing.assert_close(a, t.grad, atol=1e-5, rtol=1e-4)
        else:
            assert a is None


def test_experts_with_no_tokens_keep_weights_in_the_graph():
    from qvl_train.model.moe import experts_swiglu

    w_gu = torch.randn(4, 16, 8, requires_grad=True)
    w_d = torch.randn(4, 8, 8, requires_grad=True)
    out = experts_swiglu(torch.randn(0, 8), torch.rand(0), w_gu, w_d, torch.zeros(4, dtype=torch.long))
    out.sum().backward()
    assert w_gu.grad is not None and w_d.grad is not None


def test_padding_gives_every_parameter_zero_gradient():
    """Padding never reaches an expert (and has router weight 0): the real tokens' gradients are
    those of the unpadded batch."""
    cfg = tiny_config()
    model = build_model(cfg)
    short = ours_kwargs(make_batch(cfg, [[14]], seed=3))
    padded = {k: torch.nn.functional.pad(v, (0, 6)) for k, v in short.items()}
    grads = []
    for batch in (short, padded):
        model.zero_grad()
        model(**batch).logits[0, :14].square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():  # fp32 noise only (the padded batch takes the masked attention kernel)
        torch.testing.assert_close(grads[1][name], g, atol=1e-6 * max(1.0, g.abs().max().item()), rtol=1e-5, msg=name)


# ---- padding never reaches an expert ----------------------------------------------------------


class _Never(dict):
    def get(self, key, default=None):
        return False


def _force_fallback(monkeypatch, impl):
    """Make the experts take the named implementation on this machine."""
    from qvl_train.model import moe
    from qvl_train.peft import experts as lora_experts

    if impl == "padded_bmm":
        monkeypatch.setattr(moe, "_grouped_mm_ok", lambda *a: False)
    if impl == "lora_loop":
        monkeypatch.setattr(lora_experts, "_GMM_OK", _Never())


def _lora_wrap(experts, num_experts, seed=0):
    from qvl_train.peft.experts import ExpertLora

    experts.requires_grad_(False)
    inner = ExpertLora(experts, "gate_up_proj", r=4, alpha=8, num_experts=num_experts)
    outer = ExpertLora(inner, "down_proj", r=4, alpha=8, num_experts=num_experts)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero B, as after some training
        for p in outer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return outer


class _NaNPastGroups(torch.autograd.Function):
    """Identity on the first n rows; NaN in the rest, in the value (forward) or the gradient."""

    @staticmethod
    def forward(ctx, t, n, in_forward):
        ctx.n, ctx.in_forward = n, in_forward
        t = t.clone()
        if in_forward:
            t[n:] = float("nan")
        return t

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        if not ctx.in_forward:
            g[ctx.n :] = float("nan")
        return g, None, None


class _NaNExperts(torch.nn.Module):
    """Experts that return NaN in the padding rows and NaN gradients to them (rows past the last
    group are unwritten memory on CUDA and CPU): the dispatcher must never read them."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x_SD, weights_S, tokens_per_expert_E):
        n = int(tokens_per_expert_E.sum())
        x_SD, weights_S = _NaNPastGroups.apply(x_SD, n, False), _NaNPastGroups.apply(weights_S, n, False)
        return _NaNPastGroups.apply(self.inner(x_SD, weights_S, tokens_per_expert_E), n, True)


def _make_experts(cfg, impl):
    from qvl_train.model.moe import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.1)
        experts.down_proj.normal_(0, 0.1)
    if impl.startswith("nan"):
        return _NaNExperts(experts)
    return _lora_wrap(experts, cfg.num_experts) if impl.startswith("lora") else experts


IMPLS = ["grouped_mm", "padded_bmm", "lora_grouped_mm", "lora_loop"]


@pytest.mark.parametrize("impl", IMPLS)
def test_experts_never_compute_on_rows_past_the_last_expert(monkeypatch, impl):
    """Rows past tokens_per_expert.sum() (padding) hold NaN here: if any expert computed on one,
    NaN would reach the real rows' outputs or gradients or the expert weight gradients. (What the
    experts return in the padding rows is never read: the dispatcher drops it, see the block test.)"""
    _force_fallback(monkeypatch, impl)
    cfg = tiny_config().text
    experts = _make_experts(cfg, impl)
    counts = torch.tensor([3, 0, 5, 2, 0, 1, 4, 0])
    n, tail, D = int(counts.sum()), 6, cfg.hidden_size
    g = torch.Generator().manual_seed(1)
    x_valid, w_valid = torch.randn(n, D, generator=g), torch.rand(n, generator=g)
    dy = torch.randn(n + tail, D, generator=g)
    params = [p for p in experts.parameters() if p.requires_grad]
    results = []
    for x, w, grad in ((x_valid, w_valid, dy[:n]),
                       (F.pad(x_valid, (0, 0, 0, tail), value=float("nan")), F.pad(w_valid, (0, tail), value=float("nan")), dy)):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        for p in params:
            p.grad = None
        y = experts(x, w, counts)
        y.backward(grad)
        results.append((y, x.grad, w.grad, [p.grad.clone() for p in params]))
    (y0, gx0, gw0, gp0), (y1, gx1, gw1, gp1) = results
    for full, ref in ((y1, y0), (gx1, gx0), (gw1, gw0)):
        torch.testing.assert_close(full[:n], ref, atol=1e-6, rtol=1e-6)
    assert len(gp1) == (4 if impl.startswith("lora") else 2)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)  # NaN fails this


class _GroupedMMSpy(TorchDispatchMode):
    """Records offs[-1] (the rows the experts compute on) of every torch._grouped_mm call."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ == "_grouped_mm":
            offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
            self.rows.append(int(offs[-1]))
        return func(*args, **kwargs)


@pytest.mark.parametrize("impl", [*IMPLS, "bf16", "nan_rows", "nan_rows_bf16"])
def test_padded_block_equals_its_valid_tokens_alone_and_experts_see_only_them(monkeypatch, impl):
    """MoEBlock on a batch with padding (right, left and a hole) against the same block on only the
    valid tokens, one row, no mask: outputs and the gradients of the input, the router and the
    (expert or LoRA) weights; padding rows get exactly zero output and input gradient, also when
    the experts return NaN there (nan_rows). Every grouped matmul (forward and backward) covers
    only the valid tokens' top-k picks."""
    from qvl_train.model.moe import MoEBlock

    _force_fallback(monkeypatch, impl)
    dtype = torch.bfloat16 if impl.endswith("bf16") else torch.float32
    cfg = tiny_config().text
    block = MoEBlock(cfg)
    block.experts = _make_experts(cfg, impl)
    torch.nn.init.normal_(block.gate.weight, 0, 0.1)
    block.to(dtype)
    B, L, D, k = 2, 12, cfg.hidden_size, cfg.num_experts_per_tok
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 9:] = 0
    mask[1, :2] = 0
    mask[1, 5] = 0
    valid = mask.reshape(-1).bool()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(B, L, D, generator=g).to(dtype)
    dy = torch.randn(B, L, D, generator=g).to(dtype)  # non-zero upstream grads at padding too
    params = [p for p in block.parameters() if p.requires_grad]
    with torch.no_grad():
        block(x0, mask)  # the one-time grouped_mm probe runs here, not under the spy
    runs = []
    for padded in (True, False):
        x = (x0 if padded else x0.reshape(-1, D)[valid][None]).clone().requires_grad_()
        for p in params:
            p.grad = None
        with _GroupedMMSpy() as spy:
            y, _, routed = block(x, mask if padded else None)
            y.backward(dy if padded else dy.reshape(-1, D)[valid][None])
        runs.append((y.reshape(-1, D), x.grad.reshape(-1, D), [p.grad.clone() for p in params], spy.rows, routed))
    (y, gx, gp, rows, routed), (y_ref, gx_ref, gp_ref, rows_ref, _) = runs
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 0, "rtol": 0}
    torch.testing.assert_close(y[valid], y_ref, **tol)
    torch.testing.assert_close(gx[valid], gx_ref, **tol)
    assert not y[~valid].any() and not gx[~valid].any()
    assert (routed[~valid] == cfg.num_experts).all()
    for (name, _), a, b in zip(((n, p) for n, p in block.named_parameters() if p.requires_grad), gp, gp_ref):
        # the router's weight gradient sums over every row of the batch: in bf16 the padded
        # batch's (exactly zero) extra rows change the GEMM's blocking and so its rounding, by at
        # most one bf16 ulp on some CPUs (seen on an Intel Xeon; exact on AMD EPYC)
        router_bf16 = dtype == torch.bfloat16 and name == "gate.weight"
        torch.testing.assert_close(a, b, **({"atol": 0, "rtol": 2**-7} if router_bf16 else tol))
    n_picks = int(valid.sum()) * k
    assert rows == rows_ref  # same grouped matmuls, over the valid picks only
    assert all(r == n_picks for r in rows)
    # the spy sees the grouped matmuls (6: forward 2, backward 4 with trainable experts); the
    # fallbacks run none (their rows are checked by the NaN test above)
    assert (len(rows) >= 4) == (impl not in ("padded_bmm", "lora_loop"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_matches_index_add_and_saves_only_the_index(dtype):
    from qvl_train.model.moe import Dispatched, LocalDispatcher

    T, k, D = 6, 3, 5
    g = torch.Generator().manual_seed(0)
    top_i_Tk = torch.randint(0, 4, (T, k), generator=g)
    order_S = torch.argsort(top_i_Tk.reshape(-1), stable=True)
    token_S = order_S // k
    y_SD = torch.randn(T * k, D, generator=g).to(dtype).requires_grad_()
    grad_TD = torch.randn(T, D, generator=g).to(dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.shape), t)[1], lambda t: t):
        out = LocalDispatcher().combine(y_SD, Dispatched(None, None, None, (token_S, order_S, torch.ones(T, dtype=torch.bool), k)))
    # index vectors and the (T, 1) padding mask only, never the S x D rows
    assert saved and all(math.prod(s) <= T * k for s in saved), saved
    (got,) = torch.autograd.grad(out, y_SD, grad_TD)
    y_ref = y_SD.detach().float().requires_grad_()  # the plain autograd formula, in fp32
    ref = y_ref.new_zeros(T, D).index_add_(0, token_S, y_ref)
    (want,) = torch.autograd.grad(ref, y_ref, grad_TD.float())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(got.float(), want, atol=0, rtol=0)
