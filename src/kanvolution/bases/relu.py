"""ReLU-KAN: squared products of two ReLUs, bumps of width ``(K + 1) h`` on a uniform grid."""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops.families import RELU, compiled_loops, per_channel
from ._base import Basis, BasisFunctions, check_channels, check_int, check_range, check_state_rows, register_basis

__all__ = ["ReLUBasis", "relu_expand", "relu_derivative", "relu_local"]


def _factors(x: Tensor, starts: Tensor, width: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``p = relu(x - s)``, ``q = relu(s + width - x)`` and the normaliser ``16 / width^4``."""
    p = torch.relu(x - starts)
    q = torch.relu(starts + width - x)
    return p, q, 16.0 / width**4


def _split(x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    state = check_channels(x, state, "relu")
    return state[:, :-1], state[:, -1:]


def relu_expand(x: Tensor, state: Tensor, option: int) -> Tensor:
    """``(relu(x - s_i) relu(s_i + (K + 1) h - x))^2 16 / ((K + 1) h)^4``."""
    starts, width = _split(x, state)
    p, q, r = _factors(x.unsqueeze(-1), starts, width)
    return (p * q) ** 2 * r


def relu_derivative(x: Tensor, state: Tensor, option: int) -> Tensor:
    """``2 p q (q - p) 16 / ((K + 1) h)^4`` with ``p``, ``q`` the two ReLUs."""
    starts, width = _split(x, state)
    p, q, r = _factors(x.unsqueeze(-1), starts, width)
    return 2.0 * p * q * (q - p) * r


def relu_local(x: Tensor, state: Tensor, option: int) -> tuple[Tensor, Tensor]:
    """The ``K + 1`` functions whose support ``[s_i, s_i + (K + 1) h]`` can hold each value."""
    starts, width = _split(x, state)
    n = starts.shape[1]
    K = option
    h = width / (K + 1)
    span = torch.floor((x - starts[:, 0]) / h.squeeze(-1)).nan_to_num_(nan=-1.0).clamp_(-1.0, n)
    index = span.to(torch.long).unsqueeze(-1) - K + torch.arange(K + 1, device=x.device)
    exists = (index >= 0) & (index < n)
    index = index.clamp_(0, n - 1)
    # Start of function i, taken from the channel's own row.
    s = torch.gather(starts.expand(x.shape + (n,)), -1, index)
    p, q, r = _factors(x.unsqueeze(-1), s, width)
    return index, ((p * q) ** 2 * r).masked_fill_(~exists, 0.0)


@register_basis
class ReLUBasis(Basis):
    """ReLU-KAN: ``f_i(t) = (relu(t - s_i) relu(s_i + (K + 1) h - t))^2 16 / ((K + 1) h)^4``.

    ``s_i = a + (i - K) h``, ``h = (b - a) / G``, ``i = 0..G+K-1``: ``G + K`` bumps of height 1 and
    width ``(K + 1) h``, at most ``K + 1`` of them non-zero at any point (see :meth:`local`).

    State: ``(C, G + K + 1)``: the starts ``s_i``, then the width ``(K + 1) h``; option: ``K``.
    Grid: yes, the range: :meth:`update_grid` moves each channel's ``[a, b]`` to its data range
    plus ``margin`` (the starts stay evenly spaced, as the family requires).

    Parameters per phi: ``G + K + 2`` (``G + K`` coefficients, ``w_base``, ``w_scale``).

    Examples:
        >>> ReLUBasis.create(1, grid_size=2, spline_order=1)(torch.tensor([[0.0]]))
        tensor([[[0., 1., 0.]]])
    """

    name = "relu"
    has_grid = True
    functions = BasisFunctions(relu_expand, relu_derivative, lambda state, option: state.shape[-1] - 1, relu_local,
                               **compiled_loops(RELU, per_channel))

    @staticmethod
    def initial_state(in_channels: int, *, grid_size: int = 5, spline_order: int = 3,
                      grid_range=(-1.0, 1.0)) -> tuple[Tensor, int]:
        G = check_int("grid_size", grid_size, 1)
        K = check_int("spline_order", spline_order, 0)
        a, b = check_range(grid_range)
        h = (b - a) / G
        starts = a + (torch.arange(G + K, dtype=torch.float64) - K) * h
        row = torch.cat([starts, torch.tensor([(K + 1) * h], dtype=torch.float64)])
        return row.repeat(in_channels, 1), K

    @classmethod
    def check_state(cls, state: Tensor, option: int) -> None:
        if option < 0:
            raise ValueError(f"basis 'relu' needs K (option) >= 0, got {option}")
        check_state_rows(cls.name, state, option + 2)

    def adapted_state(self, samples: Tensor, margin: float, grid_eps: float) -> Tensor:
        K = self.option
        G = self.state.shape[1] - 1 - K
        lo = samples[:, :1] - margin
        h = (samples[:, -1:] + margin - lo) / G
        starts = lo + (torch.arange(G + K, dtype=torch.float64, device=samples.device) - K) * h
        return torch.cat([starts, (K + 1) * h], dim=1)
