"""torch.compile(model, fullgraph=True) (inductor) on every zoo model: forward and backward
against eager, float32. Too slow for the test suite (tens of seconds of compilation per model on
two cores), which runs inductor on a few models and the same graph capture with
``backend="aot_eager"`` on all; this script covers the rest.

Inductor runs with ``reorder_for_peak_memory`` off (:data:`kanvolution.ops.kan.COMPILE_OPTIONS`): with it
on, torch 2.13 zeroes the gradients of the convolutions before a max-pool in models such as
``conv_kan_small``. ``--default-options`` compiles with inductor's defaults instead.

Usage: python benchmarks/compile_zoo.py [--threads N] [--default-options] [--models NAME ...]
[--out benchmarks/compile_zoo.json]

``--models`` compiles only those models and replaces their rows in ``--out`` (the other rows stay,
when the file was written with the same torch and options).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from kanvolution.models import create_model, list_models, model_info
from kanvolution.ops.kan import COMPILE_OPTIONS


def check(name: str, options: dict, batch: int = 16) -> dict:
    kwargs = {"grid_size": 10} if model_info(name).has_kan else {}
    torch.manual_seed(0)
    eager = create_model(name, **kwargs)
    compiled_model = create_model(name, **kwargs)
    compiled_model.load_state_dict(eager.state_dict())
    torch._dynamo.reset()  # a fresh cache per model: dynamo's recompile limit is per code object
    compiled = torch.compile(compiled_model, fullgraph=True, options=options)
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = torch.arange(batch) % 10
    start = time.perf_counter()
    out_c = compiled(x)
    F.nll_loss(out_c, y).backward()
    seconds = time.perf_counter() - start
    out_e = eager(x)
    F.nll_loss(out_e, y).backward()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    # A gradient that is zero in exact arithmetic (a convolution's bias before a batch norm) is
    # rounding noise in both runs: it is measured against the model's largest gradient instead.
    largest = max(float(p.grad.abs().max()) for p in eager.parameters())
    grads = [rel(pc.grad, pe.grad) if pe.grad.abs().max() >= 1e-5 * largest
             else float((pc.grad - pe.grad).abs().max()) / largest
             for pc, pe in zip(compiled_model.parameters(), eager.parameters())]
    return {"output_rel_err": rel(out_c.detach(), out_e.detach()), "max_grad_rel_err": max(grads),
            "first_step_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--default-options", action="store_true", help="inductor's default settings")
    parser.add_argument("--out", default="benchmarks/compile_zoo.json")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="only these models (default: the whole zoo)")
    args = parser.parse_args()
    options = {} if args.default_options else COMPILE_OPTIONS
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    if args.models:
        try:
            with open(args.out) as f:
                old = json.load(f)
        except FileNotFoundError:
            old = {}
        if old.get("torch") == torch.__version__ and old.get("options") == options:
            results = {name: row for name, row in old["results"].items() if name not in args.models}
    for name in args.models or list_models():
        results[name] = row = check(name, options)
        ok = row["output_rel_err"] <= 1e-5 and row["max_grad_rel_err"] <= 1e-5
        print(f"{name:24s} output {row['output_rel_err']:.1e}  grads {row['max_grad_rel_err']:.1e}"
              f"  first step {row['first_step_s']:5.1f} s  {'OK' if ok else 'MISMATCH'}", flush=True)
        row["ok"] = ok
    results = {name: results[name] for name in list_models() if name in results}  # the zoo's order
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "options": options, "results": results}, f, indent=2)
        f.write("\n")
    print(f"{sum(r['ok'] for r in results.values())}/{len(results)} models match eager to 1e-5")


if __name__ == "__main__":
    main()
