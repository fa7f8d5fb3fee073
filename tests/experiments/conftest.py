"""Fixtures of the experiment tooling's tests."""
from __future__ import annotations

import pytest

from kanvolution.experiments.config import TrainConfig


@pytest.fixture
def tiny(shared_data_dir):
    """A TrainConfig factory for a small CNN on 512 training / 256 test images."""

    def make(**overrides):
        options = dict(
            model="cnn_small",
            dataset="fashion-mnist",
            data_dir=str(shared_data_dir),
            download=False,
            epochs=2,
            max_train_samples=512,
            max_test_samples=256,
            progress=False,
        )
        options.update(overrides)
        return TrainConfig(**options)

    return make
