"""Functional form of the KAN layers: B-spline bases, ``kan_conv1d/2d/3d`` and ``kan_linear``.

The modules in :mod:`kanvolution.layers` call these functions. Everything here depends on torch alone.

The layer (see ``SPEC.md`` section 1) applies, for every kernel tap of every (input, output) channel
pair, a univariate function ``phi(t) = w_base * act(t) + w_scale * sum_g c_g B_g(t)`` to the padded
input and sums the results. Because the bases of a pixel depend only on its value and its input
channel's knots, the layer equals ONE ordinary convolution of the *expanded* input
``[act(x), B_0(x), ..., B_{G+K-1}(x)]`` (``G + K + 1`` maps per input channel) with the weight
``[w_base, w_scale * c_0, ..., w_scale * c_{G+K-1}]``. The fused path below evaluates only the
``K + 1`` non-zero bases of each pixel (local de Boor recursion, no dense Cox-de Boor pyramid),
scatters them into the expansion batch chunk by batch chunk, and never keeps the expansion for
backward: it is recomputed there, so memory stays close to that of a plain convolution.
"""
from __future__ import annotations

import functools
import math
import threading
from fractions import Fraction
from typing import Callable, Literal, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _cpu_kernels

__all__ = [
    "PaddingMode",
    "b_splines",
    "uniform_knots",
    "expand_bases",
    "kan_conv1d",
    "kan_conv2d",
    "kan_conv3d",
    "kan_linear",
    "combine_weights",
    "resolve_padding",
    "pad_input",
    "release_workspace",
]

PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
Activation = Callable[[Tensor], Tensor]
_IntOrTuple = Union[int, Sequence[int]]

# The expansion of one batch chunk is kept under this many bytes; larger batches are processed
# chunk by chunk in forward and backward, which bounds peak memory independently of batch size.
EXPANSION_CHUNK_BYTES = 32 * 2**20

# ------------------------------------------------------------------------------------------------
# Knots and bases
# ------------------------------------------------------------------------------------------------


def uniform_knots(
    grid_size: int,
    spline_order: int,
    grid_range: tuple[float, float] = (-1.0, 1.0),
    *,
    channels: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The extended uniform knot vector ``t_j = a + (j - K) h``, ``j = 0..G+2K``, once per channel.

    Returns a tensor of shape ``(channels, grid_size + 2 * spline_order + 1)``.

    Examples:
        >>> uniform_knots(2, 1, (-1.0, 1.0))
        tensor([[-2., -1.,  0.,  1.,  2.]])
    """
    a, b = float(grid_range[0]), float(grid_range[1])
    h = (b - a) / grid_size
    j = torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float64)
    knots = (j * h + a).to(device=device, dtype=dtype or torch.get_default_dtype())
    return knots.unsqueeze(0).repeat(channels, 1)


def b_splines(x: Tensor, grid: Tensor, spline_order: int) -> Tensor:
    """Dense B-spline bases by the Cox-de Boor recursion.

    Args:
        x: values of shape ``(N, C, *)``.
        grid: knots of shape ``(C, G + 2K + 1)``, non-decreasing along the last dimension.
        spline_order: the degree ``K``.

    Returns:
        ``(N, C, *, G + K)``: all bases of every value, zero outside ``[t_0, t_{G+2K})``.
    """
    extra = x.dim() - 2
    t = grid.view(1, grid.shape[0], *([1] * extra), grid.shape[1])
    v = x.unsqueeze(-1)
    bases = ((v >= t[..., :-1]) & (v < t[..., 1:])).to(x.dtype)
    for k in range(1, spline_order + 1):
        left = (v - t[..., : -(k + 1)]) / (t[..., k:-1] - t[..., : -(k + 1)]) * bases[..., :-1]
        right = (t[..., k + 1 :] - v) / (t[..., k + 1 :] - t[..., 1:(-k)]) * bases[..., 1:]
        bases = left + right
    return bases


@functools.lru_cache(maxsize=None)
def _uniform_pieces(spline_order: int) -> tuple[tuple[tuple[Fraction, ...], ...], tuple[tuple[Fraction, ...], ...]]:
    """Monomial coefficients of the ``K + 1`` pieces of the uniform B-spline on one span.

    On span ``m`` with local coordinate ``f = (x - t_m) / h`` in ``[0, 1)``, basis ``B_{m-K+r}`` is
    ``sum_p A[p][r] f^p``; its derivative in ``f`` is ``sum_p D[p][r] f^p``. Obtained exactly (in
    rationals) from the de Boor recursion, whose denominators are constant on a uniform grid.
    """
    K = spline_order

    def add(a, b):
        n = max(len(a), len(b))
        return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]

    def mul(a, b):
        out = [Fraction(0)] * (len(a) + len(b) - 1)
        for i, u in enumerate(a):
            for j, v in enumerate(b):
                out[i + j] += u * v
        return out

    values = [[Fraction(1)]]
    for j in range(1, K + 1):
        left = [None] + [[Fraction(i - 1), Fraction(1)] for i in range(1, K + 1)]  # f + i - 1
        right = [None] + [[Fraction(i), Fraction(-1)] for i in range(1, K + 1)]  # i - f
        saved = [Fraction(0)]
        new = []
        for r in range(j):
            temp = [c / j for c in values[r]]  # right[r+1] + left[j-r] == j
            new.append(add(saved, mul(right[r + 1], temp)))
            saved = mul(left[j - r], temp)
        new.append(saved)
        values = new
    A = tuple(tuple(values[r][p] if p < len(values[r]) else Fraction(0) for r in range(K + 1)) for p in range(K + 1))
    D = tuple(tuple((p + 1) * A[p + 1][r] for r in range(K + 1)) for p in range(K))
    return A, D


def _uniform_spacing(grid: Tensor) -> Tensor | None:
    """Per-channel knot spacing if every channel's knots are uniform, else ``None`` (cached)."""
    key = (grid._version, grid.data_ptr())
    cached = getattr(grid, "_kan_uniform_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    m = grid.shape[1] - 1
    h = (grid[:, -1] - grid[:, 0]) / m
    expected = grid[:, :1] + h.unsqueeze(1) * torch.arange(m + 1, device=grid.device, dtype=grid.dtype)
    scale = grid.abs().amax(dim=1) + h.abs()
    tol = 64 * torch.finfo(grid.dtype).eps * scale
    ok = bool(((grid - expected).abs().amax(dim=1) <= tol).all() and (h > 0).all())
    result = h if ok else None
    try:
        grid._kan_uniform_cache = (key, result)
    except (AttributeError, RuntimeError):  # pragma: no cover - tensors that refuse attributes
        pass
    return result


@functools.lru_cache(maxsize=64)
def _uniform_tables(spline_order: int, n_knots: int, dtype: torch.dtype, device: torch.device):
    """Constants of the closed-form path: piece coefficients and per-span slot/validity tables.

    Table index ``row = m + 1`` for span ``m`` in ``-1 .. M`` (``M = n_knots - 1`` spans); rows 0
    and ``M + 1`` stand for "outside the knots". ``slot[r][row]`` is the expansion slot of basis
    ``m - K + r`` (its number plus one), or 0 where that basis does not exist; ``ok[r][row]`` is
    1.0 where it exists, else 0.0.
    """
    K = spline_order
    A, D = _uniform_pieces(K)
    coef = [[float(A[p][r]) for p in range(K + 1)] for r in range(K + 1)]  # coef[r][p]
    dcoef = [[float(D[p][r]) for p in range(K)] for r in range(K + 1)]
    n_spans = n_knots - 1
    n_bases = n_knots - K - 1
    m = torch.arange(-1, n_spans + 1).view(-1, 1)
    g = m - K + torch.arange(K + 1)
    ok = (g >= 0) & (g < n_bases) & (m >= 0) & (m < n_spans)
    slot = torch.where(ok, g + 1, 0).T.contiguous().to(device)
    return coef, dcoef, list(slot), list(ok.T.contiguous().to(dtype=dtype, device=device))


def _polyval(coefs: list[float], f: Tensor) -> Tensor:
    """``sum_p coefs[p] * f ** p`` by Horner's rule (scalar coefficients: vectorised loops)."""
    if len(coefs) == 1:
        return torch.full_like(f, coefs[0])
    out = f * coefs[-1] + coefs[-2]
    for c in reversed(coefs[:-2]):
        out.mul_(f).add_(c)
    return out


def _local_bases(x: Tensor, grid: Tensor, spline_order: int, *, derivative: bool):
    """The ``K + 1`` possibly non-zero bases of every value (and their derivatives).

    Args:
        x: values with the channel LAST, ``(..., C)``.
        grid: ``(C, G + 2K + 1)`` knots.

    A value in knot span ``[t_m, t_{m+1})`` can only have ``B_{m-K} .. B_m`` non-zero. On uniform
    knots these are fixed degree-``K`` polynomials of the position in the span, evaluated in
    closed form (Horner); on any other knots they come from the triangular de Boor recursion on
    the span's own knots. Either way the work is on tensors the size of ``x``, not ``(G + K)``
    times larger, one tensor per piece so that every operation runs over contiguous memory.

    Returns ``(slots, values, slopes)``: lists of ``K + 1`` tensors shaped like ``x``. ``slots[r]``
    is the basis number of ``B_{m-K+r}`` plus one (its position in the expansion; 0 where that
    basis does not exist, and there ``values`` is unspecified: the callers write slot 0 last),
    ``slopes`` the derivatives, zero where the basis does not exist (``None`` unless
    ``derivative``).
    """
    n_knots = grid.shape[1]
    K = spline_order
    spacing = _uniform_spacing(grid) if K > 0 else None
    if spacing is None:
        return _de_boor_local(x, grid, K, derivative)
    coef, dcoef, slot_table, ok_table = _uniform_tables(K, n_knots, x.dtype, x.device)
    inv_h = 1.0 / spacing
    # Position in units of h; NaN goes to "outside" (the base term still carries it).
    u = torch.nan_to_num_((x - grid[:, 0]) * inv_h, nan=-1.0).clamp_(-1.0, n_knots - 1.0)
    m_f = u.floor()
    f = u.sub_(m_f)
    row = m_f.to(torch.long).add_(1)
    slots = [torch.take(t, row) for t in slot_table]
    values = [_polyval(c, f) for c in coef]
    slopes = None
    if derivative:
        slopes = [_polyval(d, f).mul_(torch.take(ok, row)).mul_(inv_h) for d, ok in zip(dcoef, ok_table)]
    return slots, values, slopes


def _de_boor_local(x: Tensor, grid: Tensor, K: int, derivative: bool):
    """:func:`_local_bases` on arbitrary (non-decreasing) knots; ``x`` is ``(..., C)``."""
    c = x.shape[-1]
    n_knots = grid.shape[1]
    n_bases = n_knots - K - 1
    # Knot span by binary search on each channel's own knots: exactly the half-open intervals of
    # the Cox-de Boor recursion, also for values that sit on a knot.
    xc = x.reshape(-1, c).T.contiguous()
    m = (torch.searchsorted(grid, xc, right=True) - 1).T.reshape(x.shape)
    inside = (m >= 0) & (m < n_knots - 1)
    m = m.clamp(0, n_knots - 2)
    values = [torch.ones_like(x)]
    lower = values
    left: list = []
    right: list = []
    if K > 0:
        # Knots t_{m+k}, k = 1-K .. K, from a copy of the knots extended by K steps on each side
        # (the extension only feeds bases outside the range, which are dropped).
        ar = torch.arange(1, K + 1, device=grid.device, dtype=grid.dtype)
        ext = torch.cat([grid[:, :1] - (grid[:, 1:2] - grid[:, :1]) * ar.flip(0), grid,
                         grid[:, -1:] + (grid[:, -1:] - grid[:, -2:-1]) * ar], dim=1)
        flat = ext.reshape(-1)
        base_index = m + torch.arange(c, device=x.device) * ext.shape[1] + K

        def knot(k: int) -> Tensor:
            return flat[base_index + k]

        left = [None] + [x - knot(1 - j) for j in range(1, K + 1)]
        right = [None] + [knot(j) - x for j in range(1, K + 1)]
        for j in range(1, K + 1):
            lower = values
            saved = torch.zeros_like(x)
            new = []
            for r in range(j):
                temp = values[r] / (right[r + 1] + left[j - r])
                new.append(saved + right[r + 1] * temp)
                saved = left[j - r] * temp
            new.append(saved)
            values = new
    valid, slots = [], []
    for r in range(K + 1):
        g = m - K + r
        ok = (g >= 0) & (g < n_bases) & inside
        valid.append(ok)
        slots.append(torch.where(ok, g + 1, 0))
    slopes = None
    if derivative:
        # B'_{g,K} = K (B_{g,K-1} / (t_{g+K} - t_g) - B_{g+1,K-1} / (t_{g+K+1} - t_{g+1})) with
        # g = m - K + r; the degree K-1 bases on this span are B_{m-K+1} .. B_m = lower[0 .. K-1].
        slopes = []
        for r in range(K + 1):
            s = torch.zeros_like(x)
            if K > 0 and r >= 1:
                s = s + lower[r - 1] / (right[r] + left[K - r + 1])
            if K > 0 and r <= K - 1:
                s = s - lower[r] / (right[r + 1] + left[K - r])
            slopes.append(s * K * valid[r])
    return slots, values, slopes


def _scatter_expansion(out: Tensor, slots: list[Tensor], values: list[Tensor]) -> None:
    for slot, value in zip(slots, values):
        out.scatter_(-1, slot.unsqueeze(-1), value.unsqueeze(-1))


_workspace = threading.local()


def _zeros_workspace(shape: tuple[int, ...], like: Tensor, zero: bool = True) -> Tensor:
    """A zeroed scratch tensor; on CPU the memory is kept and reused between calls.

    Fresh multi-megabyte allocations on CPU go back to the operating system when freed, and
    every new one pays page faults on first touch (measured: ~8x slower zero-filling of the
    expansion). The buffer is per thread and holds at most one expansion chunk
    (``EXPANSION_CHUNK_BYTES``); :func:`release_workspace` frees it. ``zero=False`` skips the
    zero fill, for a caller that overwrites every element.
    """
    if like.device.type != "cpu":
        return like.new_zeros(shape) if zero else like.new_empty(shape)
    numel = math.prod(shape)
    buf = getattr(_workspace, "buffer", None)
    if buf is None or buf.dtype != like.dtype or buf.numel() < numel:
        buf = torch.empty(numel, dtype=like.dtype)
        _workspace.buffer = buf
    out = buf[:numel].view(shape)
    return out.zero_() if zero else out


def release_workspace() -> None:
    """Free this thread's cached expansion buffer."""
    _workspace.buffer = None


def _compiled_knots(x: Tensor, grid: Tensor, spline_order: int) -> tuple[Tensor, Tensor] | None:
    """``(t_0, 1 / h)`` per channel when the compiled CPU loops of :mod:`._cpu_kernels` can expand
    ``x`` (``(..., C)``) on these knots, else ``None``: the PyTorch code then runs instead."""
    if (
        x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or grid.dtype != x.dtype
        or grid.device.type != "cpu"
        or not 1 <= spline_order <= _cpu_kernels.MAX_ORDER
        or x.numel() == 0
        or (torch.is_grad_enabled() and (x.requires_grad or grid.requires_grad))
        or not _cpu_kernels.is_enabled()
    ):
        return None
    spacing = _uniform_spacing(grid)
    if spacing is None or _cpu_kernels.load() is None:
        return None
    cached = getattr(grid, "_kan_compiled_knots", None)
    if cached is not None and cached[0] is spacing:  # same spacing object: grid unchanged
        return cached[1]
    # The same two operations as the closed-form path of _local_bases: identical positions.
    knots = (grid[:, 0].contiguous(), (1.0 / spacing).contiguous())
    try:
        grid._kan_compiled_knots = (spacing, knots)
    except (AttributeError, RuntimeError):  # pragma: no cover - tensors that refuse attributes
        pass
    return knots


def _is_plain_silu(activation: Activation) -> bool:
    """SiLU, whose derivative ``torch.ops.aten.silu_backward`` gives without an autograd graph."""
    return activation is F.silu or (type(activation) is torch.nn.SiLU and not activation.inplace)


def _expand_last(x: Tensor, grid: Tensor, spline_order: int, act: Tensor, out: Tensor | None = None):
    """Channel-last expansion ``(..., C, G+K+1)``: slot 0 the base term, slot 1+g basis g.

    ``out``, if given, is overwritten entirely; its previous contents do not matter.
    """
    n_slots = grid.shape[1] - spline_order
    knots = _compiled_knots(x, grid, spline_order)
    if (
        knots is not None
        and act.shape == x.shape
        and act.dtype == x.dtype
        and not (torch.is_grad_enabled() and act.requires_grad)
        and (out is None or out.is_contiguous())
    ):
        if out is None:
            out = x.new_empty(x.shape + (n_slots,))
        c = x.shape[-1]
        _cpu_kernels.expand(x.reshape(-1, c).contiguous(), *knots, grid.shape[1], spline_order,
                            act.reshape(-1, c).contiguous(), out.view(-1, c, n_slots))
        return out
    slots, values, _ = _local_bases(x, grid, spline_order, derivative=False)
    if out is None:
        out = x.new_zeros(x.shape + (n_slots,))
    else:
        out.zero_()
    # Entries outside the basis range point at slot 0, which is overwritten below.
    _scatter_expansion(out, slots, values)
    out[..., 0] = act
    return out


def expand_bases(x: Tensor, grid: Tensor, spline_order: int, base_activation: Activation = F.silu) -> Tensor:
    """Expand every value into ``[act(x), B_0(x), .., B_{G+K-1}(x)]``.

    Args:
        x: ``(N, C, *)``.
        grid: ``(C, G + 2K + 1)`` knots.

    Returns:
        ``(N, C * (G + K + 1), *)``, input channel major, as the fused convolution consumes it.

    Examples:
        >>> x = torch.tensor([[0.25]])
        >>> expand_bases(x, uniform_knots(2, 1), 1)
        tensor([[0.1405, 0.0000, 0.7500, 0.2500]])
    """
    xl = x.movedim(1, -1)
    out = _expand_last(xl, grid, spline_order, base_activation(xl))
    return out.flatten(-2).movedim(-1, 1)


# ------------------------------------------------------------------------------------------------
# Padding
# ------------------------------------------------------------------------------------------------


def _ntuple(value: _IntOrTuple, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    try:
        out = tuple(int(v) for v in value)  # type: ignore[union-attr]
    except TypeError:
        raise TypeError(f"{name} must be an int or a tuple of {n} ints, got {value!r}") from None
    if len(out) != n:
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    return out


def resolve_padding(
    padding: Union[str, _IntOrTuple], kernel_size: Sequence[int], dilation: Sequence[int], stride: Sequence[int]
) -> tuple[int, ...]:
    """Padding as ``F.pad`` takes it (last dimension first, ``(left, right)`` pairs).

    ``"same"`` puts the extra element of an odd total on the right, as ``nn.Conv2d`` does.
    """
    n = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            amounts = [(0, 0)] * n
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
            amounts = []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                amounts.append((total // 2, total - total // 2))
        else:
            raise ValueError(f"padding must be 'valid', 'same', an int or a tuple of {n} ints, got {padding!r}")
    else:
        pads = _ntuple(padding, n, "padding")
        if any(p < 0 for p in pads):
            raise ValueError(f"padding must be non-negative, got {padding!r}")
        amounts = [(p, p) for p in pads]
    flat: list[int] = []
    for left, right in reversed(amounts):
        flat += [left, right]
    return tuple(flat)


def pad_input(x: Tensor, pad: Sequence[int], padding_mode: str) -> Tensor:
    """Pad ``x`` before ``phi`` is applied (padded values go through ``phi`` like any pixel)."""
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
    if not any(pad):
        return x
    if padding_mode == "zeros":
        return F.pad(x, list(pad), mode="constant", value=0.0)
    return F.pad(x, list(pad), mode=padding_mode)


# ------------------------------------------------------------------------------------------------
# The fused layer
# ------------------------------------------------------------------------------------------------


def combine_weights(base_weight: Tensor, spline_weight: Tensor, spline_scaler: Tensor) -> Tensor:
    """One weight for the expanded input: ``(out, in * (G+K+1), *kernel)``."""
    out_c, in_c = base_weight.shape[:2]
    kernel = base_weight.shape[2:]
    scaled = (spline_weight * spline_scaler.unsqueeze(-1)).movedim(-1, 2)  # (out, in, G+K, *kernel)
    w = torch.cat([base_weight.unsqueeze(2), scaled], dim=2)
    return w.reshape((out_c, in_c * w.shape[2]) + tuple(kernel))


def _apply(expanded: Tensor, weight: Tensor, ndim: int, stride, dilation, groups: int) -> Tensor:
    if ndim == 0:
        return F.linear(expanded, weight)
    conv = (F.conv1d, F.conv2d, F.conv3d)[ndim - 1]
    return conv(expanded, weight, None, stride, 0, dilation, groups)


def _chunks(n: int, per_sample: int) -> list[tuple[int, int]]:
    size = max(1, EXPANSION_CHUNK_BYTES // max(1, per_sample))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _channels_first(t: Tensor) -> Tensor:
    """``(N, *S, C*B)`` channel-last expansion viewed as ``(N, C*B, *S)`` (channels-last strides)."""
    return t.movedim(-1, 1)


class _FusedKAN(torch.autograd.Function):
    """Expansion + one linear/convolution call, chunked over the batch; the expansion is not
    saved for backward but recomputed there, so autograd keeps only the (padded) input.

    The expansion is built channel-last (``(N, *S, C, G+K+1)``): the scatter of each pixel's
    ``K + 1`` bases then writes one contiguous run, and the convolution receives a channels-last
    tensor, which oneDNN runs up to 2x faster than the same data in NCHW for these channel counts
    (forward+backward of KANC MLP (Medium)'s first layer: 12.7 vs 25.5 ms, one thread).

    Alternatives measured and not kept: ``torch.compile`` of the expansion was slower (4.8 ms
    vs 2.8 ms eager for the second layer of KANC MLP (Medium) at batch 128, after 6-27 s of
    compilation); a sparse formulation (each pixel touching only its ``K + 1`` coefficients)
    needs ~3x fewer multiply-adds but becomes per-pixel gathers of weight rows for every tap and
    output channel, bound by memory traffic, where the dense expansion feeds one oneDNN call.
    """

    @staticmethod
    def forward(ctx, x, grid, weight, spline_order, activation, ndim, stride, dilation, groups,
                channels_last_out=False):
        xl = x.movedim(1, -1).contiguous()  # (N, *S, C)
        slots = grid.shape[1] - spline_order
        outs = []
        for s, e in _chunks(xl.shape[0], xl[:1].numel() * slots * xl.element_size()):
            xs = xl[s:e]
            buf = _zeros_workspace(xs.shape + (slots,), xs, zero=False)
            expanded = _expand_last(xs, grid, spline_order, activation(xs), buf).flatten(-2)
            outs.append(_apply(_channels_first(expanded), weight, ndim, stride, dilation, groups))
        ctx.save_for_backward(xl, grid, weight)
        ctx.conf = (spline_order, activation, ndim, stride, dilation, groups)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        # oneDNN returns the expansion's channels-last layout; hand back NCHW unless the caller's
        # tensors ask for channels-last, as nn.ConvNd does.
        return out if ndim == 0 or channels_last_out else out.contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        xl, grid, weight = ctx.saved_tensors
        spline_order, activation, ndim, stride, dilation, groups = ctx.conf
        need_x, _, need_w = ctx.needs_input_grad[:3]
        slots = grid.shape[1] - spline_order
        grad_xl = torch.empty_like(xl) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        zeros = [0] * ndim
        knots = _compiled_knots(xl, grid, spline_order)
        silu = knots is not None and _is_plain_silu(activation)
        channels = xl.shape[-1]
        for s, e in _chunks(xl.shape[0], xl[:1].numel() * slots * xl.element_size()):
            xs, go = xl[s:e], grad_out[s:e]
            if silu:  # no autograd graph needed for the base term's derivative
                act = xr = None
                expanded = _expand_last(xs, grid, spline_order, F.silu(xs),
                                        _zeros_workspace(xs.shape + (slots,), xs, zero=False))
            else:
                with torch.enable_grad():
                    xr = xs.detach().requires_grad_(need_x)
                    act = activation(xr)
                if knots is not None:
                    expanded = _expand_last(xs, grid, spline_order, act.detach(),
                                            _zeros_workspace(xs.shape + (slots,), xs, zero=False))
                else:
                    slot, values, slopes = _local_bases(xs, grid, spline_order, derivative=need_x)
                    expanded = _zeros_workspace(xs.shape + (slots,), xs)
                    _scatter_expansion(expanded, slot, values)
                    expanded[..., 0] = act.detach()
            flat = _channels_first(expanded.flatten(-2))
            if ndim == 0:
                if need_w:
                    grad_w += go.T.mm(flat)
                grad_e = go.mm(weight) if need_x else None
            else:
                grad_e, gw, _ = torch.ops.aten.convolution_backward(
                    go, flat, weight, None, list(stride), zeros, list(dilation), False, zeros, groups,
                    [need_x, need_w, False],
                )
                if need_w:
                    grad_w += gw
            if need_x:
                grad_e = grad_e.movedim(1, -1).reshape(expanded.shape)
                if knots is not None:
                    # The activation's backward runs several times slower on the strided slot-0 view.
                    g0 = grad_e[..., 0].contiguous()
                    if silu:
                        g = torch.ops.aten.silu_backward(g0, xs)
                    else:
                        (g,) = torch.autograd.grad(act, xr, g0)
                    _cpu_kernels.grad_input(grad_e.reshape(-1, channels, slots), xs.reshape(-1, channels), *knots,
                                            grid.shape[1], spline_order, g.reshape(-1, channels).contiguous(),
                                            grad_xl[s:e].view(-1, channels))
                    continue
                (g,) = torch.autograd.grad(act, xr, grad_e[..., 0])
                for sl, slope in zip(slot, slopes):
                    g = g.addcmul_(grad_e.gather(-1, sl.unsqueeze(-1)).squeeze(-1), slope)
                grad_xl[s:e] = g
        grad_x = grad_xl.movedim(-1, 1) if need_x else None
        return grad_x, None, grad_w, None, None, None, None, None, None, None


def _check_kan_args(input: Tensor, base_weight: Tensor, spline_weight: Tensor, spline_scaler: Tensor,
                    grid: Tensor, spline_order: int, groups: int, ndim: int) -> None:
    if not input.is_floating_point():
        raise TypeError(f"expected a floating point input, got dtype {input.dtype}")
    if input.dtype != base_weight.dtype:
        raise TypeError(f"input dtype {input.dtype} does not match the layer's dtype {base_weight.dtype}")
    in_per_group = base_weight.shape[1]
    if input.shape[1] != in_per_group * groups:
        raise ValueError(
            f"expected input with {in_per_group * groups} channels (dimension 1), got input of shape "
            f"{tuple(input.shape)}"
        )
    if grid.shape[0] != input.shape[1]:
        raise ValueError(f"grid must hold one knot vector per input channel, got shape {tuple(grid.shape)}")
    n_bases = grid.shape[1] - spline_order - 1
    if spline_weight.shape != base_weight.shape + (n_bases,) or spline_scaler.shape != base_weight.shape:
        raise ValueError(
            "inconsistent KAN parameters: base_weight "
            f"{tuple(base_weight.shape)}, spline_weight {tuple(spline_weight.shape)} (expected "
            f"{tuple(base_weight.shape) + (n_bases,)}), spline_scaler {tuple(spline_scaler.shape)}"
        )


def _kan_convnd(ndim, input, base_weight, spline_weight, spline_scaler, grid, bias, stride, padding,
                dilation, groups, padding_mode, spline_order, base_activation, naive=False):
    if input.dim() != ndim + 2:
        raise ValueError(
            f"kan_conv{ndim}d expects a batched input of {ndim + 2} dimensions (N, C, "
            f"{', '.join('DHW'[3 - ndim:])}), got {input.dim()} dimensions of shape {tuple(input.shape)}"
        )
    _check_kan_args(input, base_weight, spline_weight, spline_scaler, grid, spline_order, groups, ndim)
    kernel = tuple(base_weight.shape[2:])
    stride = _ntuple(stride, ndim, "stride")
    dilation = _ntuple(dilation, ndim, "dilation")
    pad = resolve_padding(padding, kernel, dilation, stride)
    x = pad_input(input, pad, padding_mode)
    weight = combine_weights(base_weight, spline_weight, spline_scaler)
    if naive:
        out = naive_kan(x, grid, weight, spline_order, base_activation, ndim, stride, dilation, groups)
    else:
        channels_last = suggests_channels_last(input) or suggests_channels_last(base_weight)
        out = _FusedKAN.apply(x, grid, weight, spline_order, base_activation, ndim, stride, dilation, groups,
                              channels_last)
    if bias is not None:
        out = out + bias.view((1, -1) + (1,) * ndim)
    return out


def suggests_channels_last(t: Tensor) -> bool:
    """Whether ``t`` is laid out channels-last (2-d or 3-d), by its strides as PyTorch decides it.

    A convolution returns channels-last output when its input or its weight is laid out so
    (``model.to(memory_format=torch.channels_last)``); size-1 channel tensors count by stride.
    """
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    if fmt is None or not t.is_contiguous(memory_format=fmt):
        return False
    return not t.is_contiguous() or (t.stride(1) == 1 and t.shape[1] > 0 and t.numel() != t.shape[1])


_CONV_DOC = """KAN convolution over an input of shape ``(N, C_in, {dims})``.

    Computes ``out[n, o, p] = bias[o] + sum_{{i, u}} phi[o, i, u](xp[n, i, p * stride + u * dilation])``
    where ``xp`` is the input padded first (``padding_mode``), and
    ``phi(t) = w_base * act(t) + w_scale * sum_g c_g B_g(t)`` on the input channel's knots ``grid``.

    Args:
        input: ``(N, C_in, {dims})``.
        base_weight: ``(C_out, C_in / groups, {kdims})``: ``w_base`` of every phi.
        spline_weight: ``(C_out, C_in / groups, {kdims}, G + K)``: the coefficients ``c``.
        spline_scaler: ``(C_out, C_in / groups, {kdims})``: ``w_scale``.
        grid: ``(C_in, G + 2K + 1)`` knots per input channel.
        bias: optional ``(C_out,)``.
        stride, padding, dilation, groups, padding_mode: as :func:`torch.nn.functional.conv{n}d`
            (``padding`` also ``"same"``/``"valid"``; padding is applied BEFORE phi).
        spline_order: the degree ``K``.
        base_activation: the callable of the base term (default SiLU).
    """


def kan_conv1d(input: Tensor, base_weight: Tensor, spline_weight: Tensor, spline_scaler: Tensor, grid: Tensor,
               bias: Tensor | None = None, stride: _IntOrTuple = 1, padding: Union[str, _IntOrTuple] = 0,
               dilation: _IntOrTuple = 1, groups: int = 1, padding_mode: str = "zeros", *,
               spline_order: int = 3, base_activation: Activation = F.silu) -> Tensor:
    return _kan_convnd(1, input, base_weight, spline_weight, spline_scaler, grid, bias, stride, padding,
                       dilation, groups, padding_mode, spline_order, base_activation)


def kan_conv2d(input: Tensor, base_weight: Tensor, spline_weight: Tensor, spline_scaler: Tensor, grid: Tensor,
               bias: Tensor | None = None, stride: _IntOrTuple = 1, padding: Union[str, _IntOrTuple] = 0,
               dilation: _IntOrTuple = 1, groups: int = 1, padding_mode: str = "zeros", *,
               spline_order: int = 3, base_activation: Activation = F.silu) -> Tensor:
    return _kan_convnd(2, input, base_weight, spline_weight, spline_scaler, grid, bias, stride, padding,
                       dilation, groups, padding_mode, spline_order, base_activation)


def kan_conv3d(input: Tensor, base_weight: Tensor, spline_weight: Tensor, spline_scaler: Tensor, grid: Tensor,
               bias: Tensor | None = None, stride: _IntOrTuple = 1, padding: Union[str, _IntOrTuple] = 0,
               dilation: _IntOrTuple = 1, groups: int = 1, padding_mode: str = "zeros", *,
               spline_order: int = 3, base_activation: Activation = F.silu) -> Tensor:
    return _kan_convnd(3, input, base_weight, spline_weight, spline_scaler, grid, bias, stride, padding,
                       dilation, groups, padding_mode, spline_order, base_activation)


kan_conv1d.__doc__ = _CONV_DOC.format(dims="L", kdims="kL", n=1)
kan_conv2d.__doc__ = _CONV_DOC.format(dims="H, W", kdims="kH, kW", n=2)
kan_conv3d.__doc__ = _CONV_DOC.format(dims="D, H, W", kdims="kD, kH, kW", n=3)


def kan_linear(input: Tensor, base_weight: Tensor, spline_weight: Tensor, spline_scaler: Tensor, grid: Tensor,
               bias: Tensor | None = None, *, spline_order: int = 3,
               base_activation: Activation = F.silu) -> Tensor:
    """Dense KAN layer: ``out[..., o] = bias[o] + sum_i phi[o, i](input[..., i])``.

    Args:
        input: ``(*, in_features)``.
        base_weight, spline_scaler: ``(out_features, in_features)``.
        spline_weight: ``(out_features, in_features, G + K)``.
        grid: ``(in_features, G + 2K + 1)``.
    """
    return _kan_linear(input, base_weight, spline_weight, spline_scaler, grid, bias, spline_order,
                       base_activation)


def _kan_linear(input, base_weight, spline_weight, spline_scaler, grid, bias, spline_order, base_activation,
                naive=False):
    if input.dim() < 1:
        raise ValueError("kan_linear expects an input of shape (*, in_features), got a scalar")
    lead = input.shape[:-1]
    x = input.reshape(-1, input.shape[-1])
    _check_kan_args(x, base_weight, spline_weight, spline_scaler, grid, spline_order, 1, 0)
    weight = combine_weights(base_weight, spline_weight, spline_scaler)
    if naive:
        out = naive_kan(x, grid, weight, spline_order, base_activation, 0, (), (), 1)
    else:
        out = _FusedKAN.apply(x, grid, weight, spline_order, base_activation, 0, (), (), 1)
    if bias is not None:
        out = out + bias
    return out.view(*lead, out.shape[-1])


def naive_kan(x: Tensor, grid: Tensor, weight: Tensor, spline_order: int, base_activation: Activation,
              ndim: int, stride, dilation, groups: int) -> Tensor:
    """The textbook implementation: dense Cox-de Boor expansion of the (padded) input, then one
    convolution, autograd keeping the expansion. Twice differentiable; used as a baseline."""
    bases = b_splines(x, grid, spline_order).movedim(-1, 2)  # (N, C, G+K, *)
    expanded = torch.cat([base_activation(x).unsqueeze(2), bases], dim=2).flatten(1, 2)
    return _apply(expanded, weight, ndim, stride, dilation, groups)
