"""Tables made from ``results.json`` files (read through :mod:`.schema`), in the layout of the paper's table.

The paper's own numbers (Fashion-MNIST test set) are kept here as data so that a table can
show them beside ours.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Literal

from .schema import FINISHED, RESULTS_FILE, ResultsError, load_results, run_status

__all__ = [
    "PAPER_RESULTS",
    "PAPER_SELECTIONS",
    "SELECTIONS",
    "PaperSelection",
    "PaperResult",
    "Row",
    "csv_table",
    "find_results",
    "format_params",
    "markdown_table",
    "paper_result",
    "rows_from_results",
    "seed_table",
]

Selection = Literal["paper", "val", "last"]
# Which block of results.json a table row shows.
SELECTIONS: dict[str, str] = {
    "paper": "test",  # the best test epoch: the paper's (optimistic) selection
    "val": "test_val_selected",  # the epoch chosen on a validation split
    "last": "test_last",  # the last epoch, no selection
}


@dataclass(frozen=True)
class PaperResult:
    """One row of the paper's Fashion-MNIST table; metrics in percent as printed there."""

    model: str  # our registry name
    grid_size: int | None
    name: str  # the row name in the paper
    accuracy: float
    precision: float
    recall: float
    f1: float
    params: int  # exact count of the paper's code
    params_text: str  # as printed in the paper (its rounding is not always half-up)
    minutes: float  # minutes per epoch, on the paper's GPU


def _p(
    model: str,
    gs: int | None,
    name: str,
    acc: float,
    prec: float,
    rec: float,
    f1: float,
    params: int,
    text: str,
    minutes: float,
) -> PaperResult:
    return PaperResult(model, gs, name, acc, prec, rec, f1, params, text, minutes)


# In the order of the paper's table.
# fmt: off
PAPER_RESULTS: tuple[PaperResult, ...] = (
    _p("cnn_more_convs", None, "CNN (Medium, but with more convs)", 89.56, 89.60, 89.56, 89.55, 6930, "6.93K", 0.2103),
    _p("cnn_big", None, "CNN (Big)", 89.44, 89.40, 89.44, 89.39, 26620, "26.62K", 0.2114),
    _p("cnn_medium", None, "CNN (Medium)", 88.34, 88.20, 88.34, 88.22, 3020, "3.02K", 0.2103),
    _p("cnn_small", None, "CNN (Small)", 87.10, 87.08, 87.10, 87.01, 1540, "1.54K", 0.2328),
    _p("conv_kan_medium", 10, "Conv & KAN (Medium) (gs = 10)", 87.92, 87.84, 87.92, 87.80, 38010, "38.01K", 0.2306),
    _p("conv_kan_medium", 20, "Conv & KAN (Medium) (gs = 20)", 87.90, 88.08, 87.90, 87.95, 63010, "63.01K", 0.2266),
    _p("conv_kan_small", 10, "Conv & KAN (Small) (gs = 10)", 87.55, 87.37, 87.55, 87.42, 19030, "19.03K", 0.2303),
    _p("conv_kan_small", 20, "Conv & KAN (Small) (gs = 20)", 87.67, 87.74, 87.67, 87.59, 31530, "31.53K", 0.2254),
    _p("kanc_mlp_big", 10, "KANC MLP (Big) (gs = 10)", 89.15, 89.22, 89.15, 89.14, 33535, "33.54K", 1.6523),
    _p("kanc_mlp_big", 20, "KANC MLP (Big) (gs = 20)", 89.11, 89.05, 89.11, 89.06, 38485, "38.48K", 2.4633),
    _p("kanc_mlp_medium", 10, "KANC MLP (Medium) (gs = 10)", 88.99, 88.97, 88.99, 88.96, 9935, "9.94K", 1.6441),
    _p("kanc_mlp_medium", 20, "KANC MLP (Medium) (gs = 20)", 88.90, 88.85, 88.90, 88.83, 14885, "14.89K", 2.4615),
    _p("kanc_mlp_small", 10, "KANC MLP (Small) (gs = 10)", 87.43, 87.41, 87.43, 87.41, 5310, "5.31K", 1.1704),
    _p("kanc_mlp_small", 20, "KANC MLP (Small) (gs = 20)", 88.15, 88.02, 88.15, 87.94, 8010, "8.01K", 1.6262),
    _p("kkan_medium", 10, "KKAN (Medium) (gs = 10)", 87.91, 88.37, 87.91, 87.99, 44925, "44.93K", 1.6425),
    _p("kkan_medium", 20, "KKAN (Medium) (gs = 20)", 88.56, 88.52, 88.56, 88.52, 74875, "74.88K", 2.4753),
    _p("kkan_small", 10, "KKAN (Small) (gs = 10)", 88.01, 87.87, 88.01, 87.76, 22800, "22.80K", 1.1599),
    _p("kkan_small", 20, "KKAN (Small) (gs = 20)", 87.94, 87.80, 87.94, 87.72, 38000, "38.00K", 1.6336),
)
# fmt: on
_PAPER_INDEX = {(r.model, r.grid_size): i for i, r in enumerate(PAPER_RESULTS)}


@dataclass(frozen=True)
class PaperSelection:
    """What the paper's own search chose for one row of its table (from its repository's logs)."""

    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    val_accuracy: float  # percent, on the paper's 20% validation split


# The winners of the paper's search, from its repository's logs, keyed like PAPER_RESULTS.
# fmt: off
PAPER_SELECTIONS: dict[tuple[str, int | None], PaperSelection] = {
    ("cnn_more_convs", None): PaperSelection(1e-3, 1e-5, 128, 20, 89.11),
    ("cnn_big", None): PaperSelection(1e-3, 1e-5, 128, 20, 89.12),
    ("cnn_medium", None): PaperSelection(1e-3, 0.0, 32, 20, 88.22),
    ("cnn_small", None): PaperSelection(1e-3, 0.0, 32, 20, 86.53),
    ("conv_kan_medium", 10): PaperSelection(1e-3, 0.0, 128, 13, 87.53),
    ("conv_kan_medium", 20): PaperSelection(1e-3, 0.0, 32, 6, 87.64),
    ("conv_kan_small", 10): PaperSelection(1e-3, 0.0, 32, 11, 86.65),
    ("conv_kan_small", 20): PaperSelection(1e-3, 0.0, 32, 14, 86.84),
    ("kanc_mlp_big", 10): PaperSelection(1e-3, 1e-4, 128, 20, 89.05),
    ("kanc_mlp_big", 20): PaperSelection(1e-3, 1e-4, 128, 12, 88.70),
    ("kanc_mlp_medium", 10): PaperSelection(1e-3, 0.0, 128, 19, 88.88),
    ("kanc_mlp_medium", 20): PaperSelection(1e-3, 1e-4, 128, 17, 88.68),
    ("kanc_mlp_small", 10): PaperSelection(1e-3, 1e-5, 128, 19, 87.97),
    ("kanc_mlp_small", 20): PaperSelection(1e-3, 1e-5, 128, 20, 88.20),
    ("kkan_medium", 10): PaperSelection(1e-3, 0.0, 32, 5, 87.80),
    ("kkan_medium", 20): PaperSelection(1e-3, 1e-5, 128, 10, 88.44),
    ("kkan_small", 10): PaperSelection(1e-3, 0.0, 128, 12, 87.80),
    ("kkan_small", 20): PaperSelection(1e-3, 0.0, 32, 14, 87.75),
}
# fmt: on


def paper_result(model: str, grid_size: int | None) -> PaperResult | None:
    """The paper's Fashion-MNIST row for a model and grid size, if it has one.

    Examples:
        >>> paper_result("kanc_mlp_medium", 10).accuracy
        88.99
        >>> paper_result("ckan_bn", 10) is None
        True
    """
    index = _PAPER_INDEX.get((model, grid_size))
    return None if index is None else PAPER_RESULTS[index]


def format_params(n: int) -> str:
    """A parameter count as the paper prints it: thousands with two decimals, half up.

    Examples:
        >>> format_params(9935), format_params(1540), format_params(74875)
        ('9.94K', '1.54K', '74.88K')
    """
    return f"{(Decimal(n) / 1000).quantize(Decimal('0.01'), rounding=ROUND_HALF_UP)}K"


@dataclass(frozen=True)
class Row:
    """One model's line of a table; metrics as fractions."""

    model: str
    grid_size: int | None
    name: str
    dataset: str
    accuracy: float
    precision: float
    recall: float
    f1: float
    params: int
    minutes: float | None
    epoch: int
    selection: str
    source: str
    status: str = FINISHED  # see kanvolution.experiments.schema.STATUSES

    @property
    def paper(self) -> PaperResult | None:
        return paper_result(self.model, self.grid_size) if self.dataset == "fashion-mnist" else None


def find_results(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """``results.json`` files: each path is such a file, a run folder, or a folder searched recursively."""
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_file():
            found.append(path)
        elif (path / RESULTS_FILE).is_file():
            found.append(path / RESULTS_FILE)
        elif path.is_dir():
            found.extend(sorted(path.rglob(RESULTS_FILE)))
        else:
            raise ResultsError(f"no such file or folder: {path}")
    return list(dict.fromkeys(found))


def _sort_key(row: Row) -> tuple[Any, ...]:
    index = _PAPER_INDEX.get((row.model, row.grid_size), len(PAPER_RESULTS))
    return (row.dataset, index, row.name, row.source)


def rows_from_results(
    files: Iterable[str | os.PathLike[str]], selection: Selection = "paper"
) -> tuple[list[Row], list[Path]]:
    """Table rows from ``results.json`` files, in the paper's row order.

    A run that did not finish keeps its row, with its :func:`~.schema.run_status` in ``status``
    (a killed or failed run shows the epochs it completed).

    Returns:
        ``(rows, skipped)``: ``skipped`` lists the files without the selected test block (for
        example the runs of a search, which do not touch the test set).
    """
    key = SELECTIONS[selection]
    rows: list[Row] = []
    skipped: list[Path] = []
    for file in files:
        path = Path(file)
        data = load_results(path)
        block = data.get(key)
        if not block:
            skipped.append(path)
            continue
        rows.append(
            Row(
                model=data["model"],
                grid_size=data.get("grid_size"),
                name=data.get("name") or data["model"],
                dataset=data.get("dataset", ""),
                accuracy=block["accuracy"],
                precision=block["precision"],
                recall=block["recall"],
                f1=block["f1"],
                params=data["params"],
                minutes=data.get("minutes_per_epoch"),
                epoch=block["epoch"],
                selection=block.get("selection", key),
                source=str(path.parent),
                status=run_status(data, path.parent),
            )
        )
    return sorted(rows, key=_sort_key), skipped


_HEADER = ("Model", "Accuracy", "Precision", "Recall", "F1 Score", "# Params", "Minutes per epoch")
_PAPER_HEADER = (
    "Paper Accuracy",
    "Paper Precision",
    "Paper Recall",
    "Paper F1 Score",
    "Paper # Params",
    "Paper Minutes per epoch",
    "Δ Accuracy (pp)",
)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _minutes(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _label(row: Row) -> str:
    return row.name if row.status == FINISHED else f"{row.name} [{row.status}]"


def _markdown_cells(row: Row, compare_paper: bool) -> list[str]:
    cells = [
        _label(row),
        _pct(row.accuracy),
        _pct(row.precision),
        _pct(row.recall),
        _pct(row.f1),
        format_params(row.params),
        _minutes(row.minutes),
    ]
    if compare_paper:
        p = row.paper
        if p is None:
            cells += ["–"] * len(_PAPER_HEADER)
        else:
            delta = 100 * row.accuracy - p.accuracy
            cells += [
                f"{p.accuracy:.2f}%",
                f"{p.precision:.2f}%",
                f"{p.recall:.2f}%",
                f"{p.f1:.2f}%",
                p.params_text,
                f"{p.minutes:.4f}",
                f"{delta:+.2f}",
            ]
    return cells


def markdown_table(rows: Sequence[Row], compare_paper: bool = False) -> str:
    """The rows as a Markdown table in the paper's layout (plus the paper's columns if asked).

    A run that did not finish shows its status after its name, e.g. ``[killed]``.
    """
    header = list(_HEADER) + (list(_PAPER_HEADER) if compare_paper else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_markdown_cells(row, compare_paper)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[Row], compare_paper: bool = False) -> str:
    """The rows as CSV: unrounded numbers (metrics in percent), one column per quantity."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = [
        "model",
        "grid_size",
        "name",
        "dataset",
        "accuracy",
        "precision",
        "recall",
        "f1",
        "params",
        "minutes_per_epoch",
        "epoch",
        "selection",
        "source",
        "status",
    ]
    if compare_paper:
        header += [
            "paper_accuracy",
            "paper_precision",
            "paper_recall",
            "paper_f1",
            "paper_params",
            "paper_minutes_per_epoch",
        ]
    writer.writerow(header)
    for row in rows:
        values: list[Any] = [
            row.model,
            "" if row.grid_size is None else row.grid_size,
            row.name,
            row.dataset,
            100 * row.accuracy,
            100 * row.precision,
            100 * row.recall,
            100 * row.f1,
            row.params,
            "" if row.minutes is None else row.minutes,
            row.epoch,
            row.selection,
            row.source,
            row.status,
        ]
        if compare_paper:
            p = row.paper
            values += [""] * 6 if p is None else [p.accuracy, p.precision, p.recall, p.f1, p.params, p.minutes]
        writer.writerow(values)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# Several seeds per row
# ------------------------------------------------------------------------------------------------

_METRICS = ("accuracy", "precision", "recall", "f1")
# A row whose mean accuracy is further than this from the paper's (percentage points) is marked.
MARK_POINTS = 0.5


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mean, std


def seed_table(files: Iterable[str | os.PathLike[str]], selection: Selection = "paper") -> str:
    """Markdown: per (model, grid size) the mean +- sample std over runs (seeds) of every metric.

    Beside each row: the paper's figures and the difference of the mean accuracy in points;
    a row more than :data:`MARK_POINTS` away is marked with ``*``. Only finished runs enter the
    means; the others (running, killed, failed) are listed under the table. Seeds that are
    missing show as a lower ``n``.
    """
    rows, _ = rows_from_results(files, selection)
    unfinished = [row for row in rows if row.status != FINISHED]
    groups: dict[tuple[str, str, int | None], list[Row]] = {}
    for row in rows:
        if row.status != FINISHED:
            continue
        groups.setdefault((row.dataset, row.model, row.grid_size), []).append(row)
    header = ["Model", "n", "Accuracy", "Precision", "Recall", "F1 Score", "Epoch", "# Params",
              "Minutes per epoch", "Paper Accuracy", "Paper F1 Score", "Δ Accuracy (pp)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for key in sorted(groups, key=lambda k: _sort_key(groups[k][0])):
        group = groups[key]
        first = group[0]
        cells = [first.name, str(len(group))]
        for metric in _METRICS:
            mean, std = _mean_std([100 * getattr(r, metric) for r in group])
            cells.append(f"{mean:.2f} ± {std:.2f}" if len(group) > 1 else f"{mean:.2f}")  # no spread from one seed
        cells.append("/".join(str(r.epoch) for r in group))
        cells.append(format_params(first.params))
        minutes = [r.minutes for r in group if r.minutes is not None]
        cells.append(_minutes(sum(minutes) / len(minutes) if minutes else None))
        paper = first.paper
        if paper is None:
            cells += ["–", "–", "–"]
        else:
            delta = _mean_std([100 * r.accuracy for r in group])[0] - paper.accuracy
            mark = " *" if abs(delta) > MARK_POINTS else ""
            cells += [f"{paper.accuracy:.2f}%", f"{paper.f1:.2f}%", f"{delta:+.2f}{mark}"]
        lines.append("| " + " | ".join(cells) + " |")
    if unfinished:
        lines.append("")
        lines.append("Left out of the means: " + "; ".join(f"{_label(r)} ({r.source})" for r in unfinished) + ".")
    return "\n".join(lines) + "\n"
