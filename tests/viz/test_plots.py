"""Tests of kanvolution.viz.plots: every picture has its panels and is written as a PNG."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kanvolution import KANConv2d, KANLinear
from kanvolution.viz import analysis as A

pytest.importorskip("matplotlib")
from kanvolution.viz import plots  # noqa: E402


def test_phi_atlas_picture(tmp_path, is_png):
    layer = KANConv2d(3, 4, 3, padding=1, grid_size=5)
    atlas = A.phi_atlas(layer, torch.rand(4, 3, 8, 8) * 2 - 1, out_channels=[0, 3], in_channels=[0, 1, 2])
    fig = plots.plot_phi_atlas(atlas, title="test")
    assert plots.count_panels(fig, "phi") == 2 * 3 * 9
    path = plots.save(fig, tmp_path / "atlas.png")
    assert is_png(path)


def test_nonlinearity_picture(tmp_path, is_png):
    conv, dense = KANConv2d(2, 3, 3), KANLinear(5, 2)
    layers = {"conv": A.nonlinearity_scores(conv, torch.rand(2, 2, 6, 6)),
              "dense": A.nonlinearity_scores(dense, torch.rand(20, 5))}
    fig = plots.plot_nonlinearity(layers)
    assert plots.count_panels(fig, "heatmap") == 2
    heat = [ax for ax in fig.axes if ax.get_label() == "heatmap"]
    assert heat[0].images[0].get_array().shape == (3 * 3, 2 * 3)  # (out * kH) x (in * kW)
    assert heat[1].images[0].get_array().shape == (2, 5)
    assert is_png(plots.save(fig, tmp_path / "nonlinearity.png"))


def test_feature_map_and_kernel_pictures(tmp_path, is_png):
    images = np.random.rand(3, 1, 12, 12)
    fig = plots.plot_feature_maps(images, np.random.rand(3, 4, 10, 10), channels=[0, 1, 2, 5], labels=["a", "b", "c"])
    assert plots.count_panels(fig, "image") == 3 and plots.count_panels(fig, "map") == 12
    assert is_png(plots.save(fig, tmp_path / "maps.png"))
    data = {"kernel": np.random.randn(2, 3, 3, 3), "out_channels": [0, 1], "in_index": [0, 1, 2],
            "image": images[0], "location": (6, 6), "in_padding": np.zeros((3, 3), bool)}
    fig = plots.plot_effective_kernel(data)
    assert plots.count_panels(fig, "kernel") == 6 and plots.count_panels(fig, "image") == 1
    assert is_png(plots.save(fig, tmp_path / "kernel.png"))
    history = [{"epoch": e, "train_loss": 1 / e, "test_loss": 1.1 / e, "test_accuracy": 0.5 + e / 10} for e in (1, 2)]
    fig = plots.plot_learning_curves(history)
    assert plots.count_panels(fig, "curve") == 2

