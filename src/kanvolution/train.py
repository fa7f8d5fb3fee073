"""``kanvolution.train``: the names of a training run, under the path the README documents.

They live in :mod:`kanvolution.experiments`: ``config`` (options), ``training`` (the loop),
``checkpoint`` and ``schema`` (the files of a run folder).
"""
from .experiments.checkpoint import CHECKPOINT_FILE, load_checkpoint
from .experiments.config import DEFAULT_GRID_SIZE, ConfigError, TrainConfig, model_takes_grid_size
from .experiments.schema import CURVES_FILE, RESULTS_FILE, load_results
from .experiments.training import (
    NonFiniteLossError,
    RunExistsError,
    classification_metrics,
    count_parameters,
    evaluate,
    shard_batch,
    train,
)

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
