import pytest


@pytest.fixture(scope="session")
def zero3_runs(tmp_path_factory):
    """The suite's 2-process ZeRO-3 checks in one launch of tests/parallel/zero3_worker.py (each
    launch costs a torch + DeepSpeed import per process): its cases by "mode:ep", and
    "zero3_load" (test_zero3_load.py, on a tiny Hub-layout checkpoint in several shards) and
    "lora_ep" (tests/peft/test_lora_ep.py) and "all_to_all" (test_all_to_all.py). Rank 0's results."""
    from qvl_train.model import random_checkpoint
    from tests.parallel.launch import run_torchrun

    root = tmp_path_factory.mktemp("zero3")
    ckpt = random_checkpoint.main(["--preset", "tiny", "--layout", "hub", "--dtype", "float32", "--shard-size", "200KB",
                                   "--out", str(root / "ckpt")])
    assert len(list(ckpt.glob("*.safetensors"))) > 2
    out = root / "out"
    out.mkdir()
    return run_torchrun("zero3_worker.py", ["--cases", "autoep:1,autoep:2,a2a:2", "--zero3-load", str(ckpt), "--lora-ep",
                                            "--all-to-all", str(root / "all_to_all")], out, timeout=500)
