"""Renders the expert-load chart examples in docs/img (README, "Expert load on W&B"):

    python docs/make_expert_load_examples.py                     # the synthetic 48 x 128 example
    python docs/make_expert_load_examples.py --run runs/<run>    # and a run's latest loads

The synthetic loads: 48 MoE layers x 128 experts, 65,536 tokens x top-8 per layer, expert
popularity log-normal with a spread that grows with depth, one hot expert in layer 30 and a few
dead experts in layers 40-47 (a made-up but typical imbalance). Prints render times (and
that of a 94-layer version).
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from qvl_train.train.expert_chart import expert_load_figure, render_png

OUT = Path(__file__).resolve().parent / "img"


def synthetic_load(num_layers: int = 48, num_experts: int = 128, tokens: int = 65536, top_k: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    load = np.zeros((num_layers, num_experts))
    for layer in range(num_layers):
        logits = rng.normal(size=num_experts) * (0.15 + 0.9 * layer / num_layers)
        if layer == 30:
            logits[77] += 2.5
        if layer >= 40:
            logits[rng.choice(num_experts, size=layer - 38, replace=False)] = -np.inf
        p = np.exp(logits - logits.max())
        load[layer] = rng.multinomial(tokens * top_k, p / p.sum())
    return load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="a run dir whose expert_load.json is drawn as docs/img/expert_load_demo.png")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    load = synthetic_load()
    t0, c0 = time.perf_counter(), time.process_time()
    png = render_png(expert_load_figure(load, step=1200))
    print(f"48 x 128 chart, first (imports matplotlib): {time.perf_counter() - t0:.2f} s wall, "
          f"{time.process_time() - c0:.2f} CPU s")
    big = synthetic_load(num_layers=94)
    t0, c0 = time.perf_counter(), time.process_time()
    render_png(expert_load_figure(big, step=1200))
    print(f"94 x 128 chart: {time.perf_counter() - t0:.2f} s wall, {time.process_time() - c0:.2f} CPU s")
    (OUT / "expert_load_48x128.png").write_bytes(png)
    if args.run:
        latest = json.loads((Path(args.run) / "expert_load.json").read_text())
        (OUT / "expert_load_demo.png").write_bytes(render_png(expert_load_figure(np.array(latest["load"]), latest["step"])))


if __name__ == "__main__":
    main()
