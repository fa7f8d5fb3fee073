"""Degree-``D`` polynomial families in ``s = tanh(t)``: Chebyshev (KACN), Legendre (KALN), Gram
(KAGN), Jacobi and Bernstein.

``tanh`` maps every input into ``(-1, 1)`` without any per-batch statistics, so each phi stays a
fixed function of its input. Every family has ``D + 1`` functions ``P_0 .. P_D`` (option ``D``)
and no grid; derivatives are exact: ``d/dt P(tanh t) = (1 - s^2) P'(s)``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..ops.families import BERNSTEIN, THREE_TERM, compiled_loops
from ._base import Basis, BasisFunctions, check_int, register_basis

__all__ = [
    "ChebyshevBasis",
    "LegendreBasis",
    "GramBasis",
    "JacobiBasis",
    "BernsteinBasis",
]

# (state, D) -> [(A_n, B_n, C_n) for n = 0 .. D-1]: P_{n+1} = (A_n s + B_n) P_n - C_n P_{n-1}.
# Constants read from the state stay tensors (no .item()), so the expansion also traces.
Coefficients = Callable[[Tensor, int], "list[tuple[float, float, float]]"]


def _three_term(x: Tensor, state: Tensor, degree: int, coefficients: Coefficients, derivative: bool) -> Tensor:
    """The ``D + 1`` polynomials of a three-term recurrence at ``tanh(x)``, or their d/dx."""
    s = torch.tanh(x)
    state = state.to(dtype=x.dtype, device=x.device)
    zero = torch.zeros_like(s)
    values, slopes = [zero, torch.ones_like(s)], [zero, zero]  # P_{-1} = 0, P_0 = 1
    for a, b, c in coefficients(state, degree):
        factor = a * s + b
        if derivative:  # P'_{n+1} = A_n P_n + (A_n s + B_n) P'_n - C_n P'_{n-1}
            slopes.append(a * values[-1] + factor * slopes[-1] - c * slopes[-2])
        values.append(factor * values[-1] - c * values[-2])
    values, slopes = values[1:], slopes[1:]
    if not derivative:
        return torch.stack(values, -1)
    return torch.stack(slopes, -1) * (1.0 - s * s).unsqueeze(-1)


def _polynomial_family(coefficients: Coefficients) -> BasisFunctions:
    def expand(x: Tensor, state: Tensor, option: int) -> Tensor:
        return _three_term(x, state, option, coefficients, derivative=False)

    def derivative(x: Tensor, state: Tensor, option: int) -> Tensor:
        return _three_term(x, state, option, coefficients, derivative=True)

    def constants(state: Tensor, option: int, x: Tensor):  # the compiled loops' (A_n, B_n, C_n) table
        steps = [[float(v) for v in step] for step in coefficients(state.to(torch.float64), option)]
        return torch.tensor(steps, dtype=torch.float64), option + 1, 0

    return BasisFunctions(expand, derivative, lambda state, option: option + 1,
                          **compiled_loops(THREE_TERM, constants, tanh=True))


class _PolynomialBasis(Basis):
    """``D + 1`` polynomials in ``tanh(t)``; the state holds the family's fixed constants."""

    @staticmethod
    def initial_state(in_channels: int, *, degree: int = 3) -> tuple[Tensor, int]:
        return torch.zeros(0, dtype=torch.float64), check_int("degree", degree, 0)

    @classmethod
    def check_state(cls, state: Tensor, option: int) -> None:
        if option < 0:
            raise ValueError(f"basis {cls.name!r} needs a degree (option) >= 0, got {option}")
        if state.dim() != 1 or state.numel() != cls._state_size:
            raise ValueError(f"basis {cls.name!r} needs a state of shape ({cls._state_size},), got {tuple(state.shape)}")

    _state_size = 0


def _chebyshev(state: Tensor, degree: int):
    return [(1.0 if n == 0 else 2.0, 0.0, 1.0) for n in range(degree)]


@register_basis
class ChebyshevBasis(_PolynomialBasis):
    """Chebyshev polynomials of the first kind (KACN): ``T_0 = 1``, ``T_1 = s``,
    ``T_{n+1} = 2 s T_n - T_{n-1}``, at ``s = tanh(t)``.

    State: empty ``(0,)``; option: ``D``. Grid: none. Parameters per phi: ``D + 3``.

    Examples:
        >>> ChebyshevBasis.create(degree=2)(torch.tensor([[0.0]]))
        tensor([[[ 1.,  0., -1.]]])
    """

    name = "chebyshev"
    functions = _polynomial_family(_chebyshev)


def _legendre(state: Tensor, degree: int):
    return [((2 * n + 1) / (n + 1), 0.0, n / (n + 1)) for n in range(degree)]


@register_basis
class LegendreBasis(_PolynomialBasis):
    """Legendre polynomials (KALN): ``P_0 = 1``, ``P_1 = s``,
    ``(n + 1) P_{n+1} = (2n + 1) s P_n - n P_{n-1}``, at ``s = tanh(t)``.

    State: empty ``(0,)``; option: ``D``. Grid: none. Parameters per phi: ``D + 3``.

    Examples:
        >>> LegendreBasis.create(degree=2)(torch.tensor([[0.0]]))
        tensor([[[ 1.0000,  0.0000, -0.5000]]])
    """

    name = "legendre"
    functions = _polynomial_family(_legendre)


def _gram(state: Tensor, degree: int):
    m2 = state[0] * state[0]
    return [(1.0, 0.0, 0.0 if n == 0 else n * n * (m2 - n * n) / (m2 * (4 * n * n - 1))) for n in range(degree)]


@register_basis
class GramBasis(_PolynomialBasis):
    """Gram polynomials (KAGN's family, with fixed coefficients): the monic polynomials orthogonal
    on the ``M`` points ``-1 + (2k + 1) / M``, ``k = 0..M-1``, at ``s = tanh(t)``.

    ``p_0 = 1``, ``p_1 = s``, ``p_{n+1} = s p_n - beta_n p_{n-1}`` with
    ``beta_n = n^2 (M^2 - n^2) / (M^2 (4 n^2 - 1))`` (as ``M`` grows they tend to monic Legendre).
    Option ``gram_points`` = ``M`` (default ``D + 1``, the fewest points on which ``p_0 .. p_D``
    are orthogonal; must be ``> D``).

    State: ``(1,)`` holding ``M``; option: ``D``. Grid: none. Parameters per phi: ``D + 3``.

    Examples:
        >>> GramBasis.create(degree=2)(torch.tensor([[0.0]]))  # M = 3: beta_1 = 8/27
        tensor([[[ 1.0000,  0.0000, -0.2963]]])
    """

    name = "gram"
    functions = _polynomial_family(_gram)
    _state_size = 1

    @staticmethod
    def initial_state(in_channels: int, *, degree: int = 3, gram_points: int | None = None) -> tuple[Tensor, int]:
        D = check_int("degree", degree, 0)
        M = D + 1 if gram_points is None else check_int("gram_points", gram_points, 1)
        return torch.tensor([float(M)], dtype=torch.float64), D

    @classmethod
    def check_state(cls, state: Tensor, option: int) -> None:
        super().check_state(state, option)
        M = float(state[0])
        if not (M == int(M) and M > option):
            raise ValueError(f"basis 'gram' of degree {option} needs an integer number of points > {option}, got {M}")


def _jacobi(state: Tensor, degree: int):
    alpha, beta = state[0], state[1]
    out = [((alpha + beta + 2) / 2, (alpha - beta) / 2, 0.0)]
    for m in range(2, degree + 1):  # the recurrence giving P_m
        ab = alpha + beta
        d = 2 * m * (m + ab) * (2 * m + ab - 2)
        out.append(((2 * m + ab - 1) * (2 * m + ab) * (2 * m + ab - 2) / d,
                    (2 * m + ab - 1) * (alpha * alpha - beta * beta) / d,
                    2 * (m + alpha - 1) * (m + beta - 1) * (2 * m + ab) / d))
    return out[:degree]


@register_basis
class JacobiBasis(_PolynomialBasis):
    """Jacobi polynomials ``P_n^(alpha, beta)`` at ``s = tanh(t)`` (``alpha, beta > -1``).

    ``P_0 = 1``, ``P_1 = ((alpha + beta + 2) s + alpha - beta) / 2`` and, for ``m >= 2``,
    ``2m (m + alpha + beta)(2m + alpha + beta - 2) P_m = (2m + alpha + beta - 1)
    ((2m + alpha + beta)(2m + alpha + beta - 2) s + alpha^2 - beta^2) P_{m-1}
    - 2 (m + alpha - 1)(m + beta - 1)(2m + alpha + beta) P_{m-2}``.
    Options ``alpha``, ``beta`` (default 1, 1); ``alpha = beta = 0`` gives Legendre.

    State: ``(2,)`` holding ``(alpha, beta)``; option: ``D``. Grid: none. Parameters per phi:
    ``D + 3`` (``alpha``, ``beta`` are fixed, not learned).

    Examples:
        >>> JacobiBasis.create(degree=1, alpha=1.0, beta=1.0)(torch.tensor([[0.0]]))
        tensor([[[1., 0.]]])
    """

    name = "jacobi"
    functions = _polynomial_family(_jacobi)
    _state_size = 2

    @staticmethod
    def initial_state(in_channels: int, *, degree: int = 3, alpha: float = 1.0, beta: float = 1.0) -> tuple[Tensor, int]:
        return torch.tensor([float(alpha), float(beta)], dtype=torch.float64), check_int("degree", degree, 0)

    @classmethod
    def check_state(cls, state: Tensor, option: int) -> None:
        super().check_state(state, option)
        alpha, beta = (float(v) for v in state)
        if not (math.isfinite(alpha) and math.isfinite(beta) and alpha > -1 and beta > -1):
            raise ValueError(f"basis 'jacobi' needs finite alpha > -1 and beta > -1, got alpha={alpha}, beta={beta}")


def _binomials(state: Tensor, option: int, x: Tensor):
    """The compiled loops' constants: ``C(D, 0..D)``, then ``C(D - 1, 0..D - 1)``."""
    rows = [math.comb(option, k) for k in range(option + 1)] + [math.comb(option - 1, k) for k in range(option)]
    return torch.tensor(rows, dtype=torch.float64), option + 1, 0


def _bernstein(x: Tensor, degree: int, derivative: bool) -> Tensor:
    """de Casteljau's triangle in ``u = (1 + tanh x) / 2``: convex combinations only."""
    s = torch.tanh(x)
    u = 0.5 * (1.0 + s)
    v = 1.0 - u
    rows = [torch.ones_like(u)]
    lower = rows
    for _ in range(degree):
        lower = rows
        rows = [v * lower[0]] + [v * lower[k] + u * lower[k - 1] for k in range(1, len(lower))] + [u * lower[-1]]
    if not derivative:
        return torch.stack(rows, -1)
    if degree == 0:
        return torch.zeros_like(u).unsqueeze(-1)
    # d b_{k,D} / du = D (b_{k-1,D-1} - b_{k,D-1}); du/dx = (1 - s^2) / 2.
    zero = torch.zeros_like(u)
    padded = [zero] + lower + [zero]
    slopes = torch.stack([padded[k] - padded[k + 1] for k in range(degree + 1)], -1)
    return slopes * (0.5 * degree * (1.0 - s * s)).unsqueeze(-1)


@register_basis
class BernsteinBasis(_PolynomialBasis):
    """Bernstein polynomials ``b_{k,D}(u) = C(D, k) u^k (1 - u)^(D - k)``, ``u = (1 + tanh t) / 2``.

    Evaluated by de Casteljau's recurrence ``b_{k,j} = (1 - u) b_{k,j-1} + u b_{k-1,j-1}``
    (convex combinations: stable, non-negative, summing to 1).

    State: empty ``(0,)``; option: ``D``. Grid: none. Parameters per phi: ``D + 3``.

    Examples:
        >>> BernsteinBasis.create(degree=2)(torch.tensor([[0.0]]))
        tensor([[[0.2500, 0.5000, 0.2500]]])
    """

    name = "bernstein"
    functions = BasisFunctions(lambda x, state, option: _bernstein(x, option, False),
                               lambda x, state, option: _bernstein(x, option, True),
                               lambda state, option: option + 1,
                               **compiled_loops(BERNSTEIN, _binomials, tanh=True))
