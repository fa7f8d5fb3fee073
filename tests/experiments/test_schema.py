"""Tests of kanvolution.experiments.schema: the status of a run, and files of every format version."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kanvolution.experiments.files import RunLock
from kanvolution.experiments.schema import FAILED, FINISHED, KILLED, RUNNING, ResultsError, load_results, run_status
from kanvolution.experiments.tables import rows_from_results

REPO_RESULTS = Path(__file__).resolve().parents[2] / "results"


def test_status_from_the_file_and_the_lock(tmp_path):
    running = {"status": "running", "config": {"epochs": 3}, "epochs_completed": 1}
    assert run_status(running, tmp_path) == RUNNING  # no lock file: written before run locks existed
    with RunLock(tmp_path):
        assert run_status(running, tmp_path) == RUNNING  # its process is alive
    assert run_status(running, tmp_path) == KILLED  # the lock file stayed, its holder is gone
    assert run_status({"status": "finished"}, tmp_path) == FINISHED
    assert run_status({"status": "failed", "error": "x"}) == FAILED


def test_files_of_older_versions():
    assert run_status({"status": "stopped: training loss became nan at epoch 2, step 1"}) == FAILED
    assert run_status({"config": {"epochs": 2}, "epochs_completed": 2}) == FINISHED
    assert run_status({"config": {"epochs": 2}, "history": [{"epoch": 1}]}) == RUNNING


def test_the_results_kept_in_the_repository_stay_readable():
    files = sorted(REPO_RESULTS.rglob("results.json"))
    assert len(files) >= 20
    for path in files:
        data = load_results(path)
        assert run_status(data, path.parent) == FINISHED, path
    rows, skipped = rows_from_results(files)
    # Only the trials of a search (which never look at the test set) have no test metrics.
    searches = [f for f in files if load_results(f)["config"].get("eval_test") is False]
    assert all(f.parent.parent.name == "search" for f in searches)
    assert sorted(skipped) == searches and len(rows) == len(files) - len(searches)


def test_a_damaged_results_file_is_named(tmp_path):
    shutil.copy(next(REPO_RESULTS.rglob("results.json")), tmp_path / "results.json")
    text = (tmp_path / "results.json").read_text()
    (tmp_path / "results.json").write_text(text[: len(text) // 2])
    with pytest.raises(ResultsError, match=f"{tmp_path / 'results.json'} is not valid JSON"):
        load_results(tmp_path)
    with pytest.raises(ResultsError, match="no results.json"):
        load_results(tmp_path / "elsewhere")
    json.loads(text)  # the original was fine
