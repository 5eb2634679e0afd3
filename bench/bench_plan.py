"""Calibrate the memory plan (qvl_train.plan) against the peak RSS of real-width training on CPU.

Each case trains a 1-2-layer real-width slice of Qwen3-VL-30B-A3B (hidden 2048, 128 experts,
vocab 151,936; written by qvl_train.model.random_checkpoint) for two steps on 2 processes with
the trainer exactly as launch/sft.py sets it up, and measures each rank's peak RSS increase from
just before the model is built to the end of step 2 (/proc/self/clear_refs resets VmHWM, then
VmHWM - VmRSS at that point). The plan for the same config (device = host RAM) is printed beside
it. Big: run it under the machine-wide lock, one case at a time:

    python -m qvl_train.model.random_checkpoint --preset 30B-A3B --layers 1 --vision-layers 2 --out /tmp/30b_l1
    flock /tmp/bigmem.lock python bench/bench_plan.py --model /tmp/30b_l1 --cases lora:2 full:2 full:1 lora:1

A case is METHOD:EP (METHOD lora or full); extra hydra overrides follow --overrides.
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
sys.path.insert(0, str(REPO))

GIB = 2**30


def _status_kib() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0])
    return out


class Sampler(threading.Thread):
    """Max VmRSS / RssAnon / RssFile per phase, sampled every 20 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.phase, self.peaks, self.stop = "start", {}, False

    def run(self) -> None:
        while not self.stop:
            s = _status_kib()
            p = self.peaks.setdefault(self.phase, {})
            for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                p[k] = max(p.get(k, 0), s.get(k, 0))
            time.sleep(0.02)


def case_overrides(method: str, ep: int, model_dir: str, out_dir: str, tokens: int) -> list[str]:
    return [
        f"model.path={model_dir}", "model.preset=null", "model.activation_checkpointing=true",
        f"peft={'lora' if method == 'lora' else 'none'}", f"parallel.ep_size={ep}",
        "data=vqa_demo", f"data.tokens_per_batch={tokens}", f"data.max_length={tokens}",
        "train.max_steps=2", "train.generate_eval=false", "checkpoint.export_at_end=false",
        "logging.wandb.mode=disabled", "logging.progress_bar=false", f"output_dir={out_dir}", "run_name=bench",
    ]


def write_full_slice(out: str) -> None:
    """Full SFT needs 16 B per parameter: a real-vocab slice (0.75 B parameters even with few
    experts) needs over 20 GB on 2 CPU ranks. The full cases therefore use 30B-A3B's widths
    (hidden 2048, 32/4 heads of 128, expert I 768, top-8, vision 1152) with 32 experts and the
    tiny model's 1,024-token vocabulary (its tokenizer ids), 1 layer and 2 vision blocks."""
    import dataclasses

    from qvl_train.model import preset
    from qvl_train.model.random_checkpoint import cut_config, write_random_checkpoint

    real, tiny = cut_config(preset("30B-A3B"), layers=1, vision_layers=2), preset("tiny")
    ids = {k: getattr(tiny.text, k) for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    text = dataclasses.replace(real.text, num_experts=32, **ids)
    cfg = real.replace(text=text, **{k: getattr(tiny, k) for k in ("image_token_id", "video_token_id",
                                                                  "vision_start_token_id", "vision_end_token_id")})
    write_random_checkpoint(cfg, out, max_shard_bytes=200 * 10**6)


def worker(overrides: list[str], result_file: str) -> None:
    from qvl_train.config import compose, to_config
    from qvl_train.parallel.runtime import init_runtime, shutdown
    from qvl_train.train import trainer as trainer_mod

    cfg = to_config(compose(overrides))
    rt = init_runtime("gloo")
    sampler = Sampler()
    sampler.start()
    marks: dict[str, int] = {}
    build = trainer_mod.build_train_model

    def measured_build(*args, **kwargs):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, so the peak is this window's
        marks["before_build"] = _status_kib()["VmRSS"]
        sampler.phase = "build"
        model = build(*args, **kwargs)
        marks["after_build"] = _status_kib()["VmRSS"]
        sampler.phase = "deepspeed_init"
        return model

    trainer_mod.build_train_model = measured_build
    trainer = trainer_mod.Trainer(cfg, rt)
    marks["after_init"] = _status_kib()["VmRSS"]
    batches = iter(trainer.loader)
    trainer.engine.train()
    token_stats = []
    for step in (1, 2):
        sampler.phase = f"step{step}"
        acc = trainer._train_step(batches)
        token_stats.append({k: acc.sums[k] for k in ("real_tokens", "slots", "trained_tokens", "visual_tokens")})
        marks[f"after_step{step}"] = _status_kib()["VmRSS"]
    end = _status_kib()
    sampler.stop = True
    sampler.join()
    result = {
        "rank": rt.rank,
        "peak_increase_gib": (end["VmHWM"] - marks["before_build"]) / 2**20,
        "marks_gib": {k: (v - marks["before_build"]) / 2**20 for k, v in marks.items()},
        "phase_peaks_gib": {ph: {k: v / 2**20 for k, v in p.items()} for ph, p in sampler.peaks.items()},
        "tokens": token_stats,
        "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    Path(f"{result_file}.{rt.rank}").write_text(json.dumps(result))
    shutdown()
    sys.stdout.flush()
    os._exit(0)


def run_case(method: str, ep: int, args) -> list[dict]:
    out_dir = tempfile.mkdtemp(prefix="bench_plan_")
    result_file = f"{out_dir}/result.json"
    overrides = case_overrides(method, ep, args.model, out_dir, args.tokens) + args.overrides
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", __file__, "--worker", result_file, "--overrides", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
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
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--overrides", nargs="*", default=[])
    args = p.parse_args()
    if args.worker:
        return worker(args.overrides, args.worker)
    if args.write_full_slice:
        return write_full_slice(args.write_full_slice)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; model {args.model}")
    rows = []
    for case in args.cases:
        method, ep = case.split(":")
        ranks = run_case(method, int(ep), args)
        print(case, json.dumps(ranks), flush=True)
        if "error" not in ranks[0]:
            rows.append(compare(method, int(ep), ranks, args))
    print("\ncase     | measured peak RSS increase (max rank; where) | planned: train / load / total | plan / measured")
    for r in rows:
        print(f"{r['case']:<8} | {r['measured']:6.2f} GiB ({r['where']:<14})            | "
              f"{r['train']:5.2f} / {r['load']:5.2f} / {r['total']:5.2f} GiB   | {r['ratio']:.2f}")


def compare(method: str, ep: int, ranks: list[dict], args) -> dict:
    """The plan for the case, with the supervised and visual token shares the run really had."""
    from qvl_train.config import compose, to_config
    from qvl_train.plan import make_plan, model_config_for

    T = args.tokens
    steps = [s for r in ranks for s in r["tokens"]]
    shares = [f"plan.supervised_fraction={max(s['trained_tokens'] for s in steps) / T:.3f}",
              f"plan.visual_fraction={max(s['visual_tokens'] for s in steps) / T:.3f}"]
    cfg = to_config(compose(case_overrides(method, ep, args.model, "/tmp", T) + args.overrides + shares))
    plan = make_plan(cfg, model_config_for(cfg), world_size=2, device="cpu", device_gib=float("inf"))
    worst = max(ranks, key=lambda r: r["peak_increase_gib"])
    where = max(worst["phase_peaks_gib"].items(), key=lambda kv: kv[1]["VmRSS"])[0]
    return {"case": f"{method}:{ep}", "measured": worst["peak_increase_gib"], "where": where,
            "train": plan.train_gib, "load": plan.load_gib, "total": plan.total_gib,
            "ratio": plan.total_gib / worst["peak_increase_gib"]}


if __name__ == "__main__":
    main()
