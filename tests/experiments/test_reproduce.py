"""Tests of kanvolution.experiments.reproduce: the paper's combinations, the Optuna study, resuming, the table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

from kanvolution.cli import main  # noqa: E402
from kanvolution.experiments.checkpoint import load_checkpoint  # noqa: E402
from kanvolution.experiments.reproduce import (  # noqa: E402
    PAPER_GRID, ReproduceConfig, bases_table, paper_combinations, reproduce,
)


def test_paper_combinations_match_the_papers_draws():
    # The paper: np.random.seed(42), then np.random.choice per hyperparameter, per combination.
    np.random.seed(42)
    expected = [{key: np.random.choice(values).item() for key, values in PAPER_GRID.items()} for _ in range(8)]
    combos = paper_combinations()
    assert combos == expected
    assert combos[0] == {"lr": 1e-3, "weight_decay": 0.0, "batch_size": 128}
    assert combos[5] == combos[7] == {"lr": 1e-4, "weight_decay": 1e-5, "batch_size": 64}
    assert isinstance(combos[0]["batch_size"], int) and isinstance(combos[0]["weight_decay"], float)


def _argv(out, shared_data_dir, *extra):
    return [
        "reproduce",
        "--out",
        str(out),
        "--models",
        "cnn_small",
        "--data-dir",
        str(shared_data_dir),
        "--no-download",
        "--max-train-samples",
        "512",
        "--max-test-samples",
        "256",
        "--no-progress",
        *extra,
    ]


def _trials(out):
    storage = f"sqlite:///{out / 'study.db'}"
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    assert len(names) == 1
    return optuna.load_study(study_name=names[0], storage=storage).get_trials()


def test_reproduce_paper_protocol_and_resume(tmp_path, shared_data_dir, capsys):
    out = tmp_path / "rep"
    assert main(_argv(out, shared_data_dir, "--trials", "2", "--epochs", "1")) == 0
    printed = capsys.readouterr().out
    trials = _trials(out)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert [t.params for t in trials] == paper_combinations(2)
    assert all(t.user_attrs["best_epoch"] == 1 for t in trials)

    summary = json.loads((out / "reproduce.json").read_text())
    winner = summary["runs"]["cnn_small"]["winner"]
    best = max(trials, key=lambda t: (t.value, -t.number))
    assert winner["trial"] == best.number and winner["epochs"] == 1
    final_dir = out / "cnn_small" / "final" / f"lr0.001_wd0_bs{winner['batch_size']}_e1"
    assert summary["runs"]["cnn_small"]["final_run"] == str(final_dir)
    final = json.loads((final_dir / "results.json").read_text())
    assert final["config"]["batch_size"] == winner["batch_size"] and final["config"]["val_fraction"] == 0
    assert final["test_val_selected"]["selection"].startswith("epoch count chosen on the validation split")
    assert final["test"]["selection"] == "best test epoch (paper)"
    # Search runs train on the 80/20 split and never look at the test set.
    search = json.loads((out / "cnn_small" / "search" / "lr0.001_wd0_bs128" / "results.json").read_text())
    assert (
        search["test"] is None
        and "val_accuracy" in search["history"][0]
        and "test_accuracy" not in search["history"][0]
    )

    table = (out / "table.md").read_text()
    assert "Best test epoch (the paper's selection)" in table and "validation split (clean)" in table
    assert table.count("| CNN (Small) |") == 2 and "87.10%" in table
    assert "| CNN (Small) |" in printed
    # The search: every combination's best validation accuracy, our winner, the paper's (its logs).
    search = table.split("## The search")[1]
    row = next(line for line in search.splitlines() if line.startswith("| cnn_small |"))
    assert f"{100 * winner['val_accuracy']:.2f}%" in row and "e1)" in row
    assert row.endswith("| lr0.001_wd0_bs32, 20 epochs: 86.53% |")

    # Running again resumes: no new trial, no new training.
    final_mtime = (final_dir / "checkpoint.pt").stat().st_mtime_ns
    assert main(_argv(out, shared_data_dir, "--trials", "2", "--epochs", "1")) == 0
    again = capsys.readouterr().out
    assert "trial 1/2" not in again and "epoch 1/1" not in again
    assert len(_trials(out)) == 2
    assert (final_dir / "checkpoint.pt").stat().st_mtime_ns == final_mtime


def test_interrupted_trial_is_resumed(tmp_path, shared_data_dir):
    cfg = ReproduceConfig(
        out=str(tmp_path),
        models=["cnn_small"],
        trials=1,
        epochs=2,
        data_dir=str(shared_data_dir),
        download=False,
        max_train_samples=512,
        max_test_samples=256,
        progress=False,
    )

    def interrupt_after_first_epoch(line):
        if "epoch 1/2" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reproduce(cfg, log=interrupt_after_first_epoch)
    trial_dir = tmp_path / "cnn_small" / "search" / "lr0.001_wd0_bs128"
    assert load_checkpoint(trial_dir)["epoch"] == 1
    assert [t.state.name for t in _trials(tmp_path)] == ["FAIL"]

    lines = []
    reproduce(cfg, log=lines.append)
    trials = _trials(tmp_path)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    # The retried trial continued from the checkpoint: only epoch 2 was trained in the search.
    search_epochs = [
        line
        for line in lines[: lines.index(next(x for x in lines if "final run" in x))]
        if "epoch " in line and "/2" in line
    ]
    assert len(search_epochs) == 1 and "epoch 2/2" in search_epochs[0]
    assert len(trials[1].user_attrs["val_accuracy"]) == 2


def test_fixed_protocol(tmp_path, shared_data_dir, capsys):
    out = tmp_path / "fixed"
    assert main(_argv(out, shared_data_dir, "--protocol", "fixed", "--epochs", "1")) == 0
    final = json.loads((out / "cnn_small" / "fixed" / "results.json").read_text())
    assert (final["config"]["lr"], final["config"]["weight_decay"], final["config"]["batch_size"]) == (1e-3, 1e-4, 128)
    table = (out / "table.md").read_text()
    assert "fixed hyperparameters" in table and "Last epoch (no selection)" in table
    assert not (out / "study.db").exists()


def test_custom_storage_and_grid_sizes(tmp_path, shared_data_dir):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    cfg = ReproduceConfig(
        out=str(tmp_path / "out"),
        models=["kanc_mlp_small"],
        grid_sizes=[5],
        trials=1,
        epochs=1,
        storage=storage,
        data_dir=str(shared_data_dir),
        download=False,
        max_train_samples=128,
        max_test_samples=64,
        progress=False,
    )
    summary = reproduce(cfg, log=lambda line: None)
    assert list(summary["runs"]) == ["kanc_mlp_small_gs5"]
    studies = optuna.get_all_study_summaries(storage)
    assert len(studies) == 1 and "kanc_mlp_small_gs5" in studies[0].study_name
    final = json.loads((Path(summary["runs"]["kanc_mlp_small_gs5"]["final_run"]) / "results.json").read_text())
    assert final["grid_size"] == 5 and final["name"] == "KANC MLP (Small) (gs = 5)"


# --------------------------------------------------------------------------------------------
# Several workers on one study in a real PostgreSQL server


def _postgres_binary(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    # Debian's postgresql package keeps the server programs off PATH.
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return candidates[-1] if candidates else None


@pytest.fixture
def postgres_url():
    """A throw-away PostgreSQL server in a temporary folder (run as ``nobody`` when the tests run as root)."""
    import os
    import shutil
    import socket
    import subprocess
    import tempfile

    initdb, pg_ctl = _postgres_binary("initdb"), _postgres_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("no PostgreSQL server programs (initdb, pg_ctl); apt-get install postgresql")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install 'kanvolution[postgres]'")
    prefix: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="kanvolution-postgres-"))
    root.chmod(0o755)
    if os.geteuid() == 0:  # the server refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser to start the server as an unprivileged user")
        shutil.chown(root, "nobody")
        prefix = ["runuser", "-u", "nobody", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"

    def run(*command: str) -> None:
        subprocess.run([*prefix, *command], cwd=root, check=True, capture_output=True, timeout=120)

    run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    run(pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_search_on_postgres_splits_trials_and_finishes_a_killed_one(postgres_url, shared_data_dir, tmp_path):
    import subprocess
    import sys
    import time

    from kanvolution.experiments.files import LOCK_FILE, is_locked

    out = tmp_path / "paper"
    argv = [sys.executable, "-m", "kanvolution", "reproduce", "--storage", postgres_url, "--out", str(out),
            "--models", "cnn_small", "--trials", "4", "--epochs", "3", "--heartbeat", "1",
            "--data-dir", str(shared_data_dir), "--no-download", "--max-train-samples", "1024",
            "--max-test-samples", "256", "--threads", "1", "--no-progress"]

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen([*argv, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def trial_of(pid: int) -> Path | None:
        # The folder of a trial this worker is in the middle of: it holds the lock, one epoch is saved.
        for lock in out.rglob(LOCK_FILE):
            folder = lock.parent
            if lock.read_text().strip() == str(pid) and (folder / "checkpoint.pt").exists() and is_locked(folder):
                return folder
        return None

    first, second = start("--search-only"), start("--search-only")
    try:
        deadline = time.monotonic() + 120
        while (killed_dir := trial_of(first.pid)) is None:
            assert first.poll() is None, first.communicate()[0]
            assert time.monotonic() < deadline, "the first worker never got into a trial"
            time.sleep(0.02)
        first.kill()
        first.wait(timeout=60)
        later = start()  # waits until the killed trial is stale, finishes it, then trains the final run
        log = later.communicate(timeout=240)[0]
        assert later.returncode == 0, log
        assert second.wait(timeout=240) == 0, second.communicate()[0]
    finally:
        for proc in (first, second):
            proc.kill()

    (name,) = optuna.get_all_study_names(storage=postgres_url)
    trials = optuna.load_study(study_name=name, storage=postgres_url).trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["combination"] for t in complete) == [0, 1, 2, 3]  # each once, none twice
    pid = {t.user_attrs["combination"]: int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in complete}
    assert second.pid in pid.values()  # the workers shared the search
    killed = [t for t in trials if t.user_attrs.get("run_dir") == str(killed_dir) and t.state != t.state.COMPLETE]
    assert [t.state for t in killed] == [optuna.trial.TrialState.FAIL]  # marked failed once its heartbeat stopped
    combination = killed[0].user_attrs["combination"]
    assert pid[combination] != first.pid  # ... and finished by a later worker, from its checkpoint
    results = json.loads((killed_dir / "results.json").read_text())
    assert results["status"] == "finished" and [e["epoch"] for e in results["history"]] == [1, 2, 3]
    assert (out / "table.md").is_file()


def test_bases_protocol_table_plot_and_resume(tmp_path, shared_data_dir, capsys):
    out = tmp_path / "bases"
    argv = _argv(out, shared_data_dir, "--protocol", "bases", "--bases", "bspline", "fourier",
                 "--seeds", "0", "1", "--epochs", "1", "--max-train-samples", "128", "--max-test-samples", "128")
    assert main(argv) == 0
    params = {}
    for family in ("bspline", "fourier"):
        for seed in (0, 1):
            res = json.loads((out / family / f"seed{seed}" / "results.json").read_text())
            assert res["model"] == "kanc_mlp_medium" and res["status"] == "finished"
            assert res["config"]["basis"] == family and res["config"]["seed"] == seed
            assert (res["config"]["lr"], res["config"]["weight_decay"], res["config"]["batch_size"]) == (1e-3, 1e-4, 128)
            params[family] = res["params"]
    assert params["bspline"] == 9935 and abs(params["fourier"] / 9935 - 1) <= 0.1
    table = (out / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "±" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| bspline", "| fourier"]
    assert all(row.endswith("| 2 |") for row in rows)
    assert (out / "bases.png").stat().st_size > 0
    stamp = (out / "bspline" / "seed0" / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0  # a rerun finds every run finished
    assert (out / "bspline" / "seed0" / "results.json").stat().st_mtime_ns == stamp
    assert main(_argv(out, shared_data_dir, "--protocol", "bases", "--bases", "splines")) != 0
    assert "unknown basis families ['splines']" in capsys.readouterr().err
    # --table-only rewrites the table from the runs there, training nothing (a missing seed is missing).
    (out / "table.md").unlink()
    assert main(_argv(out, shared_data_dir, "--protocol", "bases", "--bases", "bspline", "fourier",
                      "--seeds", "0", "1", "7", "--epochs", "1", "--table-only")) == 0
    assert (out / "bspline" / "seed0" / "results.json").stat().st_mtime_ns == stamp
    assert not (out / "bspline" / "seed7").exists()
    assert [line for line in (out / "table.md").read_text().splitlines() if "±" in line and line.startswith("| ")] == rows
    assert main(_argv(out, shared_data_dir, "--protocol", "fixed", "--table-only")) != 0
    assert "--table-only applies to" in capsys.readouterr().err
    # A run still in progress stays out of the means.
    running = out / "fourier" / "seed1" / "results.json"
    res = json.loads(running.read_text())
    running.write_text(json.dumps({**res, "status": "running"}))
    dirs = [out / family / f"seed{seed}" for seed in (0, 1) for family in ("bspline", "fourier")]
    cfg = ReproduceConfig(out=str(out), protocol="bases", seeds=(0, 1), epochs=1)
    rows = [line for line in bases_table(dirs, cfg).splitlines() if line.startswith("| ") and "±" in line]
    assert rows[0].endswith("| 2 |") and rows[1].startswith("| fourier") and rows[1].endswith("| 1 |")
