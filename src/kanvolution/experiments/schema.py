"""The ``results.json`` of a run folder: its one writer (:func:`build_results`) and its readers.

Fields (all kept from the first version of the format; readers accept files of every version):
``model``, ``name``, ``grid_size``, ``dataset``, ``params``, ``status``, ``epochs_completed``,
``config`` (the resolved :class:`~kanvolution.experiments.config.TrainConfig`), ``history`` (one
entry per epoch), ``test`` / ``test_val_selected`` / ``test_last`` (metric blocks of one epoch each),
``minutes_per_epoch`` (+ ``_note``), ``environment`` and, for a failed run, ``error``.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from ..errors import KanvolutionError
from .config import TrainConfig, display_name, resolved_grid_size
from .files import is_locked

__all__ = [
    "CURVES_FILE",
    "FAILED",
    "FINISHED",
    "KILLED",
    "RESULTS_FILE",
    "RUNNING",
    "SELECTION_LAST",
    "SELECTION_PAPER",
    "SELECTION_SEARCH",
    "SELECTION_VAL",
    "STATUSES",
    "ResultsError",
    "build_results",
    "load_results",
    "run_status",
]

RESULTS_FILE = "results.json"
CURVES_FILE = "learning_curves.png"

# The life of a run. A process that dies cannot write "killed": readers infer it from a
# "running" file whose folder lock nobody holds (see run_status).
RUNNING = "running"
FINISHED = "finished"
FAILED = "failed"  # stopped by an error (e.g. a non-finite loss); the file's "error" says which
KILLED = "killed"  # interrupted (Ctrl-C, SIGTERM) or died without a word
STATUSES = (RUNNING, FINISHED, FAILED, KILLED)

SELECTION_PAPER = "best test epoch (paper)"
SELECTION_VAL = "best validation epoch"
SELECTION_SEARCH = "epoch count chosen on the validation split by the search"
SELECTION_LAST = "last epoch"


class ResultsError(KanvolutionError, ValueError):
    """A ``results.json`` is missing or is not valid JSON."""


_METRIC_KEYS = ("accuracy", "precision", "recall", "f1")


def _block(entry: dict[str, Any], prefix: str, selection: str) -> dict[str, Any]:
    return {"epoch": entry["epoch"], **{k: entry[f"{prefix}_{k}"] for k in _METRIC_KEYS}, "selection": selection}


def _best_epoch(history: list[dict[str, Any]], key: str) -> dict[str, Any]:
    # First epoch holding the maximum, as numpy.argmax picks it.
    best = history[0]
    for entry in history[1:]:
        if entry[key] > best[key]:
            best = entry
    return best


def build_results(
    config: TrainConfig,
    params: int,
    history: list[dict[str, Any]],
    status: str,
    environment: dict[str, Any],
    train_size: int,
    test_size: int | None,
    error: str | None = None,
) -> dict[str, Any]:
    """The content of ``results.json`` for a run with ``history`` so far and ``status``."""
    grid_size = resolved_grid_size(config)
    results: dict[str, Any] = {
        "model": config.model,
        "name": display_name(config.model, grid_size),
        "grid_size": grid_size,
        "dataset": config.dataset,
        "params": params,
        "status": status,
        "epochs_completed": len(history),
        "config": config.to_dict(),
        "history": history,
        "test": None,
        "test_val_selected": None,
        "test_last": None,
        "minutes_per_epoch": None,
        "minutes_per_epoch_note": (
            f"median over this run's epochs of one training epoch on its {train_size} training images"
            f" plus one pass over its {test_size} test images, at batch size {config.batch_size}"
        ),
        "environment": environment,
    }
    if error is not None:
        results["error"] = error
    if history and config.eval_test:
        results["test"] = _block(_best_epoch(history, "test_accuracy"), "test", SELECTION_PAPER)
        results["test_last"] = _block(history[-1], "test", SELECTION_LAST)
        if config.selected_epoch is not None and config.selected_epoch <= len(history):
            results["test_val_selected"] = _block(history[config.selected_epoch - 1], "test", SELECTION_SEARCH)
        elif config.val_fraction > 0:
            results["test_val_selected"] = _block(_best_epoch(history, "val_accuracy"), "test", SELECTION_VAL)
        minutes = [(e["train_seconds"] + e["test_seconds"]) / 60 for e in history]
        results["minutes_per_epoch"] = statistics.median(minutes)
    return results


def load_results(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``results.json`` of a run folder (or that file itself).

    Raises:
        ResultsError: the file is missing or is not valid JSON, naming it.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"no {RESULTS_FILE} at {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path} is not valid JSON ({err}); it was cut short or edited") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path} holds no results object")
    return data


def _complete(results: dict[str, Any]) -> bool:
    epochs = (results.get("config") or {}).get("epochs")
    done = results.get("epochs_completed", len(results.get("history") or []))
    return epochs is not None and done >= epochs


def run_status(results: dict[str, Any], folder: str | os.PathLike[str] | None = None) -> str:
    """The status of a run, one of :data:`STATUSES`, from its results and (if given) its folder.

    A file without ``status`` is judged by its content (all epochs done: finished, else running);
    the former ``"stopped: ..."`` means failed. A ``"running"`` run whose folder lock nobody holds
    was killed. Folders written before run locks existed have no lock file and stay "running".

    Examples:
        >>> run_status({"status": "stopped: training loss became nan"})
        'failed'
        >>> run_status({"config": {"epochs": 2}, "epochs_completed": 2})
        'finished'
    """
    status = results.get("status")
    if status is None:
        status = FINISHED if _complete(results) else RUNNING
    elif status.startswith("stopped"):
        status = FAILED
    if status == RUNNING and folder is not None and is_locked(folder) is False:
        status = KILLED
    return status
