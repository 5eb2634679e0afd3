"""AllToAllDispatcher + ShardedExperts over 2 gloo processes against
LocalDispatcher + the full experts on the union of both ranks' (valid) tokens: outputs and
gradients (input rows, routing weights, and a trainable tensor applied after dispatch), including
a rank that sends no tokens, a rank that receives none, and padding (never sent: the rows each
rank receives are exactly the real picks of its experts); the whole sharded model (frozen experts)
against the full model; iter_full_state_dict gathering the shards; loading only the local
expert slice from safetensors. fp32, torch.testing defaults (rtol 1.3e-6, atol 1e-5).
The checks run in the suite's shared 2-process launch (zero3_runs, tests/conftest.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from qvl_train.model import build_model, save_pretrained
from qvl_train.model.moe import GroupedExperts, LocalDispatcher
from qvl_train.parallel.expert_parallel import (
    AllToAllDispatcher,
    ShardedExperts,
    from_pretrained_ep,
    iter_full_state_dict,
    shard_experts_for_ep,
)
from qvl_train.parallel.groups import build_ep_groups

from ..model.reference import make_batch, ours_kwargs, tiny_config


SCENARIOS = ["random", "rank1_sends_nothing", "rank1_receives_nothing", "padding", "rank1_all_padding"]


def _routing(cfg, scenario: str, seed: int):
    """Both ranks' (x, top_w, top_i, upstream grad, valid), identical on every rank. Padding
    tokens (valid False) are marked as MoEBlock marks them: expert id E, router weight 0."""
    g = torch.Generator().manual_seed(seed)
    E, k, D = cfg.text.num_experts, cfg.text.num_experts_per_tok, cfg.text.hidden_size
    sizes = {"random": [6, 9], "rank1_sends_nothing": [7, 0], "rank1_receives_nothing": [5, 8],
             "padding": [6, 9], "rank1_all_padding": [6, 5]}[scenario]
    pads = {"padding": [[0, 5], [3, 7, 8]], "rank1_all_padding": [[2], list(range(5))]}.get(scenario, [[], []])
    out = []
    for T, pad in zip(sizes, pads):
        x = torch.randn(T, D, generator=g)
        logits = torch.randn(T, E, generator=g)
        if scenario == "rank1_receives_nothing":
            logits[:, E // 2 :] = -1e4  # only experts of EP rank 0 are picked
        w, i = torch.topk(torch.softmax(logits, -1), k, dim=-1)
        valid = torch.ones(T, dtype=torch.bool)
        valid[pad] = False
        w = (w / w.sum(-1, keepdim=True)) * valid[:, None]
        out.append((x, w, i.masked_fill(~valid[:, None], E), torch.randn(T, D, generator=g), valid))
    return out


def _run_moe(dispatcher, experts, scale_ED, x, w, i, num_experts, expert_offset):
    d = dispatcher.dispatch(x, w, i, num_experts)
    El = d.tokens_per_expert_E.shape[0]
    expert_S = torch.repeat_interleave(torch.arange(El), d.tokens_per_expert_E) + expert_offset
    x_SD = d.x_SD * scale_ED[expert_S]  # a trainable per-expert tensor applied after dispatch
    return dispatcher.combine(experts(x_SD, d.weights_S, d.tokens_per_expert_E), d), d


def _check_dispatcher(rank, cfg, ep_info):
    E, D = cfg.text.num_experts, cfg.text.hidden_size
    torch.manual_seed(0)
    full = GroupedExperts(cfg.text)
    torch.nn.init.normal_(full.gate_up_proj, 0, 0.1)
    torch.nn.init.normal_(full.down_proj, 0, 0.1)
    full.requires_grad_(False)
    e0, e1 = ep_info.expert_range(E)
    local = ShardedExperts(full.gate_up_proj[e0:e1].clone(), full.down_proj[e0:e1].clone(), expert_start=e0, num_experts=E, ep_group=ep_info.ep_group)
    disp = AllToAllDispatcher(ep_info.ep_group)
    for n, scenario in enumerate(SCENARIOS):
        data = _routing(cfg, scenario, seed=n)
        scale0 = 1 + 0.1 * torch.randn(E, D, generator=torch.Generator().manual_seed(99))
        # expert parallel: this rank's tokens only
        x, w, i, gout, valid = data[rank]
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        scale = scale0.clone().requires_grad_()
        y, d = _run_moe(disp, local, scale, x, w, i, E, e0)
        (y * gout).sum().backward()
        dist.all_reduce(scale.grad)
        # padding is never sent: the rows this rank's experts received are the real picks of
        # their experts, from both ranks
        received = d.x_SD.shape[0]
        assert received == int(d.tokens_per_expert_E.sum()) == d.weights_S.shape[0]
        picks = torch.cat([a[2] for a in data])
        assert received == int(((picks >= e0) & (picks < e1)).sum()), scenario
        if scenario == "rank1_receives_nothing" and rank == 1:
            assert received == 0
        # padding tokens: zero output and zero gradients
        assert not y[~valid].any() and not x.grad[~valid].any() and not w.grad[~valid].any()
        # reference: one process, the valid tokens of both ranks only, all experts
        xs = [a[0][a[4]].clone().requires_grad_() for a in data]
        ws = [a[1][a[4]].clone().requires_grad_() for a in data]
        scale_ref = scale0.clone().requires_grad_()
        y_ref, _ = _run_moe(LocalDispatcher(), full, scale_ref, torch.cat(xs), torch.cat(ws),
                            torch.cat([a[2][a[4]] for a in data]), E, 0)
        (y_ref * torch.cat([a[3][a[4]] for a in data])).sum().backward()
        lo = sum(int(a[4].sum()) for a in data[:rank])
        T = int(valid.sum())
        torch.testing.assert_close(y[valid], y_ref[lo : lo + T], msg=f"{scenario}: output")
        torch.testing.assert_close(x.grad[valid], xs[rank].grad, msg=f"{scenario}: x grad")
        torch.testing.assert_close(w.grad[valid], ws[rank].grad, msg=f"{scenario}: routing weight grad")
        torch.testing.assert_close(scale.grad, scale_ref.grad, msg=f"{scenario}: post-dispatch param grad")


def _batches(cfg):
    b0 = ours_kwargs(make_batch(cfg, [[3, ("image", (1, 4, 4)), 5], [4, ("image", (1, 2, 4)), 2]], seed=1))
    b1 = ours_kwargs(make_batch(cfg, [[9], [4]], seed=2))  # text only, padded
    for b in (b0, b1):
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return [b0, b1]


def _check_model(rank, cfg, ep_info, tmp):
    model = build_model(cfg, seed=0)
    model.run_vision_always = True  # data parallel: rank 1's batch is text-only
    for n, p in model.named_parameters():
        p.requires_grad_(".mlp.experts." not in n)
    sharded = copy.deepcopy(model)
    assert shard_experts_for_ep(sharded, ep_info) == 4
    assert not any(".mlp.experts." in n for n, _ in sharded.named_parameters())  # outside ZeRO
    batches = _batches(cfg)
    out = sharded(**batches[rank])
    out.loss.backward()
    ref_outs = [model(**b) for b in batches]
    sum(o.loss for o in ref_outs).backward()
    ref = ref_outs[rank]
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    assert torch.equal(out.expert_load, ref.expert_load)
    ref_grads = dict(model.named_parameters())
    for n, p in sharded.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        torch.testing.assert_close(g, ref_grads[n].grad, msg=n)
    # export: the expert shards gathered back, names and order as model.state_dict()
    full = list(iter_full_state_dict(sharded, ep_info=ep_info))
    if rank == 0:
        expected = model.state_dict()
        assert [n for n, _ in full] == list(expected)
        for n, t in full:
            assert torch.equal(t, expected[n]), n
    else:
        assert full == []
    # load only the local expert slice from (multi-file) safetensors
    if rank == 0:
        save_pretrained(model, tmp, max_shard_bytes=200_000)
    dist.barrier()
    loaded = from_pretrained_ep(tmp, ep_info)
    e0, e1 = ep_info.expert_range(cfg.text.num_experts)
    want = model.state_dict()
    got = dict(loaded.named_parameters())
    for n, t in want.items():
        if ".mlp.experts." in n:
            block = loaded.get_submodule(n.rsplit(".", 1)[0])
            assert isinstance(block, ShardedExperts) and block.expert_start == e0
            assert torch.equal(getattr(block, n.rsplit(".", 1)[1]), t[e0:e1]), n
        else:
            assert torch.equal(got[n], t), n
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[rank]).logits, ref.logits)


def run_checks(tmp: str) -> str:
    """Every check above, on each rank of an initialized 2-process gloo group (it raises on the
    first failure). The suite runs it inside the shared 2-process launch (the zero3_runs fixture,
    tests/conftest.py: zero3_worker.py --all-to-all)."""
    rank = dist.get_rank()
    torch.set_num_threads(1)
    cfg = tiny_config()
    with pytest.raises(ValueError, match=r"parallel.ep_size to one of \[1, 2\]"):
        build_ep_groups(3, num_experts=cfg.text.num_experts)
    ep_info = build_ep_groups(2, num_experts=cfg.text.num_experts)
    assert ep_info.ep_rank == rank and ep_info.ep_ranks == [0, 1] and ep_info.edp_ranks == [rank]
    _check_dispatcher(rank, cfg, ep_info)
    _check_model(rank, cfg, ep_info, tmp)
    dist.barrier()
    return "passed"


def test_all_to_all_dispatcher_and_sharded_experts(zero3_runs):
    assert zero3_runs["all_to_all"] == "passed"
