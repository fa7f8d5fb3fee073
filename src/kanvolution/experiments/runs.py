"""A finished run as a model: rebuilt from its checkpoint (for ``evaluate``, ``inspect`` and
``export``), and added to a pretrained folder as ``.safetensors`` with its card."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .config import TrainConfig, build_model, resolved_grid_size
from .files import atomic_write, write_json
from .weights import INDEX_FILE, PRETRAINED_DIR, WeightsError, file_sha256, pretrained_tag

__all__ = ["CHECK_IMAGES", "describe_recipe", "load_run_model", "pretrained_table", "save_pretrained"]

CHECK_IMAGES = 256  # test images whose predictions a card records
TABLE_FILE = "README.md"  # a pretrained folder's table of its cards


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
        "sha256": file_sha256(path),
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
    index = dict(sorted(index.items()))
    write_json(index_path, index)
    table = pretrained_table(index)
    atomic_write(out / TABLE_FILE, lambda f: f.write(table), mode="w")
    return card


def pretrained_table(index: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per card of a pretrained folder's ``index.json`` (written as its README)."""
    lines = [
        "# Pretrained weights",
        "",
        "Made with `kanvolution.experiments.runs.save_pretrained(run_dir)` from finished runs; loaded by",
        "`create_model(name, grid_size=..., pretrained=True)`. Test metrics are those of the epoch the weights come from.",
        "",
        "| tag | model | dataset | params | epochs | test accuracy | test F1 | recipe | SHA-256 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for tag, card in index.items():
        lines.append(
            f"| `{tag}` | {card['name']} | {card['dataset']} | {card['params']:,} | {card['epochs']} |"
            f" {100 * card['test_accuracy']:.2f}% | {100 * card['test_f1']:.2f}% | {card['recipe']} | `{card['sha256']}` |"
        )
    return "\n".join(lines) + "\n"

