"""Functional form of the KAN layers: ``kan_conv1d/2d/3d`` and ``kan_linear``, knots and bases.

The modules in :mod:`kanvolution.layers` call these functions. Everything here depends on torch alone.

The layer (the Convolutional-KAN paper's) applies, for every kernel tap of every (input, output) channel
pair, a univariate function ``phi(t) = w_base * act(t) + w_scale * sum_g c_g B_g(t)`` to the padded
input and sums the results. Because the bases of a pixel depend only on its value and its input
channel's knots, the layer equals ONE ordinary convolution of the *expanded* input
``[act(x), B_0(x), ..., B_{G+K-1}(x)]`` (``G + K + 1`` maps per input channel) with the weight
``[w_base, w_scale * c_0, ..., w_scale * c_{G+K-1}]``. That convolution is the registered op
``torch.ops.kanvolution.kan_forward_factored`` (:mod:`kanvolution.ops`; it takes the three
weights, ``kan_forward`` the combined one): it evaluates only the ``K + 1``
non-zero bases of each pixel, never keeps the expansion for backward (it is recomputed there), and
is seen through by ``torch.compile``, ``torch.export`` and the ONNX exporter.

Base activations: the op knows a fixed set by name (:data:`kanvolution.ops.ACTIVATIONS`: silu,
identity, relu, gelu, gelu_tanh, tanh, sigmoid, mish), given as a name, an ``nn`` module or the
torch function. Any other callable takes the naive path (dense expansion under autograd): same
result, slower and with ``G + K + 1`` times the input's memory kept for backward.

Mixed precision: under ``torch.autocast`` (float32 layers) the bases are computed in float32 on
float32 knots (the input is cast to float32 first), the convolution and the output are in the
autocast dtype, as ``nn.Conv2d`` under autocast. Float64 layers ignore autocast.
"""
from __future__ import annotations

from typing import Callable, Literal, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import activation_name, get_basis
from .ops.bspline import b_splines
from .ops.kan import (EXPANSION_CHUNK_BYTES, combine_weights, dense_kan, kan_forward, kan_forward_factored,
                      release_workspace)

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
    "suggests_channels_last",
    "EXPANSION_CHUNK_BYTES",
]

PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
Activation = Union[str, Callable[[Tensor], Tensor]]
_IntOrTuple = Union[int, Sequence[int]]

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


def expand_bases(x: Tensor, grid: Tensor, spline_order: int, base_activation: Activation = F.silu) -> Tensor:
    """Expand every value into ``[act(x), B_0(x), .., B_{G+K-1}(x)]``.

    Args:
        x: ``(N, C, *)``.
        grid: ``(C, G + 2K + 1)`` knots.
        spline_order: the degree ``K``.
        base_activation: the base term (a callable or a name of :data:`kanvolution.ops.ACTIVATIONS`).

    Returns:
        ``(N, C * (G + K + 1), *)``, input channel major, as the fused convolution consumes it.

    Examples:
        >>> x = torch.tensor([[0.25]])
        >>> expand_bases(x, uniform_knots(2, 1), 1)
        tensor([[0.1405, 0.0000, 0.7500, 0.2500]])
    """
    act = _activation_callable(base_activation)
    bases = b_splines(x, grid, spline_order).movedim(-1, 2)
    return torch.cat([act(x).unsqueeze(2), bases], dim=2).flatten(1, 2)


def _activation_callable(activation: Activation) -> Callable[[Tensor], Tensor]:
    if isinstance(activation, str):
        from .ops import ACTIVATIONS

        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown base activation {activation!r}; known: {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[activation][0]
    return activation

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


def _autocast_dtype(x: Tensor, layer_dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype that applies to a layer of ``layer_dtype`` on ``x``'s device, if any."""
    device = x.device.type
    if layer_dtype == torch.float64 or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return None if dtype == layer_dtype else dtype


def _kan(x: Tensor, grid: Tensor, weights: tuple[Tensor, Tensor, Tensor], bias: Tensor | None, spline_order: int,
         base_activation: Activation, stride: Sequence[int], dilation: Sequence[int], groups: int,
         naive: bool, channels_last: bool = False, basis: str = "bspline") -> Tensor:
    """The layer on the padded input from its three weights: autocast policy, then the op (or the
    naive path)."""
    low = _autocast_dtype(x, grid.dtype)
    name = activation_name(base_activation)
    if low is None and not naive and name is not None:
        # The op takes x as (N, *S, C); a view, not a copy: the sparse kernels read it channels-first
        # (the layout it has here), the dense path makes it contiguous itself.
        out = kan_forward_factored(x.movedim(1, -1), grid, *weights, basis, spline_order, name, list(stride),
                                   list(dilation), groups, channels_last)
    else:
        weight = combine_weights(*weights)
        if low is not None:  # bases on float32 knots, convolution and output in the autocast dtype
            x = x.to(grid.dtype)
            weight = weight.to(low)
            bias = None if bias is None else bias.to(low)
        if naive or name is None:
            act = _activation_callable(base_activation)
            out = dense_kan(x, grid, weight, basis, spline_order, act, stride, dilation, groups)
        else:
            out = kan_forward(x.movedim(1, -1), grid, weight, basis, spline_order, name, list(stride),
                              list(dilation), groups, channels_last)
    if bias is not None:
        out = out + bias.view((1, -1) + (1,) * len(stride))
    return out


def _check_kan_args(input: Tensor, base_weight: Tensor, spline_weight: Tensor, spline_scaler: Tensor,
                    grid: Tensor, spline_order: int, groups: int, basis: str = "bspline") -> None:
    if not input.is_floating_point():
        raise TypeError(f"expected a floating point input, got dtype {input.dtype}")
    if input.dtype != base_weight.dtype and _autocast_dtype(input, base_weight.dtype) is None:
        raise TypeError(f"input dtype {input.dtype} does not match the layer's dtype {base_weight.dtype}")
    in_per_group = base_weight.shape[1]
    if input.shape[1] != in_per_group * groups:
        raise ValueError(
            f"expected input with {in_per_group * groups} channels (dimension 1), got input of shape "
            f"{tuple(input.shape)}"
        )
    family = get_basis(basis)
    if (basis == "bspline" or grid.dim() == 2) and (grid.dim() != 2 or grid.shape[0] != input.shape[1]):
        raise ValueError(f"grid must hold one knot vector per input channel (a state row for other families), "
                         f"got shape {tuple(grid.shape)}")
    n_bases = family.num_basis(grid, spline_order)
    if spline_weight.shape != base_weight.shape + (n_bases,) or spline_scaler.shape != base_weight.shape:
        raise ValueError(
            "inconsistent KAN parameters: base_weight "
            f"{tuple(base_weight.shape)}, spline_weight {tuple(spline_weight.shape)} (expected "
            f"{tuple(base_weight.shape) + (n_bases,)}), spline_scaler {tuple(spline_scaler.shape)}"
        )


def _kan_convnd(ndim, input, base_weight, spline_weight, spline_scaler, grid, bias, stride, padding,
                dilation, groups, padding_mode, spline_order, base_activation, naive=False, basis="bspline"):
    if input.dim() != ndim + 2:
        raise ValueError(
            f"kan_conv{ndim}d expects a batched input of {ndim + 2} dimensions (N, C, "
            f"{', '.join('DHW'[3 - ndim:])}), got {input.dim()} dimensions of shape {tuple(input.shape)}"
        )
    _check_kan_args(input, base_weight, spline_weight, spline_scaler, grid, spline_order, groups, basis)
    kernel = tuple(base_weight.shape[2:])
    stride = _ntuple(stride, ndim, "stride")
    dilation = _ntuple(dilation, ndim, "dilation")
    pad = resolve_padding(padding, kernel, dilation, stride)
    x = pad_input(input, pad, padding_mode)
    channels_last = suggests_channels_last(input) or suggests_channels_last(base_weight)
    return _kan(x, grid, (base_weight, spline_weight, spline_scaler), bias, spline_order, base_activation, stride,
                dilation, groups, naive, channels_last,
                basis)


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
        spline_order: the degree ``K`` (for ``basis`` other than ``"bspline"``: the family's int option).
        base_activation: the base term (default SiLU): a callable or a name of
            :data:`kanvolution.ops.ACTIVATIONS`; other callables take the slower naive path.
        basis: the family of the ``B_g`` (:func:`kanvolution.bases.list_bases`); ``grid`` is then
            its state (``Basis.op_args()``) and ``spline_weight`` ends in its number of functions.
    """


def kan_conv1d(input: Tensor, base_weight: Tensor, spline_weight: Tensor, spline_scaler: Tensor, grid: Tensor,
               bias: Tensor | None = None, stride: _IntOrTuple = 1, padding: Union[str, _IntOrTuple] = 0,
               dilation: _IntOrTuple = 1, groups: int = 1, padding_mode: str = "zeros", *,
               spline_order: int = 3, base_activation: Activation = F.silu, basis: str = "bspline") -> Tensor:
    return _kan_convnd(1, input, base_weight, spline_weight, spline_scaler, grid, bias, stride, padding,
                       dilation, groups, padding_mode, spline_order, base_activation, basis=basis)


def kan_conv2d(input: Tensor, base_weight: Tensor, spline_weight: Tensor, spline_scaler: Tensor, grid: Tensor,
               bias: Tensor | None = None, stride: _IntOrTuple = 1, padding: Union[str, _IntOrTuple] = 0,
               dilation: _IntOrTuple = 1, groups: int = 1, padding_mode: str = "zeros", *,
               spline_order: int = 3, base_activation: Activation = F.silu, basis: str = "bspline") -> Tensor:
    return _kan_convnd(2, input, base_weight, spline_weight, spline_scaler, grid, bias, stride, padding,
                       dilation, groups, padding_mode, spline_order, base_activation, basis=basis)


def kan_conv3d(input: Tensor, base_weight: Tensor, spline_weight: Tensor, spline_scaler: Tensor, grid: Tensor,
               bias: Tensor | None = None, stride: _IntOrTuple = 1, padding: Union[str, _IntOrTuple] = 0,
               dilation: _IntOrTuple = 1, groups: int = 1, padding_mode: str = "zeros", *,
               spline_order: int = 3, base_activation: Activation = F.silu, basis: str = "bspline") -> Tensor:
    return _kan_convnd(3, input, base_weight, spline_weight, spline_scaler, grid, bias, stride, padding,
                       dilation, groups, padding_mode, spline_order, base_activation, basis=basis)


kan_conv1d.__doc__ = _CONV_DOC.format(dims="L", kdims="kL", n=1)
kan_conv2d.__doc__ = _CONV_DOC.format(dims="H, W", kdims="kH, kW", n=2)
kan_conv3d.__doc__ = _CONV_DOC.format(dims="D, H, W", kdims="kD, kH, kW", n=3)


def kan_linear(input: Tensor, base_weight: Tensor, spline_weight: Tensor, spline_scaler: Tensor, grid: Tensor,
               bias: Tensor | None = None, *, spline_order: int = 3,
               base_activation: Activation = F.silu, basis: str = "bspline") -> Tensor:
    """Dense KAN layer: ``out[..., o] = bias[o] + sum_i phi[o, i](input[..., i])``.

    Args:
        input: ``(*, in_features)``.
        base_weight, spline_scaler: ``(out_features, in_features)``.
        spline_weight: ``(out_features, in_features, G + K)``.
        grid: ``(in_features, G + 2K + 1)`` (the state of ``basis`` for other families).
        spline_order, base_activation, basis: as :func:`kan_conv2d`.
    """
    return _kan_linear(input, base_weight, spline_weight, spline_scaler, grid, bias, spline_order,
                       base_activation, basis=basis)


def _kan_linear(input, base_weight, spline_weight, spline_scaler, grid, bias, spline_order, base_activation,
                naive=False, basis="bspline"):
    if input.dim() < 1:
        raise ValueError("kan_linear expects an input of shape (*, in_features), got a scalar")
    lead = input.shape[:-1]
    x = input.reshape(-1, input.shape[-1])
    _check_kan_args(x, base_weight, spline_weight, spline_scaler, grid, spline_order, 1, basis)
    out = _kan(x, grid, (base_weight, spline_weight, spline_scaler), bias, spline_order, base_activation, (), (), 1,
               naive, basis=basis)
    return out.view(*lead, out.shape[-1])
