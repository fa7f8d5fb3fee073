"""Tests of kanvolution.viz.analysis: nonlinearity scores, input histograms, the phi atlas, effective kernels."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from kanvolution import KANConv2d, KANLinear
from kanvolution.viz import analysis as A

def _greville(layer) -> torch.Tensor:
    """``(C, G + K)`` Greville abscissae of each input channel's knots: sum_g c_g B_g(t) = t with these c."""
    K = layer.spline_order
    knots = layer.grid
    n = knots.shape[1] - K - 1
    return torch.stack([knots[:, g + 1: g + K + 1].mean(1) for g in range(n)], dim=1)


def _set_spline(layer, coeff_of_greville) -> None:
    """phi = w_scale * sum_g f(greville_g) B_g with no base term, for every phi of the layer."""
    chan = A._channel_of_phi(layer)  # (out, in/groups)
    coeff = coeff_of_greville(_greville(layer))[chan]  # (out, in/groups, G+K)
    with torch.no_grad():
        layer.base_weight.zero_()
        layer.spline_weight.copy_(coeff.view(coeff.shape[:2] + (1,) * (layer.spline_weight.dim() - 3)
                                             + coeff.shape[2:]).expand_as(layer.spline_weight))
        layer.spline_scaler.uniform_(0.5, 2.0).mul_(torch.randint(0, 2, layer.spline_scaler.shape) * 2 - 1)


# ------------------------------------------------------------------------------------------------
# Nonlinearity scores
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", [0, 1])
def test_linear_phi_scores_zero(padding):
    layer = KANConv2d(2, 3, 3, padding=padding, grid_size=6)
    _set_spline(layer, lambda g: g)
    x = torch.rand(6, 2, 9, 9) * 1.9 - 0.95  # inside grid_range, and so is the padded 0
    scores = A.nonlinearity_scores(layer, x)
    assert scores["score"].shape == (3, 2, 3, 3)
    assert scores["score"].max() < 1e-6
    assert scores["summary"]["could_be_linear"] == 1.0
    assert scores["summary"]["pooled"] < 1e-6
    # The fitted slope is w_scale (phi(t) = w_scale * t), the intercept 0.
    np.testing.assert_allclose(scores["slope"], layer.spline_scaler.detach().double().numpy(), rtol=1e-5)
    np.testing.assert_allclose(scores["intercept"], 0.0, atol=1e-5)


@pytest.mark.parametrize("curve", [lambda g: torch.sin(3 * g), lambda g: g**2], ids=["sin3x", "square"])
def test_curved_phi_scores_high(curve):
    layer = KANConv2d(2, 3, 3, grid_size=6)
    _set_spline(layer, curve)
    x = torch.rand(6, 2, 9, 9) * 1.9 - 0.95
    scores = A.nonlinearity_scores(layer, x)
    assert scores["score"].min() > 0.1
    assert scores["summary"]["could_be_linear"] == 0.0


def test_constant_phi_scores_zero_and_dead():
    layer = KANLinear(4, 3)
    with torch.no_grad():
        layer.base_weight.zero_()
        layer.spline_weight.zero_()
        layer.spline_weight[0, 0] = 1.0  # one phi is alive (a partition of unity: constant 1 inside the grid)
        layer.spline_weight[1, 1] = torch.linspace(-1, 1, layer.spline_weight.shape[-1])
    scores = A.nonlinearity_scores(layer, torch.rand(100, 4) * 1.8 - 0.9)
    assert scores["score"].shape == (3, 4)
    assert np.all(scores["score"] < 1e-6)
    assert scores["summary"]["dead"] == pytest.approx(11 / 12)


def test_histograms_count_every_tap_value_with_padding():
    layer = KANConv2d(1, 1, 3, padding=1, stride=2)
    x = torch.ones(2, 1, 5, 5)
    hist = A.input_histograms(layer, x, bins=4)
    counts = hist["counts"]  # (1, 3, 3, 4) over [0, 1]: the padded zeros in bin 0, the pixels in bin 3
    assert counts.shape == (1, 3, 3, 4)
    assert torch.all(counts.sum(-1) == 2 * 3 * 3)  # every tap reads 3 x 3 output positions per image
    assert counts[0, 0, 0, 0] == 2 * 5  # top-left tap: first row and first column of outputs are padding
    assert counts[0, 1, 1, 0] == 0  # the centre tap never reads padding
    assert hist["edges"][0, 0] == 0 and hist["edges"][0, -1] == 1


def test_phi_atlas_shapes_and_channel_checks():
    layer = KANConv2d(4, 6, 3, groups=2, grid_size=5)
    x = torch.rand(3, 4, 8, 8) * 2 - 1
    atlas = A.phi_atlas(layer, x, out_channels=[0, 5], in_channels=[1], points=50)
    assert atlas["phi"].shape == (2, 1, 3, 3, 50)
    assert atlas["input_channel"].tolist() == [[1], [3]]  # out 5 is in the second group
    widths = np.diff(atlas["edges"][0, 0])
    assert (atlas["density"][0, 0, 1, 1] * widths).sum() == pytest.approx(1.0)
    with pytest.raises(A.InspectionError, match="out_channels"):
        A.phi_atlas(layer, x, out_channels=[6])


# ------------------------------------------------------------------------------------------------
# Effective kernel
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding,stride,dilation,position", [
    (0, 1, 1, (4, 4)),
    (1, 1, 1, (0, 0)),  # a corner: some taps read padding
    (1, 2, 1, (5, 3)),
    (2, 1, 2, (4, 6)),
])
def test_effective_kernel_is_the_slope(padding, stride, dilation, position):
    layer = KANConv2d(2, 3, 3, padding=padding, stride=stride, dilation=dilation, grid_size=5, dtype=torch.float64)
    with torch.no_grad():
        layer.spline_weight.normal_(0.0, 0.5)  # clearly curved phi, so slopes differ from tap to tap
    x = torch.rand(2, 9, 9, dtype=torch.float64) * 1.8 - 0.9
    k = A.effective_kernel(layer, x, position)
    y_o, x_o = k["output_position"]
    assert k["kernel"].shape == (3, 2, 3, 3)
    h = 1e-5
    checked = 0
    for u in range(3):
        for v in range(3):
            row, col = int(k["tap_rows"][u]), int(k["tap_cols"][v])
            if k["in_padding"][u, v]:
                assert not (0 <= row < 9 and 0 <= col < 9)
                continue
            for i in range(2):
                plus, minus = x.clone(), x.clone()
                plus[i, row, col] += h
                minus[i, row, col] -= h
                fd = (layer(plus)[:, y_o, x_o] - layer(minus)[:, y_o, x_o]) / (2 * h)
                np.testing.assert_allclose(k["kernel"][:, i, u, v], fd.detach().numpy(), atol=1e-7)
                checked += 1
    assert checked >= 8
    if padding and position == (0, 0):
        assert k["in_padding"][0].all() and k["in_padding"][:, 0].all() and not k["in_padding"][1:, 1:].any()


def test_effective_kernel_window_is_centred_on_the_position():
    layer = KANConv2d(1, 1, 3)
    k = A.effective_kernel(layer, torch.zeros(1, 28, 28), (14, 14))
    assert k["output_position"] == (13, 13)
    assert k["tap_rows"].tolist() == [13, 14, 15]
    assert A.layer_position((14, 14), (28, 28), (13, 13)) == (6, 6)


def test_effective_kernel_of_a_plain_convolution_is_its_weight():
    conv = nn.Conv2d(2, 4, 3)
    k = A.effective_kernel(conv, torch.randn(2, 10, 10), (5, 5))
    np.testing.assert_array_equal(k["kernel"], conv.weight.detach().double().numpy())

