"""Fourier features: ``cos(k t)``, ``sin(k t)``, ``k = 1..G``, and optionally a constant."""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops.families import FOURIER, compiled_loops, fourier
from ._base import Basis, BasisFunctions, check_int, register_basis

__all__ = ["FourierBasis", "fourier_expand", "fourier_derivative"]


def _angles(x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    k = state.to(dtype=x.dtype, device=x.device)
    return x.unsqueeze(-1) * k, k


def fourier_expand(x: Tensor, state: Tensor, option: int) -> Tensor:
    """``[1 (if option), cos(k_1 x) .. cos(k_G x), sin(k_1 x) .. sin(k_G x)]``."""
    kx, _ = _angles(x, state)
    parts = [torch.cos(kx), torch.sin(kx)]
    if option:
        parts.insert(0, torch.ones_like(x).unsqueeze(-1))
    return torch.cat(parts, -1)


def fourier_derivative(x: Tensor, state: Tensor, option: int) -> Tensor:
    """``[0 (if option), -k sin(k x) .., k cos(k x) ..]``."""
    kx, k = _angles(x, state)
    parts = [-k * torch.sin(kx), k * torch.cos(kx)]
    if option:
        parts.insert(0, torch.zeros_like(x).unsqueeze(-1))
    return torch.cat(parts, -1)


@register_basis
class FourierBasis(Basis):
    """Fourier features of the raw input: ``cos(k t)``, ``sin(k t)``, ``k = 1..G``.

    Option ``constant_term`` adds the constant function 1 first (default off: the base term
    already offsets phi). ``2G`` (or ``2G + 1``) functions, in the order constant, cosines, sines.

    State: ``(G,)`` the frequencies ``1..G``; option: 1 with the constant term, else 0. Grid: none
    (global periodic functions have no locations to move). Parameters per phi: ``2G + 2``
    (``2G + 3`` with the constant term).

    Examples:
        >>> FourierBasis.create(grid_size=1, constant_term=True)(torch.tensor([[0.0]]))
        tensor([[[1., 1., 0.]]])
    """

    name = "fourier"
    functions = BasisFunctions(
        fourier_expand, fourier_derivative, lambda state, option: 2 * state.shape[-1] + option,
        **compiled_loops(FOURIER, fourier))

    @staticmethod
    def initial_state(in_channels: int, *, grid_size: int = 5, constant_term: bool = False) -> tuple[Tensor, int]:
        G = check_int("grid_size", grid_size, 1)
        if not isinstance(constant_term, bool):
            raise TypeError(f"constant_term must be a bool, got {constant_term!r}")
        return torch.arange(1, G + 1, dtype=torch.float64), int(constant_term)

    @classmethod
    def check_state(cls, state: Tensor, option: int) -> None:
        if state.dim() != 1 or state.numel() < 1:
            raise ValueError(f"basis 'fourier' needs a state of frequencies (G >= 1,), got {tuple(state.shape)}")
        if option not in (0, 1):
            raise ValueError(f"basis 'fourier' needs option 0 or 1 (constant term), got {option}")
