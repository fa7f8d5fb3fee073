"""Shared fixtures: where the test data lives, small deterministic helpers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    env = os.environ.get("KANVOLUTION_DATA")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The MNIST / Fashion-MNIST IDX files laid out as ``DIR/{mnist,fashion-mnist}/*.gz``."""
    path = _shared_data_dir()
    if not (path / "fashion-mnist").is_dir():
        pytest.fail(f"test data not found at {path}; set KANVOLUTION_DATA to the folder holding fashion-mnist/ and mnist/")
    return path


@pytest.fixture(scope="session")
def is_png():
    """``is_png(path)``: whether the file starts with the PNG signature."""
    return lambda path: Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # Two xdist workers on two cores: one torch thread each, or they fight over the cores.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def _devices() -> list:
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
    return ["cpu", pytest.param("cuda", marks=cuda)]


@pytest.fixture(params=_devices())
def device(request) -> torch.device:
    """Every device of the machine: the CPU, and CUDA when present (skipped with the reason otherwise)."""
    return torch.device(request.param)
