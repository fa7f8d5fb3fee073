"""Compiled CPU loops of the basis families other than B-splines (``csrc/bspline_cpu.cpp``,
``family_expand`` / ``family_grad``): one pass per value with every function of the value in
registers, instead of one tensor operation per function and a stack of the results.

:func:`compiled_loops` gives a family its ``cpu_fill`` and ``cpu_input_grad`` (see
:mod:`kanvolution.ops.bases`). Each returns ``False`` (nothing written) where the loops do not
apply: another device or dtype, empty inputs, compiled kernels switched off or not buildable. The
portable PyTorch forms stay the definition; the tests hold both to each other.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import build

__all__ = ["THREE_TERM", "BERNSTEIN", "RBF", "WAVELET", "FOURIER", "RELU", "compiled_loops", "per_channel", "centred",
           "fourier"]

# The kinds the C++ loops know (enum Family in the source).
THREE_TERM, BERNSTEIN, RBF, WAVELET, FOURIER, RELU = range(6)
_MAX_FUNCTIONS = 512  # kMaxFunctions in the source

# (state, option, x) -> (float64 constants, number of functions n, integer option of the loop),
# or None where the loops should not run (the portable code then runs, and reports bad states).
Params = Callable[[Tensor, int, Tensor], "Optional[tuple[Tensor, int, int]]"]


def _usable(x: Tensor, *others: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.numel() > 0
        and all(t.dtype == x.dtype for t in others)
        and build.is_enabled()
        and build.load() is not None
    )


def compiled_loops(kind: int, params: Params, *, tanh: bool = False) -> "dict[str, Callable[..., bool]]":
    """``{"cpu_fill": .., "cpu_input_grad": ..}`` of a family run by the loops of ``kind``, to pass
    to :class:`~kanvolution.ops.bases.BasisFunctions`.

    Args:
        kind: one of the module's constants.
        params: the loop's constants from ``(state, option, x)``.
        tanh: the functions are of ``tanh(x)`` (the polynomial families): the loops get
            ``tanh(x)`` and the input gradient the chain factor ``1 - tanh(x)^2``.
    """

    def prepare(x: Tensor, state: Tensor, option: int, *others: Tensor) -> "Optional[tuple[Tensor, Tensor, int, int]]":
        """``(z (L, C), float64 constants, n, loop option)``, or ``None`` where the loops do not apply."""
        if not _usable(x, *others):
            return None
        found = params(state, option, x)
        if found is None or not 1 <= found[1] <= _MAX_FUNCTIONS:
            return None
        constants, n, loop_option = found
        z = x.reshape(-1, x.shape[-1])
        z = torch.tanh(z) if tanh else z.contiguous()
        return z, constants.to(dtype=torch.float64, device="cpu").contiguous(), n, loop_option

    def cpu_fill(x: Tensor, state: Tensor, option: int, act: Tensor, out: Tensor) -> bool:
        prepared = prepare(x, state, option, act, out)
        if prepared is None:
            return False
        z, constants, n, loop_option = prepared
        build.load().family_expand(z, kind, constants, n, loop_option, act.reshape(z.shape).contiguous(),
                                   out.view(*z.shape, n + 1))
        return True

    def cpu_input_grad(x: Tensor, state: Tensor, option: int, grad_e: Tensor, g_base: Tensor, out: Tensor) -> bool:
        prepared = prepare(x, state, option, grad_e, g_base, out)
        if prepared is None:
            return False
        z, constants, n, loop_option = prepared
        dz = (1.0 - z * z) if tanh else None
        build.load().family_grad(grad_e.reshape(*z.shape, grad_e.shape[-1]), z, dz, kind, constants, n, loop_option,
                                 g_base.reshape(z.shape).contiguous(), out.view(z.shape))
        return True

    return {"cpu_fill": cpu_fill, "cpu_input_grad": cpu_input_grad}


def per_channel(state: Tensor, option: int, x: Tensor) -> "Optional[tuple[Tensor, int, int]]":
    """Constants of the families with one row per input channel (``n`` values, then a width)."""
    if state.dim() != 2 or state.shape[0] != x.shape[-1] or state.shape[1] < 2:
        return None
    return state, state.shape[1] - 1, 0


def centred(state: Tensor, option: int, x: Tensor) -> "Optional[tuple[Tensor, int, int]]":
    """:func:`per_channel` for the rbf and wavelet rows (``G`` centres, then the width); loop
    option 1 where the centres are ``c_0 + g w`` to rounding, as the families define them (the
    loops then walk from the nearest centre with two ``exp`` per value instead of ``G``)."""
    found = per_channel(state, option, x)
    if found is None:
        return None
    rows = state.to(torch.float64)
    centres, width = rows[:, :-1], rows[:, -1:]
    ideal = centres[:, :1] + width * torch.arange(centres.shape[1], dtype=torch.float64, device=rows.device)
    slack = 8 * torch.finfo(state.dtype).eps * (centres.abs().amax() + width.abs().amax())
    uniform = bool(((centres - ideal).abs().amax() <= slack).item()) and bool((width > 0).all().item())
    return state, found[1], int(uniform)


def fourier(state: Tensor, option: int, x: Tensor) -> "Optional[tuple[Tensor, int, int]]":
    """Fourier frequencies ``(G,)``; loop option bit 1 the constant term, bit 2 frequencies that
    are exactly ``1 .. G`` (each pair then follows from the previous one by a rotation)."""
    if state.dim() != 1 or option not in (0, 1):
        return None
    integers = torch.equal(state.to(torch.float64), torch.arange(1, state.shape[0] + 1, dtype=torch.float64))
    return state, 2 * state.shape[0] + option, option | (2 if integers else 0)
