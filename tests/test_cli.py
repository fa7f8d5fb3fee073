"""Tests of the ``kanvolution`` command line (kanvolution.cli and kanvolution.experiments.tables)."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys

import pytest

from kanvolution import cli
from kanvolution.cli import main
from kanvolution.experiments.tables import PAPER_RESULTS, format_params, paper_result


def _small(shared_data_dir, *extra):
    return [
        "--dataset",
        "fashion-mnist",
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


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shared_data_dir):
    """One real tiny training run through the CLI, shared by the table and evaluate tests."""
    out = tmp_path_factory.mktemp("runs") / "cnn_small"
    assert (
        main(
            [
                "train",
                "--model",
                "cnn_small",
                "--epochs",
                "2",
                "--out",
                str(out),
                "--val-fraction",
                "0.2",
                *_small(shared_data_dir),
            ]
        )
        == 0
    )
    return out


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_train_end_to_end(run_dir, capsys):
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs_completed"] == 2 and results["status"] == "finished"
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "learning_curves.png").is_file()


def test_train_prints_epochs_and_row(tmp_path, shared_data_dir, capsys):
    assert (
        main(["train", "--model", "cnn_small", "--epochs", "1", "--out", str(tmp_path / "r"), *_small(shared_data_dir)])
        == 0
    )
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "| CNN (Small) |" in out
    # Running again without --resume refuses in one line; with it, the finished run is kept.
    assert (
        main(["train", "--model", "cnn_small", "--epochs", "1", "--out", str(tmp_path / "r"), *_small(shared_data_dir)])
        == 2
    )
    assert "already holds a run" in _one_line_error(capsys)
    assert (
        main(
            [
                "train",
                "--model",
                "cnn_small",
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "r"),
                "--resume",
                *_small(shared_data_dir),
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["train", "--model", "resnet50", "--dataset", "fashion-mnist", "--out", "x"],
            "unknown model 'resnet50'; valid models: kanc_mlp_small",
        ),
        (
            ["train", "--model", "cnn_small", "--dataset", "cifar10", "--out", "x"],
            "unknown dataset 'cifar10'; valid datasets: mnist, fashion-mnist",
        ),
        (["reproduce", "--models", "nope", "--out", "x"], "unknown model 'nope'"),
        (["reproduce", "--dataset", "svhn", "--out", "x"], "unknown dataset 'svhn'"),
    ],
)
def test_unknown_names_give_one_line_and_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert needle in _one_line_error(capsys)


def test_missing_data_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KANVOLUTION_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    argv = [
        "train",
        "--model",
        "cnn_small",
        "--dataset",
        "mnist",
        "--data-dir",
        str(tmp_path / "empty"),
        "--no-download",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(argv) == 2
    assert "not found" in _one_line_error(capsys)


def test_grid_size_on_a_cnn_is_a_usage_error(tmp_path, shared_data_dir, capsys):
    argv = [
        "train",
        "--model",
        "cnn_small",
        "--grid-size",
        "10",
        "--out",
        str(tmp_path / "r"),
        *_small(shared_data_dir),
    ]
    assert main(argv) == 2
    assert "no KAN layers" in _one_line_error(capsys)


def test_models_lists_names_paper_names_and_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "kanc_mlp_medium" in out and "KANC MLP (Medium)" in out
    assert re.search(r"kanc_mlp_medium .* 9,935 +14,885", out)
    assert re.search(r"cnn_more_convs .* 6,930\s*$", out, re.M)
    assert main(["models", "kkan*"]) == 0
    assert "cnn_small" not in capsys.readouterr().out


def test_evaluate_prints_metrics(run_dir, capsys):
    assert main(["evaluate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "weights of epoch 2" in out and "accuracy" in out
    assert main(["evaluate", str(run_dir), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    last = json.loads((run_dir / "results.json").read_text())["history"][-1]
    assert metrics["accuracy"] == pytest.approx(last["test_accuracy"])


def test_evaluate_without_checkpoint(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no checkpoint" in _one_line_error(capsys)


def test_table_markdown(run_dir, capsys):
    assert main(["table", str(run_dir.parent)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| Model | Accuracy | Precision | Recall | F1 Score | # Params | Minutes per epoch |"
    assert len(lines) == 3
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == "CNN (Small)"
    assert all(re.fullmatch(r"\d{1,3}\.\d\d%", c) for c in cells[1:5]), cells
    assert cells[5] == "1.54K"
    assert re.fullmatch(r"\d+\.\d{4}", cells[6])
    results = json.loads((run_dir / "results.json").read_text())
    assert cells[1] == f"{100 * results['test']['accuracy']:.2f}%"


def test_table_compare_paper_and_selection(run_dir, capsys):
    assert main(["table", str(run_dir), "--compare-paper", "--selection", "val"]) == 0
    out = capsys.readouterr().out
    assert "Paper Accuracy" in out and "87.10%" in out and "| 1.54K |" in out


def test_table_csv(run_dir, capsys):
    assert main(["table", str(run_dir / "results.json"), "--csv", "--compare-paper"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1
    row = rows[0]
    results = json.loads((run_dir / "results.json").read_text())
    assert row["model"] == "cnn_small" and int(row["params"]) == 1540
    assert float(row["accuracy"]) == pytest.approx(100 * results["test"]["accuracy"])
    assert float(row["minutes_per_epoch"]) == pytest.approx(results["minutes_per_epoch"])
    assert float(row["paper_accuracy"]) == 87.10


def test_table_without_results(tmp_path, capsys):
    assert main(["table", str(tmp_path)]) == 2
    assert "no results.json" in _one_line_error(capsys)


def test_paper_table_data():
    assert len(PAPER_RESULTS) == 18
    # The paper prints parameter counts in thousands; ours are exact and must round to its text
    # (one row of the paper rounds 38,485 down).
    for row in PAPER_RESULTS:
        if row.params != 38485:
            assert format_params(row.params) == row.params_text, row
    assert paper_result("kkan_small", 20).minutes == 1.6336


def test_demo_runs(tmp_path, shared_data_dir, capsys):
    argv = [
        "demo",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "demo"),
        "--data-dir",
        str(shared_data_dir),
        "--no-download",
        "--max-train-samples",
        "256",
        "--max-test-samples",
        "128",
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| KANC MLP (Medium) (gs = 10) |" in out and "88.99%" in out


def test_broken_external_command_does_not_break_others(monkeypatch, capsys):
    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "bench", "kanvolution._no_such_module")
    assert main(["bench", "--anything"]) == 2
    assert "'bench' command is unavailable" in _one_line_error(capsys)
    assert main(["models", "cnn_small"]) == 0


def test_python_dash_m(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kanvolution", "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.startswith("kanvolution ")


# --------------------------------------------------------------------------------------------
# Expected failures: one line on stderr, exit status 2, no traceback


def _train_argv(out, shared_data_dir, *extra):
    return ["train", "--model", "cnn_small", "--epochs", "1", "--out", str(out), *_small(shared_data_dir), *extra]


def test_out_that_is_a_file(tmp_path, shared_data_dir, capsys):
    (tmp_path / "file").write_text("x")
    assert main(_train_argv(tmp_path / "file", shared_data_dir)) == 2
    assert "is a file" in _one_line_error(capsys)
    assert main(_train_argv(tmp_path / "file" / "run", shared_data_dir)) == 2
    assert "is a file" in _one_line_error(capsys)


def test_out_that_cannot_be_written(tmp_path, shared_data_dir, capsys):
    import os

    if os.geteuid() == 0:
        out = "/sys/kanvolution-run"  # root may write everywhere but in the kernel's read-only folders
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        out = tmp_path / "ro" / "run"
    assert main(_train_argv(out, shared_data_dir)) == 2
    err = _one_line_error(capsys)
    assert "cannot create" in err and str(out) in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_device(tmp_path, shared_data_dir, capsys):
    assert main(_train_argv(tmp_path / "r", shared_data_dir, "--device", "cuda")) == 2
    assert "'cuda' is not available" in _one_line_error(capsys)
    assert main(_train_argv(tmp_path / "r", shared_data_dir, "--device", "banana")) == 2
    assert "unknown device 'banana'" in _one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_wrong_data_file_is_one_line(tmp_path, shared_data_dir, capsys):
    import shutil

    folder = tmp_path / "data" / "fashion-mnist"
    folder.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(shared_data_dir / "fashion-mnist" / name, folder)
    shutil.copy(shared_data_dir / "mnist" / "train-labels-idx1-ubyte.gz", folder)
    argv = _train_argv(tmp_path / "r", shared_data_dir)
    argv[argv.index("--data-dir") + 1] = str(tmp_path / "data")
    assert main(argv) == 2
    assert "holds MNIST's train-labels-idx1-ubyte, not Fashion-MNIST's" in _one_line_error(capsys)


def test_a_held_folder_is_refused_at_once(tmp_path, shared_data_dir, capsys):
    from kanvolution.experiments.files import RunLock

    with RunLock(tmp_path / "r"):
        assert main(_train_argv(tmp_path / "r", shared_data_dir)) == 2
        assert "in use by another run" in _one_line_error(capsys)
    assert not (tmp_path / "r" / "results.json").exists()


def test_unexpected_errors_keep_their_traceback(tmp_path, shared_data_dir, monkeypatch):
    from kanvolution.experiments import training

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(training, "train", broken)
    with pytest.raises(ZeroDivisionError):
        main(_train_argv(tmp_path / "r", shared_data_dir))


@pytest.fixture
def damaged_run(run_dir, tmp_path):
    """A copy of the two-epoch run whose checkpoint.pt was cut short."""
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(run_dir, copy)
    path = copy / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:1000])
    return copy


def test_damaged_checkpoint_names_the_file_and_the_way_out(damaged_run, shared_data_dir, capsys):
    for argv in (["evaluate", str(damaged_run)], ["inspect", str(damaged_run), "--no-plots"]):
        assert main(argv) == 2
        err = _one_line_error(capsys)
        assert f"{damaged_run / 'checkpoint.pt'} cannot be read" in err
        assert "checkpoint.prev.pt" in err and "epoch 1" in err and "--resume" in err


def test_resume_continues_from_the_previous_checkpoint(damaged_run, shared_data_dir, capsys):
    argv = ["train", "--model", "cnn_small", "--epochs", "2", "--out", str(damaged_run), "--val-fraction", "0.2",
            *_small(shared_data_dir), "--resume"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "continuing from" in out and "epoch 2/2" in out and "epoch 1/2" not in out
    results = json.loads((damaged_run / "results.json").read_text())
    assert results["status"] == "finished" and results["epochs_completed"] == 2


def test_empty_checkpoint_without_a_previous_one_needs_restart(tmp_path, shared_data_dir, capsys):
    out = tmp_path / "r"
    assert main(_train_argv(out, shared_data_dir)) == 0
    capsys.readouterr()
    (out / "checkpoint.pt").write_bytes(b"")
    assert main(_train_argv(out, shared_data_dir, "--resume")) == 2
    err = _one_line_error(capsys)
    assert "checkpoint.pt cannot be read: it is empty" in err and "--restart" in err
    assert main(_train_argv(out, shared_data_dir, "--restart")) == 0
    assert json.loads((out / "results.json").read_text())["status"] == "finished"


def _kanvolution(*args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "kanvolution", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        **kwargs,
    )


def _wait_for(condition, timeout=120):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_two_runs_into_one_folder(tmp_path, shared_data_dir):
    from kanvolution.experiments.files import is_locked

    out = tmp_path / "r"
    argv = ["train", "--model", "cnn_small", "--epochs", "2", "--out", str(out), *_small(shared_data_dir)]
    first = _kanvolution(*argv)
    try:
        _wait_for(lambda: is_locked(out))
        second = _kanvolution(*argv)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2
        assert err.strip().count("\n") == 0 and "in use by another run" in err and "Traceback" not in err
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
    assert json.loads((out / "results.json").read_text())["status"] == "finished"


def test_killed_run_shows_in_table_and_resumes(tmp_path, shared_data_dir, capsys):
    import signal

    out = tmp_path / "runs" / "r"
    # More epochs than the run can reach before it is killed, however fast the machine.
    argv = ["train", "--model", "cnn_small", "--epochs", "100000", "--out", str(out), *_small(shared_data_dir)]
    proc = _kanvolution(*argv)
    try:
        # results.json is written atomically after the epoch's checkpoint: wait for an epoch in it.
        _wait_for(lambda: (out / "results.json").exists()
                  and json.loads((out / "results.json").read_text())["epochs_completed"] >= 1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert json.loads((out / "results.json").read_text())["status"] == "running"  # the process had no say
    assert main(["table", str(tmp_path / "runs")]) == 0
    assert "| CNN (Small) [killed] |" in capsys.readouterr().out
    # The kill may land between an epoch's checkpoint and its results.json: continue one epoch
    # past what the checkpoint holds.
    from kanvolution.experiments.checkpoint import load_checkpoint

    argv[argv.index("100000")] = str(load_checkpoint(out)["epoch"] + 1)
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "results.json").read_text())["status"] == "finished"


@pytest.fixture(scope="module")
def kan_run_dir(tmp_path_factory, shared_data_dir):
    """A tiny KAN model's run, for the export tests."""
    out = tmp_path_factory.mktemp("runs") / "kanc_mlp_small"
    argv = ["train", "--model", "kanc_mlp_small", "--grid-size", "5", "--epochs", "1", "--out", str(out)]
    assert main(argv + _small(shared_data_dir)) == 0
    return out


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_export_writes_and_checks_the_model(kan_run_dir, fmt, capsys):
    target = kan_run_dir / f"exported.{fmt}"
    assert main(["export", str(kan_run_dir), "--format", fmt, "--out", str(target), "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert target.is_file() and target.stat().st_size > 0
    difference = float(re.search(r"largest difference (\S+)", out).group(1))
    assert difference <= cli.EXPORT_TOLERANCE
    assert "kanc_mlp_small (epoch 1)" in out


def test_export_refuses_a_model_it_does_not_reproduce(kan_run_dir, capsys, monkeypatch):
    monkeypatch.setattr(cli, "EXPORT_TOLERANCE", -1.0)  # no difference can pass
    assert main(["export", str(kan_run_dir), "--format", "pt2", "--out", str(kan_run_dir / "x.pt2")]) == 2
    assert "does not reproduce the model" in _one_line_error(capsys)


def test_export_without_checkpoint(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "no checkpoint.pt" in _one_line_error(capsys)
