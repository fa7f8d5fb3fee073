"""Tests of kanvolution.experiments.bench: interleaved timing and the checks against the targets.

The benchmarks themselves take minutes; `make bench` runs them (results in benchmarks/).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kanvolution.experiments import bench


def test_time_interleaved_alternates_and_caps_the_slow_ones():
    calls = []
    fns = {name: (lambda n: lambda: calls.append(n))(name) for name in ("fast", "slow")}
    times = bench.time_interleaved(fns, repeats=3, device=torch.device("cpu"), slow={"slow": 1})
    assert calls == ["fast", "slow", "fast", "slow", "fast", "fast"]  # warm-up, then rounds
    assert len(times["fast"]) == 3 and len(times["slow"]) == 1
    assert all(t >= 0 for t in times["fast"])


def test_checks_compare_each_ratio_with_its_target():
    report = {
        "train_step": {"ratios": {"kanc10_vs_cnn": bench.TARGETS["kanc10_vs_cnn"] - 0.5,
                                  "kanc20_vs_cnn": bench.TARGETS["kanc20_vs_cnn"] + 0.5}},
        "memory": {"ratios": {"fused_vs_naive": 0.1}},
    }
    checks = bench._checks(report)
    assert checks["kanc10_vs_cnn"][2] is True and checks["kanc20_vs_cnn"][2] is False
    assert checks["memory_vs_naive"] == (0.1, bench.TARGETS["memory_vs_naive"], 0.1 <= bench.TARGETS["memory_vs_naive"])
    assert "epoch_seconds" not in checks and "reference_vs_kanc10" not in checks


def test_compile_benchmark_times_both_steps_and_the_compilation():
    from kanvolution.experiments.bench import compile_benchmark

    models = [("KAN", "kanc_mlp_small", 5), ("CNN", "cnn_small", None)]
    report = compile_benchmark(batch=8, repeats=2, models=models, backend="aot_eager")
    assert report["backend"] == "aot_eager" and set(report["models"]) == {"KAN", "CNN"}
    for row in report["models"].values():
        assert row["eager_ms"] > 0 and row["compiled_ms"] > 0 and row["first_compiled_step_s"] > 0
        assert row["compiled_vs_eager"] == row["compiled_ms"] / row["eager_ms"]


def test_bases_benchmark_covers_every_family_at_matched_size(capsys):
    from kanvolution.bases import list_bases
    from kanvolution.experiments.bench import _print_report, bases_benchmark

    report = bases_benchmark(batch=4, repeats=1, layer_repeats=1, memory=False, layer_shape=(1, 2, 6, 6))
    rows = report["families"]
    assert list(rows) == list_bases()
    bspline = rows["bspline"]["params"]
    for name, row in rows.items():
        assert abs(row["params"] / bspline - 1) <= 0.1, name
        assert row["step_ms"] > 0 and row["step_vs_cnn"] > 0 and row["layer_ms"] > 0
        assert row["layer_portable_ms"] > 0 and row["compiled_speedup"] == row["layer_portable_ms"] / row["layer_ms"]
    assert rows["bspline"]["layer_vs_bspline"] == 1.0
    from kanvolution.ops import build
    assert build._override is None  # the portable runs put the switch back
    _print_report({"environment": {"device": "cpu", "threads": 1, "torch": torch.__version__}, "bases": report,
                   "checks": {}})
    assert "| wavelet | 9,935 |" in capsys.readouterr().out


def test_sparse_benchmark_times_both_paths_and_checks_them_against_the_targets(capsys):
    from kanvolution.ops import sparse

    report = bench.sparse_benchmark(repeats=1, memory=False, layers=[("4->4", 4, (1, 4, 6, 6))],
                                    linear_layers=[("lin 3->5", 3, 5, 8)], grid_sizes=(10, 50))
    rows = report["rows"]
    assert list(rows) == ["4->4 gs=10", "4->4 gs=50", "lin 3->5 gs=10", "lin 3->5 gs=50"]
    for row in rows.values():
        baseline = "nn.Linear" if row["layer"].startswith("lin") else "nn.Conv2d"
        assert row["baseline"] == baseline
        assert set(row["ms"]) == {baseline, "auto", "dense"} and all(v > 0 for v in row["ms"].values())
        assert row["auto_vs_baseline"] == row["ms"]["auto"] / row["ms"][baseline]
        assert "peak_mib" not in row
    assert sparse._override is None  # the timed steps put the mode back
    # the checks: the grid size's target (convolutions only), and auto's peak memory against the dense path's
    rows["4->4 gs=10"]["auto_vs_baseline"] = bench.SPARSE_TARGETS[10] + 0.1
    rows["4->4 gs=50"]["auto_vs_baseline"] = bench.SPARSE_TARGETS[50] - 0.1
    rows["4->4 gs=50"]["peak_mib"] = {"auto": 30.0, "dense": 60.0}
    checks = bench._checks({"sparse": report})
    assert checks["4->4 gs=10 auto_vs_conv"][2] is False and checks["4->4 gs=50 auto_vs_conv"][2] is True
    assert checks["4->4 gs=50 memory_vs_dense"] == (0.5, 1.0, True) and "4->4 gs=10 memory_vs_dense" not in checks
    assert not any(key.startswith("lin") for key in checks)
    bench._print_report({"environment": {"device": "cpu", "threads": 1, "torch": torch.__version__},
                         "sparse": report, "checks": checks})
    out = capsys.readouterr().out
    assert "| 4->4 | (1, 4, 6, 6) | 50 | nn.Conv2d |" in out and "| lin 3->5 | (8, 3) | 10 | nn.Linear |" in out
    assert "30.0 / 60.0" in out and "MISSED" in out


def test_peak_memory_of_a_dense_layer_on_both_paths():
    """The fresh-process peak of a KANLinear forward + backward: positive, and the dense path's
    expansion (batch x in x (G + K) floats, 28 MiB here) shows in its figure."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak memory on CPU needs Linux /proc")
    cpu = torch.device("cpu")
    dense = bench._peak_bytes("fused", cpu, {"grid_size": 50}, (2048, 64), "never", 8)
    sparse = bench._peak_bytes("fused", cpu, {"grid_size": 50}, (2048, 64), "always", 8)
    assert dense > 20 * 2**20 and 0 < sparse < dense


def test_kanc_grid_size_ratio_is_checked():
    report = {"train_step": {"ratios": {"kanc20_vs_kanc10": bench.TARGETS["kanc20_vs_kanc10"] + 0.01}}}
    assert bench._checks(report)["kanc20_vs_kanc10"][2] is False
