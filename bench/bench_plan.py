"""Calibrate the memory plan (qvl_train.plan) against the peak RSS of real-width training on CPU.

Each case trains a 1-2-layer real-width slice of Qwen3-VL-30B-A3B (hidden 2048, 128 experts,
vocab 151,936; written by qvl_train.model.random_checkpoint) for two steps on 2 processes with
the trainer exactly as launch/sft.py sets it up, and measures each rank's peak RSS increase from
just before the model is built to the end of step 2 (VmHWM, reset via /proc/self/clear_refs at
every phase boundary, minus the RSS just before the build; the largest phase peak), with glibc's
mmap threshold pinned (ALLOCATOR_ENV) so that the resident set is the live memory the plan
counts. The plan for the same config (device = host RAM) is printed beside
it, and per rank and phase (load, deepspeed.initialize, each forward / backward / optimizer step)
its peak, glibc's heap, the live tensors by kind and the ZeRO-3 parameters gathered at the
sampled peak. Big: run it under the machine-wide lock, one case at a time:

    python -m qvl_train.model.random_checkpoint --preset 30B-A3B --layers 1 --vision-layers 2 --out /tmp/30b_l1
    flock /tmp/bigmem.lock python bench/bench_plan.py --model /tmp/30b_l1 --cases lora:2 full:2 full:1 lora:1

A case is METHOD:EP (METHOD lora or full); extra hydra overrides follow --overrides.
tests/test_plan_measured.py runs the same measurement on a narrow model in the suite.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # bench/ too when imported (tests/test_plan_measured.py)
from common import proc_status_kib, reset_peak_rss  # noqa: E402  (bench/common.py)

GIB = 2**30
# glibc returns a freed block of 64 KiB or more to the OS at once (mmap'd, not kept in the heap),
# so RSS follows the live tensors, which the plan counts. With its default dynamic threshold
# glibc keeps freed tensors up to 32 MiB in its heap (0.4-1.5 GiB per rank here) and the
# measured peak depends on the order of frees, not on what the run needs. The pinned threshold
# (no dynamic raise) makes the peak that of the live memory.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


class Sampler(threading.Thread):
    """Per phase, sampled every 20 ms: max VmRSS / RssAnon / RssFile, and at the sample with the
    highest VmRSS, the ZeRO-3 parameters gathered then and glibc's free heap (what the peak holds)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.phase, self.peaks, self.stop, self.model = "start", {}, False, None

    def run(self) -> None:
        while not self.stop:
            s = proc_status_kib("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
            p = self.peaks.setdefault(self.phase, {})
            if s["VmRSS"] > p.get("VmRSS", 0) and self.model is not None:
                p["gathered_at_peak"] = _gathered_kib(self.model)
                p["heap_free_at_peak"] = int(_mallinfo_gib()["heap_free"] * 2**20)
            for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                p[k] = max(p.get(k, 0), s.get(k, 0))
            time.sleep(0.02)


def _gathered_kib(model) -> int:
    try:
        return sum(p.data.numel() * p.data.element_size() for p in model.parameters() if hasattr(p, "ds_id")) // 1024
    except RuntimeError:  # a module changed while we walked it
        return 0


def case_overrides(method: str, ep: int, model_dir: str, out_dir: str, tokens: int) -> list[str]:
    return [
        f"model.path={model_dir}", "model.preset=null", "model.activation_checkpointing=true",
        f"peft={'lora' if method == 'lora' else 'none'}", f"parallel.ep_size={ep}",
        "data=vqa_demo", f"data.tokens_per_batch={tokens}", f"data.max_length={tokens}",
        "train.max_steps=2", "train.generate_eval=false", "checkpoint.export_at_end=false",
        "logging.wandb.mode=disabled", "logging.progress_bar=false", f"output_dir={out_dir}", "run_name=bench",
    ]


def write_full_slice(out: str, *, text: dict | None = None, vision: dict | None = None) -> None:
    """Full SFT needs 16 B per parameter: a real-vocab slice (0.75 B parameters even with few
    experts) needs over 20 GB on 2 CPU ranks. The full cases therefore use 30B-A3B's widths
    (hidden 2048, 32/4 heads of 128, expert I 768, top-8, vision 1152) with 32 experts and the
    tiny model's 1,024-token vocabulary (its tokenizer ids), 1 layer and 2 vision blocks.
    `text` / `vision` replace config fields (tests/test_plan_measured.py: a narrower slice)."""
    import dataclasses

    from qvl_train.model import preset
    from qvl_train.model.random_checkpoint import cut_config, write_random_checkpoint

    real, tiny = cut_config(preset("30B-A3B"), layers=1, vision_layers=2), preset("tiny")
    ids = {k: getattr(tiny.text, k) for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    text_cfg = dataclasses.replace(real.text, **{"num_experts": 32, **ids, **(text or {})})
    vision_cfg = dataclasses.replace(real.vision, **(vision or {}))
    cfg = real.replace(text=text_cfg, vision=vision_cfg, **{k: getattr(tiny, k) for k in ("image_token_id", "video_token_id",
                                                                  "vision_start_token_id", "vision_end_token_id")})
    write_random_checkpoint(cfg, out, max_shard_bytes=200 * 10**6)


def _mallinfo_gib() -> dict[str, float]:
    """glibc's heap over all arenas: in use, free but kept (not returned to the OS), mmapped."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(k, ctypes.c_size_t) for k in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    m = libc.mallinfo2()
    return {"heap_used": m.uordblks / GIB, "heap_free": m.fordblks / GIB, "mmapped": m.hblkhd / GIB}


def _tensor_gib(model) -> dict[str, float]:
    """Live tensor storages (deduplicated), split: ZeRO-3 partitions, ZeRO-3 params gathered now,
    plain (non-ZeRO) params, and every other tensor Python can reach (optimizer states, buffers...)."""
    import gc

    import torch

    seen: set[int] = set()
    out = dict.fromkeys(("zero_partitions", "zero_gathered", "plain_params", "other"), 0.0)

    def add(kind: str, t) -> None:
        if t is None or t.device.type != "cpu" or not t.numel():
            return
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            return
        seen.add(s.data_ptr())
        out[kind] += s.nbytes() / GIB

    for p in model.parameters():
        if hasattr(p, "ds_id"):
            add("zero_partitions", p.ds_tensor)
            add("zero_gathered", p.data)
        else:
            add("plain_params", p.data)
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor):
            add("other", o)
    return out


class Phases:
    """Per phase: the peak RSS increase over the baseline (VmHWM, reset at each boundary via
    /proc/self/clear_refs so each phase's peak is its own), RSS / anonymous / file-backed at its
    end, glibc's heap and, where a model is known, the live tensors."""

    def __init__(self, sampler: Sampler | None) -> None:
        self.sampler, self.rows, self.phase, self.base, self.model = sampler, [], None, 0, None

    def enter(self, phase: str, *, tensors: bool = True) -> None:
        s = proc_status_kib("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
        if self.phase is not None:
            row = {"phase": self.phase, "peak": (s["VmHWM"] - self.base) / 2**20, "rss_end": (s["VmRSS"] - self.base) / 2**20,
                   "anon_end": s["RssAnon"] / 2**20, "file_end": s["RssFile"] / 2**20, **_mallinfo_gib()}
            if tensors and self.model is not None and self.sampler is not None:
                row.update(_tensor_gib(self.model))
            self.rows.append(row)
        else:
            self.base = s["VmRSS"]
        reset_peak_rss()
        self.phase = phase
        if self.sampler is not None:
            self.sampler.phase = phase


def _marked(phases: Phases, phase: str, fn, *, after: str | None = None, keep_model: bool = False):
    def run(*args, **kwargs):
        phases.enter(phase)
        out = fn(*args, **kwargs)
        if keep_model:
            phases.model = out if not isinstance(out, tuple) else out[0]
        if after:
            phases.enter(after)
        return out

    return run


def worker(overrides: list[str], result_file: str, *, census: bool = True) -> None:
    """One rank of a case. census=False (tests/test_plan_measured.py) measures the phases' peaks
    only: no sampling thread, no walk over the live tensors at each phase boundary."""
    import deepspeed

    from qvl_train.config import compose, to_config
    from qvl_train.parallel import zero3_load
    from qvl_train.parallel.runtime import init_runtime, shutdown
    from qvl_train.train import metrics
    from qvl_train.train import trainer as trainer_mod

    cfg = to_config(compose(overrides))
    rt = init_runtime("gloo")
    sampler = Sampler() if census else None
    if sampler is not None:
        sampler.start()
    phases = Phases(sampler)
    build = trainer_mod.build_train_model

    def measured_build(*args, **kwargs):
        phases.enter("build")  # the baseline: just before the model is built
        out = build(*args, **kwargs)
        phases.model = out[0]
        if sampler is not None:
            sampler.model = out[0]
        phases.enter("after_build")
        return out

    trainer_mod.build_train_model = measured_build
    for name, phase in (("from_pretrained_zero3", "load"), ("from_pretrained_ep", "load"), ("apply_lora", "apply_lora"),
                        ("load_autoep_experts", "load_autoep_experts"), ("build_loader", "loader")):
        setattr(trainer_mod, name, _marked(phases, phase, getattr(trainer_mod, name), after="after_" + phase,
                                           keep_model=phase == "load"))
    # inside from_pretrained_zero3: reset_buffers runs between the zero.Init build and the copies
    zero3_load.reset_buffers = _marked(phases, "load_copy", zero3_load.reset_buffers)
    deepspeed.initialize = _marked(phases, "deepspeed_initialize", deepspeed.initialize, after="after_initialize")
    trainer = trainer_mod.Trainer(cfg, rt)
    engine = trainer.engine
    for name in ("forward", "backward", "step"):
        step_phase = {"n": 0}

        def wrapped(*args, __fn=getattr(engine, name), __name=name, __c=step_phase, **kwargs):
            __c["n"] += 1
            phases.enter(f"step{__c['n']}_{__name}")
            return __fn(*args, **kwargs)

        setattr(engine, name, wrapped)
    batches = iter(trainer.loader)
    engine.train()
    token_stats = []
    for _ in (1, 2):
        acc = metrics.StepAccumulator()
        trainer._train_step(batches, acc)
        token_stats.append({k: acc.sums[k] for k in ("real_tokens", "slots", "trained_tokens", "visual_tokens")})
    phases.enter("end")
    if sampler is not None:
        sampler.stop = True
        sampler.join()
    rows = phases.rows
    result = {
        "rank": rt.rank,
        "peak_increase_gib": max(r["peak"] for r in rows),
        "baseline_gib": phases.base / 2**20,
        "phases": rows,
        "sampled_peaks_gib": {ph: {k: v / 2**20 for k, v in p.items()} for ph, p in (sampler.peaks if sampler else {}).items()},
        "tokens": token_stats,
        "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    Path(f"{result_file}.{rt.rank}").write_text(json.dumps(result))
    shutdown()
    sys.stdout.flush()
    os._exit(0)


def run_case(method: str, ep: int, args, *, census: bool = True) -> list[dict]:
    """Both ranks' measurements (or [{"error": log tail}]); census=False: peaks only (faster)."""
    out_dir = tempfile.mkdtemp(prefix="bench_plan_")
    result_file = f"{out_dir}/result.json"
    overrides = case_overrides(method, ep, args.model, out_dir, args.tokens) + args.overrides
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", __file__, "--worker", result_file,
           *([] if census else ["--no-census"]), "--overrides", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **ALLOCATOR_ENV}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return [{"error": tail}]
    return [json.loads(Path(f"{result_file}.{r}").read_text()) for r in range(2)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a real-width slice written by qvl_train.model.random_checkpoint")
    p.add_argument("--cases", nargs="+", default=["lora:2", "full:2", "full:1", "lora:1"])
    p.add_argument("--tokens", type=int, default=2048, help="data.tokens_per_batch (= max_length)")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--write-full-slice", metavar="DIR", help="write the full cases' slice (see write_full_slice) and exit")
    p.add_argument("--replan", nargs="+", metavar="CASE=LOG", help="no runs: the table from the measurements a "
                   "previous run printed to LOG, with today's plan (e.g. lora:1=/tmp/lora1.log; --model as measured)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--no-census", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overrides", nargs="*", default=[])
    args = p.parse_args()
    if args.worker:
        return worker(args.overrides, args.worker, census=not args.no_census)
    if args.write_full_slice:
        return write_full_slice(args.write_full_slice)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; model {args.model}")
    rows = []
    logged = dict(item.split("=", 1) for item in args.replan or [])
    for case in logged or args.cases:
        method, ep = case.split(":")
        ranks = _logged_ranks(case, logged[case]) if logged else run_case(method, int(ep), args)
        print(case, json.dumps(ranks), flush=True)
        for r in ranks:
            print_phases(r)
        if "error" not in ranks[0]:
            rows.append(compare(method, int(ep), ranks, args))
    print("\ncase     | measured peak RSS increase (max rank; where) | planned: train / load / total | plan / measured")
    for r in rows:
        print(f"{r['case']:<8} | {r['measured']:6.2f} GiB ({r['where']:<14})            | "
              f"{r['train']:5.2f} / {r['load']:5.2f} / {r['total']:5.2f} GiB   | {r['ratio']:.2f}")


def _logged_ranks(case: str, log: str) -> list[dict]:
    for line in Path(log).read_text().splitlines():
        if line.startswith(case + " ["):
            return json.loads(line[len(case) + 1:])
    raise ValueError(f"{log} has no measurement of {case}")


def print_phases(r: dict) -> None:
    if "error" in r:
        print(r["error"])
        return
    keys = ("peak", "rss_end", "anon_end", "file_end", "heap_used", "heap_free", "mmapped",
            "zero_partitions", "zero_gathered", "plain_params", "other")
    print(f"rank {r['rank']} (GiB; peak and rss_end over the baseline before the build)")
    print(f"  {'phase':<24}" + "".join(f"{k[:10]:>11}" for k in keys))
    for row in r["phases"]:
        print(f"  {row['phase']:<24}" + "".join(f"{row[k]:11.2f}" if k in row else f"{'':>11}" for k in keys))
    for phase, s in r["sampled_peaks_gib"].items():
        if "gathered_at_peak" in s:
            print(f"  sampled peak in {phase:<22} RSS +{s['VmRSS'] - r['baseline_gib']:.2f}: ZeRO-3 gathered "
                  f"{s['gathered_at_peak']:.2f}, glibc free heap {s['heap_free_at_peak']:.2f} GiB")


def plan_for(method: str, ep: int, ranks: list[dict], args):
    """The plan (qvl_train.plan.Plan, CPU) for the case, with the supervised and visual token
    shares the run really had (the larger of its steps, over both ranks)."""
    from qvl_train.config import compose, to_config
    from qvl_train.plan import make_plan, model_config_for

    T = args.tokens
    steps = [s for r in ranks for s in r["tokens"]]
    shares = [f"plan.supervised_fraction={max(s['trained_tokens'] for s in steps) / T:.3f}",
              f"plan.visual_fraction={max(s['visual_tokens'] for s in steps) / T:.3f}"]
    cfg = to_config(compose(case_overrides(method, ep, args.model, "/tmp", T) + args.overrides + shares))
    return make_plan(cfg, model_config_for(cfg), world_size=2, device="cpu", device_gib=float("inf"))


def compare(method: str, ep: int, ranks: list[dict], args) -> dict:
    plan = plan_for(method, ep, ranks, args)
    worst = max(ranks, key=lambda r: r["peak_increase_gib"])
    where = max(worst["phases"], key=lambda r: r["peak"])["phase"]
    return {"case": f"{method}:{ep}", "measured": worst["peak_increase_gib"], "where": where,
            "train": plan.train_gib, "load": plan.load_gib, "total": plan.total_gib,
            "ratio": plan.total_gib / worst["peak_increase_gib"]}


if __name__ == "__main__":
    main()
