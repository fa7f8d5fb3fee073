"""Numbers that describe what a KAN layer learned: its phi on the inputs it sees, how far each
phi is from a straight line, feature maps and local linearisations. Torch and numpy only.

Examples:
    >>> import torch
    >>> from kanvolution import KANConv2d
    >>> from kanvolution.viz.analysis import nonlinearity_scores, effective_kernel
    >>> layer = KANConv2d(1, 2, 3, grid_size=5)
    >>> x = torch.rand(16, 1, 10, 10) * 2 - 1
    >>> scores = nonlinearity_scores(layer, x)  # 1 - R^2 of each phi's best line on the data
    >>> scores["score"].shape  # one score per (out, in, tap): 0 = a straight line
    (2, 1, 3, 3)
    >>> 0.0 <= scores["summary"]["median"] <= 1.0
    True
    >>> effective_kernel(layer, x[0], (5, 5))["kernel"].shape  # d phi / dt at the pixels there
    (2, 1, 3, 3)
"""
from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import functional as KF
from ..errors import KanvolutionError
from ..layers import KANConv2d, _KANConvNd, _KANLayer

__all__ = [
    "DEAD_THRESHOLD",
    "InspectionError",
    "LINEAR_THRESHOLD",
    "check_indices",
    "effective_kernel",
    "feature_maps",
    "fit_indices",
    "input_histograms",
    "layer_position",
    "nonlinearity_scores",
    "phi_atlas",
    "record_layers",
    "select_examples",
    "summary_line",
]

LINEAR_THRESHOLD = 0.01  # a phi with 1 - R^2 below this "could have been linear"
DEAD_THRESHOLD = 0.05  # a phi whose spread on the data is below this share of the layer's largest is "dead"
DEFAULT_OUT_CHANNELS = 8  # readable atlas: 8 x 4 channel pairs of 3x3 panels
DEFAULT_IN_CHANNELS = 4
DEFAULT_BINS = 64  # histogram bins per input channel
DEFAULT_POINTS = 200  # points per phi curve in the atlas

class InspectionError(KanvolutionError, ValueError):
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


def _function_range(layer) -> Tensor:
    """``(C, 2)``: per input channel, where the basis functions are defined on a grid (B-splines:
    the knots' interior span; rbf, wavelet: first and last centre; relu: the bumps' span); the
    families on all reals (polynomials in tanh, Fourier) get the layer's ``grid_range``."""
    state, name = layer.grid, getattr(layer, "basis_name", "bspline")
    if name == "bspline":
        K = layer.spline_order
        return torch.stack([state[:, K], state[:, -K - 1]], dim=1)
    if name in ("rbf", "wavelet"):
        return torch.stack([state[:, 0], state[:, -2]], dim=1)
    if name == "relu":
        return torch.stack([state[:, 0], state[:, -2] + state[:, -1]], dim=1)
    return torch.tensor(layer.grid_range, dtype=torch.float64).expand(layer.in_channels, 2)


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


def check_indices(what: str, indices: Sequence[int] | None, size: int, default: int) -> list[int]:
    """``indices`` checked against ``size`` (:class:`InspectionError` naming ``what`` if out of range); ``None`` = the first ``default``."""
    if indices is None:
        return list(range(min(default, size)))
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < size]
    if bad or not indices:
        raise InspectionError(f"{what} must be in 0..{size - 1}, got {bad or 'none'}")
    return indices


def fit_indices(indices: Sequence[int] | None, size: int) -> list[int] | None:
    """The ``indices`` below ``size`` (``None`` stays ``None``)."""
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
    oi = check_indices("out_channels", out_channels, out_c, DEFAULT_OUT_CHANNELS)
    ji = check_indices("in_channels", in_channels, in_g, DEFAULT_IN_CHANNELS)
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
    grid_range = _function_range(lay)
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
