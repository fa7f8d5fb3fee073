"""The checkpoint of a run folder: written atomically after every epoch, the previous one kept.

``checkpoint.pt`` holds the model, optimiser, scheduler and RNG states, the history and the
resolved config; ``checkpoint.prev.pt`` is the one before it, so a checkpoint damaged after it
was written (a full disk, a copy cut short) costs one epoch, not the run. Both are plain data
and tensors, loaded with ``weights_only=True``.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import KanvolutionError
from .files import atomic_write

__all__ = [
    "CHECKPOINT_FILE",
    "PREVIOUS_CHECKPOINT_FILE",
    "CheckpointError",
    "CorruptCheckpointError",
    "MissingCheckpointError",
    "load_checkpoint",
    "load_checkpoint_for_resume",
    "save_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"
CHECKPOINT_FORMAT = 1
_REQUIRED = ("epoch", "model", "config")


class CheckpointError(KanvolutionError, OSError):
    """A run folder's checkpoint cannot be used."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """The run folder holds no checkpoint."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated, empty or not a checkpoint of ``kanvolution train``."""


def save_checkpoint(run_dir: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` as the folder's checkpoint; the one it replaces becomes ``checkpoint.prev.pt``."""
    folder = Path(run_dir)
    path = folder / CHECKPOINT_FILE
    tmp = folder / f".{CHECKPOINT_FILE}.new"
    atomic_write(tmp, lambda f: torch.save(state, f))
    if path.exists():
        os.replace(path, folder / PREVIOUS_CHECKPOINT_FILE)
    os.replace(tmp, path)


def _read(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (EOFError, OSError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        reason = "it is empty" if path.stat().st_size == 0 else f"it is truncated or damaged ({type(err).__name__})"
        raise CorruptCheckpointError(f"{path} cannot be read: {reason}") from None
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in _REQUIRED):
        raise CorruptCheckpointError(f"{path} is not a checkpoint of `kanvolution train`")
    return checkpoint


def _way_out(folder: Path, map_location: str | torch.device) -> str:
    previous = folder / PREVIOUS_CHECKPOINT_FILE
    try:
        epoch = _read(previous, map_location)["epoch"]
    except (CheckpointError, FileNotFoundError):
        return f"no earlier checkpoint is kept; `kanvolution train ... --out {folder} --restart` starts the run over"
    return (
        f"the checkpoint of epoch {epoch} is kept in {previous}: `kanvolution train ... --out {folder} --resume`"
        f" continues from it (or --restart starts over)"
    )


def load_checkpoint(run_dir: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint of a run folder, loaded with ``weights_only=True`` (plain data and tensors only).

    Raises:
        MissingCheckpointError: the folder holds no ``checkpoint.pt``.
        CorruptCheckpointError: it cannot be read; the message names the file and the way out.
    """
    folder = Path(run_dir)
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        raise MissingCheckpointError(f"no {CHECKPOINT_FILE} in {folder}")
    try:
        return _read(path, map_location)
    except CorruptCheckpointError as err:
        raise CorruptCheckpointError(f"{err}; {_way_out(folder, map_location)}") from None


def load_checkpoint_for_resume(
    run_dir: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any] | None, str | None]:
    """The newest readable checkpoint of a folder to resume from, and a note when it is the previous one.

    Returns:
        ``(checkpoint, note)``: ``(None, None)`` when the folder holds no checkpoint at all.

    Raises:
        CorruptCheckpointError: no checkpoint of the folder can be read.
    """
    folder = Path(run_dir)
    path, previous = folder / CHECKPOINT_FILE, folder / PREVIOUS_CHECKPOINT_FILE
    if not path.is_file() and not previous.is_file():
        return None, None
    problem = f"no {CHECKPOINT_FILE}"
    if path.is_file():
        try:
            return _read(path, map_location), None
        except CorruptCheckpointError as err:
            problem = str(err)
    try:
        checkpoint = _read(previous, map_location)
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{problem}; no earlier checkpoint is kept: --restart starts the run in {folder} over"
        ) from None
    except CorruptCheckpointError as err:
        raise CorruptCheckpointError(f"{problem}; {err}: --restart starts the run in {folder} over") from None
    return checkpoint, f"{problem}; continuing from {previous} (epoch {checkpoint['epoch']})"
