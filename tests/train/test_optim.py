"""Parameter groups: freeze switches per part, per-part learning rates, no decay on 1-D tensors,
and the warmup + cosine schedule."""

import math

import pytest

from qvl_train.config.schema import OptimSection
from qvl_train.model import build_model
from qvl_train.train.optim import apply_freeze, param_groups, part_of, warmup_cosine


def test_parts():
    assert part_of("model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert part_of("model.visual.merger.linear_fc1.weight") == "merger"
    assert part_of("model.visual.deepstack_merger_list.1.norm.weight") == "merger"
    assert part_of("model.language_model.layers.0.mlp.experts.gate_up_proj") == "llm"
    assert part_of("lm_head.weight") == "llm"


def test_freeze_and_per_part_learning_rates():
    model = build_model("tiny")
    cfg = OptimSection(lr=1e-3, vision_lr=1e-4, merger_lr=5e-4, weight_decay=0.1, freeze_vision=True)
    apply_freeze(model, cfg)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if part_of(n) == "vision"}
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert set(groups) == {"llm", "llm_no_decay", "merger", "merger_no_decay"}
    assert groups["merger"]["lr"] == 5e-4 and groups["llm"]["lr"] == 1e-3
    assert groups["llm_no_decay"]["weight_decay"] == 0.0 and groups["llm"]["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in groups["llm_no_decay"]["params"])
    counted = sum(p.numel() for g in groups.values() for p in g["params"])
    assert counted == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_everything_frozen_is_an_error():
    model = build_model("tiny")
    apply_freeze(model, OptimSection(freeze_vision=True, freeze_merger=True, freeze_llm=True))
    with pytest.raises(ValueError, match="No trainable parameters"):
        param_groups(model, OptimSection())


def test_warmup_then_cosine_to_the_floor():
    f = lambda s: warmup_cosine(s, warmup_steps=10, max_steps=110, min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
