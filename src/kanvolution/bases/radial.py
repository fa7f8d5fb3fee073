"""Bumps around evenly spaced centres: Gaussian RBFs (FastKAN) and Mexican-hat wavelets (WavKAN).

Both keep, per input channel, ``G`` centres ``c_g`` evenly from ``a`` to ``b`` and the width
``w = (b - a) / (G - 1)`` (their spacing) in a state ``(C, G + 1)``: ``state[:, :G]`` the centres,
``state[:, G]`` the width.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops.families import RBF, WAVELET, centred, compiled_loops
from ._base import Basis, BasisFunctions, check_channels, check_int, check_range, check_state_rows, register_basis

__all__ = ["RBFBasis", "WaveletBasis", "rbf_expand", "rbf_derivative", "wavelet_expand", "wavelet_derivative"]


def _u(x: Tensor, state: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """``u = (x - c_g) / w`` ``(..., C, G)`` and ``1 / w`` ``(C, 1)``."""
    state = check_channels(x, state, name)
    inv_w = 1.0 / state[:, -1:]
    return (x.unsqueeze(-1) - state[:, :-1]) * inv_w, inv_w


def rbf_expand(x: Tensor, state: Tensor, option: int) -> Tensor:
    """``exp(-u^2)``, ``u = (x - c_g) / w``."""
    u, _ = _u(x, state, "rbf")
    return torch.exp(-u * u)


def rbf_derivative(x: Tensor, state: Tensor, option: int) -> Tensor:
    """``-2 u exp(-u^2) / w``."""
    u, inv_w = _u(x, state, "rbf")
    return -2.0 * u * torch.exp(-u * u) * inv_w


def wavelet_expand(x: Tensor, state: Tensor, option: int) -> Tensor:
    """``(1 - u^2) exp(-u^2 / 2)``, ``u = (x - c_g) / w``."""
    u, _ = _u(x, state, "wavelet")
    u2 = u * u
    return (1.0 - u2) * torch.exp(-0.5 * u2)


def wavelet_derivative(x: Tensor, state: Tensor, option: int) -> Tensor:
    """``u (u^2 - 3) exp(-u^2 / 2) / w``."""
    u, inv_w = _u(x, state, "wavelet")
    u2 = u * u
    return u * (u2 - 3.0) * torch.exp(-0.5 * u2) * inv_w


def _num_centres(state: Tensor, option: int) -> int:
    return state.shape[-1] - 1


class _CentredBasis(Basis):
    """Evenly spaced centres with their spacing as width; adapting moves them onto the data."""

    has_grid = True

    @staticmethod
    def initial_state(in_channels: int, *, grid_size: int = 5, grid_range=(-1.0, 1.0)) -> tuple[Tensor, int]:
        G = check_int("grid_size", grid_size, 2)
        a, b = check_range(grid_range)
        centres = torch.linspace(a, b, G, dtype=torch.float64)
        row = torch.cat([centres, torch.tensor([(b - a) / (G - 1)], dtype=torch.float64)])
        return row.repeat(in_channels, 1), 0

    @classmethod
    def check_state(cls, state: Tensor, option: int) -> None:
        check_state_rows(cls.name, state, 3)

    def adapted_state(self, samples: Tensor, margin: float, grid_eps: float) -> Tensor:
        # The family's centres are evenly spaced by definition: adapting moves (a, b) per channel
        # to the data's range plus margin, keeping G centres and width = spacing.
        G = self.state.shape[1] - 1
        lo = samples[:, :1] - margin
        hi = samples[:, -1:] + margin
        width = (hi - lo) / (G - 1)
        centres = lo + width * torch.arange(G, dtype=torch.float64, device=samples.device)
        return torch.cat([centres, width], dim=1)


@register_basis
class RBFBasis(_CentredBasis):
    """Gaussian radial basis functions (FastKAN): ``f_g(t) = exp(-((t - c_g) / w)^2)``.

    ``c_g`` = ``G`` points evenly from ``a`` to ``b``, ``w = (b - a) / (G - 1)`` (``G >= 2``).
    State: ``(C, G + 1)`` (centres, then width); option: unused (0). Grid: yes, the range:
    :meth:`update_grid` spreads the centres evenly over each channel's data range plus ``margin``
    (the width follows), since the family's centres are evenly spaced by definition.

    Parameters per phi: ``G + 2`` (``G`` coefficients, ``w_base``, ``w_scale``).

    Examples:
        >>> RBFBasis.create(1, grid_size=3)(torch.tensor([[0.0]]))
        tensor([[[0.3679, 1.0000, 0.3679]]])
    """

    name = "rbf"
    functions = BasisFunctions(rbf_expand, rbf_derivative, _num_centres,
                               **compiled_loops(RBF, centred))


@register_basis
class WaveletBasis(_CentredBasis):
    """Mexican-hat wavelets (WavKAN): ``f_g(t) = (1 - u^2) exp(-u^2 / 2)``, ``u = (t - c_g) / w``.

    Centres, width, state and grid adaptation as :class:`RBFBasis` (``G >= 2``).

    Parameters per phi: ``G + 2`` (``G`` coefficients, ``w_base``, ``w_scale``).

    Examples:
        >>> WaveletBasis.create(1, grid_size=5)(torch.tensor([[0.0]]))
        tensor([[[-0.4060,  0.0000,  1.0000,  0.0000, -0.4060]]])
    """

    name = "wavelet"
    functions = BasisFunctions(wavelet_expand, wavelet_derivative, _num_centres,
                               **compiled_loops(WAVELET, centred))
