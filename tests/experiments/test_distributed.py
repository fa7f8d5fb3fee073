"""Tests of kanvolution.experiments.distributed: batch shards, and torchrun against one process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from kanvolution.experiments.distributed import shard_batch
from kanvolution.experiments.schema import load_results
from kanvolution.experiments.training import train


def test_shard_batch_partitions_the_batch():
    x = torch.arange(11).view(11, 1).float()
    y = torch.arange(11)
    shards = [shard_batch(x, y, rank, 3) for rank in range(3)]
    seen = torch.cat([s[1] for s in shards])
    assert sorted(seen.tolist()) == list(range(11))
    assert all(torch.equal(sx.view(-1).long(), sy) for sx, sy in shards)
    assert shard_batch(x, y, 0, 1)[1] is y


@pytest.mark.skipif(
    not torch.distributed.is_available() or shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
    reason="needs torch.distributed and torchrun",
)
def test_torchrun_two_processes_match_one(tiny, tmp_path, shared_data_dir):
    single = train(tiny(), tmp_path / "single", log=None)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "kanvolution",
        "train",
        "--model",
        "cnn_small",
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        str(shared_data_dir),
        "--no-download",
        "--epochs",
        "2",
        "--max-train-samples",
        "512",
        "--max-test-samples",
        "256",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "ddp"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ddp = load_results(tmp_path / "ddp")
    assert ddp["environment"]["world_size"] == 2
    for a, b in zip(single["history"], ddp["history"], strict=True):
        # Same batches, gradients averaged over the two shards: equal up to float rounding.
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)
