"""Direct sparse KAN convolution on CPU: each value touches only its ``K + 1`` non-zero B-splines.

The dense fused path convolves the expansion ``[silu(x), B_0(x), .., B_{G+K-1}(x)]`` with the
combined weight (``G + K + 1`` multiply-adds per kernel tap and output channel). These kernels
reduce each input value to ``[silu(x), b_0(f), .., b_K(f)]`` and its knot span ``m`` and add
``K + 2`` weight rows per tap, whatever the grid size (``csrc/sparse_kan.cpp``).

Two sets of kernels compute the same thing (:func:`default_kernel` picks one by the layer's width):

- ``"wide"``: vectorised over output channels (64-byte vectors of a tap's output channels);
- ``"narrow"``: for layers with few output channels per group, vectorised over the kernel taps
  and output channels of one input value: the weight becomes per-span tables in power form
  (``K + 1`` coefficients of the position in the span per phi, :class:`_Narrow`), each value
  evaluates all of its phi by Horner's rule and adds whole kernel rows of channel-last outputs;
  both gradients in one pass.

Scope: CPU, float32/float64, uniform knots (one spacing per channel, as
:func:`kanvolution.functional.uniform_knots` makes them), spline order ``1 <= K <= 16``, the SiLU
base term; 1-d, 2-d and 3-d convolutions (stride, dilation, groups; the input already padded) and
the dense layer (``ndim = 0``: ``x`` is ``(N, C)``, ``weight`` is ``(O, C * (G+K+1))``).

The weights are the fused path's combined layout ``(O, C/groups * (G+K+1), *kernel)`` (see
:func:`kanvolution.functional.combine_weights`); internally they are packed by
:func:`pack_weight` into ``(C, taps, G+3K+1, O/groups)``: for input channel ``c`` and kernel tap
``u``, row 0 the base weight, rows ``1..K`` zero, row ``1+K+g`` the coefficient of basis ``g``, then
``K`` zero rows, each row the ``O/groups`` output channels of ``c``'s group. A value in span ``m``
then reads rows ``1+m .. 1+m+K`` with no bounds test at the ends of the grid.

Examples:
    >>> import torch
    >>> from kanvolution import functional as KF
    >>> from kanvolution import _sparse
    >>> grid = KF.uniform_knots(5, 3, channels=2, dtype=torch.float64)
    >>> weight = torch.randn(4, 2 * 9, 3, 3, dtype=torch.float64)
    >>> x = torch.rand(1, 2, 6, 6, dtype=torch.float64) * 2 - 1
    >>> out = _sparse.kan_conv(x, *_sparse.knot_params(grid), weight, 3)
    >>> expanded = KF.expand_bases(x, grid, 3)
    >>> torch.allclose(out, torch.nn.functional.conv2d(expanded, weight))
    True
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from ..ops import build
from ..ops.bspline import _coefficients, _uniform_spacing
from ._loader import load

__all__ = [
    "available",
    "knot_params",
    "pack_weight",
    "unpack_weight",
    "kan_conv",
    "kan_conv_grad_input",
    "kan_conv_grad_weight",
    "SparseKANFunction",
    "sparse_kan",
    "KERNELS",
    "default_kernel",
]

_IntOrTuple = Union[int, Sequence[int]]


def available() -> bool:
    """Whether the kernels can be built (builds them on the first call; the compiled CPU kernels
    must be enabled, see :mod:`kanvolution.ops.build`)."""
    return build.is_enabled() and load() is not None


def _ops():
    """The compiled ops; ``RuntimeError`` when they cannot be built (a warning said why)."""
    ops = load()
    if ops is None:
        raise RuntimeError("the sparse KAN CPU kernels could not be built (see the warning issued at the attempt)")
    return ops


def knot_params(grid: Tensor) -> tuple[Tensor, Tensor]:
    """First knot ``t0`` and inverse spacing ``inv_h`` of each channel of uniform knots.

    Args:
        grid: ``(C, G + 2K + 1)`` knots, uniform along the last dimension.

    Returns:
        Two contiguous ``(C,)`` tensors.

    Raises:
        ValueError: if some channel's knots are not uniform (adapted knots: use the dense path).
    """
    if grid.dim() != 2 or grid.shape[1] < 4:
        raise ValueError(f"grid must be (C, G + 2K + 1) knots, got shape {tuple(grid.shape)}")
    spacing = _uniform_spacing(grid)
    if spacing is None:
        raise ValueError("the sparse kernels need uniform knots; these are not uniform (use the dense path)")
    return grid[:, 0].contiguous(), (1.0 / spacing).contiguous()


def _geometry(ndim: int, value: _IntOrTuple, name: str) -> list[int]:
    """A per-dimension argument as the kernels' three ints (leading dimensions of size 1)."""
    if isinstance(value, int) and not isinstance(value, bool):
        values = [value] * ndim
    else:
        values = [int(v) for v in value]
        if len(values) != ndim:
            raise ValueError(f"{name} must be an int or {ndim} ints, got {value!r}")
    if any(v < 1 for v in values):
        raise ValueError(f"{name} must be positive, got {value!r}")
    return [1] * (3 - ndim) + values


def _as_5d(t: Tensor, ndim: int) -> Tensor:
    return t.reshape(t.shape[:2] + (1,) * (3 - ndim) + t.shape[2:])


def _check(x: Tensor, t0: Tensor, inv_h: Tensor, weight_shape: Sequence[int], spline_order: int, groups: int) -> int:
    """Validate the common arguments; returns ``ndim`` (0 for the dense layer)."""
    ndim = x.dim() - 2
    if not 0 <= ndim <= 3:
        raise ValueError(f"x must be (N, C) or (N, C, *spatial) with 1 to 3 spatial dims, got {tuple(x.shape)}")
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be a float32 or float64 CPU tensor, got {x.dtype} on {x.device}")
    if not isinstance(spline_order, int) or not 1 <= spline_order <= 16:
        raise ValueError(f"spline_order must be an int in 1..16, got {spline_order!r}")
    if not isinstance(groups, int) or groups < 1 or x.shape[1] % groups:
        raise ValueError(f"groups={groups!r} must be a positive int dividing the {x.shape[1]} input channels")
    if len(weight_shape) != ndim + 2 or weight_shape[0] % groups:
        raise ValueError(f"weight must be (O, C/groups * (G+K+1), *kernel) with {ndim} kernel dims and O divisible "
                         f"by groups={groups}, got {tuple(weight_shape)}")
    cg = x.shape[1] // groups
    if weight_shape[1] % cg:
        raise ValueError(f"weight dimension 1 ({weight_shape[1]}) must be C/groups ({cg}) times G+K+1")
    for name, t in (("t0", t0), ("inv_h", inv_h)):
        if t.shape != (x.shape[1],) or t.dtype != x.dtype:
            raise ValueError(f"{name} must be ({x.shape[1]},) of dtype {x.dtype}, got {tuple(t.shape)} {t.dtype}")
    return ndim


def pack_weight(weight: Tensor, in_channels: int, groups: int, spline_order: int) -> Tensor:
    """Combined ``(O, C/groups * (G+K+1), *kernel)`` weight to the kernels' ``(C, taps, G+3K+1, O/groups)``.

    Examples:
        >>> w = torch.arange(2 * 2 * 4.0).reshape(2, 2 * 4, 1)   # O = 2, C = 2, G+K+1 = 4 (K = 1)
        >>> pack_weight(w, 2, 1, 1)[1, 0]                       # channel 1: base, zero, 3 bases, zero
        tensor([[ 4., 12.],
                [ 0.,  0.],
                [ 5., 13.],
                [ 6., 14.],
                [ 7., 15.],
                [ 0.,  0.]])
    """
    o, k, cg = weight.shape[0], spline_order, in_channels // groups
    slots = weight.shape[1] // cg
    taps = weight[0, 0].numel()
    w = weight.reshape(groups, o // groups, cg, slots, taps).permute(0, 2, 4, 3, 1).reshape(in_channels, taps, slots, -1)
    packed = w.new_zeros((in_channels, taps, slots + 2 * k, o // groups))
    packed[:, :, 0] = w[:, :, 0]
    packed[:, :, 1 + k : k + slots] = w[:, :, 1:]
    return packed


def unpack_weight(packed: Tensor, weight_shape: Sequence[int], groups: int, spline_order: int) -> Tensor:
    """Inverse of :func:`pack_weight` (the zero rows are dropped): a packed gradient to the combined layout.

    Examples:
        >>> w = torch.randn(6, 2 * 7, 3, 3)
        >>> torch.equal(unpack_weight(pack_weight(w, 4, 2, 2), w.shape, 2, 2), w)
        True
    """
    in_channels, taps, _, og = packed.shape
    k, cg = spline_order, in_channels // groups
    w = torch.cat([packed[:, :, :1], packed[:, :, 1 + k : packed.shape[2] - k]], dim=2)
    slots = w.shape[2]
    w = w.reshape(groups, cg, taps, slots, og).permute(0, 4, 1, 3, 2)
    return w.reshape(tuple(weight_shape))


KERNELS = ("wide", "narrow")
# The narrow kernels take over below this many bytes of output channels per group (see
# kanvolution.ops.sparse for the measurements).
NARROW_MAX_OUTPUT_BYTES = 128


def default_kernel(out_channels_per_group: int, itemsize: int) -> str:
    """The kernels :func:`kan_conv` & co. use by default: ``"narrow"`` (vectorised over kernel taps
    and output channels of one input value) for fewer than ``NARROW_MAX_OUTPUT_BYTES`` of output
    channels per group (32 float32 or 16 float64 outputs), else ``"wide"`` (vectorised over output
    channels).

    Examples:
        >>> default_kernel(10, 4), default_kernel(31, 4), default_kernel(32, 4), default_kernel(16, 8)
        ('narrow', 'narrow', 'wide', 'wide')
    """
    return "narrow" if out_channels_per_group * itemsize < NARROW_MAX_OUTPUT_BYTES else "wide"


def _lane_order(t: Tensor, kernel: Sequence[int], lanes: int) -> Tensor:
    """``(..., taps, Og)`` to the narrow kernels' lanes ``(..., kd * kh * Lb)``: per kernel row
    ``(a, b)``, the ``kw`` taps in reverse order, their ``Og`` channels each, zero-padded to ``Lb``
    (a multiple of ``lanes``)."""
    kd, kh, kw = kernel
    og = t.shape[-1]
    rows = t.reshape(t.shape[:-2] + (kd * kh, kw, og)).flip(-2).reshape(t.shape[:-2] + (kd * kh, kw * og))
    lb = -(-kw * og // lanes) * lanes
    return torch.nn.functional.pad(rows, (0, lb - kw * og)).reshape(t.shape[:-2] + (kd * kh * lb,))


def _from_lanes(t: Tensor, kernel: Sequence[int], og: int) -> Tensor:
    """Inverse of :func:`_lane_order` (the padding lanes dropped): ``(..., Lp)`` to ``(..., taps, Og)``."""
    kd, kh, kw = kernel
    rows = t.reshape(t.shape[:-1] + (kd * kh, -1))[..., : kw * og]
    return rows.reshape(t.shape[:-1] + (kd * kh, kw, og)).flip(-2).reshape(t.shape[:-1] + (kd * kh * kw, og))


class _Narrow:
    """The narrow kernels' tables of one weight (see ``csrc/sparse_kan.cpp``): ``P`` ``(C, n_spans + 1,
    K + 1, Lp)`` the spline part of every phi in power form per knot span (the last span zero),
    ``Wb`` ``(C, Lp)`` the base weights, ``Dt`` ``(C, n_spans + 1, K, Lp)`` the derivative in x
    (only when asked for). Computed in float64 from the packed weight, then rounded once."""

    def __init__(self, packed: Tensor, conv: "_Conv", derivative: bool, power: bool = True):
        k, dtype = conv.K, packed.dtype
        lanes = 64 // packed.element_size()
        w = packed.to(torch.float64)  # (C, taps, S, Og)
        self.Wb = _lane_order(w[:, :, 0], conv.kernel, lanes).to(dtype).contiguous()
        self.P = self.Dt = None
        if not (power or derivative):
            return
        coef = _coefficients(k)[0]  # [r][p]: coefficient of f^p in b_r
        windows = w[:, :, 1:].unfold(2, k + 1, 1)  # (C, taps, n_spans, Og, K + 1): rows 1 + m + r
        p = torch.einsum("ctmor,rp->cmpto", windows, coef)  # (C, n_spans, K + 1, taps, Og)
        p = _lane_order(p, conv.kernel, lanes)
        p = torch.cat([p, p.new_zeros((p.shape[0], 1) + p.shape[2:])], dim=1)
        if power:
            self.P = p.to(dtype).contiguous()
        if derivative:
            scale = torch.arange(1, k + 1, dtype=torch.float64).view(1, 1, k, 1)
            inv_h = conv.inv_h.to(torch.float64).view(-1, 1, 1, 1)
            self.Dt = (p[:, :, 1:] * scale * inv_h).to(dtype).contiguous()


class _Conv:
    """The arguments of one call, resolved for the kernels (5-d input, 3-int geometry)."""

    def __init__(self, x: Tensor, t0: Tensor, inv_h: Tensor, weight_shape: Sequence[int], spline_order: int,
                 stride: _IntOrTuple, dilation: _IntOrTuple, groups: int, kernel: str | None = None):
        self.ndim = _check(x, t0, inv_h, weight_shape, spline_order, groups)
        og = weight_shape[0] // groups
        self.kernel_kind = default_kernel(og, x.element_size()) if kernel is None else kernel
        if self.kernel_kind not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)} or None, got {kernel!r}")
        self.x = _as_5d(x, self.ndim).contiguous()
        self._sx = None  # silu(x), see _silu
        self.t0, self.inv_h = t0.contiguous(), inv_h.contiguous()
        self.weight_shape = tuple(weight_shape)
        self.K, self.groups = spline_order, groups
        self.n_knots = weight_shape[1] // (x.shape[1] // groups) + spline_order
        if self.n_knots < 2 * spline_order + 2:
            raise ValueError(f"weight dimension 1 ({weight_shape[1]}) leaves fewer than one grid interval")
        self.kernel = [1] * (3 - self.ndim) + list(weight_shape[2:])
        self.stride = _geometry(self.ndim, stride, "stride")
        self.dilation = _geometry(self.ndim, dilation, "dilation")
        sizes = self.x.shape[2:]
        self.out_sizes = [(n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(sizes, self.kernel, self.stride,
                                                                               self.dilation)]
        if min(self.out_sizes) < 1:
            raise ValueError(f"input of spatial size {tuple(x.shape[2:])} is smaller than the dilated kernel")

    def args(self) -> tuple:
        return (self.t0, self.inv_h, *_coefficients(self.K))

    def geometry(self) -> tuple:
        return (self.K, self.n_knots, self.kernel, self.stride, self.dilation, self.groups)

    @property
    def narrow(self) -> bool:
        return self.kernel_kind == "narrow"

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1] * self.kernel[2]

    def packed_shape(self) -> tuple[int, int, int, int]:
        """``(C, taps, G+3K+1, O/groups)``: the packed weight's shape (and its gradient's)."""
        return (self.x.shape[1], self.taps, self.n_knots + self.K, self.weight_shape[0] // self.groups)

    def pack(self, weight: Tensor | tuple[Tensor, Tensor, Tensor], out: Tensor | None = None) -> Tensor:
        """The combined weight packed ``(C, taps, G+3K+1, O/groups)``, what :func:`pack_weight` gives
        (into ``out``, of :meth:`packed_shape`, if given). ``weight`` may also be the layer's three
        weights ``(base_weight, spline_weight, spline_scaler)``: they are packed as their combination
        (:func:`kanvolution.functional.combine_weights`, the same values), which is never built."""
        if isinstance(weight, (tuple, list)):
            base, spline, scaler = (t.contiguous() for t in weight)
            packed = base.new_empty(self.packed_shape()) if out is None else out
            o, cg = base.shape[:2]
            _ops().pack3(base.view(o, cg, self.taps), spline.view(o, cg, self.taps, spline.shape[-1]),
                         scaler.view(o, cg, self.taps), self.groups, self.K, packed)
            return packed
        packed = weight.new_empty(self.packed_shape()) if out is None else out
        # One pass in C++ (what pack_weight computes, without its temporaries).
        _ops().pack(weight.reshape(weight.shape[0], weight.shape[1], self.taps).contiguous(), self.groups, self.K,
                    packed)
        return packed

    def _split_args(self, spline_weight: Tensor, spline_scaler: Tensor, need: Sequence[bool]):
        """The gradients of the three weights (fresh, ``None`` where ``need`` says so) and the
        arguments that :meth:`unpack3` and :meth:`backward3` pass to the kernels for them."""
        spline = spline_weight.contiguous()
        scaler = spline_scaler.contiguous()
        o, cg = scaler.shape[:2]
        grads = [torch.empty_like(t) if n else spline.new_empty(0) for t, n in zip((scaler, spline, scaler), need)]
        # (O, C/groups, *kernel[, n]) -> (O, C/groups, taps[, n]); the kernel may be (1,) for a dense layer's
        # (O, C/groups[, n]) weights run as a kernel-1 convolution (ops.sparse._conv).
        views = [(g.view(o, cg, self.taps, -1) if i == 1 else g.view(o, cg, self.taps)) if g.numel() else g
                 for i, g in enumerate(grads)]
        weights = (spline.view(o, cg, self.taps, spline.shape[-1]), scaler.view(o, cg, self.taps))
        return tuple(g if n else None for g, n in zip(grads, need)), weights, views

    def unpack3(self, packed: Tensor, spline_weight: Tensor, spline_scaler: Tensor,
                need: Sequence[bool] = (True, True, True)) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """A packed weight gradient (of :meth:`packed_shape`) as the gradients of the three weights
        that :meth:`pack` combines: ``(base, spline, scaler)``, each ``None`` where ``need`` says so."""
        grads, weights, views = self._split_args(spline_weight, spline_scaler, need)
        _ops().unpack3(packed.contiguous(), *weights, self.groups, self.K, *views)
        return grads

    def backward3(self, grad_out: Tensor, prepared: Tensor | None, shape: torch.Size, need_x: bool,
                  spline_weight: Tensor, spline_scaler: Tensor, need: Sequence[bool] = (True, True, True),
                  scratch: Tensor | None = None) -> tuple[Tensor | None, tuple[Tensor | None, ...]]:
        """The wide kernels' :meth:`backward` and :meth:`unpack3` in one call: the input gradient
        (``None`` unless ``need_x``; then ``prepared`` is the packed weight) and the three weights'
        gradients, each input channel's split from the packed gradient (in ``scratch`` if given)
        right after its last update, while in cache."""
        if self.narrow:
            raise ValueError("backward3 is for the wide kernels; the narrow ones use backward and unpack3")
        grads, weights, views = self._split_args(spline_weight, spline_scaler, need)
        gx = torch.empty_like(self.x) if need_x else self.x.new_empty(0)
        gw = self.x.new_empty(self.packed_shape()) if scratch is None else scratch
        _ops().backward3(self._grad_out(grad_out), self.x, *self.args(), prepared if need_x else gw,
                         *self.geometry(), *weights, gx, gw, *views)
        return (gx.reshape(shape) if need_x else None), grads

    def prepare(self, weight: Tensor | tuple[Tensor, Tensor, Tensor], forward: bool = True, derivative: bool = True,
                out: Tensor | None = None):
        """:meth:`pack` (into ``out`` if given), and for the narrow kernels the tables (the power form
        for the forward, the derivative for the input gradient)."""
        packed = self.pack(weight, out)
        return _Narrow(packed, self, derivative, forward) if self.narrow else packed

    def _silu(self) -> Tensor:
        if self._sx is None:  # computed once, shared by the narrow forward and backward
            self._sx = torch.nn.functional.silu(self.x)
        return self._sx

    def _unpack(self, packed: Tensor) -> Tensor:
        """A packed weight gradient to the combined layout, in one compiled pass (what
        :func:`unpack_weight` computes, without its temporaries)."""
        out = self.x.new_empty(self.weight_shape)
        _ops().unpack(packed.contiguous(), self.groups, self.K,
                      out.view(self.weight_shape[0], self.weight_shape[1], self.taps))
        return out

    def forward(self, prepared, channels_last: bool = True) -> Tensor:
        """``(N, O, *out_spatial)`` with channels-last strides; the narrow kernels also write the
        contiguous layout directly (``channels_last=False``)."""
        n, o = self.x.shape[0], self.weight_shape[0]
        if self.narrow:
            if channels_last:
                out = self.x.new_empty((n, *self.out_sizes, o))
            else:
                first = self.x.new_empty((n, o, *self.out_sizes))
                out = first.permute(0, 2, 3, 4, 1)
            _ops().narrow_forward(self.x, self._silu(), self.t0, self.inv_h, prepared.P, prepared.Wb,
                                  *self.geometry(), out)
            if not channels_last:
                return first.reshape((n, o, *self.out_sizes[3 - self.ndim :]))
        else:
            out = self.x.new_empty((n, *self.out_sizes, o))
            _ops().forward(self.x, *self.args(), prepared, *self.geometry(), out)
        # (N, Do, Ho, Wo, O) -> (N, O, *spatial): channels-last strides, no copy.
        return out.reshape((n, *self.out_sizes[3 - self.ndim :], o)).movedim(-1, 1)

    def _grad_out(self, grad_out: Tensor) -> Tensor:
        n, o = grad_out.shape[:2]
        g = grad_out.movedim(1, -1).reshape((n, *self.out_sizes, o))
        return g if self.narrow else g.contiguous()  # the narrow kernels take any strides

    def backward(self, grad_out: Tensor, prepared, shape: torch.Size, need_x: bool = True,
                 need_w: bool = True, scratch: Tensor | None = None,
                 unpack: bool = True) -> tuple[Tensor | None, Tensor | None]:
        """Input and weight gradients (``None`` where not needed); one pass on the narrow kernels.
        ``scratch``: room of :meth:`packed_shape` for the wide kernels' packed weight gradient
        (else allocated). ``unpack=False``: the weight gradient in the packed layout (for
        :meth:`unpack3`; it may be ``scratch``)."""
        if not self.narrow:
            if not (need_x and need_w):
                return (self.grad_input(grad_out, prepared, shape) if need_x else None,
                        self.grad_weight(grad_out, scratch=scratch, unpack=unpack) if need_w else None)
            # Both in one call: one local form per batch chunk serves both gradients.
            gx = torch.empty_like(self.x)
            gw = torch.empty_like(prepared) if scratch is None else scratch
            _ops().backward(self._grad_out(grad_out), self.x, *self.args(), prepared, *self.geometry(), gx, gw)
            return gx.reshape(shape), (self._unpack(gw) if unpack else gw)
        c, empty = self.x.shape[1], self.x.new_empty(0)
        gx = torch.empty_like(self.x) if need_x else empty
        gw = self.x.new_empty((c, self.n_knots + self.K, prepared.Wb.shape[1])) if need_w else empty
        dsx = torch.ops.aten.silu_backward(torch.ones_like(self.x), self.x) if need_x else empty
        _ops().narrow_backward(self._grad_out(grad_out), self.x, self._silu(), dsx, *self.args(),
                               prepared.Dt if need_x else empty, prepared.Wb, *self.geometry(), gx, gw)
        grad_w = None
        if need_w:
            grad_w = _from_lanes(gw, self.kernel, self.weight_shape[0] // self.groups).transpose(1, 2)
            grad_w = self._unpack(grad_w) if unpack else grad_w.contiguous()
        return (gx.reshape(shape) if need_x else None), grad_w

    def grad_input(self, grad_out: Tensor, prepared, shape: torch.Size) -> Tensor:
        if self.narrow:
            return self.backward(grad_out, prepared, shape, need_w=False)[0]
        out = torch.empty_like(self.x)
        _ops().grad_input(self._grad_out(grad_out), self.x, *self.args(), prepared, *self.geometry(), out)
        return out.reshape(shape)

    def grad_weight(self, grad_out: Tensor, prepared=None, scratch: Tensor | None = None,
                    unpack: bool = True) -> Tensor:
        if self.narrow:
            if prepared is None:  # only the lane layout's width is read
                prepared = _Narrow(self.x.new_zeros(self.packed_shape()), self, False, False)
            return self.backward(grad_out, prepared, self.x.shape, need_x=False, unpack=unpack)[1]
        packed = self.x.new_empty(self.packed_shape()) if scratch is None else scratch
        _ops().grad_weight(self._grad_out(grad_out), self.x, *self.args(), *self.geometry(), packed)
        return self._unpack(packed) if unpack else packed


def kan_conv(x: Tensor, t0: Tensor, inv_h: Tensor, weight: Tensor, spline_order: int, stride: _IntOrTuple = 1,
             dilation: _IntOrTuple = 1, groups: int = 1, kernel: str | None = None) -> Tensor:
    """Forward: the convolution of ``x``'s expansion with the combined ``weight``, computed sparsely.

    Args:
        x: ``(N, C, *spatial)`` already padded (1 to 3 spatial dims), or ``(N, C)`` for the dense layer.
        t0, inv_h: ``(C,)`` from :func:`knot_params`.
        weight: ``(O, C/groups * (G+K+1), *kernel)`` as :func:`kanvolution.functional.combine_weights`
            makes it (``(O, C * (G+K+1))`` for the dense layer).
        spline_order: ``K``.
        stride, dilation, groups: as :func:`torch.nn.functional.conv2d`.
        kernel: ``"wide"`` or ``"narrow"`` kernels (``None``: :func:`default_kernel`); same result.

    Returns:
        ``(N, O, *out_spatial)`` with channels-last strides (``(N, O)`` for the dense layer).
    """
    conv = _Conv(x, t0, inv_h, weight.shape, spline_order, stride, dilation, groups, kernel)
    return conv.forward(conv.prepare(weight.detach(), derivative=False))


def kan_conv_grad_input(grad_out: Tensor, x: Tensor, t0: Tensor, inv_h: Tensor, weight: Tensor, spline_order: int,
                        stride: _IntOrTuple = 1, dilation: _IntOrTuple = 1, groups: int = 1,
                        kernel: str | None = None) -> Tensor:
    """Gradient of :func:`kan_conv` with respect to ``x`` (same arguments, plus ``grad_out``)."""
    conv = _Conv(x, t0, inv_h, weight.shape, spline_order, stride, dilation, groups, kernel)
    return conv.grad_input(grad_out, conv.prepare(weight.detach(), forward=False), x.shape)


def kan_conv_grad_weight(grad_out: Tensor, x: Tensor, t0: Tensor, inv_h: Tensor, weight_shape: Sequence[int],
                         spline_order: int, stride: _IntOrTuple = 1, dilation: _IntOrTuple = 1,
                         groups: int = 1, kernel: str | None = None) -> Tensor:
    """Gradient of :func:`kan_conv` with respect to the combined weight, shaped ``weight_shape``."""
    conv = _Conv(x, t0, inv_h, weight_shape, spline_order, stride, dilation, groups, kernel)
    return conv.grad_weight(grad_out)


class SparseKANFunction(torch.autograd.Function):
    """:func:`kan_conv` with its two gradients (once differentiable); ``grid`` gives the knots."""

    @staticmethod
    def forward(ctx, x, grid, weight, spline_order, stride, dilation, groups, kernel=None):
        t0, inv_h = knot_params(grid)
        conv = _Conv(x.detach(), t0, inv_h, weight.shape, spline_order, stride, dilation, groups, kernel)
        prepared = conv.prepare(weight.detach())
        ctx.conv, ctx.x_shape, ctx.prepared = conv, x.shape, prepared
        return conv.forward(prepared)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.conv.backward(grad_out, ctx.prepared, ctx.x_shape, ctx.needs_input_grad[0],
                                           ctx.needs_input_grad[2])
        return grad_x, None, grad_w, None, None, None, None, None


def sparse_kan(x: Tensor, grid: Tensor, weight: Tensor, spline_order: int, stride: _IntOrTuple = 1,
               dilation: _IntOrTuple = 1, groups: int = 1, kernel: str | None = None) -> Tensor:
    """:func:`kan_conv` through autograd (:class:`SparseKANFunction`), knots from ``grid``.

    Examples:
        >>> from kanvolution import functional as KF
        >>> grid = KF.uniform_knots(3, 1, channels=3, dtype=torch.float64)
        >>> x = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)   # dense layer: 3 -> 2
        >>> w = torch.randn(2, 3 * 5, dtype=torch.float64, requires_grad=True)
        >>> torch.autograd.gradcheck(lambda a, b: sparse_kan(a, grid, b, 1), (x, w))
        True
    """
    return SparseKANFunction.apply(x, grid, weight, spline_order, stride, dilation, groups, kernel)
