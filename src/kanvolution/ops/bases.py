"""Registry of basis families the KAN op can expand an input into, keyed by name.

A family turns each input value of channel ``c`` into ``n`` basis values, given the family's
state tensor of that channel (for B-splines: the knots ``grid``, ``(C, G + 2K + 1)``) and one
integer option (for B-splines: the order ``K``). The op writes expansion rows
``[act(x), b_0(x), .., b_{n-1}(x)]`` and needs four functions of a family:

- ``num_bases(state, option) -> n``;
- ``fill(x, state, option, act, out)``: the rows of ``x`` (``(..., C)``) into ``out``
  (``(..., C, 1 + n)``, contiguous), every element written;
- ``input_grad(x, state, option, grad_e, g_base, out)``: ``out = g_base + sum_j grad_e[..., 1 + j]
  * db_j/dx`` (``grad_e`` the gradient of the rows);
- ``dense(x, state, option)``: the bases of ``x`` (``(N, C, *)``) as ``(N, C, *, n)``, written
  with operations that trace without reading data (export, ONNX, the naive path);
- optionally ``cpu_fill``/``cpu_input_grad``: the same as ``fill``/``input_grad`` by compiled
  CPU code, returning ``False`` (nothing written) for inputs they do not handle. The op's CPU
  kernel tries them first; every other device runs the portable functions.

Only ``"bspline"`` exists; a new family is one module and one :func:`register_basis` call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from . import bspline

__all__ = ["BasisFamily", "register_basis", "get_basis", "BASES"]


@dataclass(frozen=True)
class BasisFamily:
    """The four functions of a basis family (see the module docstring)."""

    num_bases: Callable[[Tensor, int], int]
    fill: Callable[[Tensor, Tensor, int, Tensor, Tensor], None]
    input_grad: Callable[[Tensor, Tensor, int, Tensor, Tensor, Tensor], None]
    dense: Callable[[Tensor, Tensor, int], Tensor]
    cpu_fill: Callable[[Tensor, Tensor, int, Tensor, Tensor], bool] | None = None
    cpu_input_grad: Callable[[Tensor, Tensor, int, Tensor, Tensor, Tensor], bool] | None = None


BASES: dict[str, BasisFamily] = {}


def register_basis(name: str, family: BasisFamily) -> None:
    """Make ``family`` available to the op under ``name``."""
    if not isinstance(family, BasisFamily):
        raise TypeError(f"expected a BasisFamily, got {type(family).__name__}")
    BASES[name] = family


def get_basis(name: str) -> BasisFamily:
    """The family registered as ``name``.

    Examples:
        >>> import torch
        >>> get_basis("bspline").num_bases(torch.zeros(1, 12), 3)
        8
    """
    try:
        return BASES[name]
    except KeyError:
        raise ValueError(f"unknown basis {name!r}; registered: {sorted(BASES)}") from None


register_basis("bspline", BasisFamily(bspline.num_bases, bspline.fill, bspline.input_grad, bspline.dense,
                                      bspline.cpu_fill, bspline.cpu_input_grad))
