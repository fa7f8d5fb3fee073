"""Forward + backward time and peak memory of the sparse KAN kernel against the fused dense path
and ``nn.Conv2d`` of the same shape, per layer shape and grid size.

Times: the three candidates are run interleaved in one process (warm-up, then ``--reps`` rounds,
each candidate once per round), medians and ratios to ``nn.Conv2d`` from that same run, for each
thread count of ``--threads``; both wall-clock time and the process's CPU time (summed over its
threads), which is less disturbed when other jobs share the cores. Peak memory: each candidate runs one forward + backward in a fresh
process, and the growth of the resident set's high-water mark (Linux ``VmHWM``, everything the
process touched: tensors and the kernels' scratch buffers) over the state after set-up is reported.

Usage: ``python benchmarks/sparse_kernel.py [--threads 1 2] [--reps 5] [--no-memory] [--out FILE]``
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
import torch.nn.functional as F
from torch import nn

from kanvolution import KANConv2d, _sparse
from kanvolution.functional import combine_weights

# (name, in, out, input shape): the two wide layers, then KANC MLP (Medium)'s two KAN layers.
SHAPES = [
    ("64->64", 64, 64, (16, 64, 32, 32)),
    ("128->128", 128, 128, (16, 128, 16, 16)),
    ("KANC 1->5", 1, 5, (128, 1, 28, 28)),
    ("KANC 5->10", 5, 10, (128, 5, 13, 13)),
]
GRID_SIZES = (10, 20, 50)
CANDIDATES = ("sparse", "dense", "conv")


def make_step(candidate: str, cin: int, cout: int, shape: tuple[int, ...], gs: int):
    """A closure running one forward + backward of ``candidate`` (3x3, padding 1) on a fixed input."""
    torch.manual_seed(0)
    x = (torch.rand(shape) * 2 - 1).requires_grad_()
    if candidate == "conv":
        layer = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        forward = layer
    else:
        layer = KANConv2d(cin, cout, 3, padding=1, grid_size=gs)
        if candidate == "dense":
            forward = layer
        else:
            def forward(t):  # the layer's own steps, with the sparse kernel for the convolution
                w = combine_weights(layer.base_weight, layer.spline_weight, layer.spline_scaler)
                return _sparse.sparse_kan(F.pad(t, [1, 1, 1, 1]), layer.grid, w, layer.spline_order)

    def step():
        y = forward(x)
        y.backward(torch.ones_like(y))
        x.grad = None
        layer.zero_grad(set_to_none=True)

    return step


def time_all(threads: int, reps: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for name, cin, cout, shape in SHAPES:
        for gs in GRID_SIZES:
            steps = {c: make_step(c, cin, cout, shape, gs) for c in CANDIDATES}
            for step in steps.values():
                step()
            wall = {c: [] for c in CANDIDATES}
            cpu = {c: [] for c in CANDIDATES}
            for _ in range(reps):
                for c, step in steps.items():
                    start, start_cpu = time.perf_counter(), time.process_time()
                    step()
                    wall[c].append(time.perf_counter() - start)
                    cpu[c].append(time.process_time() - start_cpu)
            med = {c: statistics.median(v) for c, v in wall.items()}
            med_cpu = {c: statistics.median(v) for c, v in cpu.items()}
            row = {"layer": name, "input": list(shape), "gs": gs, "threads": threads,
                   "ms": {c: round(med[c] * 1e3, 2) for c in CANDIDATES},
                   "x_conv": {c: round(med[c] / med["conv"], 2) for c in CANDIDATES},
                   "cpu_ms": {c: round(med_cpu[c] * 1e3, 2) for c in CANDIDATES},
                   "cpu_x_conv": {c: round(med_cpu[c] / med_cpu["conv"], 2) for c in CANDIDATES}}
            rows.append(row)
            print(f"{threads} thr  {name:>10} gs={gs:<3} wall: sparse {med['sparse'] * 1e3:7.1f} ms "
                  f"({row['x_conv']['sparse']:5.2f}x) dense {med['dense'] * 1e3:7.1f} ms "
                  f"({row['x_conv']['dense']:5.2f}x) conv {med['conv'] * 1e3:6.1f} ms | cpu: sparse "
                  f"{row['cpu_x_conv']['sparse']:5.2f}x dense {row['cpu_x_conv']['dense']:5.2f}x "
                  f"conv {med_cpu['conv'] * 1e3:6.1f} ms", flush=True)
    return rows


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _memory_child(candidate: str, index: int, gs: int) -> None:
    torch.set_num_threads(1)
    name, cin, cout, shape = SHAPES[index]
    if candidate == "sparse":
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
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} "
          "(other processes share these cores: compare ratios from this run, not absolute times)")
    result = {"torch": torch.__version__, "cpus": os.cpu_count(), "load_average": load, "reps": args.reps,
              "time": [row for t in args.threads for row in time_all(t, args.reps)]}
    if not args.no_memory:
        result["memory"] = memory_all()
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
