"""Tables made from ``results.json`` files, in the layout of the paper's results table.

The paper's own numbers (Fashion-MNIST test set) are kept here as data so that a table can
show them beside ours.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "PAPER_RESULTS",
    "SELECTIONS",
    "PaperResult",
    "Row",
    "csv_table",
    "find_results",
    "format_params",
    "markdown_table",
    "paper_result",
    "rows_from_results",
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
        elif (path / "results.json").is_file():
            found.append(path / "results.json")
        elif path.is_dir():
            found.extend(sorted(path.rglob("results.json")))
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return list(dict.fromkeys(found))


def _sort_key(row: Row) -> tuple[Any, ...]:
    index = _PAPER_INDEX.get((row.model, row.grid_size), len(PAPER_RESULTS))
    return (row.dataset, index, row.name, row.source)


def rows_from_results(
    files: Iterable[str | os.PathLike[str]], selection: Selection = "paper"
) -> tuple[list[Row], list[Path]]:
    """Table rows from ``results.json`` files, in the paper's row order.

    Returns:
        ``(rows, skipped)``: ``skipped`` lists the files without the selected test block (for
        example the runs of a search, which do not touch the test set).
    """
    key = SELECTIONS[selection]
    rows: list[Row] = []
    skipped: list[Path] = []
    for file in files:
        path = Path(file)
        data: dict[str, Any] = json.loads(path.read_text())
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


def _markdown_cells(row: Row, compare_paper: bool) -> list[str]:
    cells = [
        row.name,
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
    """The rows as a Markdown table in the paper's layout (plus the paper's columns if asked)."""
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
        ]
        if compare_paper:
            p = row.paper
            values += [""] * 6 if p is None else [p.accuracy, p.precision, p.recall, p.f1, p.params, p.minutes]
        writer.writerow(values)
    return buffer.getvalue()
