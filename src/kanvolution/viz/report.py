"""The report of a trained run: ``kanvolution inspect RUN_DIR`` rebuilds the model from its
checkpoint and writes the numbers of :mod:`.analysis` and the pictures of :mod:`.plots`.

Examples:
    A trained run (pictures and their data go to ``runs/demo/inspect/``):

    >>> from kanvolution.viz.report import inspect_run
    >>> files = inspect_run("runs/demo", data_dir="~/datasets")  # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


from ..experiments.runs import load_run_model
from ..experiments.data import load_dataset
from ..experiments.files import atomic_write, write_json
from ..experiments.schema import CURVES_FILE, ResultsError, load_results
from ..layers import KANConv2d, _KANLayer
from .analysis import (
    DEFAULT_BINS,
    DEFAULT_IN_CHANNELS,
    DEFAULT_OUT_CHANNELS,
    InspectionError,
    check_indices,
    effective_kernel,
    fit_indices,
    input_histograms,
    layer_position,
    nonlinearity_scores,
    phi_atlas,
    record_layers,
    select_examples,
    summary_line,
)

__all__ = [
    "CLASS_NAMES",
    "add_arguments",
    "inspect_model",
    "inspect_run",
    "load_run",
    "parse_indices",
    "resolve_layers",
    "run",
]

DEFAULT_IMAGES = 4
DEFAULT_NUM_SAMPLES = 512  # test images whose layer inputs make the input distributions
INSPECT_DIR = "inspect"

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "mnist": tuple(str(d) for d in range(10)),
}


# ------------------------------------------------------------------------------------------------
# Whole-model inspection
# ------------------------------------------------------------------------------------------------


def _short_name(name: str) -> str:
    return name[len("layers."):] if name.startswith("layers.") else name


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in _short_name(name)) or "model"


def _default_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (_KANLayer, nn.Conv2d))}


def resolve_layers(model: nn.Module, names: Sequence[str] | None) -> dict[str, nn.Module]:
    """The modules called ``names`` (full names, or their last part, e.g. ``conv1`` for ``layers.conv1``)."""
    if not names:
        found = _default_layers(model)
        if not found:
            raise InspectionError("the model has no KAN or convolution layers to inspect")
        return found
    modules = dict(model.named_modules())
    result: dict[str, nn.Module] = {}
    for wanted in names:
        matches = [n for n in modules if n and (n == wanted or n.endswith("." + wanted))]
        if len(matches) != 1:
            valid = ", ".join(_short_name(n) for n in modules if n and "." not in _short_name(n)) or "none"
            why = "is ambiguous" if matches else "is not a layer of the model"
            raise InspectionError(f"layer {wanted!r} {why}; layers: {valid}")
        result[matches[0]] = modules[matches[0]]
    return result


class _Writer:
    """Writes the data files always and the pictures when asked for; remembers what it wrote."""

    def __init__(self, out: Path, plots: bool) -> None:
        self.out = out
        self.plots = plots
        self.files: dict[str, Path] = {}
        if plots:
            from . import plots as P  # fails early, before any work, when matplotlib is missing

            self.P = P

    def data(self, stem: str, **arrays: Any) -> None:
        path = self.out / f"{stem}.npz"
        atomic_write(path, lambda f: np.savez_compressed(f, **{k: np.asarray(v) for k, v in arrays.items()}))
        self.files[path.name] = path

    def picture(self, stem: str, draw: Callable[[Any], Any]) -> None:
        """``draw(plots_module)`` returns the figure to save as ``stem.png``."""
        if self.plots:
            path = self.P.save(draw(self.P), self.out / f"{stem}.png")
            self.files[path.name] = path


def inspect_model(
    model: nn.Module,
    images: Tensor,
    out_dir: str | os.PathLike[str],
    *,
    examples: Tensor | None = None,
    example_labels: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    out_channels: Sequence[int] | None = None,
    in_channels: Sequence[int] | None = None,
    location: Sequence[int] | None = None,
    bins: int = DEFAULT_BINS,
    plots: bool = True,
    title: str = "",
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write the pictures (and the arrays behind them) of one model into ``out_dir``.

    Files (``L`` = a layer name): ``phi_atlas_L`` for each KAN convolution, one ``nonlinearity``
    for all KAN layers, ``feature_maps_L`` for each layer with a 4-d output and
    ``effective_kernel_L`` for each 2-d (KAN or plain) convolution; each as ``.png`` and ``.npz``.

    Args:
        model: the model, e.g. from :func:`load_run`.
        images: ``(N, C, H, W)`` images whose layer inputs make the input distributions.
        out_dir: folder for the files (created).
        examples: the few images for feature maps and effective kernels (default: ``images[:4]``).
        example_labels, class_names: class of each example and the class names, for titles.
        layers: module names (default: every KAN layer and ``nn.Conv2d``).
        out_channels, in_channels: channel subsets of the atlas, feature maps and kernels (per
            layer, indices beyond its channels are skipped; if none is left, its default subset).
        location: ``(row, column)`` of the first example for the effective kernels (default: centre).
        bins: histogram bins of the input distributions.
        plots: draw the PNG files (needs matplotlib); without it only the data files are written.
        title: put in front of every figure title (e.g. the model's name).
        log: called with one summary line per KAN layer.

    Returns:
        ``(files, summary)``: ``{file name: path}`` of what was written and a summary (options,
        nonlinearity summaries, kernel positions) that :func:`inspect_run` saves as ``summary.json``.
    """
    writer = _Writer(Path(out_dir), plots)
    if images.dim() != 4 or len(images) == 0:
        raise InspectionError(f"images must be a non-empty batch (N, C, H, W), got {tuple(images.shape)}")
    if examples is None:
        examples = images[:DEFAULT_IMAGES]
    if examples.dim() != 4 or len(examples) == 0:
        raise InspectionError(f"examples must be a non-empty batch (N, C, H, W), got {tuple(examples.shape)}")
    image_size = tuple(examples.shape[2:])
    location = tuple(s // 2 for s in image_size) if location is None else tuple(int(p) for p in location)
    if len(location) != 2 or not all(0 <= p < s for p, s in zip(location, image_size)):
        raise InspectionError(f"location must be (row, column) inside the {image_size} image, got {location}")
    chosen = resolve_layers(model, layers)
    writer.out.mkdir(parents=True, exist_ok=True)
    prefix = f"{title}: " if title else ""
    summary: dict[str, Any] = {"layers": {}, "location": list(location), "num_samples": len(images), "bins": bins}

    # What every KAN layer's phi see, its nonlinearity, and the atlas of each KAN convolution.
    kan = {n: m for n, m in chosen.items() if isinstance(m, _KANLayer)}
    seen = record_layers(model, images, kan, outputs=False) if kan else {}
    nonlinearity: dict[str, dict[str, Any]] = {}
    for name, layer in kan.items():
        short = _short_name(name)
        hist = input_histograms(layer, seen[name]["input"], bins)
        scores = nonlinearity_scores(layer, histograms=hist)
        nonlinearity[short] = scores
        summary["layers"][short] = {"type": type(layer).__name__, "nonlinearity": scores["summary"]}
        if log is not None:
            log(summary_line(short, scores["summary"]))
        if isinstance(layer, KANConv2d):
            n_out, n_in = layer.base_weight.shape[:2]
            atlas = phi_atlas(layer, histograms=hist, scores=scores, out_channels=fit_indices(out_channels, n_out),
                              in_channels=fit_indices(in_channels, n_in))
            stem = f"phi_atlas_{_file_safe(name)}"
            writer.data(stem, **atlas)
            writer.picture(stem, lambda P: P.plot_phi_atlas(atlas, title=f"{prefix}{short}"))
    if nonlinearity:
        writer.data("nonlinearity", **{f"{layer}/{part}": scores[part] for layer, scores in nonlinearity.items()
                                       for part in ("score", "amplitude", "slope", "intercept")})
        writer.picture("nonlinearity", lambda P: P.plot_nonlinearity(
            nonlinearity, title=f"{prefix}distance from linear (1 - R²) of every phi"))

    # Feature maps and effective kernels of the examples.
    recorded = record_layers(model, examples, chosen)
    pictures = examples.detach().cpu().numpy()
    labels = np.asarray(example_labels if example_labels is not None else [], dtype=np.int64)
    captions = None
    if example_labels is not None:
        captions = [class_names[y] if class_names and 0 <= y < len(class_names) else str(y) for y in example_labels]
    for name, layer in chosen.items():
        short, stem = _short_name(name), _file_safe(name)
        output = recorded[name].get("output")
        if output is not None and output.dim() == 4:
            maps = output.numpy()
            oc = check_indices("out_channels", fit_indices(out_channels, maps.shape[1]), maps.shape[1],
                                DEFAULT_OUT_CHANNELS)
            writer.data(f"feature_maps_{stem}", images=pictures, maps=maps[:, oc], channels=oc, labels=labels)
            writer.picture(f"feature_maps_{stem}", lambda P: P.plot_feature_maps(
                pictures, maps[:, oc], channels=oc, labels=captions, title=f"{prefix}{short} feature maps"))
        if isinstance(layer, (KANConv2d, nn.Conv2d)):
            x = recorded[name]["input"][0]
            position = layer_position(location, image_size, tuple(x.shape[1:]))
            k = effective_kernel(layer, x, position)
            n_out, n_in = k["kernel"].shape[:2]
            oi = check_indices("out_channels", fit_indices(out_channels, n_out), n_out, DEFAULT_OUT_CHANNELS)
            ji = check_indices("in_channels", fit_indices(in_channels, n_in), n_in, DEFAULT_IN_CHANNELS)
            summary["layers"].setdefault(short, {"type": type(layer).__name__})["effective_kernel"] = {
                "input_position": list(position), "output_position": list(k["output_position"]),
            }
            kan_conv = isinstance(layer, KANConv2d)
            data = {**k, "kernel": k["kernel"][np.ix_(oi, ji)], "out_channels": oi, "in_index": ji,
                    "input_position": position, "image": pictures[0], "location": location,
                    "kind": "kan" if kan_conv else "conv"}
            writer.data(f"effective_kernel_{stem}", **data)
            what = "local slopes d phi/dt" if kan_conv else "weights (plain convolution)"
            writer.picture(f"effective_kernel_{stem}", lambda P: P.plot_effective_kernel(
                data, title=f"{prefix}{short}: {what} at image pixel {location}"))
    return writer.files, summary


def load_run(run_dir: str | os.PathLike[str],
             map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a run's model from ``RUN_DIR/checkpoint.pt`` (``weights_only=True``).

    The same loader as ``kanvolution evaluate`` and the pretrained zoo:
    :func:`kanvolution.experiments.runs.load_run_model`.

    Returns:
        ``(model, checkpoint)``: the model in eval mode with the trained weights, and the
        checkpoint's contents (``config`` holds the run's resolved options).

    Raises:
        MissingCheckpointError, CorruptCheckpointError: no readable checkpoint (the message says
            what to do).
        WeightsError: the checkpoint names no model of the zoo, or its weights do not fit.
    """
    return load_run_model(run_dir, map_location)


def inspect_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    layers: Sequence[str] | None = None,
    out_channels: Sequence[int] | None = None,
    in_channels: Sequence[int] | None = None,
    images: int = DEFAULT_IMAGES,
    image_indices: Sequence[int] | None = None,
    location: Sequence[int] | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    bins: int = DEFAULT_BINS,
    dataset: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    plots: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Inspect a trained run: write pictures and their data into ``out_dir`` (default ``RUN_DIR/inspect``).

    The model is rebuilt from the run's checkpoint; the input distributions come from the first
    ``num_samples`` test images; feature maps and effective kernels from ``images`` test images
    of different classes (or the test images ``image_indices``). Also writes ``summary.json``
    and, when the run has no ``learning_curves.png``, the learning curves from ``results.json``.

    Returns:
        ``{file name: path}`` of every file written.
    """
    run = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run / INSPECT_DIR
    model, checkpoint = load_run(run)
    config = checkpoint["config"]
    dataset = dataset or config.get("dataset", "fashion-mnist")
    data_dir = data_dir if data_dir is not None else config.get("data_dir")
    if num_samples < 1 or images < 1:
        raise InspectionError(f"num_samples and images must be positive, got {num_samples} and {images}")
    test_images, test_labels = load_dataset(dataset, "test", data_dir=data_dir, download=download)
    if image_indices is not None:
        image_indices = check_indices("image indices", image_indices, len(test_labels), 0)
    else:
        image_indices = select_examples(test_labels, images)
    name = getattr(model, "paper_name", None) or config.get("model", "")
    files, summary = inspect_model(
        model, test_images[:num_samples], out, examples=test_images[image_indices],
        example_labels=test_labels[image_indices].tolist(), class_names=CLASS_NAMES.get(dataset),
        layers=layers, out_channels=out_channels, in_channels=in_channels, location=location, bins=bins,
        plots=plots, title=name, log=log,
    )
    # The trainer draws the learning curves; draw them here only for a run that has none.
    if (run / CURVES_FILE).is_file():
        summary["learning_curves"] = str(run / CURVES_FILE)
    elif plots:
        try:
            history = load_results(run).get("history") or []
        except ResultsError:
            history = []
        if history:
            from . import plots as P

            path = P.save(P.plot_learning_curves(history, title=f"{name} on {dataset}"), out / CURVES_FILE)
            files[path.name] = path
            summary["learning_curves"] = str(path)
    summary.update({
        "run_dir": str(run), "model": config.get("model"), "name": name, "epoch": checkpoint.get("epoch"),
        "dataset": dataset, "image_indices": list(image_indices),
    })
    summary_path = out / "summary.json"
    files[summary_path.name] = summary_path
    summary["files"] = sorted(files)
    write_json(summary_path, summary)
    return files


# ------------------------------------------------------------------------------------------------
# Command line: `kanvolution inspect RUN_DIR`
# ------------------------------------------------------------------------------------------------


def parse_indices(items: Sequence[str] | None) -> list[int] | None:
    """``["0-3", "7"]`` -> ``[0, 1, 2, 3, 7]``; ``None`` stays ``None`` (the default subset).

    Examples:
        >>> parse_indices(["0-2", "5"])
        [0, 1, 2, 5]
    """
    if items is None:
        return None
    result: list[int] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1)
                    a, b = int(lo), int(hi)
                    if b < a:
                        raise ValueError
                    result.extend(range(a, b + 1))
                else:
                    result.append(int(part))
            except ValueError:
                raise InspectionError(f"expected channel indices such as 3, 0-7 or 1,4, got {item!r}") from None
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kanvolution inspect``."""
    parser.description = (
        f"Draw what a trained run has learned, into RUN_DIR/{INSPECT_DIR}: the phi of every kernel tap over the"
        " inputs it sees (phi_atlas_*), how far each phi is from a straight line (nonlinearity), feature maps of a"
        " few test images (feature_maps_*) and the local linearisation of each convolution at one pixel"
        " (effective_kernel_*); each picture with its data as .npz, and summary.json."
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `kanvolution train`")
    parser.add_argument("--out", help=f"output folder (default: RUN_DIR/{INSPECT_DIR})")
    parser.add_argument("--layers", nargs="+", metavar="NAME",
                        help="layer names, e.g. conv1 conv2 pool1 (default: every KAN and convolution layer)")
    parser.add_argument("--out-channels", nargs="+", metavar="I",
                        help=f"output channels to show, e.g. 0-3 7; indices a layer lacks are skipped there "
                             f"(default: the first {DEFAULT_OUT_CHANNELS})")
    parser.add_argument("--in-channels", nargs="+", metavar="I",
                        help=f"input channels to show (default: the first {DEFAULT_IN_CHANNELS})")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, metavar="N",
                        help=f"test images of different classes for feature maps (default: {DEFAULT_IMAGES})")
    parser.add_argument("--image-indices", nargs="+", type=int, metavar="I",
                        help="these test images instead (the first one also gives the effective kernels)")
    parser.add_argument("--location", nargs=2, type=int, metavar=("ROW", "COL"),
                        help="image pixel of the effective kernels (default: the image centre)")
    parser.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES, metavar="N",
                        help="test images whose layer inputs give the input distributions "
                             f"(default: {DEFAULT_NUM_SAMPLES})")
    parser.add_argument("--bins", type=int, default=DEFAULT_BINS, metavar="N",
                        help=f"histogram bins per input channel (default: {DEFAULT_BINS})")
    parser.add_argument("--dataset", help="mnist or fashion-mnist (default: the run's)")
    parser.add_argument("--data-dir", help="where the data lives, if not where the run found it")
    parser.add_argument("--no-download", dest="download", action="store_false", help="never fetch missing data files")
    parser.add_argument("--no-plots", dest="plots", action="store_false",
                        help="write only the data files (no matplotlib needed)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    """Run ``kanvolution inspect`` with parsed ``args``; print the layer summaries and the files."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        files = inspect_run(
            args.run_dir, args.out, layers=args.layers, out_channels=parse_indices(args.out_channels),
            in_channels=parse_indices(args.in_channels), images=args.images, image_indices=args.image_indices,
            location=args.location, num_samples=args.num_samples, bins=args.bins, dataset=args.dataset,
            data_dir=args.data_dir, download=args.download, plots=args.plots, log=print,
        )
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise
        raise InspectionError("the pictures need matplotlib: pip install 'kanvolution[viz]' "
                              "(or use --no-plots to write only the data files)") from None
    out = Path(args.out) if args.out else Path(args.run_dir) / INSPECT_DIR
    print(f"{len(files)} files in {out}: {', '.join(sorted(files))}")
    return 0
