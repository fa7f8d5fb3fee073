"""The ``kanvolution`` command: train, evaluate, list models, make tables, reproduce the paper.

Argument parsing only: every command calls one function of :mod:`kanvolution.experiments` or
:mod:`kanvolution.viz`. ``bench`` and ``inspect`` are imported only when asked for, so a problem
in one of them never breaks the other commands. Every expected failure is a
:class:`~kanvolution.errors.KanvolutionError`: one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import KanvolutionError

__all__ = ["EXTERNAL_COMMANDS", "CliError", "build_parser", "main"]

PROG = "kanvolution"

# Subcommands implemented elsewhere: each module has add_arguments(parser) and run(args) -> int.
EXTERNAL_COMMANDS: dict[str, str] = {"bench": "kanvolution.experiments.bench", "inspect": "kanvolution.viz.report"}
_EXTERNAL_HELP = {
    "bench": "time the KAN layers and models (ratios against the paper's implementation and plain convolutions)",
    "inspect": "look inside a trained model: its learned functions and feature maps",
}
_EXTRAS = {
    "torchmetrics": "train",
    "tqdm": "train",
    "matplotlib": "train",
    "optuna": "tune",
    "psycopg": "postgres",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "export",
}


class CliError(KanvolutionError):
    """A command line that cannot work (an unknown name, an option out of range)."""


# --------------------------------------------------------------------------------------------
# Checks shared by the commands


def _check_model(name: str) -> None:
    from kanvolution.experiments.models import list_models

    names = list_models()
    if name not in names:
        raise CliError(f"unknown model {name!r}; valid models: {', '.join(names)}")


def _check_dataset(name: str) -> None:
    from kanvolution.experiments.data import DATASETS

    if name not in DATASETS:
        raise CliError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# --------------------------------------------------------------------------------------------
# train / evaluate / demo


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir", help="folder holding mnist/ and fashion-mnist/ (default: kanvolution.data's search path)"
    )
    p.add_argument("--no-download", dest="download", action="store_false", help="never fetch missing data files")
    p.add_argument(
        "--max-train-samples", type=_positive_int, metavar="N", help="use only the first N training images (quick runs)"
    )
    p.add_argument(
        "--max-test-samples", type=_positive_int, metavar="N", help="use only the first N test images (quick runs)"
    )


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--no-progress", dest="progress", action="store_const", const=False, default=None, help="no progress bars"
    )


def _add_train_parser(sub: Any) -> None:
    from kanvolution.experiments.config import DEFAULT_GRID_SIZE, LR_SCHEDULES, PRECISIONS, TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train one model and write its run folder",
        description="Train one model; write OUT/checkpoint.pt, OUT/results.json and OUT/learning_curves.png.",
    )
    p.add_argument("--model", required=True, help="a name from `kanvolution models`")
    p.add_argument(
        "--grid-size",
        type=_positive_int,
        help=f"KAN grid intervals (default: {DEFAULT_GRID_SIZE} for models with KAN layers)",
    )
    _add_basis_options(p)
    p.add_argument("--dataset", required=True, help="mnist or fashion-mnist")
    p.add_argument("--out", required=True, help="run folder")
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (from checkpoint.prev.pt if checkpoint.pt is damaged)",
    )
    again.add_argument(
        "--restart", action="store_true", help="delete the run in --out (checkpoints, results) and start over"
    )
    p.add_argument("--epochs", type=_positive_int, default=d.epochs, help=f"(default: {d.epochs})")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help=f"(default: {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default: {d.lr:g})")
    p.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default: {d.weight_decay:g})"
    )
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=d.lr_schedule,
        help="cosine: per epoch to 0; warmup-cosine: per step, linear warm-up over --warmup-epochs then cosine to 0"
        " (default: none, as in the paper)",
    )
    p.add_argument(
        "--warmup-epochs", type=int, default=d.warmup_epochs, help="warm-up of --lr-schedule warmup-cosine (default: 0)"
    )
    p.add_argument(
        "--label-smoothing", type=float, default=d.label_smoothing, help="of the training loss (default: 0)"
    )
    p.add_argument(
        "--crop-padding",
        type=int,
        default=d.crop_padding,
        metavar="P",
        help="augment: pad training images by P pixels and crop back at random (default: 0, off)",
    )
    p.add_argument(
        "--hflip", action="store_true", help="augment: mirror half the training images (fashion-mnist only)"
    )
    p.add_argument(
        "--grid-update-epochs",
        type=int,
        default=d.grid_update_epochs,
        metavar="N",
        help="after each of the first N epochs, adapt the KAN layers' knots to their inputs (default: 0)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"torch seed (default: {d.seed})")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help="hold out this part of the training set and evaluate on it each epoch (paper's search: 0.2; default: 0)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="32: float32 throughout (default); bf16-mixed: forward and loss under bfloat16 autocast,"
        " weights and optimiser states in float32",
    )
    _add_data_options(p)
    _add_runtime_options(p)
    p.set_defaults(_handler=_cmd_train)


def _add_basis_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--basis", default="bspline",
                   help="basis family of the KAN layers (default: bspline; see kanvolution.bases.list_bases)")
    p.add_argument("--degree", type=int, help="degree D of the polynomial basis families")


def _train_config_from_args(args: argparse.Namespace) -> Any:
    from kanvolution.experiments.config import TrainConfig

    _check_model(args.model)
    _check_dataset(args.dataset)
    return TrainConfig(
        model=args.model,
        grid_size=args.grid_size,
        basis=args.basis,
        degree=args.degree,
        dataset=args.dataset,
        data_dir=args.data_dir,
        download=args.download,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        crop_padding=args.crop_padding,
        hflip=args.hflip,
        grid_update_epochs=args.grid_update_epochs,
        seed=args.seed,
        val_fraction=args.val_fraction,
        precision=args.precision,
        max_train_samples=args.max_train_samples,
        max_test_samples=args.max_test_samples,
        device=args.device,
        num_threads=args.threads,
        progress=args.progress,
    )


def _print_summary(results: dict[str, Any], out: str | os.PathLike[str]) -> None:
    from kanvolution.experiments.schema import RESULTS_FILE

    from kanvolution.experiments.tables import markdown_table, rows_from_results

    print(
        f"{results['name']} on {results['dataset']}: {results['epochs_completed']} epochs,"
        f" {results['params']:,} parameters -> {out}"
    )
    for key in ("test", "test_val_selected", "test_last"):
        block = results.get(key)
        if block:
            print(
                f"  {block['selection']} (epoch {block['epoch']}):"
                f" accuracy {100 * block['accuracy']:.2f}%, F1 {100 * block['f1']:.2f}%"
            )
    rows, _ = rows_from_results([Path(out) / RESULTS_FILE])
    if rows:
        print()
        print(markdown_table(rows, compare_paper=rows[0].paper is not None), end="")


def _cmd_train(args: argparse.Namespace) -> int:
    from kanvolution.experiments.training import train

    config = _train_config_from_args(args)
    config.validate()
    results = train(
        config, args.out, resume=args.resume, restart=args.restart, log=print if _is_main_process() else None
    )
    if _is_main_process():
        print()
        _print_summary(results, args.out)
    return 0


def _add_evaluate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="re-evaluate a run's checkpoint, or the shipped pretrained weights, on the test set",
        description=(
            "Re-evaluate RUN_DIR/checkpoint.pt, or with --pretrained NAME [--grid-size G] the weights shipped"
            " with the package, on the test set and print the metrics."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a run folder (or use --pretrained)")
    p.add_argument("--pretrained", metavar="NAME", help="evaluate the weights shipped for this zoo model instead")
    p.add_argument("--grid-size", type=_positive_int, metavar="G", help="with --pretrained: the grid size (default: 10)")
    p.add_argument("--data-dir", help="where the data lives, if not where the run found it")
    p.add_argument("--device", help="overrides the run's device")
    p.add_argument("--max-test-samples", type=_positive_int, metavar="N", help="overrides the run's test subsample")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(_handler=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from kanvolution.experiments.checkpoint import load_checkpoint
    from kanvolution.experiments.training import evaluate

    if (args.run_dir is None) == (args.pretrained is None):
        raise CliError("give a RUN_DIR or --pretrained NAME (one of them)")
    if args.pretrained is not None:
        metrics, source = _evaluate_pretrained(args)
    else:
        if args.grid_size is not None:
            raise CliError("--grid-size goes with --pretrained; a run folder knows its grid size")
        metrics = evaluate(args.run_dir, data_dir=args.data_dir, device=args.device, max_test_samples=args.max_test_samples)
        config = load_checkpoint(args.run_dir)["config"]
        source = f"{args.run_dir}: {config['model']} on {config['dataset']}"
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    print(f"{source}, weights of epoch {metrics['epoch']}, {metrics['test_samples']} test images")
    print(
        f"loss {metrics['loss']:.4f}  accuracy {100 * metrics['accuracy']:.2f}%"
        f"  precision {100 * metrics['precision']:.2f}%"
        f"  recall {100 * metrics['recall']:.2f}%  F1 {100 * metrics['f1']:.2f}%"
    )
    return 0


def _evaluate_pretrained(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from kanvolution.experiments.config import TrainConfig
    from kanvolution.experiments.models import DEFAULT_GRID_SIZE, create_model, model_info
    from kanvolution.experiments.training import evaluate_model

    _check_model(args.pretrained)
    kwargs = {}
    if model_info(args.pretrained).has_kan:
        kwargs["grid_size"] = args.grid_size or DEFAULT_GRID_SIZE
    elif args.grid_size is not None:
        raise CliError(f"{args.pretrained!r} has no KAN layers, so it takes no --grid-size")
    model = create_model(args.pretrained, pretrained=True, **kwargs)
    card = model.pretrained_cfg
    config = TrainConfig(model=args.pretrained, dataset=card["dataset"], data_dir=args.data_dir,
                         device=args.device or "auto", max_test_samples=args.max_test_samples)
    metrics = {"epoch": card["epochs"], **evaluate_model(model, config)}
    recorded = f"recorded test accuracy {100 * card['test_accuracy']:.2f}%"
    return metrics, f"pretrained {card['tag']} ({recorded}) on {card['dataset']}"


def _add_demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="train KANC MLP (Medium, gs = 10) on Fashion-MNIST for a few epochs and print its table row",
        description=(
            "Train KANC MLP (Medium) (gs = 10) on Fashion-MNIST (lr 1e-3, weight decay 1e-4, batch 128) and print"
            " its row of the paper's table beside the paper's numbers. Running it again resumes the same run."
        ),
    )
    p.add_argument("--epochs", type=_positive_int, default=2, help="(default: 2; the paper trains up to 20)")
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    _add_data_options(p)
    _add_runtime_options(p)
    p.set_defaults(_handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from kanvolution.experiments.config import TrainConfig
    from kanvolution.experiments.training import train

    config = TrainConfig(
        model="kanc_mlp_medium",
        grid_size=10,
        dataset="fashion-mnist",
        data_dir=args.data_dir,
        download=args.download,
        epochs=args.epochs,
        batch_size=128,
        lr=1e-3,
        weight_decay=1e-4,
        max_train_samples=args.max_train_samples,
        max_test_samples=args.max_test_samples,
        device=args.device,
        num_threads=args.threads,
        progress=args.progress,
    )
    print(f"KANC MLP (Medium) (gs = 10) on Fashion-MNIST, {args.epochs} epochs -> {args.out}")
    results = train(config, args.out, resume=True)
    print()
    _print_summary(results, args.out)
    return 0


# --------------------------------------------------------------------------------------------
# models / table


def _add_models_parser(sub: Any) -> None:
    p = sub.add_parser("models", help="list the model zoo with the paper's names and parameter counts")
    p.add_argument("pattern", nargs="?", help="fnmatch pattern, e.g. 'kkan*'")
    p.set_defaults(_handler=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from kanvolution.experiments.models import create_model, list_models, model_info
    from kanvolution.experiments.training import count_parameters

    names = list_models(args.pattern)
    if not names:
        raise CliError(f"no model matches {args.pattern!r}; valid models: {', '.join(list_models())}")
    from kanvolution.experiments.config import DEFAULT_GRID_SIZE, default_grid_size

    rows = [("name", "paper name", "params (gs = 10)", "params (gs = 20)", "params (own default gs)")]
    for name in names:
        info = model_info(name)
        if info.has_kan:
            counts = [f"{count_parameters(create_model(name, grid_size=g)):,}" for g in (10, 20)]
            own = default_grid_size(name)
            counts.append(f"{count_parameters(create_model(name)):,} (gs = {own})" if own != DEFAULT_GRID_SIZE else "")
        else:
            counts = [f"{count_parameters(create_model(name)):,}", "", ""]
        rows.append((name, info.table_name, *counts))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
    return 0


def _add_table_parser(sub: Any) -> None:
    p = sub.add_parser(
        "table",
        help="the paper's results table from results.json files",
        description=(
            "Print the paper's table layout (Model | Accuracy | Precision | Recall | F1 Score | # Params | Minutes per"
            " epoch) from results.json files. A RUN_DIR may be a run folder, a results.json, or a folder searched"
            " recursively."
        ),
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--csv", action="store_true", help="CSV instead of Markdown")
    p.add_argument("--compare-paper", action="store_true", help="add the paper's Fashion-MNIST numbers beside ours")
    p.add_argument(
        "--selection",
        choices=("paper", "val", "last"),
        default="paper",
        help="which epoch a row reports: the best test epoch as in the paper (default), the validation-selected one,"
        " or the last",
    )
    p.set_defaults(_handler=_cmd_table)


def _cmd_table(args: argparse.Namespace) -> int:
    from kanvolution.experiments.tables import csv_table, find_results, markdown_table, rows_from_results

    files = find_results(args.run_dirs)
    rows, skipped = rows_from_results(files, args.selection)
    if not rows:
        raise CliError(
            f"no results.json with test metrics for selection {args.selection!r} under {' '.join(args.run_dirs)}"
        )
    if skipped:
        print(f"({len(skipped)} results.json without such test metrics skipped, e.g. search runs)", file=sys.stderr)
    print(csv_table(rows, args.compare_paper) if args.csv else markdown_table(rows, args.compare_paper), end="")
    return 0


# --------------------------------------------------------------------------------------------
# reproduce


def _add_reproduce_parser(sub: Any) -> None:
    p = sub.add_parser(
        "reproduce",
        help="the paper's experiment: search, final runs, table beside the paper's",
        description=(
            "Per model and grid size: an Optuna study runs the paper's 8 random combinations of lr x weight decay x"
            " batch size (NumPy seed 42), each up to --epochs epochs on an 80/20 split; the best (combination, epoch"
            " count) is"
            " retrained on the whole training set and tested every epoch. Re-running resumes. Writes OUT/table.md."
        ),
    )
    p.add_argument("--dataset", default="fashion-mnist", help="(default: fashion-mnist, the paper's table)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--models", nargs="+", metavar="NAME", help="registry names (default: the 11 models of the paper's table)"
    )
    p.add_argument(
        "--grid-sizes",
        nargs="+",
        type=_positive_int,
        default=[10, 20],
        metavar="G",
        help="for models with KAN layers (default: 10 20)",
    )
    p.add_argument(
        "--protocol",
        choices=("paper", "paper-configs", "fixed", "beyond", "bases"),
        default="paper",
        help="paper: search then retrain; paper-configs: the configurations the paper's own search chose"
        " (its logs), once per --seeds; fixed: lr 1e-3, weight decay 1e-4, batch 128, no search; beyond: the"
        " small nets (default models kan_small_net cnn_small_net_matched kan_bottleneck_net"
        " cnn_bottleneck_net_matched kan_stem_bottleneck_net kan_early_bottleneck_net, each at its own grid size)"
        " with"
        " warm-up + cosine, label smoothing, random crops (and flips on fashion-mnist), validation-selected"
        " epoch, for --epochs, once per --seeds; bases: KANC MLP (Medium) with every basis family at matched"
        " size, the fixed recipe, once per --seeds",
    )
    p.add_argument("--bases", nargs="+", metavar="NAME", help="basis families of --protocol bases (default: all)")
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S",
        help="torch seeds of --protocol paper-configs, beyond and bases (default: 0 1 2)",
    )
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=20,
        help="search budget per trial, or training length with --protocol fixed (default: 20)",
    )
    p.add_argument(
        "--trials", type=_positive_int, default=8, help="how many of the paper's 8 combinations to run (default: 8)"
    )
    p.add_argument(
        "--storage",
        help="Optuna storage URL shared by several workers, e.g. postgresql://user@host/db (default: sqlite:///OUT/study.db)",
    )
    p.add_argument(
        "--heartbeat",
        type=_positive_int,
        default=20,
        metavar="S",
        help="seconds between a running trial's signs of life in the study; a trial silent for 3 beats (its"
        " worker died) is queued again and resumes from its checkpoint (default: 20)",
    )
    p.add_argument(
        "--search-only",
        action="store_true",
        help="run search trials only, no final runs (for extra workers on a shared --storage)",
    )
    p.add_argument(
        "--table-only",
        action="store_true",
        help="with --protocol paper-configs, beyond or bases: write OUT/table.md (and the plot) from the runs"
        " already in OUT, training nothing (runs not finished count as missing seeds)",
    )
    p.add_argument(
        "--zoo",
        metavar="DIR",
        help="with --protocol beyond: also put the runs of the paper's zoo found in DIR (e.g. the OUT of"
        " --protocol paper-configs) on OUT/accuracy_vs_params.png",
    )
    _add_data_options(p)
    _add_runtime_options(p)
    p.set_defaults(_handler=_cmd_reproduce)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from kanvolution.experiments.reproduce import (
        BEYOND_MODELS, PAPER_MODELS, SEEDED_PROTOCOLS, ReproduceConfig, reproduce,
    )

    _check_dataset(args.dataset)
    models = args.models or list(BEYOND_MODELS if args.protocol == "beyond" else PAPER_MODELS)
    for name in models:
        _check_model(name)
    if args.table_only and args.protocol not in SEEDED_PROTOCOLS:
        raise CliError(f"--table-only applies to --protocol paper-configs, beyond and bases, not {args.protocol}")
    if args.zoo is not None and args.protocol != "beyond":
        raise CliError(f"--zoo applies to --protocol beyond, not {args.protocol}")
    if args.zoo is not None and not Path(args.zoo).is_dir():
        raise CliError(f"--zoo must be a folder of runs, got {args.zoo!r}")
    if args.trials > 8:
        raise CliError(f"the paper draws 8 combinations; --trials must be at most 8, got {args.trials}")
    from kanvolution.bases import list_bases

    unknown = [name for name in args.bases or [] if name not in list_bases()]
    if unknown:
        raise CliError(f"unknown basis families {unknown}; expected some of {list_bases()}")
    cfg = ReproduceConfig(
        out=args.out,
        dataset=args.dataset,
        models=models,
        grid_sizes=args.grid_sizes,
        protocol=args.protocol,
        seeds=args.seeds,
        bases=args.bases,
        epochs=args.epochs,
        trials=args.trials,
        storage=args.storage,
        search_only=args.search_only,
        table_only=args.table_only,
        zoo=args.zoo,
        heartbeat=args.heartbeat,
        data_dir=args.data_dir,
        download=args.download,
        max_train_samples=args.max_train_samples,
        max_test_samples=args.max_test_samples,
        device=args.device,
        num_threads=args.threads,
        progress=args.progress,
    )
    reproduce(cfg)
    return 0


# --------------------------------------------------------------------------------------------
# export

# What a failed check tolerates: onnxruntime and PyTorch order float32 sums differently.
EXPORT_TOLERANCE = 1e-4


def _add_export_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export a run's model as ONNX or a torch.export program, and check it",
        description=(
            "Export the model of RUN_DIR/checkpoint.pt (dynamic batch size) as ONNX (standard operators,"
            " checked with onnxruntime) or as a torch.export program (.pt2, checked by loading it back),"
            f" and compare its outputs with PyTorch's; a difference above {EXPORT_TOLERANCE:g} fails."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", choices=("onnx", "pt2"), default="onnx", help="(default: onnx)")
    p.add_argument("--out", help="file to write (default: RUN_DIR/model.onnx or RUN_DIR/model.pt2)")
    p.add_argument("--batch", type=_positive_int, default=8, help="example batch size for the export and check (default: 8)")
    p.set_defaults(_handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from kanvolution.experiments.runs import load_run_model

    model, checkpoint = load_run_model(args.run_dir)
    out = Path(args.out) if args.out else Path(args.run_dir) / f"model.{args.format}"
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, 28, 28, generator=generator) * 2 - 1  # the zoo's (N, 1, 28, 28) inputs
    check = torch.rand(args.batch + 3, 1, 28, 28, generator=generator) * 2 - 1  # another batch size
    if args.format == "onnx":
        from kanvolution.export import check_onnx, export_onnx

        export_onnx(model, x, out)
        difference = check_onnx(model, out, check)
        checked = "onnxruntime"
    else:
        from kanvolution.export import save_program

        save_program(model, x, out)
        with torch.no_grad():
            got = torch.export.load(out).module()(check)
            difference = float((got - model(check)).abs().max())
        checked = "the reloaded program"
    print(f"{out}: {checkpoint['config']['model']} (epoch {checkpoint['epoch']}); {checked} vs PyTorch on"
          f" {len(check)} inputs: largest difference {difference:.2e}")
    if not difference <= EXPORT_TOLERANCE:
        raise CliError(f"{out} does not reproduce the model: largest difference {difference:.2e} > {EXPORT_TOLERANCE:g}")
    return 0


# --------------------------------------------------------------------------------------------
# bench / inspect (other modules)


def _unavailable(name: str, module: str, err: BaseException) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        raise CliError(f"the {name!r} command is unavailable: {module} failed to load ({type(err).__name__}: {err})")

    return handler


def _add_external_parser(sub: Any, name: str, load: bool) -> None:
    module = EXTERNAL_COMMANDS[name]
    if not load:
        # Only its help line is shown; the module is imported when the command is run.
        sub.add_parser(name, help=_EXTERNAL_HELP[name], add_help=False)
        return
    try:
        mod = importlib.import_module(module)
        p = sub.add_parser(
            name, help=_EXTERNAL_HELP[name], description=(mod.__doc__ or "").strip().split("\n\n")[0] or None
        )
        mod.add_arguments(p)
    except Exception as err:  # a broken module must not break the other commands
        p = sub.add_parser(name, help=_EXTERNAL_HELP[name], prefix_chars="\0")
        p.add_argument("rest", nargs="*")
        p.set_defaults(_handler=_unavailable(name, module, err))
        return
    p.set_defaults(_handler=lambda args: importlib.import_module(module).run(args))


# --------------------------------------------------------------------------------------------
# main


def _command_of(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``bench``/``inspect`` get their full arguments only when ``command`` names them."""
    from kanvolution import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="Convolutional Kolmogorov-Arnold Networks: train, evaluate, compare with the paper."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_models_parser(sub)
    _add_table_parser(sub)
    _add_reproduce_parser(sub)
    _add_demo_parser(sub)
    _add_export_parser(sub)
    for name in EXTERNAL_COMMANDS:
        _add_external_parser(sub, name, load=command == name)
    return parser


def _error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    handler = getattr(args, "_handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(handler(args) or 0)
    except KanvolutionError as err:
        _error(str(err))
        return 2
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); stop quietly as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        _error("interrupted (a training run resumes with --resume; reproduce resumes when run again)")
        return 130
    except ModuleNotFoundError as err:
        if err.name in _EXTRAS:
            _error(f"this command needs {err.name}: pip install 'kanvolution[{_EXTRAS[err.name]}]'")
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
