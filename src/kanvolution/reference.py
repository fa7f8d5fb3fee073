"""A slow, obviously-correct KAN convolution and dense KAN layer, for tests and baselines.

It follows the paper's code: a Python loop over (output, input) channel pairs, the windows of the
padded input, and the textbook Cox-de Boor recursion, one basis at a time.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .bases.reference import padded_windows

__all__ = ["bspline_bases", "kan_conv_reference", "kan_linear_reference"]


def bspline_bases(x: Tensor, knots: Tensor, spline_order: int) -> list[Tensor]:
    """The ``len(knots) - 1 - spline_order`` B-splines of degree ``spline_order`` at ``x``."""
    t = [knots[j] for j in range(knots.numel())]
    bases = [((x >= t[j]) & (x < t[j + 1])).to(x.dtype) for j in range(len(t) - 1)]
    for k in range(1, spline_order + 1):
        bases = [
            (x - t[j]) / (t[j + k] - t[j]) * bases[j] + (t[j + k + 1] - x) / (t[j + k + 1] - t[j + 1]) * bases[j + 1]
            for j in range(len(bases) - 1)
        ]
    return bases


def _phi(x: Tensor, w_base: Tensor, coeff: Tensor, w_scale: Tensor, knots: Tensor, spline_order: int,
         act: Callable[[Tensor], Tensor]) -> Tensor:
    """phi(x) = w_base * act(x) + w_scale * sum_g c_g B_g(x), elementwise; parameters broadcast."""
    spline = sum(coeff[..., g] * b for g, b in enumerate(bspline_bases(x, knots, spline_order)))
    return w_base * act(x) + w_scale * spline


def kan_conv_reference(
    input: Tensor,
    base_weight: Tensor,
    spline_weight: Tensor,
    spline_scaler: Tensor,
    grid: Tensor,
    bias: Tensor | None = None,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[str, int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    spline_order: int = 3,
    base_activation: Callable[[Tensor], Tensor] = F.silu,
) -> Tensor:
    """KAN convolution of any dimension (1, 2 or 3), one (output, input) channel pair at a time."""
    n = input.dim() - 2
    kernel = tuple(base_weight.shape[2:])
    # Windows: (N, C, *out, *kernel), the input padded first, the kernel taps in row-major order.
    windows = padded_windows(input, kernel, stride, padding, dilation, padding_mode)

    c_out, c_in_g = base_weight.shape[:2]
    out_per_group = c_out // groups
    result = input.new_zeros((input.shape[0], c_out) + tuple(windows.shape[2:2 + n]))
    taps = tuple(range(-n, 0))
    for o in range(c_out):
        for il in range(c_in_g):
            i = (o // out_per_group) * c_in_g + il
            values = _phi(windows[:, i], base_weight[o, il], spline_weight[o, il], spline_scaler[o, il],
                          grid[i], spline_order, base_activation)
            result[:, o] += values.sum(dim=taps)
    if bias is not None:
        result = result + bias.view((1, -1) + (1,) * n)
    return result


def kan_linear_reference(
    input: Tensor,
    base_weight: Tensor,
    spline_weight: Tensor,
    spline_scaler: Tensor,
    grid: Tensor,
    bias: Tensor | None = None,
    spline_order: int = 3,
    base_activation: Callable[[Tensor], Tensor] = F.silu,
) -> Tensor:
    """Dense KAN layer, one (output, input) feature pair at a time."""
    x = input.reshape(-1, input.shape[-1])
    c_out, c_in = base_weight.shape
    columns = []
    for o in range(c_out):
        acc = x.new_zeros(x.shape[0])
        for i in range(c_in):
            acc = acc + _phi(x[:, i], base_weight[o, i], spline_weight[o, i], spline_scaler[o, i], grid[i],
                             spline_order, base_activation)
        columns.append(acc)
    out = torch.stack(columns, dim=1)
    if bias is not None:
        out = out + bias
    return out.reshape(*input.shape[:-1], c_out)
