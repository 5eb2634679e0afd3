"""Loading straight into ZeRO-3 partitions (each rank reads its own element range; Hub-layout
experts, whose elements our layout reorders, read whole and sliced) gives exactly the weights of
the single-process from_pretrained: with the experts in ZeRO-3 (full SFT, ep 1) and as LoRA's
sharded expert slice (ep 2), on 2 processes, from a tiny Hub-layout checkpoint in several shards.
"""

import subprocess
import sys
from pathlib import Path

from .launch import REPO, run_torchrun


def test_zero3_partitions_hold_the_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    subprocess.run([sys.executable, "-m", "qvl_train.model.random_checkpoint", "--preset", "tiny", "--layout", "hub",
                    "--dtype", "float32", "--shard-size", "200KB", "--out", str(ckpt)], cwd=REPO, check=True, timeout=120)
    assert len(list(ckpt.glob("*.safetensors"))) > 2
    out = tmp_path / "out"
    out.mkdir()
    for r in run_torchrun(Path(__file__).with_name("zero3_load_worker.py"), ["--path", str(ckpt)], out)["ranks"]:
        assert r["full"] == [0.0, r["params"]], r
        assert r["lora_ep2"] == [0.0, r["params"]], r  # experts as 2 buffers per layer instead of 2 params
