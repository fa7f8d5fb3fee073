"""The one weights loader: run folders, checkpoint files, .safetensors, and the shipped zoo."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from kanvolution.cli import main
from kanvolution.experiments import weights
from kanvolution.experiments.data import load_dataset
from kanvolution.experiments.models import create_model
from kanvolution.experiments.training import train
from kanvolution.experiments.runs import load_run_model, save_pretrained
from kanvolution.experiments.weights import WeightsError, list_pretrained

SHIPPED = list_pretrained()


def _index() -> dict:
    return json.loads((weights.PRETRAINED_DIR / weights.INDEX_FILE).read_text())


def _build_kwargs(card: dict) -> dict:
    return {} if card["grid_size"] is None else {"grid_size": card["grid_size"]}


def test_the_zoo_ships_weights():
    assert len(SHIPPED) >= 10
    table = (weights.PRETRAINED_DIR / "README.md").read_text()
    for tag, card in _index().items():
        assert f"| `{tag}` |" in table and card["sha256"] in table
        assert (weights.PRETRAINED_DIR / card["file"]).is_file()
        assert 0.8 < card["test_accuracy"] < 1.0
        assert card["recipe"] and card["epochs"] >= 1


@pytest.mark.parametrize("tag", SHIPPED)
def test_shipped_weights_reproduce_their_recorded_predictions(tag, shared_data_dir):
    card = _index()[tag]
    model = create_model(card["model"], pretrained=True, **_build_kwargs(card))
    assert model.pretrained_cfg["test_accuracy"] == card["test_accuracy"]
    assert model.pretrained_cfg["tag"] == tag
    assert not model.training
    images, _ = load_dataset(card["dataset"], "test", shared_data_dir, download=False)
    check = card["check"]
    with torch.no_grad():
        out = model(images[: check["images"]])
    assert out.argmax(dim=1).tolist() == check["predictions"]
    assert float(out.max(dim=1).values.double().mean()) == pytest.approx(check["mean_max_log_prob"], abs=1e-5)


def test_evaluate_pretrained_gives_the_recorded_accuracy(shared_data_dir, capsys):
    tag = "cnn_medium" if "cnn_medium" in SHIPPED else SHIPPED[0]
    card = _index()[tag]
    args = ["evaluate", "--pretrained", card["model"], "--data-dir", str(shared_data_dir), "--json"]
    if card["grid_size"] is not None:
        args += ["--grid-size", str(card["grid_size"])]
    assert main(args) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["test_samples"] == 10000
    assert metrics["accuracy"] == pytest.approx(card["test_accuracy"], abs=1e-6)
    assert metrics["epoch"] == card["epochs"]


def test_evaluate_needs_a_run_or_a_pretrained_name(capsys):
    assert main(["evaluate"]) == 2
    assert "RUN_DIR or --pretrained" in capsys.readouterr().err
    assert main(["evaluate", "--pretrained", "cnn_medium", "--grid-size", "10"]) == 2
    assert "no KAN layers" in capsys.readouterr().err


def test_unknown_pretrained_weights_name_what_is_shipped():
    with pytest.raises(WeightsError, match="no pretrained weights for 'kkan_small_gs7'.*shipped: "):
        create_model("kkan_small", grid_size=7, pretrained=True)


def test_pretrained_lookup_uses_the_models_own_default_grid_size(monkeypatch):
    asked = []
    monkeypatch.setattr(weights, "load_pretrained", lambda model, name, grid_size: asked.append(grid_size) or {})
    create_model("kan_small_net", pretrained=True)  # built at grid size 4 unless told otherwise
    create_model("kanc_mlp_medium", pretrained=True)
    create_model("kanc_mlp_medium", grid_size=20, pretrained=True)
    create_model("cnn_medium", pretrained=True)
    assert asked == [4, 10, 20, None]


def test_a_damaged_shipped_file_is_refused(tmp_path, monkeypatch):
    shutil.copytree(weights.PRETRAINED_DIR, tmp_path / "zoo")
    monkeypatch.setattr(weights, "PRETRAINED_DIR", tmp_path / "zoo")
    card = _index()[SHIPPED[0]]
    path = tmp_path / "zoo" / card["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="damaged"):
        create_model(card["model"], pretrained=True, **_build_kwargs(card))


def test_own_runs_load_through_the_same_loader(tiny, tmp_path):
    run = tmp_path / "run"
    train(tiny(epochs=1), run, log=None)
    model, checkpoint = load_run_model(run)
    reference = model.state_dict()
    card = save_pretrained(run, tmp_path / "zoo", recipe="a tiny test run")
    assert card["recipe"] == "a tiny test run" and card["epochs"] == 1
    for source in (run, run / "checkpoint.pt", tmp_path / "zoo" / card["file"]):
        loaded = create_model("cnn_small", checkpoint_path=source)
        assert loaded.pretrained_cfg == {"source": str(source)}
        for key, value in loaded.state_dict().items():
            torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    index = json.loads((tmp_path / "zoo" / "index.json").read_text())
    assert list(index) == ["cnn_small"] and len(index["cnn_small"]["check"]["predictions"]) == 256


def test_weights_of_another_model_are_refused(tiny, tmp_path):
    run = tmp_path / "run"
    train(tiny(epochs=1), run, log=None)
    with pytest.raises(WeightsError, match="do not fit this model"):
        create_model("cnn_medium", checkpoint_path=run)
    with pytest.raises(WeightsError, match="no weights at"):
        create_model("cnn_small", checkpoint_path=tmp_path / "nothing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable .safetensors file"):
        create_model("cnn_small", checkpoint_path=tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="not both"):
        create_model("cnn_small", pretrained=True, checkpoint_path=run)
