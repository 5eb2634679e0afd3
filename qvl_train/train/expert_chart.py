"""The expert-load chart (W&B `experts/load_heatmap`): MoE layers down, experts across, each cell
the expert's share of its layer's routed tokens relative to the uniform share 1/E (1 = balanced).

Design choices:
- Colour is a log scale from 1/8x to 8x, centred on 1 with a diverging map (blue under-, white
  balanced, red overloaded). Load ratios are multiplicative: 2x over and 2x under are equally far
  from balanced, and a linear scale centred at 1 would spend half its colours on 0..1 and squash
  the overloaded side (up to E/top_k, 16x for 128 experts and top-8). The range is fixed so that
  images from different steps compare by colour; beyond it the colour bar's end triangles apply.
- Dead experts (no token in the interval) are black: a log scale has no place for 0.
- matplotlib's object API (Figure, no pyplot): no global state, no GUI backend, nothing to close.
- Rendered only at logging.expert_heatmap_every steps on rank 0 (0.4 CPU s for 94 x 128,
  docs/benchmarks.md).
"""

from __future__ import annotations

import io

import numpy as np

SCALE_RANGE = 8.0  # colours span 1/8x .. 8x the uniform share
_TICKS = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)
_ANNOTATE_MAX_CELLS = 128  # small grids (the demo's 4 x 8) print each cell's value


def relative_load(load_LE: np.ndarray) -> np.ndarray:
    """Tokens per expert / (the layer's tokens / E): 1 = the uniform share; a layer that routed no
    token is all zeros."""
    load = np.asarray(load_LE, dtype=np.float64)
    per_layer = load.sum(-1, keepdims=True)
    return load * load.shape[-1] / np.maximum(per_layer, 1e-12)


def expert_load_figure(load_LE: np.ndarray, step: int):
    """A matplotlib Figure of the (MoE layers, experts) token counts `load_LE` at `step`."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, MaxNLocator

    rel = relative_load(load_LE)
    num_layers, num_experts = rel.shape
    dead = rel == 0
    fig = Figure(figsize=(10, max(4.0, min(12.0, 1.8 + 0.11 * num_layers))), layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["coolwarm"].with_extremes(bad="black")
    image = ax.imshow(np.ma.masked_array(rel, mask=dead), cmap=cmap, aspect="auto", interpolation="nearest",
                      norm=LogNorm(vmin=1 / SCALE_RANGE, vmax=SCALE_RANGE))
    ax.set_xlabel(f"expert (0-{num_experts - 1})")
    ax.set_ylabel(f"MoE layer (0-{num_layers - 1})")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    bar = fig.colorbar(image, ax=ax, extend="both", shrink=0.9, pad=0.02)
    bar.set_label("tokens routed / uniform share (1/E)")
    bar.ax.yaxis.set_major_locator(FixedLocator(_TICKS))
    bar.ax.set_yticklabels([f"1/{round(1 / t)}" if t < 1 else f"{t:g}" for t in _TICKS])
    bar.ax.minorticks_off()
    live = np.where(dead, np.nan, rel)
    hot = np.unravel_index(np.argmax(rel), rel.shape)
    cold = float(np.nanmin(live)) if not dead.all() else 0.0
    ax.set_title(
        f"Expert load at step {step}: {num_layers} MoE layers x {num_experts} experts\n"
        f"max {rel.max():.2f}x uniform (layer {hot[0]}, expert {hot[1]}), min live {cold:.2f}x, "
        f"{int(dead.sum())} dead (black)", fontsize=11)
    if rel.size <= _ANNOTATE_MAX_CELLS:
        for (i, j), v in np.ndenumerate(rel):
            far = dead[i, j] or abs(np.log(v)) > 0.6 * np.log(SCALE_RANGE)  # dark cell: white text
            ax.text(j, i, "dead" if dead[i, j] else f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if far else "black")
    return fig


def render_png(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
