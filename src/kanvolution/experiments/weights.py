"""Trained weights: the one loader for run folders, checkpoint files, ``.safetensors`` files and
the pretrained zoo shipped inside the package (``create_model(name, pretrained=True)``).

The pretrained zoo lives in ``pretrained/`` beside this file: one ``<tag>.safetensors`` per model
and grid size plus ``index.json``, which holds for every tag its recipe, the epoch the weights
come from, their test metrics, the file's SHA-256 and the predictions they make on the first
test images (so a test can check that loading gives the recorded model).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import KanvolutionError
from .checkpoint import CHECKPOINT_FILE, load_checkpoint
from .config import TrainConfig, build_model, resolved_grid_size
from .files import atomic_write, write_json

__all__ = [
    "PRETRAINED_DIR",
    "WeightsError",
    "describe_recipe",
    "list_pretrained",
    "load_pretrained",
    "load_run_model",
    "load_weights",
    "pretrained_tag",
    "read_state_dict",
    "save_pretrained",
]

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
INDEX_FILE = "index.json"
CHECK_IMAGES = 256  # test images whose predictions index.json records


class WeightsError(KanvolutionError, ValueError):
    """Weights that cannot be found, read or loaded into the model they are meant for."""


def pretrained_tag(name: str, grid_size: int | None = None) -> str:
    """The zoo's key of a model: ``"kanc_mlp_medium_gs10"``, or the name alone for a plain CNN."""
    return name if grid_size is None else f"{name}_gs{grid_size}"


def _index() -> dict[str, dict[str, Any]]:
    path = PRETRAINED_DIR / INDEX_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def list_pretrained() -> list[str]:
    """Tags of the weights shipped with the package, e.g. ``["cnn_medium", "kanc_mlp_medium_gs10"]``."""
    return sorted(_index())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(source: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The model weights held by ``source``: a ``.safetensors`` file, a ``checkpoint.pt`` or a run folder.

    Checkpoints are read with ``weights_only=True``; nothing is unpickled.

    Raises:
        WeightsError: the file does not exist or is not one of these.
        MissingCheckpointError, CorruptCheckpointError: a run folder's checkpoint cannot be used.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return load_checkpoint(path, map_location)["model"]
    if not path.is_file():
        raise WeightsError(f"no weights at {path}: expected a run folder, a {CHECKPOINT_FILE} or a .safetensors file")
    if path.suffix == ".safetensors":
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError:  # pragma: no cover - a dependency of the package
            raise WeightsError("reading .safetensors files needs the safetensors package: pip install safetensors") from None
        try:
            return load_file(path, device=str(map_location))
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"{path} is not a readable .safetensors file ({err})") from None
    return load_checkpoint(path.parent, map_location)["model"] if path.name == CHECKPOINT_FILE else _read_pt(path, map_location)


def _read_pt(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise WeightsError(f"{path} cannot be read as weights ({type(err).__name__}: {err})") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]  # a checkpoint saved under another name
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{path} holds no state dict of tensors")
    return data


def load_weights(model: nn.Module, source: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> nn.Module:
    """Load the weights of ``source`` (see :func:`read_state_dict`) into ``model``, strictly.

    Raises:
        WeightsError: they do not fit the model (missing or unexpected keys, other shapes).
    """
    state = read_state_dict(source, map_location)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise WeightsError(f"the weights in {source} do not fit this model: {detail}") from None
    return model


def load_run_model(run_dir: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a run's model from ``RUN_DIR/checkpoint.pt``, in eval mode with the trained weights.

    Returns:
        ``(model, checkpoint)``; ``checkpoint["config"]`` holds the run's resolved options.

    Raises:
        MissingCheckpointError, CorruptCheckpointError: no readable checkpoint.
        WeightsError: the checkpoint names no model of the zoo, or its weights do not fit.
    """
    checkpoint = load_checkpoint(run_dir, map_location)
    try:
        model = build_model(TrainConfig.from_dict(checkpoint["config"]))
    except (ValueError, TypeError) as err:
        raise WeightsError(f"{run_dir}: {err}") from None
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        raise WeightsError(f"{run_dir}: the checkpoint's weights do not fit its model ({str(err).splitlines()[0]})") from None
    return model.eval(), checkpoint


def load_pretrained(model: nn.Module, name: str, grid_size: int | None) -> dict[str, Any]:
    """Load the shipped weights of ``name`` at ``grid_size`` into ``model``; return their card.

    The file's SHA-256 is checked against the index before it is read.

    Raises:
        WeightsError: no shipped weights for this model and grid size (the message lists them),
            or a damaged file.
    """
    tag = pretrained_tag(name, grid_size)
    card = _index().get(tag)
    if card is None:
        shipped = ", ".join(list_pretrained()) or "none"
        raise WeightsError(f"no pretrained weights for {tag!r}; shipped: {shipped}")
    path = PRETRAINED_DIR / card["file"]
    if not path.is_file() or _sha256(path) != card["sha256"]:
        raise WeightsError(f"{path} is missing or damaged (SHA-256 differs from the index); reinstall kanvolution")
    load_weights(model, path)
    return {"tag": tag, **card}


def describe_recipe(config: TrainConfig, epoch: int) -> str:
    """How a run was trained, in one line (the card's ``recipe`` unless one is given)."""
    data = f"{config.max_train_samples} training images" if config.max_train_samples else "the whole training set"
    if config.val_fraction:
        data = f"{100 * (1 - config.val_fraction):g}% of {data}"
    schedule = "no schedule" if config.lr_schedule == "none" else f"{config.lr_schedule} schedule"
    return (f"{config.dataset}, {data}: AdamW lr {config.lr:g}, weight decay {config.weight_decay:g},"
            f" batch {config.batch_size}, {schedule}, {config.epochs} epochs, torch seed {config.seed};"
            f" weights of epoch {epoch}")


@torch.no_grad()
def _predictions(model: nn.Module, images: torch.Tensor) -> tuple[list[int], float]:
    out = model.eval()(images)
    return out.argmax(dim=1).tolist(), float(out.max(dim=1).values.double().mean())


def save_pretrained(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] = PRETRAINED_DIR,
    *,
    recipe: str | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Add a finished run's final weights to a pretrained folder (``.safetensors`` + ``index.json``).

    Args:
        run_dir: a finished run of ``kanvolution train`` (its ``checkpoint.pt`` and ``results.json``).
        out_dir: the folder; the package's own zoo by default.
        recipe: how the run was made, in words (the config is recorded as well).
        data_dir: where the run's test set is, for the recorded predictions.

    Returns:
        The card written to ``index.json`` for the run's tag.
    """
    from safetensors.torch import save

    from .data import load_dataset
    from .schema import load_results

    model, checkpoint = load_run_model(run_dir)
    config = TrainConfig.from_dict(checkpoint["config"])
    results = load_results(run_dir)
    last = results.get("test_last") or {}
    if last.get("epoch") != checkpoint["epoch"]:
        raise WeightsError(f"{run_dir}: results.json has no test metrics for the checkpoint's epoch {checkpoint['epoch']}")
    grid_size = resolved_grid_size(config)
    tag = pretrained_tag(config.model, grid_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{tag}.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: f.write(save(state)))
    images, _ = load_dataset(config.dataset, "test", data_dir or config.data_dir, download=False)
    predictions, mean_max_logp = _predictions(model, images[:CHECK_IMAGES])
    card = {
        "file": path.name,
        "sha256": _sha256(path),
        "model": config.model,
        "grid_size": grid_size,
        "name": results.get("name"),
        "dataset": config.dataset,
        "params": results.get("params"),
        "epochs": checkpoint["epoch"],
        "test_accuracy": last["accuracy"],
        "test_f1": last["f1"],
        "recipe": recipe or describe_recipe(config, checkpoint["epoch"]),
        "config": {k: v for k, v in checkpoint["config"].items() if k not in ("data_dir", "progress", "device")},
        "check": {"images": CHECK_IMAGES, "predictions": predictions, "mean_max_log_prob": mean_max_logp},
    }
    index_path = out / INDEX_FILE
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    index[tag] = card
    write_json(index_path, dict(sorted(index.items())))
    return card

