"""Full SFT with AutoEP loads a real-width checkpoint holding no more than each rank's share
(issue 8): a random Qwen3-VL-30B-A3B checkpoint (hidden 2048, 128 experts, vocab 151,936) cut to
1 decoder layer and 1 vision block, written in bf16 and sharded as published (Hub expert layout), loaded by 2 processes with
ep 2 in fp32. The issue's limit on each rank's peak host memory during the load is 1.3 x (its
expert slice + its ZeRO share of the rest + the largest single tensor); the test asserts the
tighter 1.0 x (4.27 GB here; measured 3.95 GB, where the gather-and-broadcast load it replaced
peaked at 5.3 GB and fails). The peak is inside deepspeed.initialize: AutoEP copies one layer's
expert slice while ZeRO-3 partitions it (deepspeed/module_inject/auto_ep_layer.py:643), within
the "largest tensor" term. The load must also put the file's values into each rank's partitions.

The share is read off DeepSpeed's partitions after the load (not from the loader's own
load_share_bytes, which must agree with it), and the values are compared after DeepSpeed's own
all-gather, so a loader that wrote the wrong range of a parameter fails here.

Memory: about 4 GB per rank, 2.6 GB of disk in tmp; about 1 minute on 2 cores.
"""

import subprocess
import sys
from pathlib import Path

from .launch import REPO, run_torchrun

GB = 1e9


def test_autoep_load_peak_per_rank_is_within_its_share(tmp_path):
    ckpt = tmp_path / "ckpt"
    # in a subprocess, so the writer's memory is not held by this process while the ranks load
    subprocess.run([sys.executable, "-m", "qvl_train.model.random_checkpoint", "--preset", "30B-A3B", "--layers", "1",
                    "--vision-layers", "1", "--dtype", "bfloat16", "--shard-size", "1GB", "--out", str(ckpt)],
                   cwd=REPO, check=True, timeout=300)
    out = tmp_path / "out"
    out.mkdir()
    ranks = run_torchrun(Path(__file__).with_name("load_memory_worker.py"), ["--path", str(ckpt), "--ep", "2"], out,
                         timeout=420)["ranks"]
    for r in ranks:
        assert all(r["values_match"].values()) and len(r["values_match"]) == 5, r["values_match"]
        for key, planned in r["planned"].items():  # ZeRO pads each partition to world-divisible sizes
            assert abs(r[key] - planned) <= 0.001 * planned, (key, r[key], planned)
        share = r["expert_slice"] + r["zero_share"] + r["largest_tensor"]
        # the issue allows 1.3 x share; this loader keeps within 1.0 x (measured 3.95 of 4.27 GB),
        # and the gather-and-broadcast load it replaced (5.3 GB) fails here
        assert r["peak"] <= share, (f"rank {r['rank']} peaked at {r['peak'] / GB:.2f} GB while loading, over its share "
                                    f"{share / GB:.2f} GB = expert slice {r['expert_slice'] / GB:.2f} + ZeRO share "
                                    f"{r['zero_share'] / GB:.2f} + largest tensor {r['largest_tensor'] / GB:.2f}")
