"""apply_lora on the whole model: what trains (counts by part), base frozen, a training step,
activation checkpointing."""

import pytest
import torch

from qvl_train.model import build_model
from qvl_train.peft import (
    LoraSettings,
    apply_lora,
    lora_parameters,
    trainable_parameter_report,
)

from ..model.reference import make_batch, ours_kwargs, tiny_config

ALL = ("attention", "dense_mlp", "experts", "router", "vision", "merger")
R = 4


def _cfg():
    return tiny_config(mlp_only_layers=[1])


def _expected(cfg, targets, modules_to_save=()):
    t, v = cfg.text, cfg.vision
    lin = lambda i, o: R * (i + o)
    moe = [i for i in range(t.num_hidden_layers) if t.is_moe_layer(i)]
    dense = [i for i in range(t.num_hidden_layers) if not t.is_moe_layer(i)]
    D, I, E, q, kv = t.hidden_size, t.moe_intermediate_size, t.num_experts, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    C, merged = v.hidden_size, v.hidden_size * v.spatial_merge_size**2
    exp = dict.fromkeys(("vision", "merger", "attention", "experts", "router", "other"), 0)
    if "attention" in targets:
        exp["attention"] = t.num_hidden_layers * (lin(D, q) + 2 * lin(D, kv) + lin(q, D))
    if "experts" in targets:  # per expert: gate_up (D -> 2I) and down (I -> D)
        exp["experts"] = len(moe) * E * (lin(D, 2 * I) + lin(I, D))
    if "router" in targets:
        exp["router"] = len(moe) * lin(D, E)
    if "vision" in targets:
        exp["vision"] = v.depth * (lin(C, 3 * C) + lin(C, C) + lin(C, v.intermediate_size) + lin(v.intermediate_size, C))
    if "merger" in targets:
        exp["merger"] = (1 + len(v.deepstack_visual_indexes)) * (lin(merged, merged) + lin(merged, v.out_hidden_size))
    if "dense_mlp" in targets:
        exp["other"] += len(dense) * (2 * lin(D, t.intermediate_size) + lin(t.intermediate_size, D))
    if "lm_head" in modules_to_save:
        exp["other"] += t.vocab_size * D
    return exp


@pytest.mark.parametrize("targets", [ALL, ("attention",), ("experts",), ("attention", "experts", "router")])
def test_trainable_counts_by_part(targets):
    cfg = _cfg()
    model = build_model(cfg)
    total_before = sum(p.numel() for p in model.parameters())
    mts = ("lm_head",) if "router" in targets else ()
    apply_lora(model, LoraSettings(rank=R, alpha=8, targets=targets, modules_to_save=mts))
    report = trainable_parameter_report(model)
    assert dict(report) == _expected(cfg, targets, mts)
    lora = sum(p.numel() for p in lora_parameters(model).values())
    assert sum(report.total.values()) == total_before + lora
    table = report.table()
    assert "experts" in table and "all" in table and str(report) == table


def test_base_frozen_and_a_step_changes_only_adapters():
    cfg = _cfg()
    model = build_model(cfg).train()
    apply_lora(model, LoraSettings(rank=R, alpha=8, dropout=0.1, targets=ALL))
    lora = lora_parameters(model)
    assert all(p.requires_grad == (n in lora) for n, p in model.named_parameters())
    with torch.no_grad():  # as after some training: B non-zero, so A gets gradients too
        for n, p in lora.items():
            p.normal_(0, 0.02)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in lora}
    batch = make_batch(cfg, [[3, ("image", (1, 4, 6)), 2, ("video", (2, 2, 4)), 5]])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**ours_kwargs(batch), labels=labels).loss.backward()
    for n, p in model.named_parameters():
        if n in lora:
            assert p.grad is not None and p.grad.abs().max() > 0, n
        else:
            assert p.grad is None, n
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    for n, p in model.named_parameters():
        if n not in lora:
            assert torch.equal(p, base_before[n]), n


def test_activation_checkpointing_gives_same_gradients():
    cfg = _cfg()
    batch = make_batch(cfg, [[3, ("image", (1, 4, 6)), 9]])
    labels = batch["input_ids"].clone()
    grads = []
    for ckpt in (False, True):
        model = build_model(cfg).train()
        apply_lora(model, LoraSettings(rank=R, alpha=8, targets=("attention", "experts", "router")))
        torch.manual_seed(0)
        with torch.no_grad():
            for p in lora_parameters(model).values():
                p.normal_(0, 0.02)
        model.set_activation_checkpointing(ckpt)
        model(**ours_kwargs(batch), labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in lora_parameters(model).items()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_settings_validation_and_double_apply():
    with pytest.raises(ValueError, match="Unknown LoRA targets"):
        LoraSettings(targets=("mlp",))
    model = build_model(_cfg())
    with pytest.raises(ValueError, match="match no module"):
        apply_lora(model, LoraSettings(rank=R, modules_to_save=("nope",)))
    model = build_model(_cfg())
    apply_lora(model, LoraSettings(rank=R))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraSettings(rank=R))
