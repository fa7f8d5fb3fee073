"""Tests of kanvolution.experiments.environment: what a run records about where it ran."""
from __future__ import annotations

import platform

import torch

from kanvolution.experiments.environment import cpu_name, environment


def test_environment_records_versions_threads_and_device():
    env = environment(torch.device("cpu"), world_size=2)
    assert env["torch"] == torch.__version__ and env["python"] == platform.python_version()
    assert env["device"] == "cpu" and env["world_size"] == 2 and env["threads"] == torch.get_num_threads()
    assert env["cpu"] == cpu_name() and cpu_name()
    assert "gpu" not in env
