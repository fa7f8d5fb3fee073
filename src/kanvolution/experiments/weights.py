"""Trained weights: the one loader for run folders, checkpoint files, ``.safetensors`` files and
the pretrained zoo shipped inside the package (``create_model(name, pretrained=True)``);
:mod:`.runs` builds a run's model on it and adds runs to the zoo.

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

__all__ = [
    "PRETRAINED_DIR",
    "WeightsError",
    "file_sha256",
    "list_pretrained",
    "load_pretrained",
    "load_weights",
    "pretrained_tag",
    "read_state_dict",
]

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
INDEX_FILE = "index.json"


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


def file_sha256(path: Path) -> str:
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
    if not path.is_file() or file_sha256(path) != card["sha256"]:
        raise WeightsError(f"{path} is missing or damaged (SHA-256 differs from the index); reinstall kanvolution")
    load_weights(model, path)
    return {"tag": tag, **card}
