"""Look inside a trained model: the learned functions of its KAN layers, how far each is from a
straight line, feature maps and local linearisations. ``kanvolution inspect RUN_DIR`` draws them.

The numbers are computed here (torch and numpy only); the pictures are drawn by
:mod:`kanvolution.plots`, which needs matplotlib and is imported only when a picture is made.

Examples:
    >>> import torch
    >>> from kanvolution import KANConv2d
    >>> from kanvolution.inspection import nonlinearity_scores, effective_kernel
    >>> layer = KANConv2d(1, 2, 3, grid_size=5)
    >>> x = torch.rand(16, 1, 10, 10) * 2 - 1
    >>> scores = nonlinearity_scores(layer, x)  # 1 - R^2 of each phi's best line on the data
    >>> scores["score"].shape  # one score per (out, in, tap): 0 = a straight line
    (2, 1, 3, 3)
    >>> 0.0 <= scores["summary"]["median"] <= 1.0
    True
    >>> effective_kernel(layer, x[0], (5, 5))["kernel"].shape  # d phi / dt at the pixels there
    (2, 1, 3, 3)

    A trained run (pictures and their data go to ``runs/demo/inspect/``):

    >>> from kanvolution.inspection import inspect_run
    >>> files = inspect_run("runs/demo", data_dir="~/datasets")  # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import functional as KF
from .layers import KANConv2d, _KANConvNd, _KANLayer

__all__ = [
    "CLASS_NAMES",
    "InspectionError",
    "LINEAR_THRESHOLD",
    "DEAD_THRESHOLD",
    "add_arguments",
    "effective_kernel",
    "feature_maps",
    "input_histograms",
    "inspect_model",
    "inspect_run",
    "layer_position",
    "load_run",
    "nonlinearity_scores",
    "parse_indices",
    "phi_atlas",
    "record_layers",
    "resolve_layers",
    "run",
    "select_examples",
    "summary_line",
]

LINEAR_THRESHOLD = 0.01  # a phi with 1 - R^2 below this "could have been linear"
DEAD_THRESHOLD = 0.05  # a phi whose spread on the data is below this share of the layer's largest is "dead"
DEFAULT_OUT_CHANNELS = 8  # readable atlas: 8 x 4 channel pairs of 3x3 panels
DEFAULT_IN_CHANNELS = 4
DEFAULT_IMAGES = 4
DEFAULT_NUM_SAMPLES = 512  # test images whose layer inputs make the input distributions
DEFAULT_BINS = 64  # histogram bins per input channel
DEFAULT_POINTS = 200  # points per phi curve in the atlas
INSPECT_DIR = "inspect"

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "mnist": tuple(str(d) for d in range(10)),
}


class InspectionError(ValueError):
    """An option does not fit the model or the data (unknown layer, channel out of range, ...)."""


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------


def _kernel_shape(layer: _KANLayer) -> tuple[int, ...]:
    return tuple(layer.kernel_size) if isinstance(layer, _KANConvNd) else ()


def _channel_of_phi(layer: _KANLayer) -> Tensor:
    """``(out, in/groups)``: the input channel each phi reads (and whose knots it uses)."""
    out_c, in_g = layer.base_weight.shape[:2]
    per_group = out_c // layer.groups
    o = torch.arange(out_c).view(-1, 1)
    return (o // per_group) * in_g + torch.arange(in_g).view(1, -1)


def _float64_copy(layer: _KANLayer) -> _KANLayer:
    # The scores compare tiny residuals with the spread of phi; float64 keeps round-off out of them.
    return copy.deepcopy(layer).to(device="cpu", dtype=torch.float64).requires_grad_(False)


def _check_layer_input(layer: _KANLayer, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected the layer's input as a Tensor, got {type(x).__name__}")
    if isinstance(layer, _KANConvNd):
        n = len(layer.kernel_size)
        if x.dim() == n + 1:
            x = x.unsqueeze(0)
        if x.dim() != n + 2 or x.shape[1] != layer.in_channels:
            raise ValueError(f"expected the layer's input of shape (N, {layer.in_channels}, *spatial) with "
                             f"{n} spatial dimensions, got {tuple(x.shape)}")
    else:
        if x.dim() < 1 or x.shape[-1] != layer.in_channels:
            raise ValueError(f"expected the layer's input of shape (*, {layer.in_channels}), got {tuple(x.shape)}")
        x = x.reshape(-1, layer.in_channels)
    if x.numel() == 0:
        raise ValueError("the layer's input holds no values")
    return x.detach().to(device="cpu", dtype=torch.float64)


def _tap_values(layer: _KANLayer, x: Tensor) -> Iterable[tuple[int, Tensor]]:
    """``(flat tap index, values (C, M))``: every value each kernel tap of each input channel reads."""
    if not isinstance(layer, _KANConvNd):
        yield 0, x.T
        return
    xp = KF.pad_input(x, layer._pad, layer.padding_mode)
    n = len(layer.kernel_size)
    out_size = [(xp.shape[2 + d] - layer.dilation[d] * (layer.kernel_size[d] - 1) - 1) // layer.stride[d] + 1
                for d in range(n)]
    if any(s < 1 for s in out_size):
        raise ValueError(f"the input {tuple(x.shape)} is smaller than the layer's kernel")
    for p, tap in enumerate(itertools.product(*(range(k) for k in layer.kernel_size))):
        index = [slice(None), slice(None)]
        for d in range(n):
            start = tap[d] * layer.dilation[d]
            index.append(slice(start, start + (out_size[d] - 1) * layer.stride[d] + 1, layer.stride[d]))
        yield p, xp[tuple(index)].transpose(0, 1).reshape(x.shape[1], -1)


def _round(v: float) -> int:
    return math.floor(v + 0.5)


# ------------------------------------------------------------------------------------------------
# What the learned functions see and what they are
# ------------------------------------------------------------------------------------------------


def input_histograms(layer: _KANLayer, x: Tensor, bins: int = DEFAULT_BINS) -> dict[str, Tensor]:
    """Histogram of the values every kernel tap reads, with shared bins per input channel.

    The input is padded as the layer pads it (a zero-padded border is read as ``0`` by ``phi``),
    and each tap gets its own histogram, since with padding or stride the taps see different pixels.

    Args:
        layer: a KAN convolution or ``KANLinear``.
        x: the layer's input, ``(N, C_in, *spatial)`` (or ``(*, in_features)`` for ``KANLinear``).
        bins: bins per input channel, spanning the smallest to the largest value it reads.

    Returns:
        float64 tensors ``edges (C_in, bins + 1)``, ``counts (C_in, *kernel, bins)``.
    """
    if bins < 1:
        raise ValueError(f"bins must be positive, got {bins}")
    x = _check_layer_input(layer, x)
    C = layer.in_channels
    kernel = _kernel_shape(layer)
    taps = list(_tap_values(layer, x))
    lo = torch.stack([v.amin(1) for _, v in taps]).amin(0)
    hi = torch.stack([v.amax(1) for _, v in taps]).amax(0)
    flat = hi - lo <= 1e-9 * torch.maximum(lo.abs(), hi.abs()).clamp_min(1.0)
    lo = torch.where(flat, lo - 0.5, lo)  # a channel that is constant still gets a visible range
    hi = torch.where(flat, hi + 0.5, hi)
    edges = lo.unsqueeze(1) + (hi - lo).unsqueeze(1) * torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    counts = torch.zeros(C, len(taps), bins, dtype=torch.float64)
    for p, v in taps:
        idx = ((v - lo.unsqueeze(1)) / (hi - lo).unsqueeze(1) * bins).floor().clamp(0, bins - 1).long()
        counts[:, p].scatter_add_(1, idx, torch.ones_like(v))
    return {"edges": edges, "counts": counts.reshape((C,) + kernel + (bins,))}


def _per_phi(layer: _KANLayer, t: Tensor) -> Tensor:
    """Index a per-input-channel tensor ``(C, ...)`` for every phi: ``(out, in/groups, ...)``."""
    return t[_channel_of_phi(layer)]


def nonlinearity_scores(layer: _KANLayer, x: Tensor | None = None, *, histograms: dict[str, Tensor] | None = None,
                        bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """How far each learned function is from a straight line on the inputs it actually sees.

    For every phi, the best line ``a + b t`` is fitted by least squares over the histogram bin
    centres of its tap's inputs, weighted by the histogram (so frequent values count more), and
    the score is ``1 - R^2 = weighted residual / weighted variance of phi``: 0 for a straight
    line, towards 1 for a function a line cannot follow. A constant phi (no variance) scores 0.
    A layer whose scores are all near 0 computes, on this data, what a plain convolution would:
    its weights are the slopes ``b`` and its bias the sum of the intercepts ``a`` of each output.

    Args:
        layer: a KAN convolution or ``KANLinear``.
        x: the layer's input (see :func:`input_histograms`); or pass ``histograms`` instead.
        histograms: the output of :func:`input_histograms`.
        bins: histogram bins, when ``x`` is given.

    Returns:
        numpy arrays of the phi shape ``(out, in/groups, *kernel)``: ``score``, ``amplitude`` (the
        weighted standard deviation of phi on the data), ``slope`` and ``intercept`` of the line
        fit; ``pooled`` (``1 - R^2`` of the whole layer: all residuals over all variances) and a
        ``summary`` dict (``mean``, ``median``, ``max``, ``pooled``, ``could_be_linear``: share of
        scores below :data:`LINEAR_THRESHOLD`, ``dead``: share of phi whose amplitude is below
        :data:`DEAD_THRESHOLD` times the layer's largest, ``count``).
    """
    if histograms is None:
        if x is None:
            raise ValueError("pass the layer's input x or its histograms")
        histograms = input_histograms(layer, x, bins)
    edges, counts = histograms["edges"], histograms["counts"]
    lay = _float64_copy(layer)
    centres = (edges[:, :-1] + edges[:, 1:]) / 2  # (C, B)
    with torch.no_grad():
        f = lay.evaluate_phi(centres)  # (O, J, *kernel, B)
    extra = f.dim() - 3
    w = _per_phi(layer, counts)  # (O, J, *kernel, B)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-300)
    t = _per_phi(layer, centres)
    t = t.view(t.shape[:2] + (1,) * extra + t.shape[2:])
    t_mean = (w * t).sum(-1, keepdim=True)
    f_mean = (w * f).sum(-1, keepdim=True)
    dt, df = t - t_mean, f - f_mean
    var_t = (w * dt * dt).sum(-1)
    var_f = (w * df * df).sum(-1)
    cov = (w * dt * df).sum(-1)
    slope = torch.where(var_t > 0, cov / var_t.clamp_min(1e-300), torch.zeros_like(cov))
    resid = (w * (df - slope.unsqueeze(-1) * dt) ** 2).sum(-1)
    # A phi that is constant up to round-off has no shape to explain: score 0, not 0/0.
    scale = f.abs().amax().clamp_min(1e-300)
    constant = var_f.sqrt() <= 1e-10 * scale
    score = torch.where(constant, torch.zeros_like(var_f), resid / var_f.clamp_min(1e-300)).clamp(0.0, 1.0)
    amplitude = var_f.sqrt()
    intercept = f_mean.squeeze(-1) - slope * t_mean.squeeze(-1).expand_as(slope)
    pooled = float(resid.sum() / var_f.sum()) if float(var_f.sum()) > 0 else 0.0
    s = score.flatten()
    summary = {
        "mean": float(s.mean()),
        "median": float(s.median()),
        "max": float(s.max()),
        "pooled": min(max(pooled, 0.0), 1.0),
        "could_be_linear": float((s < LINEAR_THRESHOLD).double().mean()),
        "dead": float((amplitude.flatten() < DEAD_THRESHOLD * amplitude.max()).double().mean()),
        "count": int(s.numel()),
    }
    return {
        "score": score.numpy(),
        "amplitude": amplitude.numpy(),
        "slope": slope.numpy(),
        "intercept": intercept.numpy(),
        "summary": summary,
    }


def summary_line(name: str, summary: dict[str, Any]) -> str:
    """One line per layer: the distribution of its nonlinearity scores."""
    return (f"{name}: 1-R^2 mean {summary['mean']:.3f}, median {summary['median']:.3f}, max {summary['max']:.3f}, "
            f"pooled {summary['pooled']:.3f}; {100 * summary['could_be_linear']:.0f}% of {summary['count']} phi "
            f"could be linear (< {LINEAR_THRESHOLD:g}), {100 * summary['dead']:.0f}% dead")


def _check_indices(what: str, indices: Sequence[int] | None, size: int, default: int) -> list[int]:
    if indices is None:
        return list(range(min(default, size)))
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < size]
    if bad or not indices:
        raise InspectionError(f"{what} must be in 0..{size - 1}, got {bad or 'none'}")
    return indices


def _fit_indices(indices: Sequence[int] | None, size: int) -> list[int] | None:
    """Keep the indices a layer has; ``None`` (its default subset) when none of them fits.

    One ``--out-channels`` list serves layers of different widths, so an index beyond a layer's
    channels is skipped there rather than refused.
    """
    if indices is None:
        return None
    kept = [i for i in indices if 0 <= i < size]
    return kept or None


def phi_atlas(layer: _KANLayer, x: Tensor | None = None, *, histograms: dict[str, Tensor] | None = None,
              scores: dict[str, Any] | None = None, out_channels: Sequence[int] | None = None,
              in_channels: Sequence[int] | None = None, points: int = DEFAULT_POINTS,
              bins: int = DEFAULT_BINS) -> dict[str, np.ndarray]:
    """The learned functions of chosen (output, input) channel pairs over the inputs they see.

    Args:
        layer: a KAN convolution or ``KANLinear``.
        x: the layer's input (or pass ``histograms``, and ``scores`` to reuse them).
        out_channels: output channels to show (default: the first 8).
        in_channels: indices into the layer's ``in_channels / groups`` axis (default: the first 4).
        points: points per curve, evenly spaced over the range of the input channel.

    Returns:
        numpy arrays, with ``o, j`` the chosen channels: ``out_channels (o,)``, ``in_index (j,)``,
        ``input_channel (o, j)`` (the input channel each pair reads), ``t (o, j, points)``,
        ``phi (o, j, *kernel, points)``, ``edges (o, j, bins + 1)``, ``density (o, j, *kernel,
        bins)`` (a probability density: it integrates to 1), ``score`` and ``amplitude`` ``(o, j,
        *kernel)``, ``grid_range (o, j, 2)`` (where the splines live; outside, phi is the base term).
    """
    if histograms is None:
        if x is None:
            raise ValueError("pass the layer's input x or its histograms")
        histograms = input_histograms(layer, x, bins)
    if scores is None:
        scores = nonlinearity_scores(layer, histograms=histograms)
    out_c, in_g = layer.base_weight.shape[:2]
    oi = _check_indices("out_channels", out_channels, out_c, DEFAULT_OUT_CHANNELS)
    ji = _check_indices("in_channels", in_channels, in_g, DEFAULT_IN_CHANNELS)
    edges, counts = histograms["edges"], histograms["counts"]
    lay = _float64_copy(layer)
    t = edges[:, :1] + (edges[:, -1:] - edges[:, :1]) * torch.linspace(0, 1, points, dtype=torch.float64)
    with torch.no_grad():
        phi = lay.evaluate_phi(t)
    sel = (torch.tensor(oi).view(-1, 1), torch.tensor(ji).view(1, -1))
    chan = _channel_of_phi(layer)[sel]
    widths = (edges[:, 1:] - edges[:, :-1])  # (C, B)
    extra = counts.dim() - 2
    density = counts / counts.sum(-1, keepdim=True).clamp_min(1) / widths.view(widths.shape[:1] + (1,) * extra
                                                                                + widths.shape[1:])
    K = layer.spline_order
    knots = lay.grid
    grid_range = torch.stack([knots[:, K], knots[:, -K - 1]], dim=1)
    return {
        "out_channels": np.asarray(oi),
        "in_index": np.asarray(ji),
        "input_channel": chan.numpy(),
        "t": t[chan].numpy(),
        "phi": phi[sel].numpy(),
        "edges": edges[chan].numpy(),
        "density": density[chan].numpy(),
        "score": scores["score"][np.ix_(oi, ji)],
        "amplitude": scores["amplitude"][np.ix_(oi, ji)],
        "amplitude_max": np.asarray(scores["amplitude"].max()),
        "grid_range": grid_range[chan].numpy(),
    }


# ------------------------------------------------------------------------------------------------
# Local linearisation
# ------------------------------------------------------------------------------------------------


def layer_position(location: Sequence[float], image_size: Sequence[int], input_size: Sequence[int]) -> tuple[int, ...]:
    """Map a pixel of the model's input image to the same place in a (smaller) layer input.

    Examples:
        >>> layer_position((14, 14), (28, 28), (13, 13))
        (6, 6)
    """
    return tuple(min(max(int(math.floor(p * s / S)), 0), s - 1) for p, S, s in zip(location, image_size, input_size))


def effective_kernel(layer: nn.Module, x: Tensor, position: Sequence[int]) -> dict[str, Any]:
    """The layer's local linearisation at one output position: a plain convolution kernel.

    For a 2-d KAN convolution the output position whose window is centred closest to
    ``position`` is taken (padding, stride and dilation included), and each tap's entry is the
    slope ``d phi / dt`` at the value that tap reads there. Near that input, changing the pixel
    under tap ``(u, v)`` of input channel ``i`` by ``e`` changes output channel ``o`` by about
    ``kernel[o, i, u, v] * e``, just as a convolution with that kernel would. For an
    ``nn.Conv2d`` the kernel is its weight (the same everywhere).

    Args:
        layer: ``KANConv2d`` or ``nn.Conv2d``.
        x: the layer's input for ONE image, ``(C_in, H, W)`` or ``(1, C_in, H, W)``.
        position: ``(row, column)`` in the coordinates of ``x``.

    Returns:
        ``kernel (out, in/groups, kH, kW)`` (numpy), ``output_position``, ``tap_rows``/``tap_cols``
        (the input pixel under each tap; outside ``0..H-1``/``0..W-1`` for a padded tap),
        ``in_padding (kH, kW)`` (bool), and for KAN layers ``values (C_in, kH, kW)`` (what the taps read).
    """
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"effective_kernel takes the input of one image, got a batch of {x.shape[0]}")
        x = x[0]
    if x.dim() != 3:
        raise ValueError(f"expected the layer's input of one image (C, H, W), got {tuple(x.shape)}")
    if len(position) != 2:
        raise ValueError(f"position must be (row, column), got {position!r}")
    H, W = x.shape[1:]
    if isinstance(layer, nn.Conv2d):
        kernel = layer.weight.detach().cpu().to(torch.float64)
        pad = layer._reversed_padding_repeated_twice  # F.pad order, as KANConv2d._pad
        stride, dilation, kh_kw = layer.stride, layer.dilation, layer.kernel_size
    elif isinstance(layer, KANConv2d):
        stride, dilation, kh_kw, pad = layer.stride, layer.dilation, layer.kernel_size, layer._pad
        kernel = None
    else:
        raise TypeError(f"effective_kernel takes a KANConv2d or nn.Conv2d, got {type(layer).__name__}")
    top, left = pad[2], pad[0]
    pos = []
    for d, (p, size) in enumerate(zip(position, (H, W))):
        k, dil, s = kh_kw[d], dilation[d], stride[d]
        lo_pad, hi_pad = (pad[2], pad[3]) if d == 0 else (pad[0], pad[1])
        n_out = (size + lo_pad + hi_pad - dil * (k - 1) - 1) // s + 1
        if n_out < 1:
            raise ValueError(f"the input {tuple(x.shape)} is smaller than the layer's kernel")
        pos.append(min(max(_round((p + lo_pad - dil * (k - 1) / 2) / s), 0), n_out - 1))
    y_o, x_o = pos
    kh, kw = kh_kw
    rows = np.array([y_o * stride[0] - top + u * dilation[0] for u in range(kh)])
    cols = np.array([x_o * stride[1] - left + v * dilation[1] for v in range(kw)])
    in_padding = ~(((rows >= 0) & (rows < H))[:, None] & ((cols >= 0) & (cols < W))[None, :])
    result: dict[str, Any] = {"output_position": (y_o, x_o), "tap_rows": rows, "tap_cols": cols,
                              "in_padding": in_padding}
    if kernel is not None:
        result["kernel"] = kernel.numpy()
        return result

    lay = _float64_copy(layer)
    xp = KF.pad_input(x.detach().cpu().to(torch.float64).unsqueeze(0), layer._pad, layer.padding_mode)[0]
    y0, x0 = y_o * stride[0], x_o * stride[1]
    values = xp[:, y0: y0 + dilation[0] * (kh - 1) + 1: dilation[0], x0: x0 + dilation[1] * (kw - 1) + 1: dilation[1]]
    C, P = values.shape[0], kh * kw
    t = values.reshape(C, P).clone().requires_grad_(True)
    with torch.enable_grad():
        f = lay.evaluate_phi(t)  # (out, in/groups, kh, kw, P): every phi at every tap's value
        n_out, n_in = f.shape[:2]
        f = f.reshape(n_out, n_in, P, P).diagonal(dim1=2, dim2=3)  # each phi at its own tap's value
        chan = _channel_of_phi(layer)
        slopes = torch.empty(n_out, n_in, P, dtype=torch.float64)
        # Within one output channel every (in, tap) phi reads its own entry of t, so one gradient
        # per output channel separates them.
        for o in range(n_out):
            (g,) = torch.autograd.grad(f[o].sum(), t, retain_graph=o < n_out - 1)
            slopes[o] = g[chan[o]]
    result["kernel"] = slopes.reshape(n_out, n_in, kh, kw).numpy()
    result["values"] = values.detach().numpy()
    return result


# ------------------------------------------------------------------------------------------------
# Running a model with hooks
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def record_layers(model: nn.Module, images: Tensor, layers: dict[str, nn.Module], *, inputs: bool = True,
                  outputs: bool = True, batch_size: int = 256) -> dict[str, dict[str, Tensor]]:
    """Run ``model`` on ``images`` (in eval mode, in batches) and keep what the named layers see.

    Returns:
        ``{name: {"input": Tensor, "output": Tensor}}`` on the CPU, concatenated over batches.
    """
    was_training = model.training
    model.eval()
    store: dict[str, dict[str, list[Tensor]]] = {name: {"input": [], "output": []} for name in layers}

    def hook(name: str) -> Callable:
        def save(module: nn.Module, args: tuple, output: Any) -> None:
            if inputs:
                store[name]["input"].append(args[0].detach().cpu())
            if outputs and isinstance(output, Tensor):
                store[name]["output"].append(output.detach().cpu())
        return save

    handles = [module.register_forward_hook(hook(name)) for name, module in layers.items()]
    try:
        device = next(iter(model.parameters()), torch.empty(0)).device
        for start in range(0, len(images), batch_size):
            model(images[start: start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: {k: torch.cat(v) for k, v in parts.items() if v} for name, parts in store.items()}


def feature_maps(model: nn.Module, images: Tensor, layers: dict[str, nn.Module]) -> dict[str, np.ndarray]:
    """The output of each named layer for a few images: ``{name: (N, C, H, W) array}`` (4-d outputs only)."""
    recorded = record_layers(model, images, layers, inputs=False)
    return {name: r["output"].numpy() for name, r in recorded.items() if "output" in r and r["output"].dim() == 4}


def select_examples(labels: Tensor, count: int) -> list[int]:
    """Indices of ``count`` images of different classes (the first of each, in order of appearance).

    Examples:
        >>> select_examples(torch.tensor([3, 3, 1, 0, 1, 2]), 3)
        [0, 2, 3]
    """
    chosen: list[int] = []
    seen: set[int] = set()
    for i, y in enumerate(labels.tolist()):
        if len(chosen) == count:
            break
        if y not in seen:
            seen.add(y)
            chosen.append(i)
    for i in range(len(labels)):  # fewer classes than asked for: fill with the next images
        if len(chosen) >= count:
            break
        if i not in chosen:
            chosen.append(i)
    return chosen


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
        np.savez_compressed(path, **{k: np.asarray(v) for k, v in arrays.items()})
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
            atlas = phi_atlas(layer, histograms=hist, scores=scores, out_channels=_fit_indices(out_channels, n_out),
                              in_channels=_fit_indices(in_channels, n_in))
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
            oc = _check_indices("out_channels", _fit_indices(out_channels, maps.shape[1]), maps.shape[1],
                                DEFAULT_OUT_CHANNELS)
            writer.data(f"feature_maps_{stem}", images=pictures, maps=maps[:, oc], channels=oc, labels=labels)
            writer.picture(f"feature_maps_{stem}", lambda P: P.plot_feature_maps(
                pictures, maps[:, oc], channels=oc, labels=captions, title=f"{prefix}{short} feature maps"))
        if isinstance(layer, (KANConv2d, nn.Conv2d)):
            x = recorded[name]["input"][0]
            position = layer_position(location, image_size, tuple(x.shape[1:]))
            k = effective_kernel(layer, x, position)
            n_out, n_in = k["kernel"].shape[:2]
            oi = _check_indices("out_channels", _fit_indices(out_channels, n_out), n_out, DEFAULT_OUT_CHANNELS)
            ji = _check_indices("in_channels", _fit_indices(in_channels, n_in), n_in, DEFAULT_IN_CHANNELS)
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

    Returns:
        ``(model, checkpoint)``: the model in eval mode with the trained weights, and the
        checkpoint's contents (``config`` holds the run's resolved options).
    """
    from .models import DEFAULT_GRID_SIZE, create_model, model_info
    from .train import CHECKPOINT_FILE

    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CHECKPOINT_FILE} in {run_dir}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    config = checkpoint.get("config") or {}
    name = config.get("model")
    if name is None or "model" not in checkpoint:
        raise InspectionError(f"{path} holds no model name and weights; is it a checkpoint of `kanvolution train`?")
    try:
        info = model_info(name)
    except ValueError as err:
        raise InspectionError(str(err)) from None
    if info.has_kan:
        model = create_model(name, grid_size=config.get("grid_size") or DEFAULT_GRID_SIZE)
    else:
        model = create_model(name)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return model, checkpoint


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
    from .data import load_dataset
    from .train import CURVES_FILE, RESULTS_FILE

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
        image_indices = _check_indices("image indices", image_indices, len(test_labels), 0)
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
    results_path = run / RESULTS_FILE
    if (run / CURVES_FILE).is_file():
        summary["learning_curves"] = str(run / CURVES_FILE)
    elif plots and results_path.is_file():
        history = json.loads(results_path.read_text()).get("history") or []
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
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
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
    except InspectionError as err:
        from .cli import CliError

        raise CliError(str(err), code=2) from None
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise
        from .cli import CliError

        raise CliError("the pictures need matplotlib: pip install 'kanvolution[viz]' "
                       "(or use --no-plots to write only the data files)") from None
    out = Path(args.out) if args.out else Path(args.run_dir) / INSPECT_DIR
    print(f"{len(files)} files in {out}: {', '.join(sorted(files))}")
    return 0
