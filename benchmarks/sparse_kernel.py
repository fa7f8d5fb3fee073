"""Forward + backward time and peak memory of ``KANConv2d`` on the dense fused path, on the sparse
kernels (``sparse``: the kernels :func:`kanvolution._sparse.default_kernel` picks, narrow or wide
by the layer's width; ``wide``: the wide kernels whatever the width) and under the automatic rule
(:mod:`kanvolution.ops.sparse`), against ``nn.Conv2d`` of the same shape, per layer shape and grid
size; and the training step of KANC MLP (Medium) at several grid sizes against the CNN (Medium)
step.

Times: the candidates are run interleaved in one process (warm-up, then ``--reps`` rounds, each
candidate once per round; the sparse mode is set before each candidate's step), medians and ratios
to ``nn.Conv2d`` (to the CNN step) from that same run, for each thread count of ``--threads``; both
wall-clock time and the process's CPU time (summed over its threads), which is less disturbed when
other jobs share the cores. Peak memory: each candidate runs one forward + backward in a fresh
process, and the growth of the resident set's high-water mark (Linux ``VmHWM``, everything the
process touched: tensors and the kernels' scratch buffers) over the state after set-up is reported.

Usage: ``python benchmarks/sparse_kernel.py [--threads 1 2] [--reps 5] [--no-layers] [--sweep] [--no-models] [--no-memory]
[--out FILE]``
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from kanvolution import KANConv2d, _sparse
from kanvolution.experiments.environment import cpu_name
from kanvolution.experiments.bench import make_train_step
from kanvolution.models import create_model
from kanvolution.ops import sparse

# (name, in, out, input shape): the two wide layers, then KANC MLP (Medium)'s two KAN layers.
SHAPES = [
    ("64->64", 64, 64, (16, 64, 32, 32)),
    ("128->128", 128, 128, (16, 128, 16, 16)),
    ("KANC 1->5", 1, 5, (128, 1, 28, 28)),
    ("KANC 5->10", 5, 10, (128, 5, 13, 13)),
]
GRID_SIZES = (10, 20, 50)
# --sweep: where the rule's thresholds lie (the output width of the narrow kernels at gs = 10, the
# grid size from which each kernel beats the dense path).
SWEEP = [
    ((16, 8, (16, 16, 32, 32)), (5, 10)),
    ((16, 16, (16, 16, 32, 32)), (5, 10)),
    ((16, 32, (16, 16, 32, 32)), (10,)),
    ((16, 64, (16, 16, 32, 32)), (10,)),
    ((1, 5, (128, 1, 28, 28)), (3, 5, 7)),
    ((5, 10, (128, 5, 13, 13)), (3, 5, 7)),
]
# Candidates: nn.Conv2d, then KANConv2d under each sparse mode ("wide": mode "always" with the
# wide kernels forced).
CANDIDATES = ("conv", "dense", "sparse", "wide", "auto")
MODES = {"dense": "never", "sparse": "always", "wide": "always", "auto": "auto"}
MODEL_GRID_SIZES = (10, 20)
MODEL_BATCH = 128


def _with_mode(candidate: str, step):
    """``step`` run under ``candidate``'s sparse mode (none for the plain convolution / CNN)."""
    if candidate not in MODES:
        return step

    def run():
        sparse.set_mode(MODES[candidate])
        limit = _sparse.NARROW_MAX_OUTPUT_BYTES
        if candidate == "wide":
            _sparse.NARROW_MAX_OUTPUT_BYTES = 0
        try:
            step()
        finally:
            sparse.set_mode(None)
            _sparse.NARROW_MAX_OUTPUT_BYTES = limit

    return run


def make_step(candidate: str, cin: int, cout: int, shape: tuple[int, ...], gs: int):
    """A closure running one forward + backward of ``candidate`` (3x3, padding 1) on a fixed input."""
    torch.manual_seed(0)
    x = (torch.rand(shape) * 2 - 1).requires_grad_()
    if candidate == "conv":
        layer = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    else:
        layer = KANConv2d(cin, cout, 3, padding=1, grid_size=gs)

    def step():
        y = layer(x)
        y.backward(torch.ones_like(y))
        x.grad = None
        layer.zero_grad(set_to_none=True)

    return _with_mode(candidate, step)


def zoo_step(name: str, grid_size: int, batch: int, mode: str | None):
    """One AdamW training step of zoo model ``name`` on a fixed batch of 28x28 images."""
    torch.manual_seed(0)
    model = create_model(name, grid_size=grid_size) if name.startswith("kan") else create_model(name)
    step = make_train_step(model, batch, torch.device("cpu"))
    return _with_mode(mode, step) if mode else step


def _interleaved(steps: dict, reps: int) -> tuple[dict, dict]:
    """Median wall-clock and CPU seconds of each step, run in rounds (each step once per round)."""
    for step in steps.values():
        step()
    wall = {c: [] for c in steps}
    cpu = {c: [] for c in steps}
    for _ in range(reps):
        for c, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            wall[c].append(time.perf_counter() - start)
            cpu[c].append(time.process_time() - start_cpu)
    return ({c: statistics.median(v) for c, v in wall.items()}, {c: statistics.median(v) for c, v in cpu.items()})


def _row(med: dict, med_cpu: dict, base: str, **info) -> dict:
    return {**info, "ms": {c: round(v * 1e3, 2) for c, v in med.items()},
            f"x_{base}": {c: round(v / med[base], 2) for c, v in med.items()},
            "cpu_ms": {c: round(v * 1e3, 2) for c, v in med_cpu.items()},
            f"cpu_x_{base}": {c: round(v / med_cpu[base], 2) for c, v in med_cpu.items()}}


def time_layers(threads: int, reps: int, sweep: bool = False) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    cases = ([(f"{cin}->{cout}", cin, cout, shape, gss) for (cin, cout, shape), gss in SWEEP] if sweep
             else [(*shape, GRID_SIZES) for shape in SHAPES])
    for name, cin, cout, shape, grid_sizes in cases:
        for gs in grid_sizes:
            steps = {c: make_step(c, cin, cout, shape, gs) for c in CANDIDATES}
            row = _row(*_interleaved(steps, reps), "conv", layer=name, input=list(shape), gs=gs, threads=threads)
            rows.append(row)
            print(f"{threads} thr {name:>10} gs={gs:<3} x conv, wall: "
                  + " ".join(f"{c} {row['x_conv'][c]:5.2f}" for c in CANDIDATES[1:])
                  + " | cpu: " + " ".join(f"{c} {row['cpu_x_conv'][c]:5.2f}" for c in CANDIDATES[1:])
                  + f" | conv {row['ms']['conv']:.1f} ms", flush=True)
    return rows


def time_models(threads: int, reps: int) -> list[dict]:
    """KANC MLP (Medium) at each grid size and sparse mode against the CNN (Medium), interleaved."""
    torch.set_num_threads(threads)
    steps = {"cnn_medium": zoo_step("cnn_medium", 0, MODEL_BATCH, None)}
    for gs in MODEL_GRID_SIZES:
        for candidate in MODES:
            steps[f"kanc_mlp_medium gs={gs} {candidate}"] = zoo_step("kanc_mlp_medium", gs, MODEL_BATCH,
                                                                            candidate)
    row = _row(*_interleaved(steps, reps), "cnn_medium", batch=MODEL_BATCH, threads=threads)
    for c in steps:
        print(f"{threads} thr {c:>32}: {row['ms'][c]:7.1f} ms  {row['x_cnn_medium'][c]:5.2f}x CNN "
              f"(cpu {row['cpu_x_cnn_medium'][c]:5.2f}x)", flush=True)
    return [row]


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _memory_child(candidate: str, index: int, gs: int) -> None:
    torch.set_num_threads(1)
    name, cin, cout, shape = SHAPES[index]
    _sparse.available()  # build/load the extension before the baseline
    step = make_step(candidate, cin, cout, shape, gs)
    before = _hwm_kib()
    step()
    print(json.dumps({"peak_mib": (_hwm_kib() - before) / 1024}))


def memory_all() -> list[dict]:
    rows = []
    for index, (name, _, _, shape) in enumerate(SHAPES):
        for gs in GRID_SIZES:
            peaks = {}
            for c in CANDIDATES:
                out = subprocess.run([sys.executable, __file__, "--memory-child", c, str(index), str(gs)],
                                     check=True, capture_output=True, text=True).stdout
                peaks[c] = round(json.loads(out.strip().splitlines()[-1])["peak_mib"], 1)
            rows.append({"layer": name, "input": list(shape), "gs": gs, "peak_mib": peaks})
            print(f"memory {name:>10} gs={gs:<3} " + "  ".join(f"{c} {v:7.1f} MiB" for c, v in peaks.items()),
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-layers", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time the SWEEP layers instead of SHAPES")
    parser.add_argument("--no-models", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("sparse_kernel.json"))
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        c, index, gs = args.memory_child
        _memory_child(c, int(index), int(gs))
        return
    if not _sparse.available():
        raise SystemExit("the sparse kernels could not be built")
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {cpu_name()} ({platform.machine()}), {os.cpu_count()} CPUs, load average "
          f"{load:.1f} (other processes share these cores: compare ratios from this run, not absolute times)")
    result = {"torch": torch.__version__, "cpu": cpu_name(), "cpus": os.cpu_count(), "load_average": load,
              "reps": args.reps,
              "time": [] if args.no_layers else [row for t in args.threads for row in time_layers(t, args.reps, args.sweep)]}
    if not args.no_models:
        result["models"] = [row for t in args.threads for row in time_models(t, 3 * args.reps)]
    if not args.no_memory:
        result["memory"] = memory_all()
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
