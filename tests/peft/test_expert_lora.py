"""Expert LoRA (grouped, on expert-sorted rows) against a naive per-expert loop over W + delta,
with the delta built by PEFT's own formula for target_parameters; EP slices; empty inputs."""

import pytest
import torch

from qvl_train.model.moe import GroupedExperts, MoEBlock
from qvl_train.peft import experts as ex
from qvl_train.peft.experts import ExpertLora

from ..model.reference import tiny_config

E, D, I, R = 8, 64, 48, 4


def _peft_delta(a_w, b_w, r, num_experts, scaling):
    """lora.ParamWrapper.get_delta_weight for a [E, out, in] parameter (peft 0.21.2)."""
    weight_A = a_w.reshape(num_experts, -1, a_w.shape[-1])
    weight_B = b_w.reshape(b_w.shape[0], -1, num_experts)
    return torch.einsum("o r e, e r i -> e o i", weight_B, weight_A) * scaling


def _naive(x, w, counts, gate_up, down):
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start : start + n]
        g, u = (xe @ gate_up[e].t()).chunk(2, dim=-1)
        out.append((torch.nn.functional.silu(g) * u * w[start : start + n, None]) @ down[e].t())
        start += n
    return torch.cat(out)


def _wrapped(dtype, num_local=E, offset=None, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config().text
    experts = GroupedExperts(cfg, num_local).to(dtype)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.1)
        experts.down_proj.normal_(0, 0.1)
    experts.requires_grad_(False)
    if offset is not None:
        experts.expert_start = offset
    inner = ExpertLora(experts, "gate_up_proj", r=R, alpha=2 * R, num_experts=E)
    outer = ExpertLora(inner, "down_proj", r=R, alpha=2 * R, num_experts=E)
    with torch.no_grad():  # training-like, non-zero B
        for p in outer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return outer


def _inputs(dtype, counts, seed=1):
    g = torch.Generator().manual_seed(seed)
    S = int(counts.sum())
    x = torch.randn(S, D, generator=g).to(dtype).requires_grad_()
    w = torch.rand(S, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(S, D, generator=g).to(dtype)
    return x, w, dy


def _grads(fn, params, x, w, dy):
    y = fn()
    y.backward(dy)
    out = [y.detach(), x.grad.clone(), w.grad.clone()] + [p.grad.clone() for p in params]
    x.grad = w.grad = None
    for p in params:
        p.grad = None
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # fp32: torch._grouped_mm; fp64: per-expert fallback
def test_grads_match_naive_loop_with_peft_delta(dtype):
    mod = _wrapped(dtype)
    experts, loras = mod.chain()
    gu, dn = loras["gate_up_proj"], loras["down_proj"]
    params = [gu.lora_A["default"].weight, gu.lora_B["default"].weight, dn.lora_A["default"].weight, dn.lora_B["default"].weight]
    counts = torch.tensor([5, 0, 3, 9, 1, 0, 7, 4])  # empty experts included
    x, w, dy = _inputs(dtype, counts)

    def ref():
        wgu = experts.gate_up_proj + _peft_delta(params[0], params[1], R, E, gu.scaling)
        wd = experts.down_proj + _peft_delta(params[2], params[3], R, E, dn.scaling)
        return _naive(x, w, counts, wgu, wd)

    ours = _grads(lambda: mod(x, w, counts), params, x, w, dy)
    want = _grads(ref, params, x, w, dy)
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-9}
    for name, a, b in zip(["y", "dx", "dw", "dA_gu", "dB_gu", "dA_d", "dB_d"], ours, want):
        torch.testing.assert_close(a, b, **tol, msg=name)
    assert experts.gate_up_proj.grad is None and experts.down_proj.grad is None
    # the LoRA really changes the output (not the zero-init identity)
    with torch.no_grad():
        base = _naive(x, w, counts, experts.gate_up_proj, experts.down_proj)
    assert (ours[0] - base).abs().max() > 1e-2
    if dtype == torch.float32:
        assert any(ok for k, ok in ex._GMM_OK.items() if k[2] == torch.float32), "grouped path not taken"


def test_bf16_close_to_fp32():
    m32, m16 = _wrapped(torch.float32), _wrapped(torch.bfloat16)
    counts = torch.tensor([5, 0, 3, 9, 1, 0, 7, 4])
    x, w, _ = _inputs(torch.float32, counts)
    with torch.no_grad():
        y32 = m32(x, w, counts)
        y16 = m16(x.bfloat16(), w.bfloat16(), counts)
    assert (y16.float() - y32).abs().max() < 0.05 * y32.abs().max()


def test_expert_parallel_slice_matches_full_and_zero_grads_elsewhere():
    """A rank hosting experts [4, 8) (expert_start = 4, as ShardedExperts sets) with LoRA of all 8 experts:
    same outputs/grads as the full module for those experts' rows, zero LoRA grads for 0..3."""
    full = _wrapped(torch.float32)
    local = _wrapped(torch.float32, num_local=E // 2, offset=E // 2)
    with torch.no_grad():
        fe, le = full.get_base_layer(), local.get_base_layer()
        le.gate_up_proj.copy_(fe.gate_up_proj[4:])
        le.down_proj.copy_(fe.down_proj[4:])
        for (n, pf), (_, pl) in zip(full.named_parameters(), local.named_parameters()):
            if pf.requires_grad:
                pl.copy_(pf)
    counts_full = torch.tensor([0, 0, 0, 0, 6, 2, 0, 5])
    x, w, dy = _inputs(torch.float32, counts_full)
    pf = [p for p in full.parameters() if p.requires_grad]
    pl = [p for p in local.parameters() if p.requires_grad]
    a = _grads(lambda: full(x, w, counts_full), pf, x, w, dy)
    b = _grads(lambda: local(x, w, counts_full[4:]), pl, x, w, dy)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)
    dA = b[3].view(E, R, D)
    assert dA[:4].abs().max() == 0 and dA[4:].abs().max() > 0
    dB = b[6].view(D, R, E)
    assert dB[:, :, :4].abs().max() == 0 and dB[:, :, 4:].abs().max() > 0


def test_missing_offset_on_a_slice_is_an_error():
    local = _wrapped(torch.float32, num_local=E // 2)
    x, w, _ = _inputs(torch.float32, torch.tensor([1, 1, 1, 1]))
    with pytest.raises(ValueError, match="expert_start"):
        local(x, w, torch.tensor([1, 1, 1, 1]))


def test_no_rows_keeps_lora_in_graph():
    mod = _wrapped(torch.float32)
    x = torch.zeros(0, D, requires_grad=True)
    y = mod(x, torch.zeros(0), torch.zeros(E, dtype=torch.long))
    assert y.shape == (0, D)
    y.sum().backward()
    lora = [p for p in mod.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in lora)


def test_moe_block_with_lora_runs_through_dispatcher():
    cfg = tiny_config().text
    torch.manual_seed(0)
    block = MoEBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(2, 5, cfg.hidden_size)
    with torch.no_grad():
        base = block(x, None)[0]
    block.experts = ExpertLora(ExpertLora(block.experts, "gate_up_proj", r=R, alpha=R, num_experts=E),
                               "down_proj", r=R, alpha=R, num_experts=E)
    with torch.no_grad():  # zero-init B: identical to the base block
        torch.testing.assert_close(block(x, None)[0], base, atol=1e-6, rtol=0)
    assert block.experts.gate_up_proj is block.experts.get_base_layer().gate_up_proj  # attribute passthrough
