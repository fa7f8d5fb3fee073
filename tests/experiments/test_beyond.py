"""Tests of the small nets and the modern recipe: augmentation, warm-up + cosine, label smoothing,
validation selection, resume with the whole recipe, and the "beyond" protocol."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from kanvolution import KANConv2d
from kanvolution.experiments.checkpoint import load_checkpoint
from kanvolution.experiments.config import ConfigError
from kanvolution.experiments.data import augment_batch
from kanvolution.experiments.models import create_model, list_models
from kanvolution.experiments.reproduce import BEYOND_RECIPE, ReproduceConfig, reproduce
from kanvolution.experiments.training import count_parameters, smoothed_nll_loss, train, warmup_cosine

TIMING_KEYS = {"seconds", "train_seconds", "test_seconds", "val_seconds"}


def _untimed(history):
    return [{k: v for k, v in entry.items() if k not in TIMING_KEYS} for entry in history]


@pytest.fixture
def recipe(tiny):
    """A TrainConfig factory: the whole modern recipe on 512 training / 256 test images."""

    def make(**overrides):
        options = dict(epochs=3, lr_schedule="warmup-cosine", warmup_epochs=1, label_smoothing=0.1,
                       crop_padding=2, hflip=True, val_fraction=0.25)
        return tiny(**{**options, **overrides})

    return make


# ------------------------------------------------------------------------------------------------
# Models


BEYOND_PAIRS = [("kan_small_net", "cnn_small_net_matched"), ("kan_bottleneck_net", "cnn_bottleneck_net_matched"),
                ("kan_stem_bottleneck_net", "cnn_bottleneck_net_matched"),
                ("kan_early_bottleneck_net", "cnn_bottleneck_net_matched")]


@pytest.mark.parametrize("kan_name, cnn_name", BEYOND_PAIRS)
def test_small_nets_are_registered_with_matched_parameter_counts(kan_name, cnn_name):
    assert {kan_name, cnn_name} <= set(list_models())
    kan = count_parameters(create_model(kan_name))
    cnn = count_parameters(create_model(cnn_name))
    assert kan <= 100_000
    assert abs(cnn - kan) / kan <= 0.10, (kan, cnn)


@pytest.mark.parametrize("name", sorted({name for pair in BEYOND_PAIRS for name in pair}))
def test_small_nets_forward_and_backward(name):
    model = create_model(name)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    out = model(x)
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(4), atol=1e-5)  # log-probabilities
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_kan_small_net_layers_and_grid_ranges():
    model = create_model("kan_small_net", grid_size=3)
    convs = [m for m in model.modules() if isinstance(m, KANConv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 24, 28]
    assert all(c.grid_size == 3 and c.padding == (1, 1) for c in convs)
    assert [tuple(c.grid_range) for c in convs] == [(-1.0, 1.0)] + [(-2.0, 2.0)] * 3
    assert model.paper_name == "KAN small net (gs = 3)"
    # A BatchNorm feeds every KAN conv after the first.
    names = list(model.layers._modules)
    for index in (2, 3, 4):
        assert names[names.index(f"conv{index}") - 1] == f"bn{index - 1}"


def test_kan_bottleneck_net_has_no_fixed_activation_and_residual_blocks():
    from kanvolution.experiments.models import Bottleneck

    model = create_model("kan_bottleneck_net", grid_size=5)
    convs = [m for m in model.modules() if isinstance(m, KANConv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 24)] + [(15, 15)] * 4
    assert all(c.grid_size == 5 and c.padding == (1, 1) for c in convs)
    assert [tuple(c.grid_range) for c in convs] == [(-1.0, 1.0)] + [(-2.0, 2.0)] * 4
    inside_kan = {id(m) for conv in convs for m in conv.modules()}  # the phi's own SiLU base term
    activations = (torch.nn.ReLU, torch.nn.SiLU, torch.nn.GELU)
    assert not any(isinstance(m, activations) for m in model.modules() if id(m) not in inside_kan)
    assert model.paper_name == "KAN bottleneck net (gs = 5)"
    cnn = create_model("cnn_bottleneck_net_matched")
    assert sum(isinstance(m, Bottleneck) for m in model.modules()) == 4
    assert sum(isinstance(m, Bottleneck) for m in cnn.modules()) == 4
    # The residual path: a block whose body gives zero passes its input through.
    block = next(m for m in model.modules() if isinstance(m, Bottleneck))
    torch.nn.init.zeros_(block.body[-1].weight)
    x = torch.randn(2, 32, 14, 14)
    assert torch.equal(block.eval()(x), x)


def test_kan_stem_bottleneck_net_is_the_matched_cnn_with_a_kan_stem():
    model = create_model("kan_stem_bottleneck_net", grid_size=6)
    cnn = create_model("cnn_bottleneck_net_matched")
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, KANConv2d)]
    assert [name for name, _ in convs] == ["layers.conv1"]
    stem = convs[0][1]
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.padding) == (1, 24, (3, 3), (1, 1))
    assert stem.grid_size == 6 and tuple(stem.grid_range) == (-1.0, 1.0)
    assert model.paper_name == "KAN-stem bottleneck net (gs = 6)"
    # Everything after the stem is the CNN's: same module names, types and parameter shapes.
    after = lambda m: [(n, type(x).__name__) for n, x in m.named_modules() if n and not n.startswith("layers.conv1")]
    shapes = lambda m: {n: p.shape for n, p in m.named_parameters() if not n.startswith("layers.conv1.")}
    assert after(model) == after(cnn)
    assert shapes(model) == shapes(cnn)
    assert isinstance(cnn.layers.conv1, torch.nn.Conv2d)


def test_kan_early_bottleneck_net_has_kan_convs_at_28_and_14_pixels_only():
    model = create_model("kan_early_bottleneck_net", grid_size=5)
    kan = [name for name, m in model.named_modules() if isinstance(m, KANConv2d)]
    assert kan == ["layers.conv1", "layers.block2_1.body.2"]
    assert all(model.get_submodule(n).grid_size == 5 for n in kan)
    assert (model.layers.block2_1.body[2].in_channels, model.layers.block2_1.body[2].out_channels) == (15, 15)
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.layers.block2_1.modules())
    cnn = create_model("cnn_bottleneck_net_matched")
    for name in ("block3_1", "block3_2", "block4_1"):  # the CNN's blocks at 7x7 and 3x3
        assert [type(m) for m in model.layers.get_submodule(name).modules()] == \
            [type(m) for m in cnn.layers.get_submodule(name).modules()]
    assert isinstance(model.layers.relu1, torch.nn.ReLU)
    assert model.paper_name == "KAN-early bottleneck net (gs = 5)"


def test_default_grid_size_of_a_run_is_the_models_own(recipe):
    from kanvolution.experiments.config import resolved_grid_size

    assert resolved_grid_size(recipe(model="kan_small_net")) == 4
    assert resolved_grid_size(recipe(model="kanc_mlp_medium")) == 10
    assert resolved_grid_size(recipe(model="cnn_small_net_matched")) is None


# ------------------------------------------------------------------------------------------------
# Augmentation


def test_augment_crop_shapes_and_content():
    x = torch.randn(64, 1, 28, 28)
    out = augment_batch(x, crop_padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)
    # Every crop is the image shifted by at most 2 pixels, the uncovered border filled with -1.
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    for i in range(64):
        windows = [padded[i, :, dy : dy + 28, dx : dx + 28] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows), i


def test_augment_is_deterministic_with_a_seed():
    x = torch.randn(32, 3, 28, 28)
    a = augment_batch(x, crop_padding=2, hflip=True, generator=torch.Generator().manual_seed(5))
    b = augment_batch(x, crop_padding=2, hflip=True, generator=torch.Generator().manual_seed(5))
    c = augment_batch(x, crop_padding=2, hflip=True, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augment_flip_mirrors_about_half():
    x = torch.randn(400, 1, 28, 28)
    out = augment_batch(x, hflip=True, generator=torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped ^ kept).all())
    assert 150 < int(flipped.sum()) < 250
    assert augment_batch(x) is x


def test_augment_rejects_bad_input():
    with pytest.raises(ValueError, match="N, C, H, W"):
        augment_batch(torch.zeros(28, 28), crop_padding=2)
    with pytest.raises(ValueError, match="crop_padding"):
        augment_batch(torch.zeros(1, 1, 28, 28), crop_padding=-1)


def test_flip_is_for_fashion_mnist_only(recipe):
    recipe().validate()
    with pytest.raises(ConfigError, match="fashion-mnist only"):
        recipe(dataset="mnist").validate()
    recipe(dataset="mnist", hflip=False).validate()


# ------------------------------------------------------------------------------------------------
# Schedule and loss


def test_warmup_cosine_values():
    warmup, total = 10, 110
    factors = [warmup_cosine(s, warmup, total) for s in range(total + 1)]
    assert factors[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert factors[warmup] == 1.0
    assert factors[warmup + 50] == pytest.approx(0.5)
    assert factors[total] == pytest.approx(0.0, abs=1e-12)
    after = factors[warmup:]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert warmup_cosine(0, 0, 4) == 1.0  # no warm-up: cosine from the first step


def test_trainer_follows_the_schedule_per_step(recipe, tmp_path):
    config = recipe(epochs=3, warmup_epochs=1, crop_padding=0, hflip=False, label_smoothing=0.0)
    results = train(config, tmp_path, log=None)
    steps = math.ceil(384 / config.batch_size)  # 512 images less the 25% validation split
    lrs = [entry["lr"] for entry in results["history"]]
    # The lr after each epoch's last step: the factor of the next step.
    expected = [config.lr * warmup_cosine(e * steps, steps, 3 * steps) for e in (1, 2, 3)]
    assert lrs == pytest.approx(expected)


def test_label_smoothing_matches_cross_entropy_and_changes_the_loss():
    logits = torch.randn(16, 10)
    target = torch.randint(0, 10, (16,))
    log_probs = F.log_softmax(logits, dim=1)
    for s in (0.0, 0.1, 0.3):
        expected = F.cross_entropy(logits, target, label_smoothing=s)
        assert smoothed_nll_loss(log_probs, target, s) == pytest.approx(float(expected), rel=1e-6)
        summed = smoothed_nll_loss(log_probs, target, s, reduction="sum")
        assert float(summed) == pytest.approx(16 * float(expected), rel=1e-5)
    assert torch.equal(smoothed_nll_loss(log_probs, target), F.nll_loss(log_probs, target))
    # A confident, correct prediction costs more with smoothing.
    confident = F.log_softmax(torch.tensor([[10.0] + [0.0] * 9]), dim=1)
    assert smoothed_nll_loss(confident, torch.tensor([0]), 0.1) > smoothed_nll_loss(confident, torch.tensor([0]))


def test_recipe_options_are_checked(recipe):
    for bad, match in (
        (dict(warmup_epochs=3), "warmup_epochs"),
        (dict(lr_schedule="cosine"), "warmup-cosine"),
        (dict(label_smoothing=1.0), "label_smoothing"),
        (dict(crop_padding=-1), "crop_padding"),
        (dict(lr_schedule="linear"), "lr_schedule"),
    ):
        with pytest.raises(ConfigError, match=match):
            recipe(**bad).validate()


# ------------------------------------------------------------------------------------------------
# Training with the recipe


def test_validation_selects_the_best_validation_epoch(recipe, tmp_path):
    results = train(recipe(epochs=4), tmp_path, log=None)
    history = results["history"]
    val = [entry["val_accuracy"] for entry in history]
    best = val.index(max(val))
    selected = results["test_val_selected"]
    assert selected["selection"] == "best validation epoch"
    assert selected["epoch"] == best + 1
    assert selected["accuracy"] == history[best]["test_accuracy"]
    assert results["test_last"]["epoch"] == 4
    stored = json.loads((tmp_path / "results.json").read_text())["config"]
    for key in ("lr_schedule", "warmup_epochs", "label_smoothing", "crop_padding", "hflip", "val_fraction"):
        assert stored[key] == getattr(recipe(epochs=4), key), key


def test_recipe_run_resumes_bit_exactly(recipe, tmp_path):
    straight = train(recipe(), tmp_path / "straight", log=None)

    def stop(line):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(recipe(), tmp_path / "resumed", log=stop)
    resumed = train(recipe(), tmp_path / "resumed", resume=True, log=None)
    assert _untimed(resumed["history"]) == _untimed(straight["history"])
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_augmentation_changes_training(recipe, tmp_path):
    plain = train(recipe(epochs=1, warmup_epochs=0, crop_padding=0, hflip=False), tmp_path / "plain", log=None)
    augmented = train(recipe(epochs=1, warmup_epochs=0), tmp_path / "augmented", log=None)
    assert plain["history"][0]["train_loss"] != augmented["history"][0]["train_loss"]


def test_resume_refuses_another_recipe(recipe, tmp_path):
    train(recipe(epochs=1, lr_schedule="none", warmup_epochs=0), tmp_path, log=None)
    with pytest.raises(ConfigError, match="label_smoothing"):
        train(recipe(epochs=2, lr_schedule="none", warmup_epochs=0, label_smoothing=0.2), tmp_path, resume=True,
              log=None)


# ------------------------------------------------------------------------------------------------
# The study command


def test_beyond_protocol_runs_seeds_skips_finished_runs_and_writes_a_table(tmp_path, shared_data_dir):
    cfg = ReproduceConfig(
        out=str(tmp_path),
        dataset="mnist",
        models=["cnn_small", "kanc_mlp_small"],
        protocol="beyond",
        seeds=[0, 1],
        epochs=2,
        data_dir=str(shared_data_dir),
        download=False,
        max_train_samples=256,
        max_test_samples=128,
        progress=False,
    )
    lines: list[str] = []
    summary = reproduce(cfg, log=lines.append)
    assert sorted(summary["runs"]) == ["cnn_small", "kanc_mlp_small"]
    for tag in ("cnn_small", "kanc_mlp_small"):
        for seed in (0, 1):
            results = json.loads((tmp_path / tag / f"seed{seed}" / "results.json").read_text())
            config = results["config"]
            assert results["status"] == "finished" and config["seed"] == seed
            assert config["hflip"] is False  # digits
            for key, value in BEYOND_RECIPE.items():
                assert config[key] == value, key
            assert results["test_val_selected"]["selection"] == "best validation epoch"
    table = (tmp_path / "table.md").read_text()
    assert "Validation-selected epoch" in table and "Last epoch" in table
    assert "| KANC MLP (Small) (gs = 10) | 2 |" in table
    assert (tmp_path / "accuracy_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A rerun trains nothing.
    before = (tmp_path / "cnn_small" / "seed0" / "checkpoint.pt").stat().st_mtime_ns
    reproduce(cfg, log=lambda line: None)
    assert (tmp_path / "cnn_small" / "seed0" / "checkpoint.pt").stat().st_mtime_ns == before


def test_command_line_options_reach_the_run(tmp_path, shared_data_dir, capsys):
    from kanvolution.cli import main

    assert main(["models", "*small_net*"]) == 0
    assert "96,994 (gs = 4)" in capsys.readouterr().out
    out = tmp_path / "run"
    argv = ["train", "--model", "cnn_small", "--dataset", "fashion-mnist", "--out", str(out), "--epochs", "2",
            "--data-dir", str(shared_data_dir), "--no-download", "--max-train-samples", "256",
            "--max-test-samples", "128", "--val-fraction", "0.25", "--lr-schedule", "warmup-cosine",
            "--warmup-epochs", "1", "--label-smoothing", "0.1", "--crop-padding", "2", "--hflip"]
    assert main(argv) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["lr_schedule"], config["warmup_epochs"], config["label_smoothing"]) == ("warmup-cosine", 1, 0.1)
    assert (config["crop_padding"], config["hflip"], config["val_fraction"]) == (2, True, 0.25)


def test_grid_updates_move_the_knots_and_resume_exactly(recipe, tmp_path):
    from kanvolution.functional import uniform_knots

    def grids(run_dir):
        state = load_checkpoint(run_dir)["model"]
        return {k: v for k, v in state.items() if k.endswith(".grid")}

    options = dict(model="kanc_mlp_small", grid_size=3, epochs=2, max_train_samples=256, max_test_samples=64)
    train(recipe(**options), tmp_path / "plain", log=None)
    straight = train(recipe(grid_update_epochs=1, **options), tmp_path / "updated", log=None)
    plain, updated = grids(tmp_path / "plain"), grids(tmp_path / "updated")
    assert plain.keys() == updated.keys() and len(plain) == 2
    for key, grid in plain.items():
        assert torch.equal(grid, uniform_knots(3, 3, (-1.0, 1.0), channels=grid.shape[0]).to(grid)), key
        assert not torch.equal(updated[key], grid), key

    def stop(line):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(recipe(grid_update_epochs=1, **options), tmp_path / "resumed", log=stop)
    resumed = train(recipe(grid_update_epochs=1, **options), tmp_path / "resumed", resume=True, log=None)
    assert _untimed(resumed["history"]) == _untimed(straight["history"])
    for key, grid in grids(tmp_path / "resumed").items():
        assert torch.equal(grid, updated[key]), key


def test_grid_updates_need_kan_layers(recipe, tmp_path):
    with pytest.raises(ConfigError, match="no grids to update"):
        train(recipe(model="cnn_small", grid_update_epochs=1), tmp_path, log=None)
    with pytest.raises(ConfigError, match="grid_update_epochs"):
        recipe(grid_update_epochs=-1).validate()


def test_accuracy_vs_params_plot_groups_finished_runs(tmp_path):
    pytest.importorskip("matplotlib")
    from kanvolution.experiments import reproduce as R

    def run(folder, model, params, accuracy, status="finished"):
        folder.mkdir(parents=True)
        block = {"accuracy": accuracy, "precision": accuracy, "recall": accuracy, "f1": accuracy, "epoch": 3}
        (folder / "results.json").write_text(json.dumps({
            "model": model, "name": model, "dataset": "fashion-mnist", "params": params, "status": status,
            "history": [], "test_val_selected": block, "test_last": block, "test": block}))
        return folder

    runs = [run(tmp_path / "a" / f"seed{s}", "kan_small_net", 96994, 0.9 + s / 100) for s in range(2)]
    runs.append(run(tmp_path / "a" / "seed9", "kan_small_net", 96994, 0.1, status="failed"))
    zoo = [run(tmp_path / "zoo" / "seed0", "cnn_medium", 3020, 0.89)]
    points = R.plot_accuracy_vs_params(runs, tmp_path / "p.png", "fashion-mnist", zoo)
    assert list(points) == ["kan_small_net"]  # the zoo is drawn beside, not returned
    params, accuracies = points["kan_small_net"]
    assert params == 96994 and accuracies == pytest.approx([90.0, 91.0])  # the failed run left out
    assert (tmp_path / "p.png").stat().st_size > 1000
    # Only a failed run: nothing finished, no figure.
    assert R.plot_accuracy_vs_params(runs[2:], tmp_path / "q.png", "fashion-mnist") is None
    assert not (tmp_path / "q.png").exists()
