"""The registry of basis families, keyed by name: what the KAN op and the layers look up.

A family turns each input value of channel ``c`` into ``n`` basis values, given the family's
state tensor (for B-splines: the knots ``(C, G + 2K + 1)``; per-channel states are ``(C, m)``)
and one integer option (for B-splines: the order ``K``). Every family is one
:class:`BasisFunctions`, registered once (:func:`register_basis`, done by the family's
:class:`kanvolution.bases.Basis` class) and found by name with :func:`get_basis`. The contract:

- ``expand(x, state, option)``: ``x`` ``(..., C)`` to its ``n`` functions ``(..., C, n)``;
- ``derivative(x, state, option)``: the same shape, ``d f_g / d x``;
- ``num_basis(state, option) -> n``, from the state's shape only (fake tensors);
- ``local`` (optional): ``(index, values)``, ``(..., C, L)``, the only functions that can be
  non-zero at each value, for compactly supported families.

All four are written with tensor operations free of data-dependent control flow, so they trace
(``torch.compile``, ``torch.export``) and decompose to standard aten operations (ONNX). From
them the op derives what it runs; a family can override each with a faster version:

- ``fill(x, state, option, act, out)``: the rows ``[act(x), f_0(x), .., f_{n-1}(x)]`` into
  ``out`` ``(..., C, 1 + n)`` (contiguous, every element written);
- ``input_grad(x, state, option, grad_e, g_base, out)``: ``out = g_base + sum_g grad_e[..., 1 + g]
  * f_g'(x)``;
- ``dense(x, state, option)``: the functions of a channel-first ``x`` ``(N, C, *)`` as
  ``(N, C, *, n)`` (export, ONNX, the naive path);
- ``cpu_fill``/``cpu_input_grad``: ``fill``/``input_grad`` by compiled CPU code, returning
  ``False`` (nothing written) for inputs they do not handle; the op's CPU kernel tries them first.

B-splines override all of them (local closed-form pieces and compiled loops); the other families
use the derived portable forms and compiled loops of their own (:mod:`kanvolution.ops.families`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import Tensor

__all__ = ["BasisFunctions", "register_basis", "get_basis", "list_bases", "BASES"]

ExpandFn = Callable[[Tensor, Tensor, int], Tensor]


@dataclass(frozen=True)
class BasisFunctions:
    """The functions of a basis family (see the module docstring); ``module`` is the
    :class:`kanvolution.bases.Basis` subclass that holds a state of the family."""

    expand: ExpandFn
    derivative: ExpandFn
    num_basis: Callable[[Tensor, int], int]
    local: Optional[Callable[[Tensor, Tensor, int], "tuple[Tensor, Tensor]"]] = None
    fill: Optional[Callable[..., None]] = None
    input_grad: Optional[Callable[..., None]] = None
    dense: Optional[Callable[[Tensor, Tensor, int], Tensor]] = None
    cpu_fill: Optional[Callable[..., bool]] = None
    cpu_input_grad: Optional[Callable[..., bool]] = None
    module: Optional[type] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        derived = {"fill": self._fill, "input_grad": self._input_grad, "dense": self._dense}
        for name, fn in derived.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, fn)

    def _fill(self, x: Tensor, state: Tensor, option: int, act: Tensor, out: Tensor) -> None:
        out[..., 0] = act
        out[..., 1:] = self.expand(x, state, option)

    def _input_grad(self, x: Tensor, state: Tensor, option: int, grad_e: Tensor, g_base: Tensor,
                    out: Tensor) -> None:
        out.copy_(g_base).add_((grad_e[..., 1:] * self.derivative(x, state, option)).sum(-1))

    def _dense(self, x: Tensor, state: Tensor, option: int) -> Tensor:
        return self.expand(x.movedim(1, -1), state, option).movedim(-2, 1)


BASES: dict[str, BasisFunctions] = {}


def register_basis(name: str, functions: BasisFunctions) -> None:
    """Make the family ``functions`` available under ``name`` (once per name)."""
    if not isinstance(functions, BasisFunctions):
        raise TypeError(f"expected a BasisFunctions, got {type(functions).__name__}")
    if name in BASES:
        raise ValueError(f"a basis family named {name!r} is already registered")
    BASES[name] = functions


def list_bases() -> list[str]:
    """The registered family names, in registration order (``"bspline"`` first)."""
    return list(BASES)


def get_basis(name: str) -> BasisFunctions:
    """The family registered as ``name``.

    Examples:
        >>> import torch
        >>> get_basis("bspline").num_basis(torch.zeros(1, 12), 3)
        8
    """
    if not isinstance(name, str):
        raise TypeError(f"basis name must be a str, got {type(name).__name__}")
    try:
        return BASES[name]
    except KeyError:
        raise ValueError(f"unknown basis {name!r}; expected one of {list_bases()}") from None
