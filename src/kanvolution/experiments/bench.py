"""Speed and memory benchmarks (``kanvolution bench``): training steps, one layer, one epoch.

Every figure that is compared is measured in the same run with interleaved repetitions (median),
and reported as a ratio, because absolute times on shared machines drift.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import build

__all__ = ["add_arguments", "run", "time_interleaved", "make_train_step", "train_step_benchmark", "compile_benchmark",
           "layer_benchmark", "layer_peak_memory", "epoch_benchmark", "bases_benchmark", "sparse_benchmark"]

STEP_MODELS = [  # (label, registry name, grid size, implementation)
    ("KANC MLP (Medium) gs=10", "kanc_mlp_medium", 10, "fused"),
    ("KANC MLP (Medium) gs=20", "kanc_mlp_medium", 20, "fused"),
    ("KKAN (Small) gs=10", "kkan_small", 10, "fused"),
    ("CNN (Medium)", "cnn_medium", None, None),
    ("KANC MLP (Medium) gs=10, reference loop", "kanc_mlp_medium", 10, "reference"),
]
TARGETS = {  # the speed and memory goals, checked and printed beside the measured ratios
    "kanc10_vs_cnn": 2.5,
    "kanc20_vs_cnn": 4.0,
    "kanc20_vs_kanc10": 1.15,
    "reference_vs_kanc10": 250.0,
    "memory_vs_naive": 1 / 3,
    "epoch_seconds": 15.0,
}
# The wide layers of the sparse benchmark, (label, channels, input shape), and the targets of their
# forward + backward against nn.Conv2d of the same shape, per grid size; the peak memory of each on
# the path that runs (``auto``) must stay at most that of the dense fused path (``never``).
SPARSE_LAYERS = [("64->64", 64, (16, 64, 32, 32)), ("128->128", 128, (16, 128, 16, 16))]
SPARSE_TARGETS = {10: 8.0, 20: 9.0, 50: 10.0}
# Dense layers of the sparse benchmark, (label, in, out, batch), against nn.Linear (no target).
SPARSE_LINEAR_LAYERS = [("KANLinear 512->512", 512, 512, 1024), ("KANLinear 784->64", 784, 64, 1024)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                     slow: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Run each function once per round, round after round, so drift hits all of them alike.

    ``slow`` caps the number of rounds for very slow entries (they still interleave).
    """
    slow = slow or {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up: allocator, oneDNN primitives, lazy init
        fn()
    _sync(device)
    for r in range(repeats):
        for name, fn in fns.items():
            if r >= slow.get(name, repeats):
                continue
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def make_train_step(model: nn.Module, batch: int, device: torch.device) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 1, 28, 28, generator=gen) * 2 - 1).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.nll_loss(model(x), y).backward()
        opt.step()

    return step


def train_step_benchmark(batch: int = 128, repeats: int = 20, reference_repeats: int = 3,
                         device: torch.device | None = None, include_reference: bool = True) -> dict:
    """Median training-step time (forward, backward, AdamW) of the zoo models at ``batch``."""
    from ..layers import kan_layers
    from .models import create_model

    device = device or torch.device("cpu")
    fns = {}
    for label, name, gs, impl in STEP_MODELS:
        if impl == "reference" and not include_reference:
            continue
        torch.manual_seed(0)
        model = create_model(name, **({"grid_size": gs} if gs else {})).to(device)
        for _, layer in kan_layers(model):
            layer.implementation = impl
        fns[label] = make_train_step(model, batch, device)
    times = time_interleaved(fns, repeats, device, slow={STEP_MODELS[-1][0]: reference_repeats})
    med = {k: statistics.median(v) for k, v in times.items()}
    cnn = med["CNN (Medium)"]
    rows = {k: {"median_ms": v * 1e3, "runs": len(times[k]), "vs_cnn": v / cnn} for k, v in med.items()}
    ratios = {
        "kanc10_vs_cnn": med["KANC MLP (Medium) gs=10"] / cnn,
        "kanc20_vs_cnn": med["KANC MLP (Medium) gs=20"] / cnn,
        "kanc20_vs_kanc10": med["KANC MLP (Medium) gs=20"] / med["KANC MLP (Medium) gs=10"],
    }
    ref = STEP_MODELS[-1][0]
    if ref in med:
        ratios["reference_vs_kanc10"] = med[ref] / med["KANC MLP (Medium) gs=10"]
    return {"batch": batch, "steps": rows, "ratios": ratios}


COMPILE_MODELS = [("KANC MLP (Medium) gs=10", "kanc_mlp_medium", 10), ("CNN (Medium)", "cnn_medium", None)]


def compile_benchmark(batch: int = 128, repeats: int = 20, device: torch.device | None = None,
                      models: list[tuple[str, str, int | None]] = COMPILE_MODELS, backend: str = "inductor") -> dict:
    """Training step of ``torch.compile(model)`` (default settings) beside the eager step, and the
    time of the first compiled step (compilation of forward and backward included).

    Args:
        models: ``(label, registry name, grid size)`` of each model to time.
        backend: ``torch.compile``'s backend (its default, inductor, unless testing).
    """
    from .models import create_model

    device = device or torch.device("cpu")
    fns, first_step_s = {}, {}
    for label, name, gs in models:
        pair = []
        for _ in range(2):
            torch.manual_seed(0)
            pair.append(create_model(name, **({"grid_size": gs} if gs else {})).to(device))
        fns[f"{label} eager"] = make_train_step(pair[0], batch, device)
        compiled = make_train_step(torch.compile(pair[1], backend=backend), batch, device)
        _sync(device)
        start = time.perf_counter()
        compiled()
        _sync(device)
        first_step_s[label] = time.perf_counter() - start
        fns[f"{label} compiled"] = compiled
    times = time_interleaved(fns, repeats, device)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    rows = {label: {"eager_ms": med[f"{label} eager"], "compiled_ms": med[f"{label} compiled"],
                    "compiled_vs_eager": med[f"{label} compiled"] / med[f"{label} eager"],
                    "first_compiled_step_s": first_step_s[label]} for label, _, _ in models}
    return {"batch": batch, "backend": backend, "models": rows}


def layer_benchmark(repeats: int = 10, device: torch.device | None = None) -> dict:
    """``KANConv2d(64, 64, 3, padding=1, grid_size=10)`` vs ``nn.Conv2d`` on ``(16, 64, 32, 32)``."""
    from ..layers import KANConv2d

    device = device or torch.device("cpu")
    torch.manual_seed(0)
    x = torch.randn(16, 64, 32, 32, device=device, requires_grad=True)
    layers = {
        "KANConv2d": KANConv2d(64, 64, 3, padding=1, grid_size=10).to(device),
        "KANConv2d naive": KANConv2d(64, 64, 3, padding=1, grid_size=10, implementation="naive").to(device),
        "nn.Conv2d": nn.Conv2d(64, 64, 3, padding=1).to(device),
    }
    fns = {}
    for name, layer in layers.items():
        fns[f"{name} forward"] = (lambda m: lambda: m(x))(layer)
        fns[f"{name} forward+backward"] = (lambda m: lambda: m(x).sum().backward())(layer)
    with torch.no_grad():
        fwd_only = {k: v for k, v in fns.items() if k.endswith("forward")}
        t_fwd = time_interleaved(fwd_only, repeats, device)
    t_bwd = time_interleaved({k: v for k, v in fns.items() if k.endswith("backward")}, repeats, device)
    med = {k: statistics.median(v) for k, v in {**t_fwd, **t_bwd}.items()}
    return {
        "shape": [16, 64, 32, 32],
        "times_ms": {k: v * 1e3 for k, v in med.items()},
        "ratios": {
            "forward_vs_conv": med["KANConv2d forward"] / med["nn.Conv2d forward"],
            "forward_backward_vs_conv": med["KANConv2d forward+backward"] / med["nn.Conv2d forward+backward"],
            "forward_backward_vs_naive": med["KANConv2d forward+backward"] / med["KANConv2d naive forward+backward"],
        },
    }


_MEMORY_SCRIPT = r"""
import json, re, sys, torch
from torch import nn
from kanvolution import KANConv2d, KANLinear
impl, device = sys.argv[1], torch.device(sys.argv[2])
options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {"grid_size": 10}
shape = json.loads(sys.argv[4]) if len(sys.argv) > 4 else [16, 64, 32, 32]
out = int(sys.argv[5]) if len(sys.argv) > 5 else shape[1]
torch.manual_seed(0)
if len(shape) == 2:  # a dense layer (N, C) -> (N, out)
    layer = nn.Linear(shape[1], out) if impl == "conv" else KANLinear(shape[1], out, implementation=impl, **options)
elif impl == "conv":
    layer = nn.Conv2d(shape[1], out, 3, padding=1)
else:
    layer = KANConv2d(shape[1], out, 3, padding=1, implementation=impl, **options)
layer = layer.to(device)
x = torch.randn(*shape, device=device, requires_grad=True)
def step():
    layer(x).sum().backward()
    layer.zero_grad(set_to_none=True); x.grad = None
step()  # warm-up: primitives, thread pools
def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated(); step(); torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
else:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark
    base = status("VmRSS"); step(); peak = status("VmHWM") - base
print(json.dumps({"peak_bytes": peak}))
"""


def _peak_bytes(impl: str, device: torch.device, options: dict | None = None,
                shape: tuple[int, ...] | None = None, sparse_mode: str | None = None, out: int | None = None) -> int:
    """Peak extra memory of one forward+backward in a fresh process of a 3x3 layer with padding 1 on
    ``shape`` ``(N, C, H, W)`` (default: 64->64 on ``(16, 64, 32, 32)``, grid size 10), or of a dense
    layer on ``shape`` ``(N, C)``, ``C -> out`` (default ``C``); ``impl`` ``"conv"``: ``nn.Conv2d`` /
    ``nn.Linear``; ``sparse_mode`` sets the process's ``KANVOLUTION_SPARSE``."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    if sparse_mode:
        env["KANVOLUTION_SPARSE"] = sparse_mode
    extra = [json.dumps(options or {"grid_size": 10}), json.dumps(list(shape))] if shape else (
        [json.dumps(options)] if options else [])
    if out is not None:
        extra.append(str(out))
    argv = [sys.executable, "-c", _MEMORY_SCRIPT, impl, str(device)] + extra
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


def layer_peak_memory(device: torch.device | None = None) -> dict:
    """Peak extra memory of one forward+backward of the 64->64 layer, each in a fresh process.

    CPU: growth of the resident set's high-water mark (Linux ``/proc``), with glibc told to hand
    large blocks straight back to the system so that freed memory is not counted as still live.
    CUDA: ``torch.cuda.max_memory_allocated``.
    """
    device = device or torch.device("cpu")
    if device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        return {"error": "peak memory on CPU needs Linux /proc"}
    out = {impl: _peak_bytes(impl, device) for impl in ("fused", "naive", "conv")}
    return {
        "peak_mib": {k: v / 2**20 for k, v in out.items()},
        "ratios": {"fused_vs_naive": out["fused"] / out["naive"], "fused_vs_conv": out["fused"] / out["conv"]},
    }


def bases_benchmark(batch: int = 128, repeats: int = 10, layer_repeats: int = 5,
                    device: torch.device | None = None, memory: bool = True,
                    layer_shape: tuple[int, int, int, int] = (16, 64, 32, 32)) -> dict:
    """Every basis family at the paper's parameter count (:data:`.models.MATCHED_BASES`).

    Training step of KANC MLP (Medium) per family, interleaved with CNN (Medium) (ratio to it),
    and the fused ``KANConv2d(64, 64, 3, padding=1)`` per family on ``(16, 64, 32, 32)``:
    forward+backward time (interleaved) and peak memory (fresh process each, as
    :func:`layer_peak_memory`; the time also on another ``layer_shape``, C -> C channels).
    """
    from ..layers import KANConv2d
    from .models import MATCHED_BASES, create_model

    device = device or torch.device("cpu")
    steps, params = {}, {}
    for label, options in [("CNN (Medium)", None)] + list(MATCHED_BASES.items()):
        torch.manual_seed(0)
        model = create_model("cnn_medium" if options is None else "kanc_mlp_medium", **(options or {})).to(device)
        params[label] = sum(p.numel() for p in model.parameters())
        steps[label] = make_train_step(model, batch, device)
    step_med = {k: statistics.median(v) for k, v in time_interleaved(steps, repeats, device).items()}
    cnn = step_med["CNN (Medium)"]

    torch.manual_seed(0)
    x = torch.randn(layer_shape, device=device, requires_grad=True)
    c = layer_shape[1]
    layers = {name: KANConv2d(c, c, 3, padding=1, **options).to(device) for name, options in MATCHED_BASES.items()}

    def run(layer, compiled: bool):
        def fn():
            build.set_enabled(None if compiled else False)
            try:
                layer(x).sum().backward()
            finally:
                build.set_enabled(None)
        return fn

    fns = {name: run(layer, True) for name, layer in layers.items()}
    if device.type == "cpu":  # the same layers without the compiled CPU loops, for their speed-up
        fns.update({f"{name} (portable)": run(layer, False) for name, layer in layers.items()})
    layer_med = {k: statistics.median(v) for k, v in time_interleaved(fns, layer_repeats, device).items()}
    rows = {}
    for name in MATCHED_BASES:
        rows[name] = {"params": params[name], "step_ms": step_med[name] * 1e3, "step_vs_cnn": step_med[name] / cnn,
                      "layer_ms": layer_med[name] * 1e3, "layer_vs_bspline": layer_med[name] / layer_med["bspline"]}
        if f"{name} (portable)" in layer_med:
            rows[name]["layer_portable_ms"] = layer_med[f"{name} (portable)"] * 1e3
            rows[name]["compiled_speedup"] = layer_med[f"{name} (portable)"] / layer_med[name]
        if memory and tuple(layer_shape) == (16, 64, 32, 32) and (device.type == "cuda" or Path("/proc/self/clear_refs").exists()):
            rows[name]["layer_peak_mib"] = _peak_bytes("fused", device, MATCHED_BASES[name]) / 2**20
    return {"batch": batch, "cnn_step_ms": cnn * 1e3, "cnn_params": params["CNN (Medium)"], "families": rows}


def _forward_backward(layer: nn.Module, x: torch.Tensor, sparse_mode: str | None = None) -> Callable[[], None]:
    """One forward + backward of ``layer`` on ``x`` under ``sparse_mode`` (``kanvolution.ops.sparse``)."""
    from ..ops import sparse

    def fn() -> None:
        sparse.set_mode(sparse_mode)
        try:
            layer(x).sum().backward()
        finally:
            sparse.set_mode(None)
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return fn


def sparse_benchmark(repeats: int = 7, device: torch.device | None = None, memory: bool = True,
                     layers: list[tuple[str, int, tuple[int, int, int, int]]] | None = None,
                     linear_layers: list[tuple[str, int, int, int]] | None = None,
                     grid_sizes: tuple[int, ...] = tuple(SPARSE_TARGETS)) -> dict:
    """Forward + backward of the wide layers ``KANConv2d(C, C, 3, padding=1)`` of ``layers``
    (:data:`SPARSE_LAYERS`) against ``nn.Conv2d(C, C, 3, padding=1)`` on the same input, and of the
    dense layers ``KANLinear(C, O)`` of ``linear_layers`` (:data:`SPARSE_LINEAR_LAYERS`) against
    ``nn.Linear(C, O)``, interleaved per layer and grid size, on the path the rule picks (``auto``:
    the sparse kernels on CPU) and on the dense fused path (``never``); and, with ``memory``, the
    peak memory of one forward + backward of each path in a fresh process.
    """
    from ..layers import KANConv2d, KANLinear

    device = device or torch.device("cpu")
    cases = [(label, shape, c, "nn.Conv2d", lambda c, o: nn.Conv2d(c, o, 3, padding=1),
              lambda c, o, gs: KANConv2d(c, o, 3, padding=1, grid_size=gs))
             for label, c, shape in (SPARSE_LAYERS if layers is None else layers)]
    cases += [(label, (n, c), o, "nn.Linear", nn.Linear, lambda c, o, gs: KANLinear(c, o, grid_size=gs))
              for label, c, o, n in (SPARSE_LINEAR_LAYERS if linear_layers is None else linear_layers)]
    rows = {}
    for label, shape, out, baseline, make_baseline, make_kan in cases:
        torch.manual_seed(0)
        x = (torch.rand(shape, device=device) * 2 - 1).requires_grad_()
        plain = make_baseline(shape[1], out).to(device)
        for gs in grid_sizes:
            kan = make_kan(shape[1], out, gs).to(device)
            fns = {baseline: _forward_backward(plain, x), "auto": _forward_backward(kan, x, "auto"),
                   "dense": _forward_backward(kan, x, "never")}
            med = {k: statistics.median(v) for k, v in time_interleaved(fns, repeats, device).items()}
            row = {"layer": label, "input": list(shape), "grid_size": gs, "baseline": baseline,
                   "ms": {k: v * 1e3 for k, v in med.items()},
                   "auto_vs_baseline": med["auto"] / med[baseline], "dense_vs_baseline": med["dense"] / med[baseline]}
            if memory and (device.type == "cuda" or Path("/proc/self/clear_refs").exists()):
                peaks = {mode: _peak_bytes("fused", device, {"grid_size": gs}, shape, mode, out) / 2**20
                         for mode in ("auto", "never")}
                row["peak_mib"] = {"auto": peaks["auto"], "dense": peaks["never"]}
            rows[f"{label} gs={gs}"] = row
    return {"rows": rows}


def epoch_benchmark(data_dir: str | None, model: str = "kanc_mlp_medium", grid_size: int | None = 10,
                    device: str = "cpu") -> dict:
    """One epoch (60k training images + the 10k test pass, batch 128, AdamW 1e-3) through the trainer."""
    from .config import TrainConfig
    from .training import train

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(model=model, grid_size=grid_size, dataset="fashion-mnist", data_dir=data_dir,
                             epochs=1, batch_size=128, lr=1e-3, device=device, progress=False, download=False)
        results = train(config, tmp, log=None)
    entry = results["history"][-1]
    return {"model": model, "grid_size": grid_size, "seconds": entry["seconds"],
            "minutes_per_epoch": results["minutes_per_epoch"], "test_accuracy": entry["test_accuracy"]}


def _environment(device: torch.device) -> dict:
    from .environment import cpu_name

    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _print_report(report: dict) -> None:
    print(f"# kanvolution bench ({report['environment']['device']}, {report['environment']['threads']} threads, "
          f"torch {report['environment']['torch']})")
    if "train_step" in report:
        s = report["train_step"]
        print(f"\nTraining step, batch {s['batch']} (forward + backward + AdamW), median")
        print("| model | ms / step | x CNN (Medium) | runs |\n| --- | ---: | ---: | ---: |")
        for name, row in s["steps"].items():
            print(f"| {name} | {row['median_ms']:.2f} | {row['vs_cnn']:.2f} | {row['runs']} |")
    if "compile" in report:
        s = report["compile"]
        print(f"\nTraining step, batch {s['batch']}: torch.compile (default settings) beside eager, median")
        print("| model | eager ms | compiled ms | compiled / eager | first compiled step (compilation) s |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, row in s["models"].items():
            print(f"| {name} | {row['eager_ms']:.2f} | {row['compiled_ms']:.2f} | {row['compiled_vs_eager']:.2f} |"
                  f" {row['first_compiled_step_s']:.1f} |")
    if "layer" in report:
        s = report["layer"]
        print("\nLayer KANConv2d(64, 64, 3, padding=1, grid_size=10) on (16, 64, 32, 32), median")
        print("| what | ms |\n| --- | ---: |")
        for name, ms in s["times_ms"].items():
            print(f"| {name} | {ms:.2f} |")
    if "memory" in report and "peak_mib" in report["memory"]:
        s = report["memory"]
        print("\nPeak memory of one forward+backward of that layer (fresh process each)")
        print("| implementation | peak MiB |\n| --- | ---: |")
        for name, mib in s["peak_mib"].items():
            print(f"| {name} | {mib:.1f} |")
    if "bases" in report:
        s = report["bases"]
        print(f"\nBasis families at matched size: KANC MLP (Medium) training step (batch {s['batch']}; CNN (Medium)"
              f" {s['cnn_step_ms']:.2f} ms) and KANConv2d(64, 64, 3, padding=1) forward+backward on"
              " (16, 64, 32, 32), median")
        print("| basis | params | ms / step | x CNN | layer ms | x bspline | layer ms without the compiled loops"
              " | speed-up | layer peak MiB |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, r in s["families"].items():
            mib = f"{r['layer_peak_mib']:.1f}" if "layer_peak_mib" in r else "-"
            portable = (f"{r['layer_portable_ms']:.1f} | {r['compiled_speedup']:.2f}" if "compiled_speedup" in r
                        else "- | -")
            print(f"| {name} | {r['params']:,} | {r['step_ms']:.2f} | {r['step_vs_cnn']:.2f} | {r['layer_ms']:.1f} | "
                  f"{r['layer_vs_bspline']:.2f} | {portable} | {mib} |")
    if "sparse" in report:
        print("\nKANConv2d(C, C, 3, padding=1) and KANLinear forward+backward against nn.Conv2d / nn.Linear of the"
              " same shape, median; the path the rule picks (auto) and the dense fused path")
        print("| layer | input | gs | baseline | ms | auto ms | x baseline | dense ms | x baseline |"
              " peak MiB auto / dense |")
        print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in report["sparse"]["rows"].values():
            mib = f"{r['peak_mib']['auto']:.1f} / {r['peak_mib']['dense']:.1f}" if "peak_mib" in r else "-"
            print(f"| {r['layer']} | {tuple(r['input'])} | {r['grid_size']} | {r['baseline']} |"
                  f" {r['ms'][r['baseline']]:.2f} | {r['ms']['auto']:.2f} | {r['auto_vs_baseline']:.2f} |"
                  f" {r['ms']['dense']:.2f} | {r['dense_vs_baseline']:.2f} | {mib} |")
    if "epoch" in report:
        s = report["epoch"]
        print(f"\nFashion-MNIST epoch through the trainer ({s['model']}, gs={s['grid_size']}): "
              f"{s['seconds']:.1f} s = {s['minutes_per_epoch']:.4f} minutes per epoch")
    if report["checks"]:
        print("\nRatios (same run) against the targets")
    for name, (value, target, ok) in report["checks"].items():
        print(f"- {name}: {value:.3f} (target {'<=' if name != 'reference_vs_kanc10' else '>='} {target:g}) "
              f"{'OK' if ok else 'MISSED'}")


def _checks(report: dict) -> dict:
    checks = {}
    ratios = report.get("train_step", {}).get("ratios", {})
    for key in ("kanc10_vs_cnn", "kanc20_vs_cnn", "kanc20_vs_kanc10"):
        if key in ratios:
            checks[key] = (ratios[key], TARGETS[key], ratios[key] <= TARGETS[key])
    if "reference_vs_kanc10" in ratios:
        v = ratios["reference_vs_kanc10"]
        checks["reference_vs_kanc10"] = (v, TARGETS["reference_vs_kanc10"], v >= TARGETS["reference_vs_kanc10"])
    mem = report.get("memory", {}).get("ratios", {})
    if "fused_vs_naive" in mem:
        v = mem["fused_vs_naive"]
        checks["memory_vs_naive"] = (v, TARGETS["memory_vs_naive"], v <= TARGETS["memory_vs_naive"])
    for key, row in report.get("sparse", {}).get("rows", {}).items():
        target = SPARSE_TARGETS.get(row["grid_size"]) if row["baseline"] == "nn.Conv2d" else None
        if target is not None:
            v = row["auto_vs_baseline"]
            checks[f"{key} auto_vs_conv"] = (v, target, v <= target)
        if "peak_mib" in row:
            v = row["peak_mib"]["auto"] / row["peak_mib"]["dense"]
            checks[f"{key} memory_vs_dense"] = (v, 1.0, v <= 1.0)
    if "epoch" in report:
        v = report["epoch"]["seconds"]
        checks["epoch_seconds"] = (v, TARGETS["epoch_seconds"], v <= TARGETS["epoch_seconds"])
    return checks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", nargs="+", choices=("step", "compile", "layer", "memory", "sparse", "epoch", "bases"),
                        default=["step", "compile", "layer", "memory", "sparse", "epoch"],
                        help="which benchmarks to run (bases: every basis family, run only when named)")
    parser.add_argument("--data-dir", default=None, help="folder with fashion-mnist/ (for the epoch benchmark)")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved rounds of the step benchmark")
    parser.add_argument("--reference-repeats", type=int, default=3, help="rounds for the slow reference loop")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference loop")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default="benchmarks/results.json", help="JSON file for the report")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report: dict = {"environment": _environment(device), "command": "kanvolution bench " + " ".join(sys.argv[2:])}
    if "step" in args.only:
        report["train_step"] = train_step_benchmark(repeats=args.repeats, reference_repeats=args.reference_repeats,
                                                    device=device, include_reference=not args.no_reference)
    if "compile" in args.only:
        report["compile"] = compile_benchmark(repeats=args.repeats, device=device)
    if "layer" in args.only:
        report["layer"] = layer_benchmark(device=device)
    if "memory" in args.only:
        report["memory"] = layer_peak_memory(device)
    if "sparse" in args.only:
        report["sparse"] = sparse_benchmark(device=device)
    if "epoch" in args.only:
        report["epoch"] = epoch_benchmark(args.data_dir, device=args.device)
    if "bases" in args.only:
        report["bases"] = bases_benchmark(repeats=args.repeats, device=device)
    report["checks"] = _checks(report)
    _print_report(report)
    if args.out:
        from .files import write_json

        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, report)
        print(f"\nwrote {path}")
    return 0
