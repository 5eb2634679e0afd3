"""The expert-load chart at the size of Qwen3-VL-235B-A22B (94 MoE layers x 128 experts), read
through matplotlib's objects, and the per-layer load metrics beside it."""

import numpy as np
import pytest
import torch

from qvl_train.train.expert_chart import expert_load_figure, relative_load, render_png
from qvl_train.train.metrics import expert_load_metrics


def test_94x128_chart_has_axes_a_labelled_colour_bar_centred_on_uniform_and_the_step():
    rng = np.random.default_rng(0)
    load = rng.poisson(64, size=(94, 128)).astype(float)
    load[5, 7] = 0  # a dead expert
    fig = expert_load_figure(load, step=1234)
    ax, bar_ax = fig.axes  # the heatmap and its colour bar, nothing else
    image = ax.get_images()[0]
    assert image.get_array().shape == (94, 128)
    assert "expert" in ax.get_xlabel() and "layer" in ax.get_ylabel()
    assert len(ax.get_xticks()) > 4 and len(ax.get_yticks()) > 4
    assert "step 1234" in ax.get_title() and "1 dead" in ax.get_title()
    assert image.colorbar is not None and image.colorbar.ax is bar_ax and "uniform" in bar_ax.get_ylabel()
    assert image.norm(1.0) == pytest.approx(0.5)  # balanced sits mid-scale; 2x over and 2x under mirror
    assert image.norm(2.0) - 0.5 == pytest.approx(0.5 - image.norm(0.5))
    assert image.get_array().mask[5, 7] and tuple(image.get_cmap().get_bad()[:3]) == (0.0, 0.0, 0.0)  # dead: black
    assert render_png(fig).startswith(b"\x89PNG")


def test_relative_load_and_metrics_measure_against_the_uniform_share():
    load = torch.tensor([[4.0, 2.0, 2.0, 0.0], [2.0, 2.0, 2.0, 2.0]])  # 8 tokens over 4 experts: 2 each is uniform
    np.testing.assert_allclose(relative_load(load.numpy()), [[2, 1, 1, 0], [1, 1, 1, 1]])
    m = expert_load_metrics(load)
    assert m["experts/max_load"] == 2.0 and m["experts/min_load"] == 0.0 and m["experts/dead_total"] == 1.0
    assert m["experts_by_layer/layer_00/max_load"] == 2.0 and m["experts_by_layer/layer_01/min_load"] == 1.0
    assert m["experts_by_layer/layer_00/dead"] == 1.0 and m["experts_by_layer/layer_01/cv"] == 0.0
