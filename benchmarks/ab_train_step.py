"""A/B training step of a zoo model: this checkout against another copy of the package, interleaved
in one process on one thread (ratios from the same run, as absolute times drift on shared machines).

The other copy is a ``kanvolution`` package folder renamed (e.g. ``git archive <rev> src/kanvolution``
extracted and moved to ``/tmp/kan_old/kanvolution_old``); give its parent folder and name::

    python benchmarks/ab_train_step.py --other /tmp/kan_old --package kanvolution_old
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def make_step(models_module, name: str, grid_size: int, batch: int):
    torch.manual_seed(0)
    model = models_module.create_model(name, grid_size=grid_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, generator=gen) * 2 - 1
    y = torch.randint(0, 10, (batch,), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        F.nll_loss(model(x), y).backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", required=True, help="folder holding the other package")
    parser.add_argument("--package", default="kanvolution_old", help="the other package's folder name")
    parser.add_argument("--model", default="kanc_mlp_medium")
    parser.add_argument("--grid-size", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, args.other)
    import kanvolution.models as new

    old = importlib.import_module(f"{args.package}.models")
    steps = {"new": make_step(new, args.model, args.grid_size, args.batch),
             "old": make_step(old, args.model, args.grid_size, args.batch)}
    for step in steps.values():  # warm-up: kernel builds, allocator, caches
        for _ in range(3):
            step()
    times = {k: [] for k in steps}
    ratios = []
    for _ in range(args.rounds):
        for key in ("new", "old") if len(ratios) % 2 else ("old", "new"):
            start = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - start)
        ratios.append(times["new"][-1] / times["old"][-1])
    print(f"{args.model} gs={args.grid_size} batch {args.batch}, 1 thread, {args.rounds} interleaved rounds")
    for key, ts in times.items():
        print(f"  {key}: median {statistics.median(ts) * 1e3:.2f} ms, min {min(ts) * 1e3:.2f} ms")
    print(f"  new/old: median of per-round ratios {statistics.median(ratios):.3f}, "
          f"ratio of medians {statistics.median(times['new']) / statistics.median(times['old']):.3f}, "
          f"ratio of minima {min(times['new']) / min(times['old']):.3f}")


if __name__ == "__main__":
    main()
