"""Whole train step (forward + backward + optimizer step) under DeepSpeed ZeRO-3, 2+ processes:
ours (AutoEP ep=2, and plain ZeRO-3 ep=1) vs transformers' Qwen3VLMoeForConditionalGeneration
with the MoE block as a ZeRO-3 leaf (the LLaMA-Factory / ms-swift recipe), same weights, same
micro-batches from the real demo loader.

    torchrun --standalone --nproc_per_node 2 bench/bench_train.py                 # packed (default)
    torchrun --standalone --nproc_per_node 2 bench/bench_train.py --data padded   # identical padded batches
    torchrun --standalone --nproc_per_node 2 bench/bench_train.py --systems ours_ep2   # one system (its peak RSS)
    torchrun --standalone --nproc_per_node 2 bench/bench_train.py --profile 3     # + torch.profiler on rank 0

Systems (rows), all built in this one process and timed interleaved (round robin, the order
rotating every step, so machine noise hits them alike):
  ours_ep2  our model, ZeRO-3 + DeepSpeed AutoEP ep=2, exactly as qvl_train.train.trainer sets it up
            (deepspeed_config + autoep_config, run_vision_always, install_autoep_router_capture)
  ours_ep1  our model, plain ZeRO-3 (our fused grouped experts)
  local     reference only: our model, no DeepSpeed, no collectives, torch AdamW (compute floor)
  hf[ATTN/EXPERTS]  transformers' model (tests.model.reference.hf_twin: our exact weights) with the
            given attention / experts implementation, Qwen3VLMoeTextSparseMoeBlock as a ZeRO-3 leaf,
            output_router_logits=True (it computes the aux loss too), loss normalised like ours
            (num_items_in_batch = our loss_normalizer).

Data (--data):
  packed  ours trains on the loader's packed rows (its production setting); transformers cannot
          take our segment_ids, so it gets the SAME samples unpacked: one right-padded row per
          sample, in the same order (pixels line up). Same tokens, same labels, same loss value.
  padded  the loader with packing off; both systems get the identical padded tensors.
Throughput counts real (non-padding) tokens over all ranks, identical for every system.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecation spam
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qvl_train.config.schema import RootConfig
from qvl_train.data import (
    build_loader,
    build_tiny_tokenizer,
    load_data_config,
    load_tokenizer,
    model_inputs,
    write_processor_configs,
)
from qvl_train.model import build_model, preset
from qvl_train.model.model import IGNORE_INDEX
from qvl_train.parallel.deepspeed_config import deepspeed_config
from qvl_train.parallel.expert_parallel import (
    autoep_config,
    install_autoep_router_capture,
)
from qvl_train.parallel.runtime import init_runtime, shutdown
from qvl_train.train.optim import param_groups

# ---- model config -----------------------------------------------------------------------------


def bench_model_config(args):
    """The tiny preset (its tokenizer ids) scaled up so the MoE layers dominate: H 256, E 32,
    top-4, I 160 (2I = 320; neither I nor 2I equals H), 4 layers; small vision tower."""
    cfg = preset("tiny")
    text = dataclasses.replace(
        cfg.text,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden // 4,
        mrope_section=_mrope(args.hidden // 4),
        moe_intermediate_size=args.moe_intermediate,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
    )
    vision = dataclasses.replace(
        cfg.vision, depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=args.hidden,
        deepstack_visual_indexes=[0, 1],
    )
    return cfg.replace(text=text, vision=vision)


def _mrope(head_dim: int) -> list[int]:
    half = head_dim // 2  # Qwen's 24/20/20 split of 64, scaled
    t = round(half * 24 / 64)
    h = (half - t) // 2
    return [t, h, half - t - h]


# ---- data ---------------------------------------------------------------------------------------


def signature(b) -> tuple[bool, bool]:
    return (b["pixel_values"] is not None, b["pixel_values_videos"] is not None)


def collect_batches(args, tokenizer, rt) -> list[dict]:
    """`args.steps + args.warmup` micro-batches per rank from the demo loader. transformers' model
    calls its vision tower once for images and once more for videos; under ZeRO-3 every rank must
    make the same calls, so a step index is kept only when all ranks' batches have the same
    (images?, videos?) signature and carry images (ranks without images would hang it)."""
    cfg = load_data_config(args.data_config, [f"data.packing={args.data == 'packed'}",
                                               f"data.tokens_per_batch={args.tokens_per_batch}",
                                               f"data.buffer_size={args.buffer_size}"])
    loader = iter(build_loader(cfg, tokenizer, rank=rt.rank, world_size=rt.world_size))
    need, kept, dropped = args.steps + args.warmup, [], 0
    while len(kept) < need:
        b = next(loader)
        sigs = [None] * rt.world_size
        dist.all_gather_object(sigs, signature(b))
        if len(set(sigs)) == 1 and sigs[0][0]:
            kept.append(b)
        else:
            dropped += 1
    return kept, dropped, cfg


def mm_token_type_ids(input_ids, mcfg):
    mm = torch.zeros_like(input_ids)
    mm[input_ids == mcfg.image_token_id] = 1
    mm[input_ids == mcfg.video_token_id] = 2
    return mm


def hf_inputs(b, mcfg, packed: bool) -> dict:
    """transformers' inputs for loader batch b: the batch itself (padded mode), or (packed mode) its
    samples unpacked into right-padded rows, same order, so pixel_values still line up."""
    keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    if not packed:
        out = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]}
    else:
        seqs = []
        for r in range(b["input_ids"].shape[0]):
            seg = b["segment_ids"][r]
            for s in range(int(seg.max()) + 1):
                idx = (seg == s).nonzero().squeeze(1)
                seqs.append((b["input_ids"][r, idx], b["labels"][r, idx], b["attention_mask"][r, idx]))
        L = max(len(s[0]) for s in seqs)
        pad = mcfg.text.pad_token_id
        ids = torch.full((len(seqs), L), pad, dtype=torch.long)
        labels = torch.full((len(seqs), L), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, (x, y, m) in enumerate(seqs):
            ids[i, : len(x)], labels[i, : len(x)], mask[i, : len(x)] = x, y, m
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    out["mm_token_type_ids"] = mm_token_type_ids(out["input_ids"], mcfg)
    out.update({k: b[k] for k in keys if b[k] is not None})
    return out


def supervised(labels) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# ---- systems ------------------------------------------------------------------------------------


class System:
    def __init__(self, name, engine, inputs, kind):
        self.name, self.engine, self.inputs, self.kind = name, engine, inputs, kind
        self.times, self.fwd, self.bwd, self.opt, self.losses = [], [], [], [], []

    def step(self, i: int, normaliser: float, record: bool) -> None:
        kw = self.inputs[i]
        dist.barrier()
        t0 = time.perf_counter()
        if self.kind == "ours":
            out = self.engine(**kw, loss_normalizer=normaliser)
        else:
            out = self.engine(**kw, output_router_logits=True, num_items_in_batch=normaliser)
        t1 = time.perf_counter()
        self.engine.backward(out.loss)
        t2 = time.perf_counter()
        self.engine.step()
        t3 = time.perf_counter()
        dist.barrier()  # the step ends when the slowest rank is done
        t4 = time.perf_counter()
        if record:
            self.times.append(t4 - t0)
            self.fwd.append(t1 - t0)
            self.bwd.append(t2 - t1)
            self.opt.append(t3 - t2)
        self.losses.append(float(out.loss.detach()))


class LocalEngine:
    """The compute floor: our model on this rank's micro-batch with plain torch AdamW, no DeepSpeed,
    no collectives (each rank trains its own copy). Not a training setup, a reference: what the
    step costs when nothing is sharded or communicated."""

    def __init__(self, model, opt):
        self.model, self.opt = model.train(), opt

    def __call__(self, **kw):
        return self.model(**kw)

    def backward(self, loss):
        loss.backward()

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def build_systems(args, mcfg, batches, rt):
    import deepspeed
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import (
        Qwen3VLMoeTextSparseMoeBlock,
    )

    from tests.model.reference import hf_twin

    root = RootConfig()
    root.parallel.zero_stage = 3
    base_ds = deepspeed_config(root, dtype=torch.float32, on_gpu=False)
    packed = args.data == "packed"
    ours_in = [model_inputs(b) for b in batches]
    hf_in = [hf_inputs(b, mcfg, packed) for b in batches]
    systems, rss = [], {}
    wanted = args.systems.split(",")
    for name in wanted:
        if name.startswith("ours_ep"):
            ep = int(name[len("ours_ep"):])
            model = build_model(mcfg, dtype=torch.float32, seed=0)
            model.run_vision_always = True  # as the trainer
            ds = dict(base_ds)
            ds.update(autoep_config(model.config, ep, world_size=rt.world_size))
            engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, root.optim), config=ds)
            if ep > 1:
                n = install_autoep_router_capture(engine)
                assert n == mcfg.text.num_hidden_layers, n
            systems.append(System(name, engine, ours_in, "ours"))
        elif name.startswith("hf"):
            attn, experts = name[3:-1].split("/")  # hf[sdpa/grouped_mm]
            hf = hf_twin(build_model(mcfg, dtype=torch.float32, seed=0)).train()
            for c in (hf.config, hf.config.text_config, hf.config.vision_config):
                c._attn_implementation = attn
                c._experts_implementation = experts
            deepspeed.utils.set_z3_leaf_modules(hf, [Qwen3VLMoeTextSparseMoeBlock])
            engine, *_ = deepspeed.initialize(model=hf, model_parameters=param_groups(hf, root.optim), config=base_ds)
            systems.append(System(name, engine, hf_in, "hf"))
        elif name == "local":
            model = build_model(mcfg, dtype=torch.float32, seed=0)
            opt = torch.optim.AdamW(param_groups(model, root.optim), lr=root.optim.lr)
            systems.append(System(name, LocalEngine(model, opt), ours_in, "ours"))
        else:
            raise ValueError(f"unknown system {name!r}")
        rss[name] = _rss_mib()
    return systems, rss, base_ds


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gather_max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def profile(systems, normalisers, n: int, rt) -> None:
    """torch.profiler on rank 0 over n steps of each system (the other ranks just step)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    for s in systems:
        if rt.is_main:
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                for i in range(n):
                    s.step(i, normalisers[i], record=False)
            print(f"\n==== profile rank 0: {s.name}, {n} steps (self CPU time, top 18) ====")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
        else:
            for i in range(n):
                s.step(i, normalisers[i], record=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per system")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--preset", default="moe256", choices=["moe256"], help="model config (see bench_model_config)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--moe-intermediate", type=int, default=160)
    p.add_argument("--data", choices=["packed", "padded"], default="packed")
    p.add_argument("--data-config", default="vqa_demo")
    p.add_argument("--tokens-per-batch", type=int, default=2048)
    p.add_argument("--buffer-size", type=int, default=256)
    p.add_argument("--systems", default="ours_ep2,ours_ep1,hf[sdpa/grouped_mm],local",
                   help="comma list of ours_ep1, ours_ep2, local, hf[ATTN/EXPERTS] (ATTN sdpa|eager, "
                        "EXPERTS grouped_mm|batched_mm|eager)")
    p.add_argument("--profile", type=int, default=0, help="after timing, profile N steps of each system on rank 0")
    p.add_argument("--json", default=None, help="also write the results here (rank 0)")
    args = p.parse_args()

    load0 = os.getloadavg()
    rt = init_runtime("gloo")
    torch.manual_seed(0)
    tok_dir = Path("/tmp/bench_helper/tokenizer") if Path("/tmp/bench_helper").exists() else ROOT / "runs" / "bench_tokenizer"
    if rt.is_main:
        build_tiny_tokenizer(tok_dir)
        write_processor_configs(tok_dir)
    dist.barrier()
    tokenizer = load_tokenizer(tok_dir)
    mcfg = bench_model_config(args)
    batches, dropped, dcfg = collect_batches(args, tokenizer, rt)
    n = len(batches)
    local_real = [int(b["attention_mask"].sum()) for b in batches]
    local_sup = [supervised(b["labels"]) for b in batches]
    t = torch.tensor([local_real, local_sup], dtype=torch.float64)
    dist.all_reduce(t)
    global_real, global_sup = t[0].tolist(), t[1].tolist()
    normalisers = [max(s, 1.0) / rt.world_size for s in global_sup]  # grad_accum 1, as the trainer
    slots_ours = sum(b["input_ids"].numel() for b in batches) / n
    hf_shapes = [hf_inputs(b, mcfg, args.data == "packed")["input_ids"].shape for b in batches]
    slots_hf = sum(s.numel() for s in hf_shapes) / n

    rss_start = _rss_mib()
    systems, rss, ds_cfg = build_systems(args, mcfg, batches, rt)

    # interleaved timing, order rotating each step
    for i in range(n):
        k = i % len(systems)
        for s in systems[k:] + systems[:k]:
            s.step(i, normalisers[i], record=i >= args.warmup)
    if args.profile:
        profile(systems, normalisers, args.profile, rt)
    rss_end = _gather_max(_rss_mib())
    load1 = os.getloadavg()

    timed = range(args.warmup, n)
    tokens_per_step = statistics.median([global_real[i] for i in timed])
    results = {}
    for s in systems:
        med = _gather_max(statistics.median(s.times))
        results[s.name] = {
            "median_step_s": med,
            "tokens_per_s_median": tokens_per_step / med,
            "min_step_s": _gather_max(min(s.times)),
            "max_step_s": _gather_max(max(s.times)),
            "tokens_per_s_mean": sum(global_real[i] for i in timed) / _gather_max(sum(s.times)),
            "rank0_fwd_bwd_opt_s": [statistics.median(x) for x in (s.fwd, s.bwd, s.opt)],
            "loss_step0": s.losses[0],
            "loss_last": s.losses[n - 1] if len(s.losses) >= n else None,
            "max_rss_after_build_mib": _gather_max(rss[s.name]),
        }
    if rt.is_main:
        t = mcfg.text
        print("=" * 100)
        print(f"machine: {platform.processor() or platform.machine()} | {_cpu_model()} | {os.cpu_count()} cpus | "
              f"torch {torch.__version__} | threads/rank {torch.get_num_threads()} | world {rt.world_size} gloo | "
              f"python {platform.python_version()}")
        import deepspeed
        import transformers

        print(f"deepspeed {deepspeed.__version__} | transformers {transformers.__version__} | "
              f"loadavg before {load0[0]:.2f} after {load1[0]:.2f}")
        print(f"model: text H {t.hidden_size}, layers {t.num_hidden_layers}, heads {t.num_attention_heads}/"
              f"{t.num_key_value_heads}x{t.head_dim}, experts {t.num_experts} top-{t.num_experts_per_tok}, "
              f"moe I {t.moe_intermediate_size}, vocab {t.vocab_size}, aux coef {t.router_aux_loss_coef} | vision "
              f"depth {mcfg.vision.depth} H {mcfg.vision.hidden_size} | fp32")
        print(f"data: {args.data_config} loader, {args.data} (packing={dcfg.packing}), max_length {dcfg.max_length}, "
              f"tokens_per_batch {dcfg.tokens_per_batch}, buffer {dcfg.buffer_size}; {n} micro-batches/rank "
              f"({args.warmup} warmup + {args.steps} timed), {dropped} skipped (vision-signature mismatch)")
        print(f"       real tokens/step (global, median) {tokens_per_step:.0f}; slots per rank-batch ours "
              f"{slots_ours:.0f}, hf {slots_hf:.0f}")
        print(f"deepspeed: {json.dumps(ds_cfg['zero_optimization'])}, optimizer AdamW torch_adam, clip "
              f"{ds_cfg['gradient_clipping']}; ours_ep2 adds expert_parallel autoep_size 2")
        print(f"peak RSS per rank: {rss_start:.0f} MiB after data, max over ranks at end {rss_end:.0f} MiB; "
              f"after each build: " + ", ".join(f"{k} {v['max_rss_after_build_mib']:.0f}" for k, v in results.items()))
        print("-" * 100)
        print(f"{'system':24s} {'median s/step':>13s} {'min':>7s} {'max':>7s} {'tok/s med':>9s} {'tok/s mean':>10s} "
              f"{'fwd/bwd/opt (r0 med)':>22s} {'loss0':>8s} {'loss_end':>8s}")
        for name, r in results.items():
            f, b, o = r["rank0_fwd_bwd_opt_s"]
            print(f"{name:24s} {r['median_step_s']:13.3f} {r['min_step_s']:7.3f} {r['max_step_s']:7.3f} "
                  f"{r['tokens_per_s_median']:9.0f} {r['tokens_per_s_mean']:10.0f} {f:7.3f}/{b:6.3f}/{o:6.3f} {r['loss_step0']:8.4f} {r['loss_last']:8.4f}")
        hf_names = [k for k in results if k.startswith("hf")]
        if hf_names:
            best = min(hf_names, key=lambda k: results[k]["median_step_s"])
            for k in results:
                if k.startswith("ours"):
                    print(f"ratio {k} / {best} (tokens/s, median-based): "
                          f"{results[best]['median_step_s'] / results[k]['median_step_s']:.2f}x")
        if "local" in results:
            floor = results["local"]["median_step_s"]
            for k in results:
                if k != "local":
                    print(f"{k}: step = {results[k]['median_step_s'] / floor:.2f}x the no-DeepSpeed compute floor "
                          f"(the most any system can gain over it is this factor)")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results,
                                                   "load": [load0, load1]}, indent=2))
    shutdown()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    main()
