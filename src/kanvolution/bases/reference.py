"""A slow, obviously-correct KAN convolution over any basis family, for tests and baselines.

A Python loop over output channels, input channels and kernel taps, applying each tap's
``phi(t) = w_base * act(t) + w_scale * sum_g c_g f_g(t)`` to its window of the padded input.
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import Basis

__all__ = ["kan_conv_reference", "padded_windows"]

_IntOrTuple = Union[int, Sequence[int]]


def _as_tuple(value: _IntOrTuple, n: int) -> tuple[int, ...]:
    return (value,) * n if isinstance(value, int) else tuple(value)


def padded_windows(input: Tensor, kernel: Sequence[int], stride: _IntOrTuple = 1,
                   padding: Union[str, _IntOrTuple] = 0, dilation: _IntOrTuple = 1,
                   padding_mode: str = "zeros") -> Tensor:
    """The input padded FIRST (``padding_mode``), cut into the windows the kernel taps read.

    Args:
        input: ``(N, C, *spatial)`` with 1 to 3 spatial dimensions.
        kernel: the kernel size per spatial dimension.

    Returns:
        ``(N, C, *out, *kernel)``: ``[..., p, u]`` is the padded value tap ``u`` reads at output ``p``.

    Examples:
        >>> padded_windows(torch.arange(4.0).view(1, 1, 4), (2,), padding=1)[0, 0]
        tensor([[0., 0.],
                [0., 1.],
                [1., 2.],
                [2., 3.],
                [3., 0.]])
    """
    n = input.dim() - 2
    stride, dilation = _as_tuple(stride, n), _as_tuple(dilation, n)
    if padding == "valid":
        pads = [(0, 0)] * n
    elif padding == "same":
        pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
    else:
        pads = [(p, p) for p in _as_tuple(padding, n)]
    flat = [v for pair in reversed(pads) for v in pair]
    x = F.pad(input, flat, mode="constant", value=0.0) if padding_mode == "zeros" else F.pad(input, flat, mode=padding_mode)
    for d in range(n):
        x = x.unfold(2 + d, dilation[d] * (kernel[d] - 1) + 1, stride[d])
    return x[(slice(None),) * (2 + n) + tuple(slice(None, None, d) for d in dilation)]


def kan_conv_reference(
    input: Tensor,
    basis: Basis,
    base_weight: Tensor,
    coefficients: Tensor,
    scaler: Tensor,
    stride: _IntOrTuple = 1,
    padding: Union[str, _IntOrTuple] = 0,
    dilation: _IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    activation: Callable[[Tensor], Tensor] = F.silu,
    bias: Tensor | None = None,
) -> Tensor:
    """KAN convolution of any dimension (1, 2 or 3) on any basis, one (output, input, tap) at a time.

    ``out[n, o, p] = bias[o] + sum_{i, u} w_base * act(xp) + w_scale * sum_g c_g f_g(xp)`` with
    ``xp = xpad[n, i, p * stride + u * dilation]`` and ``(w_base, w_scale, c) = (base_weight,
    scaler, coefficients)[o, i - group offset, u]``.

    Args:
        input: ``(N, C_in, *spatial)``.
        basis: the functions ``f_g`` (``num_basis = n``), with ``C_in`` channels where it has
            per-channel state.
        base_weight, scaler: ``(C_out, C_in / groups, *kernel)``.
        coefficients: ``(C_out, C_in / groups, *kernel, n)``.
        stride, padding, dilation, groups, padding_mode: as ``nn.ConvNd`` (``padding`` may be
            ``"same"`` or ``"valid"``); the input is padded before any function is applied.
        activation: the base activation ``act``.
        bias: optional ``(C_out,)``.

    Returns:
        ``(N, C_out, *out)``, the output size of ``nn.ConvNd`` with the same arguments.

    Examples:
        >>> from kanvolution.bases import create_basis
        >>> basis = create_basis("chebyshev", degree=2)
        >>> w = torch.ones(4, 2, 3, 3)
        >>> kan_conv_reference(torch.zeros(1, 2, 5, 5), basis, w, torch.ones(4, 2, 3, 3, 3), w, padding=1).shape
        torch.Size([1, 4, 5, 5])
    """
    kernel = tuple(base_weight.shape[2:])
    windows = padded_windows(input, kernel, stride, padding, dilation, padding_mode)
    n = len(kernel)
    c_out, c_in_g = base_weight.shape[:2]
    out_per_group = c_out // groups
    result = input.new_zeros((input.shape[0], c_out) + tuple(windows.shape[2:2 + n]))
    for o in range(c_out):
        for il in range(c_in_g):
            i = (o // out_per_group) * c_in_g + il
            basis_i = _channel_basis(basis, i, input.shape[1])
            for tap in itertools.product(*(range(k) for k in kernel)):
                xp = windows[(slice(None), i, Ellipsis) + tap]  # (N, *out)
                f = basis_i.expand(xp.unsqueeze(-1))[..., 0, :]  # (N, *out, n)
                spline = (f * coefficients[(o, il) + tap]).sum(-1)
                result[:, o] += base_weight[(o, il) + tap] * activation(xp) + scaler[(o, il) + tap] * spline
    if bias is not None:
        result = result + bias.view((1, -1) + (1,) * n)
    return result


def _channel_basis(basis: Basis, channel: int, channels: int) -> Basis:
    """The basis restricted to one input channel (itself if its state is not per channel)."""
    name, state, option = basis.op_args()
    if state.dim() == 2 and state.shape[0] == channels:
        return type(basis)(state[channel:channel + 1], option)
    return basis
