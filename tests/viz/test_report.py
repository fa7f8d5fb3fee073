"""Tests of kanvolution.viz.report: the report of a model and of a trained run, and `kanvolution inspect`."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from kanvolution import KANConv2d, kan_layers
from kanvolution.experiments.models import create_model, list_models, model_info
from kanvolution.viz import analysis as A
from kanvolution.viz import report as R


@pytest.fixture(scope="module")
def needs_matplotlib():
    pytest.importorskip("matplotlib")


def test_inspect_model_without_a_run(needs_matplotlib, tmp_path):
    # A plain-convolution trunk and a dense KAN head: kernels are weights, only the head gets scores.
    model = create_model("conv_kan_small", grid_size=5)
    images = torch.rand(16, 1, 28, 28) * 2 - 1
    files, summary = R.inspect_model(model, images, tmp_path, examples=images[:2], location=(3, 20))
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
    files, summary = R.inspect_model(model, images, tmp_path, examples=images[:1], plots=False)
    kan = [n for n, _ in kan_layers(model)]
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, KANConv2d))]
    assert set(summary["layers"]) == {n.removeprefix("layers.") for n in kan + convs}
    # Nested layers (the bottleneck nets' blocks) get file names with "_" for ".".
    assert {f"effective_kernel_{R._file_safe(n)}.npz" for n in convs} <= set(files)
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
import torch, kanvolution, kanvolution.experiments.models, kanvolution.viz.report as R
model = kanvolution.experiments.models.create_model("kanc_mlp_small", grid_size=3)
files, _ = R.inspect_model(model, torch.rand(4, 1, 28, 28), {str(tmp_path)!r}, plots=False, layers=["conv2"])
expected = ["effective_kernel_conv2.npz", "feature_maps_conv2.npz", "nonlinearity.npz", "phi_atlas_conv2.npz"]
assert sorted(files) == expected, files
try:
    R.inspect_model(model, torch.rand(4, 1, 28, 28), {str(tmp_path)!r})
except ModuleNotFoundError as err:
    assert err.name == "matplotlib", err
else:
    raise AssertionError("pictures without matplotlib")
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_parse_indices():
    assert R.parse_indices(None) is None
    assert R.parse_indices(["0-2", "7", "4,5"]) == [0, 1, 2, 7, 4, 5]
    with pytest.raises(A.InspectionError):
        R.parse_indices(["3-1"])


# ------------------------------------------------------------------------------------------------
# End to end on a real (tiny) run
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_data_dir):
    from kanvolution.experiments.config import TrainConfig
    from kanvolution.experiments.training import train

    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(model="kanc_mlp_small", grid_size=5, dataset="fashion-mnist", data_dir=str(shared_data_dir),
                         download=False, epochs=1, batch_size=100, max_train_samples=1000, max_test_samples=200,
                         device="cpu", progress=False)
    train(config, out, log=None)
    return out


def test_inspect_command_writes_every_picture(needs_matplotlib, tiny_run, shared_data_dir, capsys, is_png):
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
        assert is_png(out / f"{stem}.png"), stem
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
    assert atlas["phi"].shape == (3, 2, 3, 3, A.DEFAULT_POINTS)
    assert np.load(out / "phi_atlas_conv1.npz")["phi"].shape[:2] == (3, 1)  # conv1 has one input channel


def test_inspect_run_draws_missing_learning_curves_and_other_layers(needs_matplotlib, tiny_run, shared_data_dir, tmp_path):
    from kanvolution.experiments.schema import CURVES_FILE

    (tiny_run / CURVES_FILE).rename(tiny_run / "curves.bak")
    try:
        files = R.inspect_run(tiny_run, tmp_path, layers=["pool1", "layers.conv2"], num_samples=32, images=1,
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
    assert main(["inspect", str(tiny_run / "missing")]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err


@pytest.mark.parametrize("basis", ["relu"])
def test_inspect_model_with_another_basis_family(needs_matplotlib, tmp_path, basis):
    model = create_model("kanc_mlp_small", grid_size=4, basis=basis, degree=4)
    images = torch.rand(8, 1, 28, 28) * 2 - 1
    files, summary = R.inspect_model(model, images, tmp_path, examples=images[:1])
    assert {"conv1", "conv2"} <= set(summary["layers"])
    assert {"phi_atlas_conv1.png", "nonlinearity.png", "effective_kernel_conv2.png"} <= set(files)
    atlas = np.load(files["phi_atlas_conv2.npz"])
    assert np.isfinite(atlas["phi"]).all() and atlas["phi"].std() > 0
    lo, hi = atlas["grid_range"][..., 0], atlas["grid_range"][..., 1]
    assert (lo < hi).all()
