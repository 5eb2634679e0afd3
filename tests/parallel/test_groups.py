"""ep_size validation, EP/EDP group layout (and where it falls on 2 x 8 and 8 x 8 GPUs), the AutoEP ds_config section (accepted by DeepSpeed's
own parser and validator), and the decoder layer's adapter for hidden-states-only MoE layers."""

import pytest
import torch

from qvl_train.model import build_model
from qvl_train.parallel.expert_parallel import autoep_config
from qvl_train.parallel.groups import (
    edp_group_ranks,
    ep_group_ranks,
    ep_info_for,
    ep_layout,
    ep_layout_warning,
    validate_ep_size,
)

from ..model.reference import make_batch, ours_kwargs, tiny_config


def test_ep_size_validation_names_valid_values():
    validate_ep_size(8, 16, 128)
    with pytest.raises(ValueError, match=r"the number of experts 60.*\[1, 2, 4\]"):
        validate_ep_size(8, 8, 60)
    with pytest.raises(ValueError, match=r"the world size 6.*\[1, 2\]"):
        validate_ep_size(4, 6, 128)
    with pytest.raises(ValueError, match="world size 3 and the number of experts 8"):
        validate_ep_size(3 * 3, 3, 8)
    with pytest.raises(ValueError, match="positive integer"):
        validate_ep_size(0, 8, 8)
    with pytest.raises(ValueError, match=r"\[1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60\]"):
        validate_ep_size(7, 120, 60)


def test_groups_contiguous_ep_strided_edp():
    assert ep_group_ranks(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert edp_group_ranks(8, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    info = ep_info_for(6, 8, 4)
    assert (info.ep_rank, info.edp_rank, info.edp_size) == (2, 1, 2)
    assert info.expert_range(128) == (64, 96)


@pytest.mark.parametrize("num_nodes", [2, 8])
def test_ep_groups_stay_inside_a_node_when_ep_fits_in_one(num_nodes):
    """Simulated 2 x 8 and 8 x 8 GPUs (torchrun: node n holds ranks 8n..8n+7), every valid ep."""
    gpus, experts = 8, 128
    world = num_nodes * gpus
    for ep in [d for d in range(1, world + 1) if world % d == 0 and experts % d == 0]:
        layout = ep_layout(num_nodes=num_nodes, gpus_per_node=gpus, ep_size=ep)
        assert layout.dp_ranks == list(range(world))  # ZeRO-3 partitions over every rank
        assert sorted(r for g in layout.ep_groups for r in g) == list(range(world))  # a partition of the world
        assert sorted(r for g in layout.edp_groups for r in g) == list(range(world))
        if ep <= gpus:  # inside one node; the ranks holding one expert slice: ep-strided, gpus/ep per node
            assert layout.ep_inside_nodes and ep_layout_warning(world, ep, gpus) is None, ep
            assert all(n == list(range(num_nodes)) for n in layout.edp_nodes)
            assert all(sum(r // gpus == node for r in g) == gpus // ep for g in layout.edp_groups for node in range(num_nodes))
        else:  # whole nodes: ep/8 of them per group
            assert [len(n) for n in layout.ep_nodes] == [ep // gpus] * (world // ep), ep
            assert "each spans" in ep_layout_warning(world, ep, gpus)
    # one node: nothing to cross, whatever ep
    assert ep_layout_warning(8, 8, 8) is None and ep_layout_warning(4, 4, 8) is None


def test_an_ep_that_does_not_divide_the_node_straddles_two_nodes_and_is_reported():
    layout = ep_layout(num_nodes=3, gpus_per_node=8, ep_size=6)  # groups {0..5}, {6..11}, {12..17}, {18..23}
    assert layout.ep_nodes == [[0], [0, 1], [1, 2], [2]]
    note = ep_layout_warning(24, 6, 8)
    assert "2 of 4 expert-parallel groups cross a node boundary" in note and "[1, 2, 4, 8]" in note


def test_autoep_config_is_accepted_by_deepspeed():
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config, validate_autoep_config

    cfg = tiny_config()
    assert autoep_config(cfg, 1) == {}
    section = autoep_config(cfg, 2, world_size=4)["expert_parallel"]
    assert section["load_balance_coeff"] is None and section["top_k"] == cfg.text.num_experts_per_tok
    parsed = parse_autoep_config(section)
    validate_autoep_config(parsed, 4, 1, 1, 1, zero_stage=3)
    with pytest.raises(ValueError, match="Set parallel.ep_size to one of"):
        autoep_config(cfg, 3)


class _HiddenOnly(torch.nn.Module):
    """Stands in for DeepSpeed's AutoEP layer: hidden states in, hidden states out, every row
    routed; logits published through a hook, as install_autoep_router_capture does."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        block.gate.register_forward_hook(lambda m, i, o: setattr(self, "captured_router_logits", o[0]))

    def forward(self, x_BLD):
        return self.block(x_BLD, None)[0]


def test_hidden_states_only_moe_layer_keeps_padding_aux_loss_and_load():
    cfg = tiny_config()
    model = build_model(cfg).eval()
    batch = ours_kwargs(make_batch(cfg, [[3, ("image", (1, 4, 4)), 2], [4]], seed=3))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    ref = model(**batch)
    for layer in model.model.language_model.layers:
        layer.mlp = _HiddenOnly(layer.mlp)
    out = model(**batch)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    torch.testing.assert_close(out.loss, ref.loss)
    assert torch.equal(out.expert_load, ref.expert_load)


def test_hidden_states_only_moe_layer_all_padding_batch():
    cfg = tiny_config()
    model = build_model(cfg).eval()
    ids = torch.randint(0, 900, (2, 5))
    mask = torch.zeros(2, 5, dtype=torch.long)
    ref = model(input_ids=ids, attention_mask=mask)
    for layer in model.model.language_model.layers:
        layer.mlp = _HiddenOnly(layer.mlp)
    out = model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out.logits, ref.logits)
    assert int(out.expert_load.sum()) == 0
