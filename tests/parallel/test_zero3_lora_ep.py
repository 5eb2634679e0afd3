"""ZeRO-3 (2 processes) with FROZEN experts sharded over ep 2 (shard_experts_for_ep +
AllToAllDispatcher, the LoRA path; expert weights stay outside ZeRO): the first 3 steps of the
other parameters match a single-process run with frozen experts, a text-only padded rank next to
an image rank does not hang, and iter_full_state_dict gathers the expert shards for export.
Tolerances as in test_zero3_ep.py."""

from .test_zero3_ep import check


def test_zero3_frozen_sharded_experts_match_single_process(zero3_runs):
    check(zero3_runs["a2a:2"], ep=2, hooked=0)
