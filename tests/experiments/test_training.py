"""Tests of kanvolution.experiments.training (and the config, checkpoint and schema it writes): results schema, checkpoints, resume, non-finite loss, DDP sharding."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from kanvolution.experiments import training as train_mod
from kanvolution.experiments.checkpoint import load_checkpoint
from kanvolution.experiments.config import ConfigError, TrainConfig
from kanvolution.experiments.schema import load_results
from kanvolution.experiments.training import (
    NonFiniteLossError,
    RunExistsError,
    classification_metrics,
    evaluate,
    train,
)

TIMING_KEYS = {"seconds", "train_seconds", "test_seconds", "val_seconds"}


def _untimed(history):
    return [{k: v for k, v in entry.items() if k not in TIMING_KEYS} for entry in history]


def test_results_schema(tiny, tmp_path):
    results = train(tiny(val_fraction=0.2), tmp_path, log=None)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for key in (
        "model",
        "grid_size",
        "dataset",
        "params",
        "config",
        "history",
        "test",
        "test_val_selected",
        "minutes_per_epoch",
        "environment",
    ):
        assert key in on_disk, key
    assert on_disk["model"] == "cnn_small" and on_disk["grid_size"] is None and on_disk["params"] == 1540
    assert on_disk["name"] == "CNN (Small)"
    assert on_disk["status"] == "finished"
    assert set(on_disk["config"]) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert [e["epoch"] for e in on_disk["history"]] == [1, 2]
    for entry in on_disk["history"]:
        for key in (
            "train_loss",
            "test_loss",
            "test_accuracy",
            "test_precision",
            "test_recall",
            "test_f1",
            "seconds",
            "val_loss",
            "val_accuracy",
            "val_precision",
            "val_recall",
            "val_f1",
        ):
            assert math.isfinite(entry[key]), key
        assert 0 <= entry["test_accuracy"] <= 1
    test = on_disk["test"]
    assert test["selection"] == "best test epoch (paper)"
    assert test["accuracy"] == max(e["test_accuracy"] for e in on_disk["history"])
    assert set(test) == {"epoch", "accuracy", "precision", "recall", "f1", "selection"}
    val_sel = on_disk["test_val_selected"]
    best_val = max(on_disk["history"], key=lambda e: e["val_accuracy"])
    assert val_sel["epoch"] == best_val["epoch"] and val_sel["accuracy"] == best_val["test_accuracy"]
    expected_minutes = sorted((e["train_seconds"] + e["test_seconds"]) / 60 for e in on_disk["history"])
    assert on_disk["minutes_per_epoch"] == pytest.approx(sum(expected_minutes) / 2)
    env = on_disk["environment"]
    for key in ("python", "torch", "numpy", "torchmetrics", "threads", "device", "platform"):
        assert env[key], key
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000


def test_checkpoint_loads_with_weights_only(tiny, tmp_path):
    train(tiny(epochs=1), tmp_path, log=None)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert isinstance(state["config"], dict) and state["config"]["model"] == "cnn_small"
    assert isinstance(state["rng"]["torch"], torch.Tensor) and isinstance(state["rng"]["shuffle"], torch.Tensor)
    assert set(state) >= {"model", "optimizer", "scheduler", "history", "config"}
    # The atomic write leaves no temporary file behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "checkpoint.pt", "learning_curves.png", "results.json"]


@pytest.mark.parametrize("schedule", ["none", "cosine"])
def test_resume_is_identical_to_a_straight_run(tiny, tmp_path, schedule):
    straight = train(tiny(lr_schedule=schedule, val_fraction=0.2), tmp_path / "straight", log=None)

    resumed_dir = tmp_path / "resumed"
    if schedule == "none":
        # Train one epoch, then ask for two: the run continues.
        train(tiny(lr_schedule=schedule, val_fraction=0.2, epochs=1), resumed_dir, log=None)
    else:
        # A schedule depends on the epoch count, so interrupt a two-epoch run after its first epoch.
        def stop(line):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            train(tiny(lr_schedule=schedule, val_fraction=0.2), resumed_dir, log=stop)
        assert load_checkpoint(resumed_dir)["epoch"] == 1
    resumed = train(tiny(lr_schedule=schedule, val_fraction=0.2), resumed_dir, resume=True, log=None)

    assert _untimed(resumed["history"]) == _untimed(straight["history"])
    assert resumed["test"] == straight["test"]
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(resumed_dir)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["rng"]["shuffle"], b["rng"]["shuffle"])


def test_resume_checks(tiny, tmp_path):
    train(tiny(epochs=1), tmp_path, log=None)
    with pytest.raises(RunExistsError):
        train(tiny(epochs=1), tmp_path, log=None)
    with pytest.raises(ConfigError, match="lr"):
        train(tiny(epochs=2, lr=0.5), tmp_path, resume=True, log=None)
    # A finished run is returned as is, without training again.
    before = (tmp_path / "checkpoint.pt").stat().st_mtime_ns
    lines = []
    results = train(tiny(epochs=1), tmp_path, resume=True, log=lines.append)
    assert results["status"] == "finished" and lines == []
    assert (tmp_path / "checkpoint.pt").stat().st_mtime_ns == before


def test_finished_results_without_checkpoint_are_kept(tiny, tmp_path):
    """A results folder kept without its checkpoints (as in results/) counts as finished for
    --resume; other options or more epochs refuse to overwrite it."""
    first = train(tiny(epochs=1), tmp_path, log=None)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (tmp_path / name).unlink(missing_ok=True)
    written = (tmp_path / "results.json").read_bytes()
    again = train(tiny(epochs=1), tmp_path, resume=True, log=None)
    assert again == first and (tmp_path / "results.json").read_bytes() == written
    assert not (tmp_path / "checkpoint.pt").exists()
    with pytest.raises(ConfigError, match="lr"):
        train(tiny(epochs=1, lr=0.5), tmp_path, resume=True, log=None)
    with pytest.raises(RunExistsError, match="no checkpoint"):
        train(tiny(epochs=2), tmp_path, resume=True, log=None)
    assert (tmp_path / "results.json").read_bytes() == written


class _NaNAfter(nn.Module):
    """Wraps a model; its output turns NaN after ``good_steps`` training forward passes."""

    def __init__(self, inner: nn.Module, good_steps: int) -> None:
        super().__init__()
        self.inner = inner
        self.good_steps = good_steps
        self.calls = 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls > self.good_steps:
                return out * float("nan")
        return out


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    build = train_mod.build_model
    # 512 images at batch 128: four steps an epoch, so the loss turns NaN in epoch 2.
    monkeypatch.setattr(train_mod, "build_model", lambda config: _NaNAfter(build(config), good_steps=5))
    with pytest.raises(NonFiniteLossError, match="epoch 2, step 2"):
        train(tiny(epochs=3), tmp_path, log=None)
    state = load_checkpoint(tmp_path)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    results = load_results(tmp_path)
    assert results["status"] == "failed" and "nan" in results["error"]
    assert len(results["history"]) == 1


def test_non_finite_loss_in_first_epoch_writes_no_checkpoint(tiny, tmp_path, monkeypatch):
    build = train_mod.build_model
    monkeypatch.setattr(train_mod, "build_model", lambda config: _NaNAfter(build(config), good_steps=0))
    with pytest.raises(NonFiniteLossError, match="no checkpoint"):
        train(tiny(), tmp_path, log=None)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_huge_learning_rate_is_reported(tiny, tmp_path):
    # lr 1e30 blows the weights up within a step or two; the run must stop, not go on with NaN.
    with pytest.raises(NonFiniteLossError):
        train(tiny(lr=1e30, epochs=3), tmp_path, log=None)


def test_evaluate_reproduces_the_last_epoch(tiny, tmp_path):
    results = train(tiny(), tmp_path, log=None)
    metrics = evaluate(tmp_path)
    last = results["history"][-1]
    assert metrics["epoch"] == 2 and metrics["test_samples"] == 256
    for key in ("loss", "accuracy", "precision", "recall", "f1"):
        assert metrics[key] == pytest.approx(last[f"test_{key}"], abs=1e-6), key


def test_kan_model_default_grid_size(tiny, tmp_path):
    results = train(
        tiny(model="kanc_mlp_small", epochs=1, max_train_samples=128, max_test_samples=64), tmp_path, log=None
    )
    assert results["grid_size"] == 10 and results["params"] == 5310
    assert results["name"] == "KANC MLP (Small) (gs = 10)"


def test_classification_metrics_macro_averages():
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 2, 0])
    m = classification_metrics(preds, target, num_classes=3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    precision = [1 / 2, 2 / 3, 1.0]
    recall = [1 / 2, 1.0, 1 / 2]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True)]
    assert m["precision"] == pytest.approx(sum(precision) / 3)
    assert m["recall"] == pytest.approx(sum(recall) / 3)
    assert m["f1"] == pytest.approx(sum(f1) / 3)


# --------------------------------------------------------------------------------------------
# bf16-mixed precision


@pytest.mark.parametrize("model", ["cnn_medium", "kanc_mlp_small"])
def test_bf16_mixed_tracks_float32_and_keeps_float32_states(tiny, tmp_path, model):
    runs = {}
    for precision in ("32", "bf16-mixed"):
        config = tiny(model=model, epochs=2, batch_size=64, precision=precision)
        runs[precision] = train(config, tmp_path / precision, log=None)
    full, mixed = runs["32"]["history"], runs["bf16-mixed"]["history"]
    assert runs["bf16-mixed"]["config"]["precision"] == "bf16-mixed"
    for a, b in zip(full, mixed):
        assert b["train_loss"] != a["train_loss"]  # autocast did change the arithmetic ...
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.03)  # ... but not the training
        assert b["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=0.05)
    state = load_checkpoint(tmp_path / "bf16-mixed")
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    moments = [s for per_param in state["optimizer"]["state"].values() for k, s in per_param.items() if k != "step"]
    assert moments and all(m.dtype == torch.float32 for m in moments)
