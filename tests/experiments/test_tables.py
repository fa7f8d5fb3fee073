"""Tests of kanvolution.experiments.tables: runs that did not finish are shown and left out of means."""
from __future__ import annotations

import csv
import io

import pytest

from kanvolution.experiments.files import RunLock, write_json
from kanvolution.experiments.tables import csv_table, markdown_table, rows_from_results, seed_table


def _results(folder, seed, accuracy, status="finished", epochs_completed=2):
    block = {"epoch": epochs_completed, "accuracy": accuracy, "precision": accuracy, "recall": accuracy,
             "f1": accuracy, "selection": "best test epoch (paper)"}
    data = {"model": "cnn_medium", "name": "CNN (Medium)", "grid_size": None, "dataset": "fashion-mnist",
            "params": 3020, "status": status, "epochs_completed": epochs_completed,
            "config": {"epochs": 2, "seed": seed}, "history": [], "test": block, "test_val_selected": None,
            "test_last": block, "minutes_per_epoch": 0.1}
    folder.mkdir(parents=True)
    write_json(folder / "results.json", data)
    return folder / "results.json"


@pytest.fixture
def runs(tmp_path):
    files = [_results(tmp_path / "s0", 0, 0.80), _results(tmp_path / "s1", 1, 0.90)]
    files.append(_results(tmp_path / "s2", 2, 0.10, status="failed", epochs_completed=1))
    killed = _results(tmp_path / "s3", 3, 0.20, status="running", epochs_completed=1)
    RunLock(killed.parent).acquire().release()  # a run lock nobody holds any more: its process died
    files.append(killed)
    return files


def test_rows_carry_their_status(runs):
    rows, _ = rows_from_results(runs)
    assert sorted(r.status for r in rows) == ["failed", "finished", "finished", "killed"]
    table = markdown_table(rows)
    assert "| CNN (Medium) [killed] |" in table and "| CNN (Medium) [failed] |" in table
    statuses = [row["status"] for row in csv.DictReader(io.StringIO(csv_table(rows)))]
    assert sorted(statuses) == ["failed", "finished", "finished", "killed"]


def test_seed_means_leave_out_runs_that_did_not_finish(runs):
    table = seed_table(runs)
    row = next(line for line in table.splitlines() if line.startswith("| CNN (Medium) |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and cells[2] == "85.00 ± 7.07"
    assert "Left out of the means" in table and "[killed]" in table and "[failed]" in table


def test_one_seed_shows_no_spread(runs):
    row = next(line for line in seed_table(runs[:1]).splitlines() if line.startswith("| CNN (Medium) |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "1" and cells[2] == "80.00"
