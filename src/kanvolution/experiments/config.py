"""The options of a training run: :class:`TrainConfig`, its checks, and the zoo model it names."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ..errors import KanvolutionError
from .models import DEFAULT_GRID_SIZE, create_model, model_info

__all__ = [
    "DEFAULT_GRID_SIZE",
    "LR_SCHEDULES",
    "PRECISIONS",
    "ConfigError",
    "TrainConfig",
    "build_model",
    "check_resume",
    "default_grid_size",
    "display_name",
    "model_takes_grid_size",
    "resolved_grid_size",
]

PRECISIONS = ("32", "bf16-mixed")
LR_SCHEDULES = ("none", "cosine", "warmup-cosine")


class ConfigError(KanvolutionError, ValueError):
    """A training option is out of range or does not fit the checkpoint being resumed."""


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
    lr_schedule: Literal["none", "cosine", "warmup-cosine"] = "none"  # "none" as in the paper; "cosine" anneals
    # to 0 over `epochs`, stepped per epoch; "warmup-cosine" rises linearly over `warmup_epochs`, then anneals to 0
    # by the last step, stepped per optimiser step
    warmup_epochs: int = 0  # linear warm-up length of "warmup-cosine", in epochs
    label_smoothing: float = 0.0  # training loss: (1 - s) * NLL + s * mean over classes of -log p
    crop_padding: int = 0  # augmentation: pad each training image by this many pixels, crop back at random; 0 = off
    hflip: bool = False  # augmentation: mirror half the training images (Fashion-MNIST only; digits are not symmetric)
    grid_update_epochs: int = 0  # after each of the first N epochs, adapt every KAN layer's knots to its inputs
    seed: int = 0  # torch seed for initialisation and shuffling; the paper's final runs use 0
    val_fraction: float = 0.0  # 0 = train on the whole training set; >0 = hold this part out (paper: 0.2)
    split_seed: int = 0  # generator seed of the train/validation split (the paper's random_split uses 0)
    eval_test: bool = True  # evaluate on the test set after every epoch; a search turns it off
    selected_epoch: int | None = None  # an epoch chosen on validation elsewhere; reported as test_val_selected
    max_train_samples: int | None = None  # keep only the first N training images (quick runs, tests)
    max_test_samples: int | None = None  # keep only the first N test images
    precision: str = "32"  # "32", or "bf16-mixed": forward and loss under bfloat16 autocast, optimiser states in float32
    device: str = "auto"  # "auto" = cuda when available, else cpu (bit-exact reruns are promised on cpu only)
    num_threads: int | None = None  # torch.set_num_threads; None = torch's default
    progress: bool | None = None  # tqdm bars; None = only when stderr is a terminal
    basis: str = "bspline"  # basis family of the KAN layers (kanvolution.bases.list_bases())
    degree: int | None = None  # degree D of the polynomial families; None = the layers' default

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
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not isinstance(self.warmup_epochs, int) or not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"warmup_epochs must be an integer in [0, epochs), got {self.warmup_epochs!r}")
        if self.warmup_epochs and self.lr_schedule != "warmup-cosine":
            raise ConfigError(f"warmup_epochs needs lr_schedule 'warmup-cosine', got {self.lr_schedule!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not isinstance(self.crop_padding, int) or not 0 <= self.crop_padding < 28:
            raise ConfigError(f"crop_padding must be an integer in [0, 28), got {self.crop_padding!r}")
        if not isinstance(self.grid_update_epochs, int) or self.grid_update_epochs < 0:
            raise ConfigError(f"grid_update_epochs must be a non-negative integer, got {self.grid_update_epochs!r}")
        if self.hflip and self.dataset != "fashion-mnist":
            raise ConfigError(f"hflip is for fashion-mnist only (mirrored digits change meaning), got {self.dataset!r}")
        if not self.eval_test and self.val_fraction == 0:
            raise ConfigError("a run that skips the test set needs a validation split (val_fraction > 0)")
        from ..bases import list_bases

        if self.basis not in list_bases():
            raise ConfigError(f"basis must be one of {', '.join(list_bases())}, got {self.basis!r}")
        if self.degree is not None and (not isinstance(self.degree, int) or self.degree < 0):
            raise ConfigError(f"degree must be a non-negative integer or None, got {self.degree!r}")
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
    "warmup_epochs",
    "label_smoothing",
    "crop_padding",
    "hflip",
    "grid_update_epochs",
    "seed",
    "val_fraction",
    "split_seed",
    "eval_test",
    "max_train_samples",
    "max_test_samples",
    "precision",
    "basis",
    "degree",
)


# --------------------------------------------------------------------------------------------
# Models


def model_takes_grid_size(name: str) -> bool:
    """Whether the zoo model ``name`` has KAN layers (and so a ``grid_size`` argument)."""
    return model_info(name).has_kan


def default_grid_size(name: str) -> int:
    """The grid size the KAN model ``name`` is built with when none is given (10 for the paper's models)."""
    grid_size = model_info(name).default_grid_size
    if grid_size is None:
        raise ConfigError(f"model {name!r} has no KAN layers, so it has no grid size")
    return grid_size


def resolved_grid_size(config: TrainConfig) -> int | None:
    """The grid size the run's model is built with: ``None`` for a model without KAN layers."""
    if model_takes_grid_size(config.model):
        return config.grid_size if config.grid_size is not None else default_grid_size(config.model)
    if config.grid_size is not None:
        raise ConfigError(f"model {config.model!r} has no KAN layers, so it takes no grid size")
    if config.grid_update_epochs:
        raise ConfigError(f"model {config.model!r} has no KAN layers, so it has no grids to update")
    if config.basis != "bspline" or config.degree is not None:
        raise ConfigError(f"model {config.model!r} has no KAN layers, so it takes no basis or degree")
    return None


def basis_options(config: TrainConfig) -> dict:
    """The layer options of a non-default basis (``{}`` for the paper's B-splines)."""
    options = {} if config.basis == "bspline" else {"basis": config.basis}
    return options if config.degree is None else {**options, "degree": config.degree}


def build_model(config: TrainConfig) -> nn.Module:
    """The untrained zoo model that ``config`` names."""
    grid_size = resolved_grid_size(config)
    if grid_size is None:
        return create_model(config.model)
    return create_model(config.model, grid_size=grid_size, **basis_options(config))


def display_name(model: str, grid_size: int | None) -> str:
    """The row name of the paper's table, e.g. ``"KANC MLP (Medium) (gs = 10)"``."""
    info = model_info(model)
    return info.paper_name(grid_size) if grid_size is not None else info.paper_name()


def check_resume(stored: dict[str, Any], config: TrainConfig, done: int) -> None:
    """Raise :class:`ConfigError` when ``config`` cannot continue a checkpoint of ``done`` epochs made with ``stored``."""
    defaults = TrainConfig().to_dict()  # options a checkpoint may predate
    for key in _RESUME_MUST_MATCH:
        if stored.get(key, defaults[key]) != getattr(config, key):
            raise ConfigError(
                f"cannot resume: the checkpoint has {key}={stored.get(key, defaults[key])!r},"
                f" the new options {key}={getattr(config, key)!r}"
            )
    if config.epochs != stored.get("epochs") and config.lr_schedule != "none":
        raise ConfigError("cannot change epochs when resuming a run with an LR schedule that depends on it")
    if config.epochs < done:
        raise ConfigError(
            f"cannot resume: the checkpoint already holds {done} epochs, more than epochs={config.epochs}"
        )
