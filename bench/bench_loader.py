"""Does the loader keep up? Time spent waiting for data vs a simulated training step.

    python bench/bench_loader.py [--steps 40] [--step-ms 50] [--data-config vqa_demo]

For each setting (workers 0/2, packing on/off) it runs a loop of `steps` iterations: fetch the
next batch (timed: data wait), then sleep step-ms (the simulated forward/backward, which leaves
the CPUs to the workers, as a GPU step would). Prints the wait/step ratio (0 = data is never the
bottleneck), batches and samples per second of pure loading, and packing efficiency. The real
encoder and the tiny tokenizer are used on the bundled demo set.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

from qvl_train.data.config import load_data_config
from qvl_train.data.loader import MixtureLoader
from qvl_train.data.tokenizer import build_tiny_tokenizer, load_tokenizer


def run(cfg, tokenizer, steps: int, step_s: float) -> dict[str, float]:
    it = iter(MixtureLoader(cfg, tokenizer=tokenizer))
    t0 = time.perf_counter()
    next(it)  # startup (worker spawn, first buffer) reported separately
    startup = time.perf_counter() - t0
    wait = real = slots = samples = 0.0
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t
        real += batch["stats"]["real_tokens"]
        slots += batch["stats"]["slots"]
        samples += batch["stats"]["num_samples"]
        time.sleep(step_s)
    return {
        "startup_s": startup,
        "wait_ms_per_step": 1000 * wait / steps,
        "wait_over_step": wait / (steps * step_s),
        "samples_per_step": samples / steps,
        "efficiency": real / slots,
        "samples_per_s_loading_only": samples / wait if wait else float("inf"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--step-ms", type=float, default=50.0)
    ap.add_argument("--data-config", default="vqa_demo")
    args = ap.parse_args()
    tokenizer = load_tokenizer(build_tiny_tokenizer(tempfile.mkdtemp(prefix="qvl_tiny_tok_")))
    base = load_data_config(args.data_config)
    print(
        f"data={args.data_config} tokens_per_batch={base.tokens_per_batch} max_length={base.max_length} "
        f"step={args.step_ms:.0f} ms steps={args.steps}"
    )
    for workers in (0, 2):
        for packing in (True, False):
            cfg = dataclasses.replace(base, num_workers=workers, packing=packing)
            r = run(cfg, tokenizer, args.steps, args.step_ms / 1000)
            print(
                f"workers={workers} packing={packing!s:5}  startup {r['startup_s']:.2f}s  "
                f"wait {r['wait_ms_per_step']:6.1f} ms/step  wait/step {r['wait_over_step']:.3f}  "
                f"samples/step {r['samples_per_step']:5.1f}  efficiency {r['efficiency']:.3f}  "
                f"loading-only {r['samples_per_s_loading_only']:.0f} samples/s"
            )


if __name__ == "__main__":
    main()
