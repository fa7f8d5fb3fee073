"""Tests of kanvolution.inspection (the numbers) and kanvolution.plots (the pictures)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kanvolution import KANConv2d, KANLinear, kan_layers
from kanvolution import inspection as I
from kanvolution.models import create_model, list_models, model_info

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _greville(layer) -> torch.Tensor:
    """``(C, G + K)`` Greville abscissae of each input channel's knots: sum_g c_g B_g(t) = t with these c."""
    K = layer.spline_order
    knots = layer.grid
    n = knots.shape[1] - K - 1
    return torch.stack([knots[:, g + 1: g + K + 1].mean(1) for g in range(n)], dim=1)


def _set_spline(layer, coeff_of_greville) -> None:
    """phi = w_scale * sum_g f(greville_g) B_g with no base term, for every phi of the layer."""
    chan = I._channel_of_phi(layer)  # (out, in/groups)
    coeff = coeff_of_greville(_greville(layer))[chan]  # (out, in/groups, G+K)
    with torch.no_grad():
        layer.base_weight.zero_()
        layer.spline_weight.copy_(coeff.view(coeff.shape[:2] + (1,) * (layer.spline_weight.dim() - 3)
                                             + coeff.shape[2:]).expand_as(layer.spline_weight))
        layer.spline_scaler.uniform_(0.5, 2.0).mul_(torch.randint(0, 2, layer.spline_scaler.shape) * 2 - 1)


def _is_png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE


# ------------------------------------------------------------------------------------------------
# Nonlinearity scores
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", [0, 1])
def test_linear_phi_scores_zero(padding):
    layer = KANConv2d(2, 3, 3, padding=padding, grid_size=6)
    _set_spline(layer, lambda g: g)
    x = torch.rand(6, 2, 9, 9) * 1.9 - 0.95  # inside grid_range, and so is the padded 0
    scores = I.nonlinearity_scores(layer, x)
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
    scores = I.nonlinearity_scores(layer, x)
    assert scores["score"].min() > 0.1
    assert scores["summary"]["could_be_linear"] == 0.0


def test_constant_phi_scores_zero_and_dead():
    layer = KANLinear(4, 3)
    with torch.no_grad():
        layer.base_weight.zero_()
        layer.spline_weight.zero_()
        layer.spline_weight[0, 0] = 1.0  # one phi is alive (a partition of unity: constant 1 inside the grid)
        layer.spline_weight[1, 1] = torch.linspace(-1, 1, layer.spline_weight.shape[-1])
    scores = I.nonlinearity_scores(layer, torch.rand(100, 4) * 1.8 - 0.9)
    assert scores["score"].shape == (3, 4)
    assert np.all(scores["score"] < 1e-6)
    assert scores["summary"]["dead"] == pytest.approx(11 / 12)


def test_histograms_count_every_tap_value_with_padding():
    layer = KANConv2d(1, 1, 3, padding=1, stride=2)
    x = torch.ones(2, 1, 5, 5)
    hist = I.input_histograms(layer, x, bins=4)
    counts = hist["counts"]  # (1, 3, 3, 4) over [0, 1]: the padded zeros in bin 0, the pixels in bin 3
    assert counts.shape == (1, 3, 3, 4)
    assert torch.all(counts.sum(-1) == 2 * 3 * 3)  # every tap reads 3 x 3 output positions per image
    assert counts[0, 0, 0, 0] == 2 * 5  # top-left tap: first row and first column of outputs are padding
    assert counts[0, 1, 1, 0] == 0  # the centre tap never reads padding
    assert hist["edges"][0, 0] == 0 and hist["edges"][0, -1] == 1


def test_phi_atlas_shapes_and_channel_checks():
    layer = KANConv2d(4, 6, 3, groups=2, grid_size=5)
    x = torch.rand(3, 4, 8, 8) * 2 - 1
    atlas = I.phi_atlas(layer, x, out_channels=[0, 5], in_channels=[1], points=50)
    assert atlas["phi"].shape == (2, 1, 3, 3, 50)
    assert atlas["input_channel"].tolist() == [[1], [3]]  # out 5 is in the second group
    widths = np.diff(atlas["edges"][0, 0])
    assert (atlas["density"][0, 0, 1, 1] * widths).sum() == pytest.approx(1.0)
    with pytest.raises(I.InspectionError, match="out_channels"):
        I.phi_atlas(layer, x, out_channels=[6])


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
    k = I.effective_kernel(layer, x, position)
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
    k = I.effective_kernel(layer, torch.zeros(1, 28, 28), (14, 14))
    assert k["output_position"] == (13, 13)
    assert k["tap_rows"].tolist() == [13, 14, 15]
    assert I.layer_position((14, 14), (28, 28), (13, 13)) == (6, 6)


def test_effective_kernel_of_a_plain_convolution_is_its_weight():
    conv = nn.Conv2d(2, 4, 3)
    k = I.effective_kernel(conv, torch.randn(2, 10, 10), (5, 5))
    np.testing.assert_array_equal(k["kernel"], conv.weight.detach().double().numpy())


# ------------------------------------------------------------------------------------------------
# Pictures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plots():
    pytest.importorskip("matplotlib")
    from kanvolution import plots as P

    return P


def test_phi_atlas_picture(plots, tmp_path):
    layer = KANConv2d(3, 4, 3, padding=1, grid_size=5)
    atlas = I.phi_atlas(layer, torch.rand(4, 3, 8, 8) * 2 - 1, out_channels=[0, 3], in_channels=[0, 1, 2])
    fig = plots.plot_phi_atlas(atlas, title="test")
    assert plots.count_panels(fig, "phi") == 2 * 3 * 9
    path = plots.save(fig, tmp_path / "atlas.png")
    assert _is_png(path)


def test_nonlinearity_picture(plots, tmp_path):
    conv, dense = KANConv2d(2, 3, 3), KANLinear(5, 2)
    layers = {"conv": I.nonlinearity_scores(conv, torch.rand(2, 2, 6, 6)),
              "dense": I.nonlinearity_scores(dense, torch.rand(20, 5))}
    fig = plots.plot_nonlinearity(layers)
    assert plots.count_panels(fig, "heatmap") == 2
    heat = [ax for ax in fig.axes if ax.get_label() == "heatmap"]
    assert heat[0].images[0].get_array().shape == (3 * 3, 2 * 3)  # (out * kH) x (in * kW)
    assert heat[1].images[0].get_array().shape == (2, 5)
    assert _is_png(plots.save(fig, tmp_path / "nonlinearity.png"))


def test_feature_map_and_kernel_pictures(plots, tmp_path):
    images = np.random.rand(3, 1, 12, 12)
    fig = plots.plot_feature_maps(images, np.random.rand(3, 4, 10, 10), channels=[0, 1, 2, 5], labels=["a", "b", "c"])
    assert plots.count_panels(fig, "image") == 3 and plots.count_panels(fig, "map") == 12
    assert _is_png(plots.save(fig, tmp_path / "maps.png"))
    data = {"kernel": np.random.randn(2, 3, 3, 3), "out_channels": [0, 1], "in_index": [0, 1, 2],
            "image": images[0], "location": (6, 6), "in_padding": np.zeros((3, 3), bool)}
    fig = plots.plot_effective_kernel(data)
    assert plots.count_panels(fig, "kernel") == 6 and plots.count_panels(fig, "image") == 1
    assert _is_png(plots.save(fig, tmp_path / "kernel.png"))
    history = [{"epoch": e, "train_loss": 1 / e, "test_loss": 1.1 / e, "test_accuracy": 0.5 + e / 10} for e in (1, 2)]
    fig = plots.plot_learning_curves(history)
    assert plots.count_panels(fig, "curve") == 2


def test_inspect_model_without_a_run(plots, tmp_path):
    # A plain-convolution trunk and a dense KAN head: kernels are weights, only the head gets scores.
    model = create_model("conv_kan_small", grid_size=5)
    images = torch.rand(16, 1, 28, 28) * 2 - 1
    files, summary = I.inspect_model(model, images, tmp_path, examples=images[:2], location=(3, 20))
    assert set(summary["layers"]) == {"conv1", "conv2", "kan1"}
    assert "nonlinearity" in summary["layers"]["kan1"] and "nonlinearity" not in summary["layers"]["conv1"]
    assert summary["layers"]["conv1"]["effective_kernel"]["output_position"] == [2, 19]
    expected = {"nonlinearity.png", "nonlinearity.npz"} | {
        f"{kind}_{layer}.{ext}" for kind in ("feature_maps", "effective_kernel") for layer in ("conv1", "conv2")
        for ext in ("png", "npz")}
    assert set(files) == expected
    assert not any(name.startswith("phi_atlas") for name in files)
    kernel = np.load(files["effective_kernel_conv2.npz"])["kernel"]
    np.testing.assert_allclose(kernel, model.layers.conv2.weight.detach().numpy()[:, :4], rtol=1e-6)


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_can_be_inspected(name, tmp_path):
    model = create_model(name, grid_size=3) if model_info(name).has_kan else create_model(name)
    images = torch.rand(6, 1, 28, 28) * 2 - 1
    files, summary = I.inspect_model(model, images, tmp_path, examples=images[:1], plots=False)
    kan = [n for n, _ in kan_layers(model)]
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, KANConv2d))]
    assert set(summary["layers"]) == {n.removeprefix("layers.") for n in kan + convs}
    assert {f"effective_kernel_{n.removeprefix('layers.')}.npz" for n in convs} <= set(files)
    if kan:
        stored = np.load(files["nonlinearity.npz"])
        for n in kan:
            short = n.removeprefix("layers.")
            assert stored[f"{short}/score"].shape == dict(model.named_modules())[n].base_weight.shape
            assert 0.0 <= summary["layers"][short]["nonlinearity"]["pooled"] <= 1.0


def test_imports_and_data_only_mode_without_matplotlib(tmp_path):
    code = f"""
import sys
sys.modules["matplotlib"] = None  # as if it were not installed
import torch, kanvolution, kanvolution.models, kanvolution.inspection as I
model = kanvolution.models.create_model("kanc_mlp_small", grid_size=3)
files, _ = I.inspect_model(model, torch.rand(4, 1, 28, 28), {str(tmp_path)!r}, plots=False, layers=["conv2"])
expected = ["effective_kernel_conv2.npz", "feature_maps_conv2.npz", "nonlinearity.npz", "phi_atlas_conv2.npz"]
assert sorted(files) == expected, files
try:
    I.inspect_model(model, torch.rand(4, 1, 28, 28), {str(tmp_path)!r})
except ModuleNotFoundError as err:
    assert err.name == "matplotlib", err
else:
    raise AssertionError("pictures without matplotlib")
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_parse_indices():
    assert I.parse_indices(None) is None
    assert I.parse_indices(["0-2", "7", "4,5"]) == [0, 1, 2, 7, 4, 5]
    with pytest.raises(I.InspectionError):
        I.parse_indices(["3-1"])


# ------------------------------------------------------------------------------------------------
# End to end on a real (tiny) run
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_data_dir):
    from kanvolution.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(model="kanc_mlp_small", grid_size=5, dataset="fashion-mnist", data_dir=str(shared_data_dir),
                         download=False, epochs=1, batch_size=100, max_train_samples=1000, max_test_samples=200,
                         device="cpu", progress=False)
    train(config, out, log=None)
    return out


def test_inspect_command_writes_every_picture(plots, tiny_run, shared_data_dir, capsys):
    from kanvolution.cli import main

    out = tiny_run / "inspect"
    code = main(["inspect", str(tiny_run), "--data-dir", str(shared_data_dir), "--num-samples", "64",
                 "--images", "2", "--out-channels", "0-2", "--in-channels", "0", "1", "--no-download"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "conv1: 1-R^2 mean" in printed and "conv2: 1-R^2 mean" in printed
    pictures = {f"{kind}_{layer}" for kind in ("phi_atlas", "feature_maps", "effective_kernel")
                for layer in ("conv1", "conv2")} | {"nonlinearity"}
    for stem in pictures:
        assert _is_png(out / f"{stem}.png"), stem
        assert (out / f"{stem}.npz").is_file(), stem
    assert not (out / "learning_curves.png").exists()  # the trainer drew it already
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "kanc_mlp_small" and summary["epoch"] == 1
    assert summary["learning_curves"] == str(tiny_run / "learning_curves.png")
    assert summary["location"] == [14, 14] and len(summary["image_indices"]) == 2
    for layer in ("conv1", "conv2"):
        s = summary["layers"][layer]["nonlinearity"]
        assert 0 <= s["median"] <= s["max"] <= 1 and 0 <= s["could_be_linear"] <= 1
    atlas = np.load(out / "phi_atlas_conv2.npz")
    assert atlas["phi"].shape == (3, 2, 3, 3, I.DEFAULT_POINTS)
    assert np.load(out / "phi_atlas_conv1.npz")["phi"].shape[:2] == (3, 1)  # conv1 has one input channel


def test_inspect_run_draws_missing_learning_curves_and_other_layers(plots, tiny_run, shared_data_dir, tmp_path):
    from kanvolution.train import CURVES_FILE

    (tiny_run / CURVES_FILE).rename(tiny_run / "curves.bak")
    try:
        files = I.inspect_run(tiny_run, tmp_path, layers=["pool1", "layers.conv2"], num_samples=32, images=1,
                              image_indices=[5], location=(3, 25), data_dir=shared_data_dir, download=False)
    finally:
        (tiny_run / "curves.bak").rename(tiny_run / CURVES_FILE)
    assert {"learning_curves.png", "feature_maps_pool1.png", "phi_atlas_conv2.png", "summary.json"} <= set(files)
    assert "phi_atlas_conv1.png" not in files and "effective_kernel_pool1.png" not in files
    summary = json.loads(files["summary.json"].read_text())
    assert summary["image_indices"] == [5]
    assert summary["layers"]["conv2"]["effective_kernel"]["input_position"] == [1, 11]


def test_inspect_command_reports_bad_options(tiny_run, shared_data_dir, capsys):
    from kanvolution.cli import main

    code = main(["inspect", str(tiny_run), "--layers", "conv9", "--data-dir", str(shared_data_dir), "--no-download"])
    assert code == 2
    assert "conv9" in capsys.readouterr().err
    assert main(["inspect", str(tiny_run / "missing")]) == 1
