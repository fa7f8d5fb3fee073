"""Train and evaluate one model of the zoo on MNIST or Fashion-MNIST.

A run lives in one folder: ``checkpoint.pt`` (rewritten atomically after every epoch, so a run
can be resumed), ``results.json`` (config, per-epoch history, metrics, environment) and
``learning_curves.png``. Under ``torchrun`` with ``WORLD_SIZE > 1`` the same loop trains with
DistributedDataParallel.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CHECKPOINT_FILE",
    "CURVES_FILE",
    "DEFAULT_GRID_SIZE",
    "RESULTS_FILE",
    "ConfigError",
    "NonFiniteLossError",
    "RunExistsError",
    "TrainConfig",
    "classification_metrics",
    "count_parameters",
    "evaluate",
    "load_checkpoint",
    "load_results",
    "model_takes_grid_size",
    "shard_batch",
    "train",
]

CHECKPOINT_FILE = "checkpoint.pt"
RESULTS_FILE = "results.json"
CURVES_FILE = "learning_curves.png"
NUM_CLASSES = 10
DEFAULT_GRID_SIZE = 10  # the smaller of the paper's two grids
_CHECKPOINT_FORMAT = 1

SELECTION_PAPER = "best test epoch (paper)"
SELECTION_VAL = "best validation epoch"
SELECTION_SEARCH = "epoch count chosen on the validation split by the search"
SELECTION_LAST = "last epoch"


class ConfigError(ValueError):
    """A training option is out of range or does not fit the checkpoint being resumed."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class RunExistsError(FileExistsError):
    """The output folder already holds a run and ``resume`` was not asked for."""


@dataclass
class TrainConfig:
    """Every option of a training run; stored as plain data in the checkpoint and results."""

    model: str = "kanc_mlp_medium"  # a name from kanvolution.models.list_models()
    grid_size: int | None = None  # KAN grid intervals; None = 10 for KAN models, must stay None for CNNs
    dataset: str = "fashion-mnist"  # "mnist" or "fashion-mnist"
    data_dir: str | None = None  # None = kanvolution.data's default folder
    download: bool = True  # fetch missing files (needs internet)
    epochs: int = 20  # the paper's search trains up to 20 epochs
    batch_size: int = 128  # the paper's timing batch; its search draws from {32, 64, 128}
    eval_batch_size: int = 512  # only affects speed and memory, never the metrics
    lr: float = 1e-3  # AdamW learning rate; the paper's grid is {1e-4, 5e-4, 1e-3}
    weight_decay: float = 1e-4  # top of the paper's grid {0, 1e-5, 1e-4}; AdamW's own 1e-2 is far above it
    lr_schedule: Literal["none", "cosine"] = "none"  # "none" as in the paper; "cosine" anneals to 0 over `epochs`
    seed: int = 0  # torch seed for initialisation and shuffling; the paper's final runs use 0
    val_fraction: float = 0.0  # 0 = train on the whole training set; >0 = hold this part out (paper: 0.2)
    split_seed: int = 0  # generator seed of the train/validation split (the paper's random_split uses 0)
    eval_test: bool = True  # evaluate on the test set after every epoch; a search turns it off
    selected_epoch: int | None = None  # an epoch chosen on validation elsewhere; reported as test_val_selected
    max_train_samples: int | None = None  # keep only the first N training images (quick runs, tests)
    max_test_samples: int | None = None  # keep only the first N test images
    device: str = "auto"  # "auto" = cuda when available, else cpu (bit-exact reruns are promised on cpu only)
    num_threads: int | None = None  # torch.set_num_threads; None = torch's default
    progress: bool | None = None  # tqdm bars; None = only when stderr is a terminal

    def validate(self) -> None:
        """Raise :class:`ConfigError` for an option that cannot work."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size}
        for key, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        for key in ("max_train_samples", "max_test_samples", "num_threads", "grid_size", "selected_epoch"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{key} must be a positive integer or None, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"weight_decay must be a non-negative number, got {self.weight_decay!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.lr_schedule not in ("none", "cosine"):
            raise ConfigError(f"lr_schedule must be 'none' or 'cosine', got {self.lr_schedule!r}")
        if not self.eval_test and self.val_fraction == 0:
            raise ConfigError("a run that skips the test set needs a validation split (val_fraction > 0)")
        if self.selected_epoch is not None and self.selected_epoch > self.epochs:
            raise ConfigError(f"selected_epoch {self.selected_epoch} is beyond epochs {self.epochs}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# Options that change what a run computes: a resumed run must keep them. `epochs` may grow
# unless a schedule depends on it.
_RESUME_MUST_MATCH = (
    "model",
    "grid_size",
    "dataset",
    "batch_size",
    "lr",
    "weight_decay",
    "lr_schedule",
    "seed",
    "val_fraction",
    "split_seed",
    "eval_test",
    "max_train_samples",
    "max_test_samples",
)


# --------------------------------------------------------------------------------------------
# Models


def model_takes_grid_size(name: str) -> bool:
    """Whether the zoo model ``name`` has KAN layers (and so a ``grid_size`` argument)."""
    from kanvolution.models import model_info

    return model_info(name).has_kan


def _resolved_grid_size(config: TrainConfig) -> int | None:
    if model_takes_grid_size(config.model):
        return config.grid_size if config.grid_size is not None else DEFAULT_GRID_SIZE
    if config.grid_size is not None:
        raise ConfigError(f"model {config.model!r} has no KAN layers, so it takes no grid size")
    return None


def _build_model(config: TrainConfig) -> nn.Module:
    from kanvolution.models import create_model

    grid_size = _resolved_grid_size(config)
    return create_model(config.model) if grid_size is None else create_model(config.model, grid_size=grid_size)


def _display_name(model: str, grid_size: int | None) -> str:
    from kanvolution.models import model_info

    info = model_info(model)
    return info.paper_name(grid_size) if grid_size is not None else info.paper_name()


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers such as KAN grids are not counted, as in the paper)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Data


_DATA_CACHE: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def _load_split(config: TrainConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    # A search trains many models on the same arrays; keep the last few loaded sets in memory.
    from kanvolution.data import load_dataset

    key = (config.dataset, split, config.data_dir)
    if key not in _DATA_CACHE:
        if len(_DATA_CACHE) >= 4:
            _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
        _DATA_CACHE[key] = load_dataset(config.dataset, split, data_dir=config.data_dir, download=config.download)
    return _DATA_CACHE[key]


def _prepare_data(config: TrainConfig, need_train: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return the ``train``, ``test`` and (with a validation split) ``val`` tensors."""
    from kanvolution.data import train_val_split

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
# Distributed training (torchrun)


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we called init_process_group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_kind: str) -> _Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Dist()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def shard_batch(x: torch.Tensor, y: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of a batch: every ``world_size``-th sample starting at ``rank``.

    Every rank draws the same permutation (same seed), so the shards of one batch are disjoint
    and together are exactly the batch a single process would train on.
    """
    if world_size == 1:
        return x, y
    return x[rank::world_size], y[rank::world_size]


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
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device
) -> dict[str, float]:
    from kanvolution.data import iterate_batches

    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    preds = []
    for x, y in iterate_batches(images, labels, batch_size):
        out = model(x.to(device))
        loss_sum += F.nll_loss(out, y.to(device), reduction="sum").double().cpu()
        preds.append(out.argmax(dim=1).cpu())
    model.train(was_training)
    metrics = classification_metrics(torch.cat(preds), labels)
    return {"loss": float(loss_sum) / len(labels), **metrics}


# --------------------------------------------------------------------------------------------
# Files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through ``write(file)`` to a temporary file beside ``path``, then rename over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(data, indent=2) + "\n"), mode="w")


def load_results(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``results.json`` of a run folder."""
    return json.loads((Path(run_dir) / RESULTS_FILE).read_text())


def load_checkpoint(run_dir: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint of a run folder, loaded with ``weights_only=True`` (plain data and tensors only)."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def _environment(device: torch.device, dist: _Dist) -> dict[str, Any]:
    import numpy

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torchmetrics": _version_of("torchmetrics"),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "world_size": dist.world_size,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _version_of(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------
# Results


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


def _build_results(
    config: TrainConfig,
    params: int,
    history: list[dict[str, Any]],
    status: str,
    environment: dict[str, Any],
    train_size: int,
    test_size: int | None,
) -> dict[str, Any]:
    grid_size = _resolved_grid_size(config)
    results: dict[str, Any] = {
        "model": config.model,
        "name": _display_name(config.model, grid_size),
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


def _plot_curves(path: Path, history: list[dict[str, Any]], title: str) -> None:
    # Figure + Agg canvas directly: no pyplot, so the user's matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [e["epoch"] for e in history]
    colors = {"train": "C0", "test": "C1", "val": "C2"}
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [e["train_loss"] for e in history], marker="o", color=colors["train"], label="train")
    for split in ("test", "val"):
        if f"{split}_loss" in history[0]:
            ax_loss.plot(epochs, [e[f"{split}_loss"] for e in history], marker="o", color=colors[split], label=split)
            ax_acc.plot(
                epochs, [100 * e[f"{split}_accuracy"] for e in history], marker="o", color=colors[split], label=split
            )
    ax_loss.set(xlabel="epoch", ylabel="NLL loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


# --------------------------------------------------------------------------------------------
# Training


def _resolve_device(name: str, dist: _Dist | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and dist is not None and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    return device


def _check_resume(stored: dict[str, Any], config: TrainConfig, done: int) -> None:
    for key in _RESUME_MUST_MATCH:
        if stored.get(key) != getattr(config, key):
            raise ConfigError(
                f"cannot resume: the checkpoint has {key}={stored.get(key)!r},"
                f" the new options {key}={getattr(config, key)!r}"
            )
    if config.epochs != stored.get("epochs") and config.lr_schedule != "none":
        raise ConfigError("cannot change epochs when resuming a run with an LR schedule that depends on it")
    if config.epochs < done:
        raise ConfigError(
            f"cannot resume: the checkpoint already holds {done} epochs, more than epochs={config.epochs}"
        )


def _progress(iterable: Any, enabled: bool | None, dist: _Dist, **kwargs: Any) -> Any:
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
    dist: _Dist,
    epoch: int,
) -> float:
    """One pass over the training images; returns the mean training loss."""
    from kanvolution.data import iterate_batches

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
        x, y = shard_batch(x, y, dist.rank, dist.world_size)
        out = model(x.to(device))
        if dist.world_size == 1:
            loss = F.nll_loss(out, y.to(device))
            batch_loss = loss.detach() * batch
        else:
            # Sum over the shard, scaled so that DDP's gradient average is the gradient of the
            # mean over the whole batch even when shards differ in size.
            shard_sum = F.nll_loss(out, y.to(device), reduction="sum")
            loss = shard_sum * (dist.world_size / batch)
            batch_loss = shard_sum.detach().clone()
            torch.distributed.all_reduce(batch_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = float(batch_loss)
        if not math.isfinite(value):
            # Checked before the step, so the weights in memory are still those of the last good step.
            raise NonFiniteLossError(f"training loss became {value} at epoch {epoch}, step {step + 1}")
        optimizer.step()
        loss_total += value
    return loss_total / len(labels)


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train ``config.model`` and write the run folder ``out_dir``; return the results dict.

    Args:
        config: every option of the run.
        out_dir: the run folder (created if needed).
        resume: continue from ``out_dir/checkpoint.pt`` when it exists (a finished run is returned
            as is); without it, an existing checkpoint raises :class:`RunExistsError`.
        log: called with one line per epoch (``None`` = silent).

    Raises:
        NonFiniteLossError: the loss became NaN/inf; the checkpoint of the last good epoch and
            the results so far stay in ``out_dir``.
    """
    config.validate()
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT_FILE
    checkpoint = None
    if ckpt_path.exists():
        if not resume:
            raise RunExistsError(f"{out} already holds a run; resume it or choose another output folder")
        checkpoint = load_checkpoint(out)
        _check_resume(checkpoint["config"], config, checkpoint["epoch"])
        if (
            checkpoint["epoch"] >= config.epochs
            and checkpoint["config"].get("epochs") == config.epochs
            and (out / RESULTS_FILE).exists()
        ):
            results = load_results(out)
            if results.get("status") == "finished":
                return results
    _resolved_grid_size(config)  # fail early on a grid size given to a CNN

    emit = log if log is not None else (lambda line: None)
    probe_device = _resolve_device(config.device)
    dist = _init_distributed(probe_device.type)
    try:
        return _train(config, out, checkpoint, dist, _resolve_device(config.device, dist), emit)
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()


def _train(
    config: TrainConfig,
    out: Path,
    checkpoint: dict[str, Any] | None,
    dist: _Dist,
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
    model = _build_model(config).to(device)
    params = count_parameters(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = None
    if config.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
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

    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    environment = _environment(device, dist)
    test_size = len(data["test"][1]) if "test" in data else None
    title = f"{_display_name(config.model, _resolved_grid_size(config))} on {config.dataset}"

    def write(status: str) -> dict[str, Any]:
        results = _build_results(config, params, history, status, environment, len(train_labels), test_size)
        if dist.is_main:
            _write_json(out / RESULTS_FILE, results)
        return results

    def save_checkpoint(epoch: int) -> None:
        if not dist.is_main:
            return
        state = {
            "format": _CHECKPOINT_FORMAT,
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
        _atomic_write(out / CHECKPOINT_FILE, lambda f: torch.save(state, f))

    write("running")
    try:
        for epoch in range(len(history) + 1, config.epochs + 1):
            started = time.perf_counter()
            train_loss = _train_epoch(
                net, optimizer, train_images, train_labels, config, generator, device, dist, epoch
            )
            if scheduler is not None:
                scheduler.step()
            entry: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"]}
            entry["train_seconds"] = time.perf_counter() - started
            for split in ("test", "val"):
                if split in data:
                    t0 = time.perf_counter()
                    metrics = _evaluate_split(model, *data[split], config.eval_batch_size, device)
                    entry.update({f"{split}_{k}": v for k, v in metrics.items()})
                    entry[f"{split}_seconds"] = time.perf_counter() - t0
            entry["seconds"] = time.perf_counter() - started
            history.append(entry)
            save_checkpoint(epoch)
            write("running" if epoch < config.epochs else "finished")
            if dist.is_main:
                emit(_epoch_line(entry, config.epochs))
    except NonFiniteLossError as err:
        write(f"stopped: {err}")
        kept = (
            f"the checkpoint of epoch {len(history)} is kept"
            if history
            else "no epoch finished, so no checkpoint was written"
        )
        raise NonFiniteLossError(f"{err} (lr={config.lr:g}); {kept} in {out}") from None
    finally:
        if dist.is_main and history:
            try:
                _plot_curves(out / CURVES_FILE, history, title)
            except ImportError:
                pass
    return write("finished")


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

    Returns:
        ``{"epoch", "loss", "accuracy", "precision", "recall", "f1", "test_samples"}``, metrics as
        fractions. For the epoch the checkpoint holds they equal that epoch's history entry.
    """
    checkpoint = load_checkpoint(run_dir)
    config = TrainConfig.from_dict(checkpoint["config"])
    config.eval_test = True
    if data_dir is not None:
        config.data_dir = data_dir
    if device is not None:
        config.device = device
    if max_test_samples is not None:
        config.max_test_samples = max_test_samples
    dev = _resolve_device(config.device)
    model = _build_model(config)
    model.load_state_dict(checkpoint["model"])
    model.to(dev)
    images, labels = _prepare_data(config, need_train=False)["test"]
    metrics = _evaluate_split(model, images, labels, config.eval_batch_size, dev)
    return {"epoch": checkpoint["epoch"], **metrics, "test_samples": len(labels)}
