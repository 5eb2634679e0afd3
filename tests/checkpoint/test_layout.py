"""Refusals: a checkpoint that cannot be resumed on this layout gets an error naming the saved
layout, the current one and what to do, before any tensor is read (never a raw state_dict error)."""

import json

import pytest
import torch

from qvl_train.checkpoint import reshard
from qvl_train.checkpoint.state import LAYOUT, check_layout, resolve_format, saved_layout

HERE = {"world_size": 1, "num_nodes": 1, "ep_size": 1, "zero_stage": 3, "peft": "lora", "num_workers": 1}


def test_a_deepspeed_format_checkpoint_on_another_layout_is_refused_with_both_layouts(tmp_path):
    (tmp_path / LAYOUT).write_text(json.dumps({**HERE, "world_size": 2, "ep_size": 2, "format": "deepspeed"}))
    with pytest.raises(ValueError) as e:
        check_layout(tmp_path, saved_layout(tmp_path), HERE)
    msg = str(e.value)
    assert "saved with world_size=2, num_nodes=1, ep_size=2, zero_stage=3, peft=lora" in msg
    assert "this run has world_size=1, num_nodes=1, ep_size=1" in msg
    assert "(world_size and ep_size differ)" in msg
    assert "Resume with the saving layout: 2 processes in all (torchrun --nnodes x --nproc_per_node), parallel.ep_size=2" in msg
    assert "checkpoint.format=auto or resharding" in msg
    check_layout(tmp_path, saved_layout(tmp_path), {**HERE, "world_size": 2, "ep_size": 2})  # its own layout: fine


def test_an_older_deepspeed_checkpoint_without_layout_file_is_judged_by_its_rank_files(tmp_path):
    for r in range(2):
        (tmp_path / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    assert saved_layout(tmp_path) == {"format": "deepspeed", "world_size": 2}
    with pytest.raises(ValueError, match="saved with world_size=2, this run has world_size=1"):
        check_layout(tmp_path, saved_layout(tmp_path), HERE)


def test_a_resharding_checkpoint_resumes_on_any_world_and_ep_but_needs_zero3(tmp_path):
    saved = {**HERE, "world_size": 8, "num_nodes": 2, "ep_size": 8, "format": "resharding"}
    check_layout(tmp_path, saved, HERE)
    with pytest.raises(ValueError, match="Resume with parallel.zero_stage=3"):
        check_layout(tmp_path, saved, {**HERE, "zero_stage": 2})
    assert resolve_format("auto", 3) == "resharding" and resolve_format("auto", 2) == "deepspeed"
    with pytest.raises(ValueError, match="needs parallel.zero_stage=3"):
        resolve_format("resharding", 1)


class _Saved:
    def __init__(self, shapes, layout):
        self.names, self._shapes, self.train_state = list(shapes), shapes, {"layout": layout}

    def shape(self, name):
        return self._shapes[name]


def test_a_resharding_checkpoint_of_other_trainable_tensors_is_refused_naming_them():
    saved = _Saved({"a.lora_A.weight": (4, 8), "b.weight": (3,)}, {**HERE, "world_size": 2, "ep_size": 2})
    here = [reshard.Target("a.lora_A.weight", (16, 8), torch.empty(0), reshard._identity),
            reshard.Target("c.weight", (3,), torch.empty(0), reshard._identity)]
    with pytest.raises(ValueError) as e:
        reshard.check_tensors(saved, here, "CKPT", current={**HERE, "peft": "none"})
    msg = str(e.value)
    assert "1 trainable tensors of this run are not in it (e.g. ['c.weight'])" in msg
    assert "it has 1 this run does not train (e.g. ['b.weight'])" in msg
    assert "a.lora_A.weight saved (4, 8) now (16, 8)" in msg
    assert "saved by a run with world_size=2, num_nodes=1, ep_size=2" in msg and "peft.method, LoRA rank" in msg
    assert "this run has world_size=1, num_nodes=1, ep_size=1, zero_stage=3, peft=none" in msg
    assert "It was trained with peft=lora and this run has peft=none: set peft=lora." in msg


@pytest.mark.parametrize("start,count", [(0, 7), (5, 30), (17, 1), (0, 48)])
def test_autoep_expert_partitions_map_to_the_right_elements_of_gate_up_proj(start, count):
    """w1 / w3 of experts 2..3 of 4 (El=2, I=3, D=4): each local flat element lands where the
    logical [E, 2I, D] tensor has that expert's gate (w1) or up (w3) row."""
    E, el, i, d, e0 = 4, 2, 3, 4, 2
    logical = torch.arange(E * 2 * i * d).view(E, 2 * i, d)
    for row0, local in ((0, logical[e0:e0 + el, :i]), (i, logical[e0:e0 + el, i:])):
        flat = local.reshape(-1)
        seg = reshard._expert_rows(e0=e0, rows=i, cols=d, total_rows=2 * i, row0=row0)
        count_ = min(count, flat.numel() - start)
        got = torch.cat([logical.reshape(-1)[lo:lo + n] for _, lo, n in seg(start, count_)])
        assert torch.equal(got, flat[start:start + count_])
        assert sum(n for *_, n in seg(start, count_)) == count_
