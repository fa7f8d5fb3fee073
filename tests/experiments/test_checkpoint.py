"""Tests of kanvolution.experiments.checkpoint: the previous checkpoint is kept, damage is named."""
from __future__ import annotations

import pytest
import torch

from kanvolution.experiments.checkpoint import (
    CHECKPOINT_FILE,
    PREVIOUS_CHECKPOINT_FILE,
    CorruptCheckpointError,
    MissingCheckpointError,
    load_checkpoint,
    load_checkpoint_for_resume,
    save_checkpoint,
)


def _state(epoch):
    return {"epoch": epoch, "model": {"w": torch.full((3,), float(epoch))}, "config": {"model": "cnn_small"}}


@pytest.fixture
def two_epochs(tmp_path):
    save_checkpoint(tmp_path, _state(1))
    save_checkpoint(tmp_path, _state(2))
    return tmp_path


def test_the_previous_checkpoint_is_kept(two_epochs):
    assert load_checkpoint(two_epochs)["epoch"] == 2
    assert torch.load(two_epochs / PREVIOUS_CHECKPOINT_FILE, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in two_epochs.iterdir()) == [PREVIOUS_CHECKPOINT_FILE, CHECKPOINT_FILE]


@pytest.mark.parametrize("damage,reason", [(lambda b: b[:200], "truncated or damaged"), (lambda b: b"", "empty")])
def test_damage_names_the_file_and_the_way_out(two_epochs, damage, reason):
    path = two_epochs / CHECKPOINT_FILE
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptCheckpointError) as info:
        load_checkpoint(two_epochs)
    message = str(info.value)
    assert f"{path} cannot be read" in message and reason in message
    assert f"checkpoint of epoch 1 is kept in {two_epochs / PREVIOUS_CHECKPOINT_FILE}" in message
    assert "--resume" in message and "\n" not in message
    checkpoint, note = load_checkpoint_for_resume(two_epochs)
    assert checkpoint["epoch"] == 1 and "continuing from" in note


def test_without_a_good_checkpoint_resume_says_restart(two_epochs):
    for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE):
        (two_epochs / name).write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptCheckpointError, match="--restart"):
        load_checkpoint_for_resume(two_epochs)
    with pytest.raises(CorruptCheckpointError, match="no earlier checkpoint|cannot be read"):
        load_checkpoint(two_epochs)


def test_other_files_and_missing_ones(tmp_path):
    assert load_checkpoint_for_resume(tmp_path) == (None, None)
    with pytest.raises(MissingCheckpointError, match="no checkpoint.pt in"):
        load_checkpoint(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(CorruptCheckpointError, match="is not a checkpoint of `kanvolution train`"):
        load_checkpoint(tmp_path)
