"""Print the plan tables of docs/scale.md (GiB per GPU, bf16, ep = GPUs) from qvl_train.plan.

    python bench/scale_tables.py > /tmp/tables.md
"""

from __future__ import annotations

from qvl_train.config import compose, to_config
from qvl_train.model.config import preset
from qvl_train.plan import make_plan

# (GPUs, GiB each, label): an "80 GB" H100 reports 81,559 MiB = 79.6 GiB; for the 141 GB H200 its
# decimal GB are counted (131.3 GiB, a lower bound) until bench/gpu_check.sh has printed its total.
H100_GIB, H200_GIB = 81559 / 1024, 141e9 / 2**30
HARDWARE = [(8, H100_GIB, "80 GB"), (8, H200_GIB, "141 GB"), (16, H100_GIB, "80 GB"), (32, H100_GIB, "80 GB")]
RUNS = [("LoRA r16", "lora", []), ("full", "full", ["parallel.offload_optimizer=false"]),
        ("full + optimizer offload", "full", ["parallel.offload_optimizer=true"])]
MODELS = [("Qwen3-VL-30B-A3B", "30B-A3B", "30b_a3b"), ("Qwen3-VL-235B-A22B", "235B-A22B", "235b_a22b")]


def cell(recipe: str, extra: list[str], model: str, gpus: int, mem: float) -> str:
    cfg = to_config(compose([f"+recipe={recipe}", *extra, f"parallel.ep_size={gpus}", "plan.supervised_fraction=1"]))
    plan = make_plan(cfg, preset(model), world_size=gpus, device="gpu", device_gib=mem)
    gib = plan.total_gib
    mark = " ✗" if gib > mem else (" (tight)" if gib > 0.9 * mem else "")
    return f"{gib:.0f}{mark}"


def main() -> None:
    for title, model, prefix in MODELS:
        print(f"### {title}\n")
        print("| run | tokens/batch | " + " | ".join(f"{g} x {label} ({m:.1f} GiB)" for g, m, label in HARDWARE) + " |")
        print("|---|---|" + "---|" * len(HARDWARE))
        for name, kind, extra in RUNS:
            for tokens in (16384, 8192):
                row = [cell(f"{prefix}_{kind}", [*extra, f"data.tokens_per_batch={tokens}"], model, g, m) for g, m, _ in HARDWARE]
                print(f"| {name}, ep = GPUs | {tokens} | " + " | ".join(row) + " |")
        print()
    print(recipe_line())


def recipe_line() -> str:
    """The sentence under the 235B-A22B table: its full-SFT recipe (64 GPUs, ep 8, offload)."""
    gib = H100_GIB
    cells = []
    for tokens in (8192, 16384):
        cfg = to_config(compose(["+recipe=235b_a22b_full", f"data.tokens_per_batch={tokens}", "plan.supervised_fraction=1"]))
        total = make_plan(cfg, preset("235B-A22B"), world_size=cfg.plan.gpus, device="gpu", device_gib=gib).total_gib
        cells.append(f"{total:.0f} GiB per GPU at {tokens} tokens ({1 - total / gib:.0%} headroom)")
    return (f"235B-A22B full SFT on 64 x 80 GB ({gib:.1f} GiB; 8 nodes, the recipe), ep 8, optimizer offload: "
            + "; ".join(cells) + ".")


if __name__ == "__main__":
    main()
