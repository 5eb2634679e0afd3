"""Loading straight into ZeRO-3 partitions (each rank reads its own element range; Hub-layout
experts, whose elements our layout reorders, read whole and sliced) gives exactly the weights of
the single-process from_pretrained: with the experts in ZeRO-3 (full SFT, ep 1) and as LoRA's
sharded expert slice (ep 2), on 2 processes, from a tiny Hub-layout checkpoint in several shards.
The worker (zero3_load_worker.run) runs in the suite's shared 2-process ZeRO-3 launch (the
zero3_runs fixture, tests/conftest.py).
"""


def test_zero3_partitions_hold_the_checkpoint(zero3_runs):
    for r in zero3_runs["zero3_load"]["ranks"]:
        assert r["full"] == [0.0, r["params"]], r
        assert r["lora_ep2"] == [0.0, r["params"]], r  # experts as 2 buffers per layer instead of 2 params
