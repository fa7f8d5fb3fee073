"""Pictures of :mod:`kanvolution.viz.analysis`'s numbers: phi atlas, nonlinearity map, feature maps,
effective kernels and learning curves. Needs matplotlib (``pip install 'kanvolution[viz]'``).

Figures are built on the Agg canvas directly, without pyplot, so the user's backend and pyplot's
figure list are left alone. Every panel axes carries a label (``"phi"``, ``"heatmap"``, ``"image"``,
``"map"``, ``"kernel"``, ``"curve"``) so that a figure's panels can be counted by kind.
"""
from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib  # noqa: F401  (first, so that a missing matplotlib is reported under its own name)
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..experiments.files import atomic_write
from .analysis import DEAD_THRESHOLD, LINEAR_THRESHOLD

__all__ = [
    "count_panels",
    "plot_effective_kernel",
    "plot_feature_maps",
    "plot_learning_curves",
    "plot_nonlinearity",
    "plot_phi_atlas",
    "save",
]

DPI = 110
_LINEAR_COLOR = "tab:blue"
_CURVED_COLOR = "tab:red"
_DEAD_COLOR = "0.55"
_DENSITY_COLOR = "0.86"
_CLIPPED_COLOR = "0.72"
_SCORE_FLOOR = 1e-4  # the log colour scale of the nonlinearity map starts here


def _figure(width: float, height: float, **kwargs: Any) -> Figure:
    fig = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _suptitle(fig: Figure, title: str, fontsize: float) -> None:
    """A figure title wrapped to the figure's width, so that narrow figures do not cut it."""
    chars = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
    lines = [w for line in title.splitlines() for w in (textwrap.wrap(line, chars) or [""])]
    fig.suptitle("\n".join(lines), fontsize=fontsize)


def save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG (atomically); returns the path."""
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    return path


def count_panels(fig: Figure, kind: str) -> int:
    """How many axes of ``fig`` are panels of ``kind`` (colour bars and decorations are not)."""
    return sum(1 for ax in fig.axes if ax.get_label() == kind)


def _gapped(n_blocks: int, block: int, gap: float) -> tuple[list[float], list[int]]:
    """Grid ratios for ``n_blocks`` blocks of ``block`` cells with a thin gap between blocks,
    and the grid index of the first cell of each block."""
    ratios: list[float] = []
    starts: list[int] = []
    for b in range(n_blocks):
        if b:
            ratios.append(gap)
        starts.append(len(ratios))
        ratios.extend([1.0] * block)
    return ratios, starts


def plot_phi_atlas(atlas: dict[str, np.ndarray], title: str = "") -> Figure:
    """One block of ``kH x kW`` panels per (output, input) channel pair, each the phi of that tap.

    The curve is phi over the range of values its input channel takes; the grey shade behind it
    is the density of the values that tap reads (bars above the second-tallest are clipped, drawn
    darker and marked with a triangle, so a background spike does not flatten the rest). All panels share the y range,
    so a dead (flat) phi looks flat. Blue: near-linear (``1 - R^2 < 0.01``), red: curved, grey:
    dead. The number in a panel is its ``1 - R^2``.

    Args:
        atlas: the output of :func:`kanvolution.viz.analysis.phi_atlas` for a 2-d convolution.
    """
    phi, t = atlas["phi"], atlas["t"]
    if phi.ndim != 5:
        raise ValueError(f"the atlas needs the phi of a 2-d convolution (out, in, kH, kW, T), got shape {phi.shape}")
    n_o, n_j, kh, kw, _ = phi.shape
    density, edges = atlas["density"], atlas["edges"]
    score, amplitude = atlas["score"], atlas["amplitude"]
    dead_below = DEAD_THRESHOLD * float(atlas["amplitude_max"])
    lo, hi = float(phi.min()), float(phi.max())
    pad = 0.06 * (hi - lo) if hi > lo else 0.5
    y0, y1 = lo - pad, hi + pad

    gap = 0.4
    rows, row_start = _gapped(n_o, kh, gap)
    cols, col_start = _gapped(n_j, kw, gap)
    legend = (f"phi of every kernel tap: one {kh}x{kw} block per (output, input) channel pair, "
              f"y range [{y0:.2g}, {y1:.2g}] shared by all panels. Blue: near-linear (1-R² < {LINEAR_THRESHOLD:g}), "
              f"red: curved, grey: dead (spread < {DEAD_THRESHOLD:g} of the largest). Shade: density of the "
              f"tap's inputs (darker bins, marked with a triangle, are clipped). Dotted: edge of the spline grid. "
              f"Number: 1-R².")
    left, right, bottom = 0.7, 0.15, 0.15  # inches
    width = max(5.5, left + right + 0.62 * sum(cols))
    lines = [title] if title else []
    lines += textwrap.wrap(legend, width=int(width * 15))
    top = 0.15 + 0.15 * len(lines) + 0.4  # title lines plus room for the column labels
    height = top + bottom + 0.5 * sum(rows)
    fig = _figure(width, height)
    grid = fig.add_gridspec(len(rows), len(cols), height_ratios=rows, width_ratios=cols, left=left / width,
                            right=1 - right / width, top=1 - top / height, bottom=bottom / height,
                            hspace=0.12, wspace=0.12)
    for a in range(n_o):
        for b in range(n_j):
            tt = t[a, b]
            g_lo, g_hi = atlas["grid_range"][a, b]
            for u in range(kh):
                for v in range(kw):
                    ax = fig.add_subplot(grid[row_start[a] + u, col_start[b] + v], label="phi")
                    h, clipped = _density_heights(density[a, b, u, v])
                    bar = 0.85 * (y1 - y0)
                    ax.stairs(y0 + bar * h, edges[a, b], baseline=y0, fill=True, color=_DENSITY_COLOR, lw=0)
                    if clipped.any():  # a thin spike (e.g. the background) also gets a mark, to be seen at all
                        ax.stairs(y0 + bar * h * clipped, edges[a, b], baseline=y0, fill=True, color=_CLIPPED_COLOR,
                                  lw=0)
                        centres = (edges[a, b, :-1] + edges[a, b, 1:]) / 2
                        ax.plot(centres[clipped > 0], np.full(int(clipped.sum()), y0 + bar), "v", ms=3,
                                color=_CLIPPED_COLOR, clip_on=False)
                    ax.axhline(0.0, color="0.7", lw=0.4)
                    for g in (g_lo, g_hi):
                        if tt[0] < g < tt[-1]:
                            ax.axvline(g, color="0.6", lw=0.5, ls=":")
                    s = float(score[a, b, u, v])
                    if amplitude[a, b, u, v] < dead_below:
                        color = _DEAD_COLOR
                    else:
                        color = _LINEAR_COLOR if s < LINEAR_THRESHOLD else _CURVED_COLOR
                    ax.plot(tt, phi[a, b, u, v], color=color, lw=1.0)
                    ax.text(0.04, 0.95, f"{s:.2f}", transform=ax.transAxes, fontsize=5, va="top", color="0.25")
                    ax.set_xlim(tt[0], tt[-1])
                    ax.set_ylim(y0, y1)
                    ax.set_xticks([])
                    ax.set_yticks([])
                    for spine in ax.spines.values():
                        spine.set_linewidth(0.4)
                    if a == 0 and u == 0 and v == kw // 2:
                        ax.set_title(f"in {int(atlas['input_channel'][0, b])}\n[{tt[0]:.2g}, {tt[-1]:.2g}]", fontsize=7)
                    if b == 0 and v == 0 and u == kh // 2:
                        ax.set_ylabel(f"out {int(atlas['out_channels'][a])}", fontsize=7)
    fig.suptitle("\n".join(lines), fontsize=8, y=1 - 0.12 / height, va="top")
    return fig


def _density_heights(density: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bar heights in [0, 1] for a histogram, and which bars were clipped.

    Image inputs put a large share of all values in one bin (the background), which would flatten
    every other bar; the scale is therefore set by the second-largest bar and the taller ones are
    clipped (and drawn darker).
    """
    d = np.asarray(density, dtype=float)
    top = np.sort(d)[-2:] if d.size > 1 else d
    ref = top[0] if top[0] > 0 else top[-1]
    if ref <= 0:
        return np.zeros_like(d), np.zeros_like(d)
    return np.minimum(d / ref, 1.0), (d > ref * (1 + 1e-9)).astype(float)


def _score_matrix(score: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Lay the scores out as a matrix: (out * kH) x (in * kW) for a 2-d kernel, out x in for a dense layer."""
    if score.ndim == 2:
        return score, 1, 1
    if score.ndim == 3:  # 1-d kernel: one row per output channel
        o, j, k = score.shape
        return score.reshape(o, j * k), 1, k
    if score.ndim == 4:
        o, j, kh, kw = score.shape
        return score.transpose(0, 2, 1, 3).reshape(o * kh, j * kw), kh, kw
    raise ValueError(f"cannot draw scores of shape {score.shape}")


def plot_nonlinearity(layers: dict[str, dict[str, Any]], title: str = "") -> Figure:
    """One heat map per KAN layer: a cell per phi, coloured by its ``1 - R^2`` (log scale).

    For a convolution, each (output, input) channel pair is a ``kH x kW`` block, laid out as the
    kernel; a dense layer has a cell per (output, input) feature. Dark cells are phi that a
    straight line follows; the title of each map summarises the layer.

    Args:
        layers: ``{name: the output of kanvolution.viz.analysis.nonlinearity_scores}``.
    """
    if not layers:
        raise ValueError("no layers to draw")
    mats = {name: _score_matrix(np.asarray(s["score"])) for name, s in layers.items()}
    widths = [max(m.shape[1], 0.25 * m.shape[0], 4) for m, _, _ in mats.values()]
    total = sum(widths)
    scale = min(0.32, 14.0 / total)
    height = max(3.2, min(12.0, 0.32 * max(m.shape[0] for m, _, _ in mats.values()) + 2.2))
    fig = _figure(max(6.0, scale * total + 2.5 + 0.6 * len(mats)), height, layout="constrained")
    axes = fig.subplots(1, len(mats), width_ratios=widths, squeeze=False)[0]
    norm = LogNorm(vmin=_SCORE_FLOOR, vmax=1.0)
    image = None
    for ax, (name, (m, kh, kw)) in zip(axes, mats.items()):
        ax.set_label("heatmap")
        image = ax.imshow(np.clip(m, _SCORE_FLOOR, 1.0), cmap="viridis", norm=norm, aspect="auto",
                          interpolation="nearest")
        n_rows, n_cols = m.shape[0] // kh, m.shape[1] // kw
        if kh * kw > 1:  # white lines between the channel pairs' blocks
            for r in range(1, n_rows):
                ax.axhline(r * kh - 0.5, color="white", lw=1.2)
            for c in range(1, n_cols):
                ax.axvline(c * kw - 0.5, color="white", lw=1.2)
        shown_r = range(0, n_rows, max(1, n_rows // 12))
        shown_c = range(0, n_cols, max(1, n_cols // 12))
        ax.set_yticks([r * kh + (kh - 1) / 2 for r in shown_r], [str(r) for r in shown_r])
        ax.set_xticks([c * kw + (kw - 1) / 2 for c in shown_c], [str(c) for c in shown_c])
        ax.tick_params(labelsize=7, length=0)
        ax.set_ylabel("output channel", fontsize=8)
        ax.set_xlabel("input channel" + (f" (each block: {kh}x{kw} taps)" if kh * kw > 1 else ""), fontsize=8)
        s = layers[name]["summary"]
        ax.set_title(
            f"{name}\nmean {s['mean']:.3f}  median {s['median']:.3f}  max {s['max']:.3f}\n"
            f"{100 * s['could_be_linear']:.0f}% < {LINEAR_THRESHOLD:g} (could be linear), {100 * s['dead']:.0f}% dead",
            fontsize=8,
        )
    bar = fig.colorbar(image, ax=list(axes), shrink=0.9, pad=0.02)
    bar.set_label("1 - R² of the best line (log)", fontsize=8)
    bar.ax.axhline(LINEAR_THRESHOLD, color="white", lw=1.5)
    bar.ax.tick_params(labelsize=7)
    if title:
        _suptitle(fig, title, 10)
    return fig


def _show_image(ax: Any, image: np.ndarray) -> None:
    img = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    if img.ndim == 3 and img.shape[2] not in (3, 4):
        img = img.mean(2)
    if img.ndim == 3:
        lo, hi = img.min(), img.max()
        ax.imshow((img - lo) / (hi - lo if hi > lo else 1.0))
    else:
        ax.imshow(img, cmap="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_feature_maps(images: np.ndarray, maps: np.ndarray, channels: Sequence[int] | None = None,
                      labels: Sequence[str] | None = None, title: str = "") -> Figure:
    """A row per image: the image, then the layer's output channels (one colour scale per channel).

    Args:
        images: ``(N, C, H, W)`` model inputs.
        maps: ``(N, K, h, w)`` the layer's output for them (``K`` chosen channels).
        channels: the channel number of each of the ``K`` maps (for the titles).
        labels: a caption per image (e.g. its class).
    """
    n, k = maps.shape[:2]
    channels = list(range(k)) if channels is None else list(channels)
    fig = _figure(1.2 * (k + 1) + 0.4, 1.25 * n + 0.8, layout="constrained")
    axes = fig.subplots(n, k + 1, squeeze=False)
    lo = maps.min(axis=(0, 2, 3))
    hi = maps.max(axis=(0, 2, 3))
    for r in range(n):
        ax = axes[r, 0]
        ax.set_label("image")
        _show_image(ax, images[r])
        ax.set_ylabel(labels[r] if labels else f"image {r}", fontsize=8)
        if r == 0:
            ax.set_title("input", fontsize=8)
        for c in range(k):
            ax = axes[r, c + 1]
            ax.set_label("map")
            ax.imshow(maps[r, c], cmap="viridis", vmin=lo[c], vmax=hi[c] if hi[c] > lo[c] else lo[c] + 1e-12)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"ch {channels[c]}\n[{lo[c]:.2g}, {hi[c]:.2g}]", fontsize=7)
    if title:
        _suptitle(fig, title, 10)
    return fig


def plot_effective_kernel(data: dict[str, Any], title: str = "") -> Figure:
    """The image with the chosen pixel marked, then a ``kH x kW`` kernel per (output, input) pair.

    For a KAN convolution each entry is the slope ``d phi / dt`` of that tap at the pixel it reads
    (its local linearisation: read it as an ordinary convolution kernel); for ``nn.Conv2d`` it is
    the weight. One symmetric colour scale per figure; a cross marks a tap that reads padding.

    Args:
        data: ``kernel (out, in, kH, kW)``, ``out_channels``, ``in_index``, ``image (C, H, W)``,
            ``location (row, col)``, ``in_padding (kH, kW)``, as written by ``inspect_model``.
    """
    kernel = np.asarray(data["kernel"])
    n_o, n_j, kh, kw = kernel.shape
    cell = 0.75
    fig = _figure(2.6 + cell * n_j + 1.0, max(2.8, cell * n_o + 1.3), layout="constrained")
    outer = fig.add_gridspec(1, 2, width_ratios=[2.2, cell * n_j + 0.6])
    ax = fig.add_subplot(outer[0], label="image")
    _show_image(ax, np.asarray(data["image"]))
    row, col = data["location"]
    ax.plot([col], [row], marker="+", color="red", ms=12, mew=2)
    ax.set_title(f"pixel ({row:g}, {col:g})", fontsize=8)
    inner = outer[1].subgridspec(n_o, n_j, wspace=0.05, hspace=0.05)
    limit = float(np.abs(kernel).max()) or 1.0
    padded = np.asarray(data.get("in_padding", np.zeros((kh, kw), bool)))
    annotate = kh * kw <= 25 and n_o * n_j <= 40
    image = None
    for a in range(n_o):
        for b in range(n_j):
            ax = fig.add_subplot(inner[a, b], label="kernel")
            image = ax.imshow(kernel[a, b], cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
            for u, v in zip(*np.nonzero(padded)):
                ax.plot([v], [u], marker="x", color="0.3", ms=5, mew=0.8)
            if annotate:
                for u in range(kh):
                    for v in range(kw):
                        val = kernel[a, b, u, v]
                        ax.text(v, u, f"{val:.2f}", ha="center", va="center", fontsize=5,
                                color="white" if abs(val) > 0.6 * limit else "black")
            ax.set_xticks([])
            ax.set_yticks([])
            if a == 0:
                ax.set_title(f"in {int(data['in_index'][b])}", fontsize=7)
            if b == 0:
                ax.set_ylabel(f"out {int(data['out_channels'][a])}", fontsize=7)
    bar = fig.colorbar(image, ax=fig.axes[1:], shrink=0.8, pad=0.02)
    bar.ax.tick_params(labelsize=7)
    if title:
        _suptitle(fig, title, 9)
    return fig


def plot_learning_curves(history: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """Loss and accuracy per epoch from a run's ``results.json`` history."""
    if not history:
        raise ValueError("the history is empty")
    epochs = [e["epoch"] for e in history]
    fig = _figure(10, 4, layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax in (ax_loss, ax_acc):
        ax.set_label("curve")
    if "train_loss" in history[0]:
        ax_loss.plot(epochs, [e["train_loss"] for e in history], marker="o", label="train")
    for split in ("val", "test"):
        if f"{split}_loss" in history[0]:
            ax_loss.plot(epochs, [e[f"{split}_loss"] for e in history], marker="o", label=split)
        if f"{split}_accuracy" in history[0]:
            ax_acc.plot(epochs, [100 * e[f"{split}_accuracy"] for e in history], marker="o", label=split)
    ax_loss.set(xlabel="epoch", ylabel="NLL loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        _suptitle(fig, title, 12)
    return fig
