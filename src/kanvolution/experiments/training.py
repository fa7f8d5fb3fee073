"""Train and evaluate one model of the zoo on MNIST or Fashion-MNIST.

A run lives in one folder, held by one process at a time (:class:`~.files.RunLock`):
``checkpoint.pt`` (rewritten atomically after every epoch, the previous one kept as
``checkpoint.prev.pt``), ``results.json`` (:mod:`.schema`) and ``learning_curves.png``. Under
``torchrun`` with ``WORLD_SIZE > 1`` the same loop trains with DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KanvolutionError
from ..layers import update_grids
from .checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    PREVIOUS_CHECKPOINT_FILE,
    load_checkpoint_for_resume,
    save_checkpoint,
)
from .config import TrainConfig, build_model, check_resume, display_name, resolved_grid_size
from .data import augment_batch, iterate_batches, load_dataset, train_val_split
from .distributed import Dist, init_distributed, shard_batch
from .environment import environment
from .files import RunLock, write_json
from .schema import CURVES_FILE, FAILED, FINISHED, KILLED, RESULTS_FILE, RUNNING, build_results, load_results

__all__ = [
    "DeviceError",
    "NonFiniteLossError",
    "RunExistsError",
    "classification_metrics",
    "count_parameters",
    "evaluate",
    "evaluate_model",
    "resolve_device",
    "smoothed_nll_loss",
    "train",
    "warmup_cosine",
]

NUM_CLASSES = 10
GRID_UPDATE_SAMPLES = 1024  # the first training images, fed through the model to place the knots


class NonFiniteLossError(KanvolutionError, RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class RunExistsError(KanvolutionError, FileExistsError):
    """The output folder already holds a run and neither ``resume`` nor ``restart`` was asked for."""


class DeviceError(KanvolutionError, RuntimeError):
    """The requested device does not exist or is not available to this torch build."""


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers such as KAN grids are not counted, as in the paper)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Data


_DATA_CACHE: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def _load_split(config: TrainConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    # A search trains many models on the same arrays; keep the last few loaded sets in memory.
    key = (config.dataset, split, config.data_dir)
    if key not in _DATA_CACHE:
        if len(_DATA_CACHE) >= 4:
            _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
        _DATA_CACHE[key] = load_dataset(config.dataset, split, data_dir=config.data_dir, download=config.download)
    return _DATA_CACHE[key]


def _prepare_data(config: TrainConfig, need_train: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return the ``train``, ``test`` and (with a validation split) ``val`` tensors."""
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if need_train:
        images, labels = _load_split(config, "train")
        if config.max_train_samples is not None:
            images, labels = images[: config.max_train_samples], labels[: config.max_train_samples]
        if config.val_fraction > 0:
            train_idx, val_idx = train_val_split(len(labels), config.val_fraction, seed=config.split_seed)
            train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
            parts["train"] = (images[train_idx], labels[train_idx])
            parts["val"] = (images[val_idx], labels[val_idx])
        else:
            parts["train"] = (images, labels)
    if config.eval_test:
        images, labels = _load_split(config, "test")
        if config.max_test_samples is not None:
            images, labels = images[: config.max_test_samples], labels[: config.max_test_samples]
        parts["test"] = (images, labels)
    return parts


# --------------------------------------------------------------------------------------------
# Metrics and evaluation


def classification_metrics(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_CLASSES
) -> dict[str, float]:
    """Accuracy and macro (unweighted mean over classes) precision, recall and F1, as fractions."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    kwargs = {"num_classes": num_classes, "validate_args": False}
    return {
        "accuracy": float(multiclass_accuracy(preds, target, average="micro", **kwargs)),
        "precision": float(multiclass_precision(preds, target, average="macro", **kwargs)),
        "recall": float(multiclass_recall(preds, target, average="macro", **kwargs)),
        "f1": float(multiclass_f1_score(preds, target, average="macro", **kwargs)),
    }


@torch.no_grad()
def _evaluate_split(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device: torch.device,
    precision: str = "32",
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    preds = []
    for x, y in iterate_batches(images, labels, batch_size):
        with _autocast(precision, device):
            out = model(x.to(device))
        loss_sum += F.nll_loss(out, y.to(device), reduction="sum").double().cpu()
        preds.append(out.argmax(dim=1).cpu())
    model.train(was_training)
    metrics = classification_metrics(torch.cat(preds), labels)
    return {"loss": float(loss_sum) / len(labels), **metrics}


# --------------------------------------------------------------------------------------------
# Training


def smoothed_nll_loss(
    log_probs: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0, reduction: str = "mean"
) -> torch.Tensor:
    """Negative log-likelihood with label smoothing, on log-probabilities (the zoo's outputs).

    ``(1 - smoothing) * nll + smoothing * mean over classes of -log p``: the loss of
    ``F.cross_entropy(logits, target, label_smoothing=smoothing)``; exactly ``F.nll_loss`` at 0.

    Examples:
        >>> log_probs = torch.log(torch.tensor([[0.5, 0.5]]))
        >>> round(float(smoothed_nll_loss(log_probs, torch.tensor([0]), 0.1)), 4)
        0.6931
    """
    nll = F.nll_loss(log_probs, target, reduction=reduction)
    if smoothing == 0:
        return nll
    uniform = -log_probs.mean(dim=1)
    uniform = uniform.sum() if reduction == "sum" else uniform.mean()
    return (1 - smoothing) * nll + smoothing * uniform


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate factor of optimiser step ``step`` (0-based): linear warm-up, then cosine.

    Rises as ``(step + 1) / warmup_steps`` over the first ``warmup_steps`` steps, then falls
    from 1 along half a cosine to 0 at ``total_steps``.

    Examples:
        >>> [round(warmup_cosine(s, 2, 6), 3) for s in range(7)]
        [0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def resolve_device(name: str, dist: Dist | None = None) -> torch.device:
    """The device ``name`` ("auto", "cpu", "cuda", "cuda:1", ...) stands for, checked to be usable.

    Raises:
        DeviceError: an unknown name, or a device this machine or torch build does not have.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise DeviceError(f"device {name!r} is not available: {build}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} is not available: {torch.cuda.device_count()} CUDA device(s) visible")
        if device.index is None and dist is not None and dist.world_size > 1:
            device = torch.device("cuda", dist.local_rank)
    elif device.type != "cpu":
        raise DeviceError(f"device {name!r} is not supported; expected cpu, cuda, cuda:N or auto")
    return device


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    # bf16-mixed: the forward pass and the loss in bfloat16 where autocast deems it safe; the
    # parameters, their gradients and the optimiser states stay float32.
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _progress(iterable: Any, enabled: bool | None, dist: Dist, **kwargs: Any) -> Any:
    if enabled is None:
        enabled = sys.stderr.isatty()
    enabled = enabled and dist.is_main
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
    dist: Dist,
    epoch: int,
    step_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """One pass over the training images (augmented as ``config`` asks); returns the mean training loss.

    ``step_scheduler`` is stepped after every optimiser step.
    """
    model.train()
    loss_total = 0.0
    steps = math.ceil(len(labels) / config.batch_size)
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iterate_batches(
        images, labels, config.batch_size, shuffle=True, generator=generator
    )
    for step, (x, y) in enumerate(
        _progress(batches, config.progress, dist, total=steps, desc=f"epoch {epoch}/{config.epochs}")
    ):
        batch = len(y)
        if config.crop_padding or config.hflip:
            x = augment_batch(x, crop_padding=config.crop_padding, hflip=config.hflip, generator=generator)
        x, y = shard_batch(x, y, dist.rank, dist.world_size)
        with _autocast(config.precision, device):
            out = model(x.to(device))
            if dist.world_size == 1:
                loss = smoothed_nll_loss(out, y.to(device), config.label_smoothing)
                batch_loss = loss.detach().float() * batch
            else:
                # Sum over the shard, scaled so that DDP's gradient average is the gradient of the
                # mean over the whole batch even when shards differ in size.
                shard_sum = smoothed_nll_loss(out, y.to(device), config.label_smoothing, reduction="sum")
                loss = shard_sum * (dist.world_size / batch)
                batch_loss = shard_sum.detach().float().clone()
        if dist.world_size > 1:
            torch.distributed.all_reduce(batch_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = float(batch_loss)
        if not math.isfinite(value):
            # Checked before the step, so the weights in memory are still those of the last good step.
            raise NonFiniteLossError(f"training loss became {value} at epoch {epoch}, step {step + 1}")
        optimizer.step()
        if step_scheduler is not None:
            step_scheduler.step()
        loss_total += value
    return loss_total / len(labels)


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    restart: bool = False,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train ``config.model`` and write the run folder ``out_dir``; return the results dict.

    The folder is locked for the run's whole life: a second run into it fails at once.

    Args:
        config: every option of the run.
        out_dir: the run folder (created if needed).
        resume: continue from the folder's checkpoint when there is one (from
            ``checkpoint.prev.pt`` when ``checkpoint.pt`` is damaged; a finished run is returned
            as is).
        restart: delete the run the folder holds (checkpoints, results, curves) and start over.
        log: called with one line per epoch (``None`` = silent).

    Raises:
        RunExistsError: the folder holds a run and neither ``resume`` nor ``restart`` is set.
        RunFolderError: another process holds the folder, or it cannot be written.
        CorruptCheckpointError: ``resume`` found no readable checkpoint.
        DeviceError: the device is not available.
        NonFiniteLossError: the loss became NaN/inf; the checkpoint of the last good epoch and
            the results so far stay in ``out_dir``.

    Examples:
        >>> from kanvolution.experiments.config import TrainConfig
        >>> config = TrainConfig(model="cnn_small", epochs=1, max_train_samples=256)
        >>> results = train(config, "runs/quick")  # doctest: +SKIP
        >>> results["status"], results["epochs_completed"]  # doctest: +SKIP
        ('finished', 1)
    """
    config.validate()
    if resume and restart:
        raise RunExistsError("choose one of resume and restart, not both")
    resolved_grid_size(config)  # fail early on a grid size given to a CNN
    probe_device = resolve_device(config.device)
    out = Path(out_dir)
    dist = init_distributed(probe_device.type)
    try:
        device = resolve_device(config.device, dist)
        emit = log if log is not None and dist.is_main else (lambda line: None)
        # Only rank 0 writes, so only rank 0 holds the folder.
        with RunLock(out) if dist.is_main else contextlib.nullcontext():
            checkpoint, finished = _claim_folder(config, out, resume=resume, restart=restart, emit=emit)
            if finished is not None:
                return finished
            return _train(config, out, checkpoint, dist, device, emit)
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()


_RUN_FILES = (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE, RESULTS_FILE, CURVES_FILE)


def _claim_folder(
    config: TrainConfig, out: Path, *, resume: bool, restart: bool, emit: Callable[[str], None]
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """With the folder locked: ``(checkpoint to resume from or None, results of an already finished run or None)``."""
    existing = [name for name in _RUN_FILES if (out / name).exists()]
    if restart:
        for name in existing:
            (out / name).unlink()
        return None, None
    if not resume:
        if existing:
            raise RunExistsError(
                f"{out} already holds a run ({', '.join(existing)}); --resume continues it,"
                " --restart starts it over, or choose another output folder"
            )
        return None, None
    checkpoint, note = load_checkpoint_for_resume(out)
    if checkpoint is None:
        return None, _finished_without_checkpoint(config, out)
    if note:
        emit(note)
    check_resume(checkpoint["config"], config, checkpoint["epoch"])
    if (
        note is None
        and checkpoint["epoch"] >= config.epochs
        and checkpoint["config"].get("epochs") == config.epochs
        and (out / RESULTS_FILE).exists()
    ):
        results = load_results(out)
        if results.get("status") == FINISHED:
            return checkpoint, results
    return checkpoint, None


def _finished_without_checkpoint(config: TrainConfig, out: Path) -> dict[str, Any] | None:
    """The results of a finished run whose folder kept ``results.json`` but no checkpoint (a
    results folder copied or committed without its weights): returned as they are when they are a
    run of ``config``. A finished run of other options is never overwritten; an unfinished one
    (no checkpoint yet) starts over."""
    if not (out / RESULTS_FILE).exists():
        return None
    results = load_results(out)
    if results.get("status") != FINISHED:
        return None
    stored = results.get("config", {})
    check_resume(stored, config, results.get("epochs_completed", 0))
    if stored.get("epochs") != config.epochs:
        raise RunExistsError(
            f"{out} holds a finished run of {stored.get('epochs')} epochs and no checkpoint to continue it"
            f" to {config.epochs}; --restart starts it over, or choose another output folder"
        )
    return results


def _train(
    config: TrainConfig,
    out: Path,
    checkpoint: dict[str, Any] | None,
    dist: Dist,
    device: torch.device,
    emit: Callable[[str], None],
) -> dict[str, Any]:
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    # Imported up front so that their import time does not land in the first epoch's timing.
    import torchmetrics.functional.classification  # noqa: F401

    data = _prepare_data(config)
    train_images, train_labels = data["train"]

    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    params = count_parameters(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = None
    if config.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    elif config.lr_schedule == "warmup-cosine":
        steps = math.ceil(len(train_labels) / config.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, config.warmup_epochs * steps, config.epochs * steps)
        )
    step_scheduler = scheduler if config.lr_schedule == "warmup-cosine" else None
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []

    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None and checkpoint.get("scheduler") is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        rng = checkpoint["rng"]
        torch.set_rng_state(rng["torch"])
        generator.set_state(rng["shuffle"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
        history = list(checkpoint["history"])

    net: nn.Module = model
    if dist.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    env = environment(device, dist.world_size)
    test_size = len(data["test"][1]) if "test" in data else None
    title = f"{display_name(config.model, resolved_grid_size(config))} on {config.dataset}"

    def write(status: str, error: str | None = None) -> dict[str, Any]:
        results = build_results(config, params, history, status, env, len(train_labels), test_size, error)
        if dist.is_main:
            write_json(out / RESULTS_FILE, results)
        return results

    def checkpoint_epoch(epoch: int) -> None:
        if not dist.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "history": history,
            "rng": {
                "torch": torch.get_rng_state(),
                "shuffle": generator.get_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
            "config": config.to_dict(),
            "params": params,
        }
        save_checkpoint(out, state)

    write(RUNNING)
    try:
        for epoch in range(len(history) + 1, config.epochs + 1):
            started = time.perf_counter()
            train_loss = _train_epoch(
                net, optimizer, train_images, train_labels, config, generator, device, dist, epoch, step_scheduler
            )
            if scheduler is not None and step_scheduler is None:
                scheduler.step()
            if epoch <= config.grid_update_epochs:
                _update_grids(model, train_images[:GRID_UPDATE_SAMPLES], device)
            entry: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"]}
            entry["train_seconds"] = time.perf_counter() - started
            for split in ("test", "val"):
                if split in data:
                    t0 = time.perf_counter()
                    metrics = _evaluate_split(model, *data[split], config.eval_batch_size, device, config.precision)
                    entry.update({f"{split}_{k}": v for k, v in metrics.items()})
                    entry[f"{split}_seconds"] = time.perf_counter() - t0
            entry["seconds"] = time.perf_counter() - started
            history.append(entry)
            checkpoint_epoch(epoch)
            write(RUNNING if epoch < config.epochs else FINISHED)
            if dist.is_main:
                emit(_epoch_line(entry, config.epochs))
    except NonFiniteLossError as err:
        write(FAILED, str(err))
        kept = (
            f"the checkpoint of epoch {len(history)} is kept"
            if history
            else "no epoch finished, so no checkpoint was written"
        )
        raise NonFiniteLossError(f"{err} (lr={config.lr:g}); {kept} in {out}") from None
    except KeyboardInterrupt:
        write(KILLED, "interrupted")
        raise
    except Exception as err:
        write(FAILED, f"{type(err).__name__}: {err}")
        raise
    finally:
        if dist.is_main and history:
            _draw_curves(out / CURVES_FILE, history, title)
    return write(FINISHED)


@torch.no_grad()
def _update_grids(model: nn.Module, images: torch.Tensor, device: torch.device) -> None:
    """Adapt every KAN layer's knots to the inputs ``images`` bring it (BatchNorm in eval mode)."""
    was_training = model.training
    model.eval()
    update_grids(model, images.to(device))
    model.train(was_training)


def _draw_curves(path: Path, history: list[dict[str, Any]], title: str) -> None:
    try:
        from ..viz.plots import plot_learning_curves, save
    except ImportError:  # matplotlib is optional
        return
    save(plot_learning_curves(history, title), path)





def _epoch_line(entry: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {entry['epoch']}/{epochs}", f"train loss {entry['train_loss']:.4f}"]
    for split in ("val", "test"):
        if f"{split}_accuracy" in entry:
            parts.append(f"{split} loss {entry[f'{split}_loss']:.4f} acc {100 * entry[f'{split}_accuracy']:.2f}%")
    parts.append(f"{entry['seconds']:.1f} s")
    return "  ".join(parts)


def evaluate(
    run_dir: str | os.PathLike[str],
    *,
    data_dir: str | None = None,
    device: str | None = None,
    max_test_samples: int | None = None,
) -> dict[str, Any]:
    """Re-evaluate the weights in ``run_dir/checkpoint.pt`` on the test set.

    Args:
        run_dir: a run folder written by :func:`train`.
        data_dir: where the data lives, if not where the run found it.
        device: overrides the run's device.
        max_test_samples: overrides the run's test subsample (``None`` keeps the run's).

    Raises:
        MissingCheckpointError, CorruptCheckpointError: no readable ``checkpoint.pt``.
        DeviceError: the device is not available.

    Returns:
        ``{"epoch", "loss", "accuracy", "precision", "recall", "f1", "test_samples"}``, metrics as
        fractions. For the epoch the checkpoint holds they equal that epoch's history entry.
    """
    from .runs import load_run_model

    model, checkpoint = load_run_model(run_dir)
    config = TrainConfig.from_dict(checkpoint["config"])
    config.eval_test = True
    if data_dir is not None:
        config.data_dir = data_dir
    if device is not None:
        config.device = device
    if max_test_samples is not None:
        config.max_test_samples = max_test_samples
    return {"epoch": checkpoint["epoch"], **evaluate_model(model, config)}


def evaluate_model(model: nn.Module, config: TrainConfig) -> dict[str, Any]:
    """Test metrics of ``model`` on the test set that ``config`` names (its dataset, data folder,
    device, precision, evaluation batch size and ``max_test_samples``).

    Returns:
        ``{"loss", "accuracy", "precision", "recall", "f1", "test_samples"}``, metrics as fractions.
    """
    dev = resolve_device(config.device)
    config = TrainConfig.from_dict({**config.to_dict(), "eval_test": True})
    images, labels = _prepare_data(config, need_train=False)["test"]
    metrics = _evaluate_split(model.to(dev), images, labels, config.eval_batch_size, dev, config.precision)
    return {**metrics, "test_samples": len(labels)}
