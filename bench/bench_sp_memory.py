"""Sequence parallelism's memory per rank: sp=2 against sp=1 on the same video row, and the plan.

    OMP_NUM_THREADS=2 torchrun --nproc_per_node 2 bench/bench_sp_memory.py          # the issue's setting
    OMP_NUM_THREADS=2 torchrun --nproc_per_node 2 bench/bench_sp_memory.py --vision-layers 2   # 16k tokens, ~20 min on 2 CPU cores
    OMP_NUM_THREADS=2 torchrun --nproc_per_node 2 bench/bench_sp_memory.py --tokens 4096 --vision-layers 2   # the fast rerun

A 30B-A3B-width model cut to --layers decoder layers and --vision-layers vision blocks
(qvl_train.model.random_checkpoint.cut_config; random weights), set up like the
30b_a3b_long_video recipe (LoRA, frozen vision tower, activation checkpointing), trains on one
row of --tokens tokens: a short prompt, a video of 2-frame groups of --frame patches (each group
with its timestamp tokens), and a supervised answer. Each process measures:
- sp=1: the whole row (what a data-parallel rank does today); on CPU one rank at a time by
  default (--sp1): rank 0 before the sp=2 step, the others after it, the rest waiting at a barrier;
- sp=2: its slice of the row (SequenceParallel.shard / slice_inputs, the trainer's calls), the
  vision tower split by qvl_train.parallel.sp_vision.sp_encode_visual; every rank at once.
On CPU the weights are shared (shared_recipe_model): rank 0 saves them to one file (--weights-file,
6.9 GB at the issue's setting, removed at the end) that every rank maps copy-on-write, so the box
holds one copy; the smaps figures printed show they stay shared (Pss = Rss / ranks, nothing
dirty). The measured peak is heap growth during the step, which file mappings are no part of.
Printed per rank: the peak heap growth of forward + backward (CPU: glibc mallinfo2 sampled after
every aten op, bench/common.peak_mb; CUDA: max_memory_allocated above the start), the ratio
sp2 / sp1, the patches each rank's vision tower encoded, and the plan's activation, loss,
backward-transient (+ Ulysses) lines (plan.slice_lines) for the same setting, as plan / measured.
bench/sp_memory_phases.py runs the same with the forward and backward apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cuda_peak_mb, mapped_file_kib, peak_mb  # noqa: E402
from qvl_train.config import compose, to_config  # noqa: E402
from qvl_train.data.packing import collate, model_inputs  # noqa: E402
from qvl_train.model import build_model, preset  # noqa: E402
from qvl_train.model.random_checkpoint import cut_config  # noqa: E402
from qvl_train.model.rope import get_rope_index  # noqa: E402
from qvl_train.parallel.sequence import SequenceParallel, build_sp_groups  # noqa: E402
from qvl_train.parallel.sp_vision import sp_encode_visual  # noqa: E402
from qvl_train.peft import LoraSettings, apply_lora  # noqa: E402
from qvl_train.plan import GIB, slice_lines  # noqa: E402
from qvl_train.train.evaluate import to_device  # noqa: E402
from qvl_train.train.optim import apply_freeze  # noqa: E402

RECIPE = "30b_a3b_long_video"
PROMPT, TIMESTAMP = 32, 2  # text tokens before the video; tokens of each frame group's timestamp


def video_row(cfg, *, tokens: int, frame: int, seed: int = 0) -> dict:
    """One packed row of exactly `tokens` tokens: prompt, video, answer (supervised)."""
    group = 1 + frame * frame // 4 + 1 + TIMESTAMP  # start, pads, end, timestamp
    t = (tokens - PROMPT - 64) // group  # frame groups; at least 64 answer tokens
    if t < 1:
        raise ValueError(f"--tokens {tokens} holds no {frame}x{frame} frame group; raise --tokens.")
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, 1000, (n,), generator=g).tolist()  # noqa: E731
    ids = text(PROMPT)
    for _ in range(t):
        ids += text(TIMESTAMP) + [cfg.vision_start_token_id] + [cfg.video_token_id] * (frame * frame // 4)
        ids += [cfg.vision_end_token_id]
    answer = tokens - len(ids)
    ids += text(answer)
    input_ids = torch.tensor(ids)
    labels = torch.full_like(input_ids, -100)
    labels[-answer:] = input_ids[-answer:]
    grid = torch.tensor([[t, frame, frame]])
    pos, _ = get_rope_index(input_ids[None], image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                            spatial_merge_size=cfg.vision.spatial_merge_size, video_grid_thw=grid)
    sample = {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids),
              "position_ids": pos[:, 0], "pixel_values": None, "image_grid_thw": None,
              "pixel_values_videos": torch.randn(t * frame * frame, cfg.vision.patch_dim, generator=g),
              "video_grid_thw": grid}
    return collate([[sample]], pad_token_id=0, pad_to_multiple_of=2)


def recipe_model(cfg, model_cfg, *, device: str = "cpu"):
    """The recipe's trainable set (LoRA, frozen vision blocks) and checkpointing, random weights
    (shapes only on device="meta")."""
    model = build_model(model_cfg, seed=0, device=device)
    apply_freeze(model, cfg.optim)
    apply_lora(model, LoraSettings.from_section(cfg.peft))
    model.set_activation_checkpointing(cfg.model.activation_checkpointing)
    return model


def shared_recipe_model(cfg, model_cfg, path: Path):
    """recipe_model with its weights mapped copy-on-write from one file that every process on this
    machine shares, instead of one private copy per process (2 x 6.9 GB at the issue's setting):
    rank 0 builds the model once and saves every parameter and buffer to `path`; then each rank
    builds the model's shapes (meta) and takes the tensors from torch.load(mmap=True), a private
    (MAP_PRIVATE) file mapping. Pages nobody writes stay the page cache's one copy; the bench never
    writes a weight (no optimizer step; gradients are new tensors), which mapped_file_kib checks."""
    if dist.get_rank() == 0:
        model = recipe_model(cfg, model_cfg)
        torch.save({k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]}, path)
        del model
    dist.barrier()
    model = recipe_model(cfg, model_cfg, device="meta")
    for name, tensor in torch.load(path, mmap=True, weights_only=True).items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
        else:
            module._buffers[leaf] = tensor
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"not in {path}: {left[:3]}"
    return model


def step_peak_mib(model, inputs: dict, normaliser: float, device: torch.device) -> float:
    def step():
        out = model(**inputs, loss_normalizer=normaliser, return_logits=False)
        out.loss.backward()

    model.zero_grad(set_to_none=True)
    return cuda_peak_mb(step) if device.type == "cuda" else peak_mb(step)


def plan_mib(cfg, model_cfg, *, tokens: int, sp: int, visual_fraction: float) -> float:
    c = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokens_per_batch=tokens, max_length=tokens),
                            parallel=dataclasses.replace(cfg.parallel, sp_size=sp, ep_size=1),
                            plan=dataclasses.replace(cfg.plan, visual_fraction=visual_fraction))
    return sum(line.gib for line in slice_lines(c, model_cfg, b=4, ep=1)) * GIB / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--preset", default="30B-A3B", help="model width (tiny: a quick check that the script runs)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vision-layers", type=int, default=None, help="vision blocks (default: all 27)")
    p.add_argument("--frame", type=int, default=32, help="patches per frame side (32: 512x512 frames)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--sp1", choices=("one-at-a-time", "together", "rank0"), default=None,
                   help="sp=1 steps of the ranks one after the other (default on CPU: two whole-row steps at once "
                        "need twice the host memory), at once (default on CUDA: a GPU each), or on rank 0 only "
                        "(the others report its figures: the same row and weights)")
    p.add_argument("--weights-file", type=Path, default=None,
                   help="CPU: where rank 0 writes the weights every rank maps (default: the temp dir; 6.9 GB at the issue's setting)")
    args = p.parse_args()

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    # the other ranks wait at a barrier while one measures its sp=1 step alone (--sp1)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=4))
    rank, world = dist.get_rank(), dist.get_world_size()
    args.sp1 = args.sp1 or ("together" if device.type == "cuda" else "one-at-a-time")
    weights = args.weights_file or Path(tempfile.gettempdir()) / f"bench_sp_memory.{os.environ.get('MASTER_PORT', 0)}.pt"
    say = lambda text: print(f"{time.strftime('%H:%M:%S', time.gmtime())} rank {rank}: {text}", flush=True)  # noqa: E731
    try:
        torch.manual_seed(0)
        cfg = to_config(compose([f"+recipe={RECIPE}", "model.path=null", f"model.preset={args.preset}"]))
        model_cfg = cut_config(preset(args.preset), layers=args.layers, vision_layers=args.vision_layers)
        if device.type == "cpu":
            model = shared_recipe_model(cfg, model_cfg, weights)
        else:
            model = recipe_model(cfg, model_cfg).to(device)
        model.run_vision_always = True
        batch = video_row(model_cfg, tokens=args.tokens, frame=args.frame)
        n_visual = int((batch["input_ids"] == model_cfg.video_token_id).sum())
        n_supervised = float((batch["labels"][:, 1:] != -100).sum())
        encoded = []
        model.model.visual.register_forward_hook(lambda m, a, o: encoded.append(a[0].shape[0]))
        mapped = {"loaded": mapped_file_kib(weights)} if device.type == "cpu" else {}
        threads = torch.get_num_threads()
        say(f"model ready ({threads} threads); weights file mapping {mapped.get('loaded')}")

        # sp = 1: the whole row on this rank (what a data-parallel rank does today). Unless --sp1
        # together, one rank at a time while the others wait at a barrier: rank 0 before the sp=2
        # step, the others after it (so a run cut short still has rank 0's sp=1 and every sp=2)
        peak, patches, wall = {}, {}, {}

        def sp1_step(turns):
            for turn in turns:
                if turn == rank:
                    t0 = time.time()
                    peak[1] = step_peak_mib(model, to_device(model_inputs(batch), device), n_supervised, device)
                    patches[1], wall[1] = encoded[-1], time.time() - t0
                    say(f"sp=1 peak {peak[1]:.0f} MiB in {wall[1]:.0f} s, tower encoded {patches[1]} patches")
                if args.sp1 != "together":
                    dist.barrier()

        sp1_step({"one-at-a-time": [0], "together": [rank], "rank0": [0]}[args.sp1])
        # sp = 2: this rank's slice, the trainer's calls; every rank at once (the collectives)
        torch.set_num_threads(max(1, threads // world))  # the ranks share the cores now
        sp = SequenceParallel(build_sp_groups(2), model_cfg, pad_token_id=0, device=device,
                              encode_visual=sp_encode_visual)
        local = sp.shard(batch)
        inputs = to_device(local, device) | sp.slice_inputs(local, device)
        inputs = {k: v for k, v in inputs.items() if k in (*model_inputs(batch), "sequence_slice")}
        t0 = time.time()
        peak[2] = step_peak_mib(model, inputs, n_supervised / 2, device)  # ZeRO's world average: / world
        patches[2], wall[2] = encoded[-1], time.time() - t0
        say(f"sp=2 peak {peak[2]:.0f} MiB in {wall[2]:.0f} s, tower encoded {patches[2]} patches")
        torch.set_num_threads(threads)
        if args.sp1 == "one-at-a-time":
            sp1_step(range(1, world))
        if args.sp1 == "rank0":  # the other ranks' sp=1 step is rank 0's: the same row, the same weights
            shared = [peak.get(1), patches.get(1)]
            dist.broadcast_object_list(shared, src=0)
            peak[1], patches[1] = shared
        if device.type == "cpu":
            mapped["after steps"] = mapped_file_kib(weights)

        fraction = n_visual / args.tokens
        plan = {s: plan_mib(cfg, model_cfg, tokens=args.tokens, sp=s, visual_fraction=fraction) for s in (1, 2)}
        row = {"rank": rank, "peak_mib": peak, "sp2_over_sp1": peak[2] / peak[1], "patches_encoded": patches,
               "plan_mib": plan, "plan_over_measured": {s: plan[s] / peak[s] for s in (1, 2)}, "step_s": wall,
               "weights_mapping_kib": mapped, "threads": threads,
               "sp1_measured_here": args.sp1 != "rank0" or rank == 0}
        rows = [None] * world
        dist.all_gather_object(rows, row)
        if dist.get_rank() == 0:
            print(f"{model_cfg.text.num_hidden_layers} layer(s), {model_cfg.vision.depth} vision blocks, row of "
                  f"{args.tokens} tokens ({n_visual} visual, {batch['video_grid_thw'].tolist()}), {device.type}")
            for r in rows:
                print(f"rank {r['rank']}: peak sp1 {r['peak_mib'][1]:.0f} MiB, sp2 {r['peak_mib'][2]:.0f} MiB "
                      f"(x{r['sp2_over_sp1']:.2f}); patches encoded sp1 {r['patches_encoded'][1]}, sp2 "
                      f"{r['patches_encoded'][2]}; plan/measured sp1 {r['plan_over_measured'][1]:.2f}, "
                      f"sp2 {r['plan_over_measured'][2]:.2f}" + ("" if r["sp1_measured_here"] else " (sp1: rank 0's step)"))
                if mapped:
                    print(f"  weights file {weights}: {r['weights_mapping_kib']} KiB")
            if args.json:
                args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                 "fraction_visual": fraction, "rows": rows}, indent=1))
        dist.barrier()
        if rank == 0 and device.type == "cpu":
            weights.unlink()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
