"""B-splines on per-channel knots: the paper's basis and the default family."""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops import bspline as fast
from ..ops.bspline import _local_bases, b_splines
from ._base import Basis, BasisFunctions, check_channels, check_int, check_range, check_state_rows, register_basis

__all__ = ["BSplineBasis", "bspline_expand", "bspline_derivative", "bspline_local"]


def bspline_expand(x: Tensor, state: Tensor, option: int) -> Tensor:
    """Values of the ``G + K`` B-splines (Cox-de Boor, :func:`kanvolution.ops.bspline.b_splines`).

    ``state`` is the knots ``(C, G + 2K + 1)``, ``option`` the degree ``K``.
    """
    grid = check_channels(x, state, "bspline")
    flat = b_splines(x.reshape(-1, x.shape[-1]), grid, option)
    return flat.reshape(x.shape + flat.shape[-1:])


def bspline_local(x: Tensor, state: Tensor, option: int) -> tuple[Tensor, Tensor]:
    """The ``K + 1`` B-splines that can be non-zero at each value (local de Boor / closed form)."""
    grid = check_channels(x, state, "bspline")
    slots, values, _ = _local_bases(x, grid, option, derivative=False)
    index = torch.stack(slots, -1)
    return (index - 1).clamp_min_(0), torch.stack(values, -1).masked_fill_(index == 0, 0.0)


def bspline_derivative(x: Tensor, state: Tensor, option: int) -> Tensor:
    """``B'_g = K (B_{g,K-1} / (t_{g+K} - t_g) - B_{g+1,K-1} / (t_{g+K+1} - t_{g+1}))`` (0 for ``K = 0``).

    Dense and free of data-dependent control flow, so it also traces (``torch.compile``).
    """
    K = option
    if K == 0:
        return torch.zeros_like(bspline_expand(x, state, 0))
    lower = bspline_expand(x, state, K - 1)  # (..., C, G + K + 1)
    grid = state.to(dtype=x.dtype, device=x.device)
    span = grid[:, K:] - grid[:, :-K]  # t_{g+K} - t_g, g = 0 .. G+K
    scaled = torch.where(span > 0, lower / span, torch.zeros_like(lower)) * K
    return scaled[..., :-1] - scaled[..., 1:]


@register_basis
class BSplineBasis(Basis):
    """The paper's B-splines: ``G + K`` splines of degree ``K`` on per-channel knots.

    Knots ``t_j = a + (j - K) h``, ``j = 0..G+2K``, ``h = (b - a) / G``, one row per input channel;
    degree 0 uses half-open intervals ``[t_g, t_{g+1})``, higher degrees the Cox-de Boor
    recursion; every spline is 0 outside ``[t_0, t_{G+2K})``. The values are exactly those of
    :func:`kanvolution.ops.bspline.b_splines`; the op runs the fast local forms of
    :mod:`kanvolution.ops.bspline` (closed-form uniform pieces, compiled CPU loops).

    State: ``(C, G + 2K + 1)`` knots; option: ``K``. Grid: yes; :meth:`update_grid` moves the
    ``G + 1`` interior knots to ``grid_eps * uniform + (1 - grid_eps) * quantiles`` of the data
    (the uniform part spanning the data plus ``margin``) and extends them by ``K`` uniform steps on
    each side, as the paper's adaptive grids do.

    Parameters per phi: ``G + K + 2`` (``G + K`` coefficients, ``w_base``, ``w_scale``); 135 for
    ``G = 10, K = 3`` on a 3x3 kernel's channel pair (9 phi of 15).

    Examples:
        >>> basis = BSplineBasis.create(1, grid_size=2, spline_order=1)
        >>> basis(torch.tensor([[0.25]]))
        tensor([[[0.0000, 0.7500, 0.2500]]])
    """

    name = "bspline"
    has_grid = True
    functions = BasisFunctions(bspline_expand, bspline_derivative, fast.num_bases, bspline_local,
                               fill=fast.fill, input_grad=fast.input_grad, dense=fast.dense,
                               cpu_fill=fast.cpu_fill, cpu_input_grad=fast.cpu_input_grad)

    @staticmethod
    def initial_state(in_channels: int, *, grid_size: int = 5, spline_order: int = 3,
                      grid_range=(-1.0, 1.0)) -> tuple[Tensor, int]:
        G = check_int("grid_size", grid_size, 1)
        K = check_int("spline_order", spline_order, 0)
        a, b = check_range(grid_range)
        j = torch.arange(-K, G + K + 1, dtype=torch.float64)
        return (j * ((b - a) / G) + a).repeat(in_channels, 1), K

    @classmethod
    def check_state(cls, state: Tensor, option: int) -> None:
        if option < 0:
            raise ValueError(f"basis 'bspline' needs a degree (option) >= 0, got {option}")
        check_state_rows(cls.name, state, option + 2)

    def adapted_state(self, samples: Tensor, margin: float, grid_eps: float) -> Tensor:
        K = self.option
        G = self.state.shape[1] - 2 * K - 1
        S = samples.shape[1]
        pick = torch.linspace(0, S - 1, G + 1, device=samples.device).round().long()
        lo = samples[:, :1] - margin
        step = (samples[:, -1:] + margin - lo) / G
        ar = torch.arange(G + 1, dtype=torch.float64, device=samples.device)
        interior = grid_eps * (lo + step * ar) + (1.0 - grid_eps) * samples[:, pick]
        ext = torch.arange(1, K + 1, dtype=torch.float64, device=samples.device)
        return torch.cat([interior[:, :1] - step * ext.flip(0), interior, interior[:, -1:] + step * ext], dim=1)
