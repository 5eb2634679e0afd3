"""Full SFT with AutoEP (ep 2, ZeRO-3, 2 CPU processes) from a REAL-WIDTH checkpoint: the
Qwen3-VL-30B-A3B shapes (hidden 2048, 128 experts of 768, vocab 151,936) cut to 1 decoder layer
and 1 vision block (1.2 B parameters, 2.5 GB in bf16). No rank holds more than its share while
loading (autoep_load_worker.py: from_pretrained_zero3(defer_experts=True), deepspeed.initialize
with AutoEP, load_autoep_experts): peak resident-set growth per rank <= 1.3 x (its expert slice +
its ZeRO share of the rest + the largest single tensor, all fp32) + the gradient partitions
deepspeed.initialize allocates for training. Building the whole model per rank, as before, peaks
above 2 x that model (fp32 5 GB): far over the limit.

The weights are zeros (memory does not depend on values; writing random ones costs a minute);
parity of the loaded values is tests/train/test_matrix.py's job.
"""

import dataclasses

import torch

from qvl_train.model import build_model, preset, save_pretrained

from .launch import run_torchrun


def _real_width_checkpoint(path) -> None:
    cfg = preset("30B-A3B")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=1),
                      vision=dataclasses.replace(cfg.vision, depth=1, deepstack_visual_indexes=[0]))
    meta = build_model(cfg, device="meta")
    zeros = ((name, torch.zeros(p.shape, dtype=torch.bfloat16)) for name, p in meta.state_dict().items())
    save_pretrained(meta, path, state_dict=zeros, dtype=torch.bfloat16, max_shard_bytes=1 << 30)


def test_autoep_load_holds_only_this_ranks_share(tmp_path):
    ckpt = tmp_path / "ckpt"
    _real_width_checkpoint(ckpt)
    res = run_torchrun("autoep_load_worker.py", ["--path", str(ckpt), "--ep", "2"], tmp_path, nproc=2, timeout=600)
    for r in res["ranks"]:
        share = r["expert_slice"] + r["zero_share"] + r["largest_tensor"]
        limit = 1.3 * share + r["grad_partitions"]
        assert r["peak"] <= limit, {k: round(v / 2**30, 2) for k, v in r.items() if k not in ("rank", "seconds")}
