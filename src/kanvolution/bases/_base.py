"""The ``Basis`` interface and the registry that resolves a basis family by name.

A basis is fully described by the triple ``(name, state, option)``: the family's name, one state
tensor (per-channel knots, centres, or fixed constants) and one int; the family's
:class:`~kanvolution.ops.bases.BasisFunctions` compute everything from that triple, so the op
carries it through its schema. Names resolve in the one registry of :mod:`kanvolution.ops.bases`.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..ops.bases import BasisFunctions, get_basis, list_bases
from ..ops.bases import register_basis as _register

__all__ = [
    "Basis",
    "BasisFunctions",
    "register_basis",
    "basis_functions",
    "list_bases",
    "create_basis",
    "basis_from_state",
]


def register_basis(cls: type["Basis"]) -> type["Basis"]:
    """Class decorator: register the family ``cls.functions`` under ``cls.name`` (see
    :func:`kanvolution.ops.bases.register_basis`), with ``cls`` as the module that holds its state."""
    _register(cls.name, dataclasses.replace(cls.functions, module=cls))
    cls.functions = get_basis(cls.name)
    return cls


basis_functions = get_basis  # the functions of a family by name, what an op calls


def _family(name: str) -> type["Basis"]:
    return get_basis(name).module


def create_basis(name: str, in_channels: int = 1, *, device=None, dtype=None, **options) -> "Basis":
    """A new basis of family ``name`` for ``in_channels`` input channels.

    Args:
        name: one of :func:`list_bases`.
        in_channels: ``C``: families with per-channel state keep one row per channel.
        device, dtype: of the state buffer (``dtype`` defaults to torch's default dtype).
        **options: the family's options. The common ones (``grid_size``, ``spline_order``,
            ``grid_range``, ``degree``) are accepted by every family and dropped where unused,
            so that a layer can pass them all; any other name must be an option of the family.

    Examples:
        >>> create_basis("rbf", 2, grid_size=4).num_basis
        4
    """
    return _family(name).create(in_channels, device=device, dtype=dtype, **options)


def basis_from_state(name: str, state: Tensor, option: int) -> "Basis":
    """Rebuild a basis module from the triple given by :meth:`Basis.op_args`.

    Examples:
        >>> basis = create_basis("relu", 3, grid_size=4, spline_order=1)
        >>> basis_from_state(*basis.op_args()).num_basis
        5
    """
    return _family(name)(state, option)


_COMMON_OPTIONS = ("grid_size", "spline_order", "grid_range", "degree")


class Basis(nn.Module):
    """A family of ``n`` univariate functions ``f_g`` applied to every input channel.

    A KAN function built on it is ``phi(t) = w_base * act(t) + w_scale * sum_g c_g f_g(t)``;
    ``num_basis`` counts the ``f_g`` only (the base term is the layer's). The state is the buffer
    ``state`` (so ``state_dict``, ``.to()`` and pickling carry it) and ``option`` an int; both
    together with ``name`` define the basis: see :meth:`op_args` and :func:`basis_from_state`.

    Subclasses set ``name``, ``functions`` (a :class:`BasisFunctions`), ``has_grid``, implement
    ``initial_state`` (the state of :meth:`create`) and, where ``has_grid``, ``adapted_state``.

    Args:
        state: the family's state tensor (see the family's docstring for its layout).
        option: the family's int option.
    """

    name: ClassVar[str]
    functions: ClassVar[BasisFunctions]
    has_grid: ClassVar[bool] = False  # whether update_grid adapts the state to data

    def __init__(self, state: Tensor, option: int) -> None:
        super().__init__()
        if not isinstance(state, Tensor):
            raise TypeError(f"state must be a Tensor, got {type(state).__name__}")
        if isinstance(option, bool) or not isinstance(option, int):
            raise TypeError(f"option must be an int, got {option!r}")
        self.check_state(state, option)
        self.option = option
        self.register_buffer("state", state)

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def create(cls, in_channels: int = 1, *, device=None, dtype=None, **options) -> "Basis":
        """A basis of this family from its options (see :func:`create_basis`)."""
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        accepted = inspect.signature(cls.initial_state).parameters
        unknown = [k for k in options if k not in accepted and k not in _COMMON_OPTIONS]
        if unknown:
            known = sorted(set(accepted) - {"in_channels"} | set(_COMMON_OPTIONS))
            raise TypeError(f"basis {cls.name!r} got unknown option(s) {unknown}; expected some of {known}")
        state, option = cls.initial_state(in_channels, **{k: v for k, v in options.items() if k in accepted})
        return cls(state.to(device=device, dtype=dtype or torch.get_default_dtype()), option)

    @staticmethod
    def initial_state(in_channels: int, **options) -> tuple[Tensor, int]:  # pragma: no cover - abstract
        """``(state, option)`` of a new basis, the state in float64."""
        raise NotImplementedError

    @classmethod
    def check_state(cls, state: Tensor, option: int) -> None:
        """Raise ``ValueError`` if ``(state, option)`` is not a valid state of this family."""

    def op_args(self) -> tuple[str, Tensor, int]:
        """``(name, state, option)``: everything an op needs to compute this basis."""
        return self.name, self.state, self.option

    # -- evaluation --------------------------------------------------------------------------------

    @property
    def num_basis(self) -> int:
        """``n``, the number of functions (the base term excluded)."""
        return self.functions.num_basis(self.state, self.option)

    def expand(self, x: Tensor) -> Tensor:
        """The functions at ``x``: ``(..., C) -> (..., C, n)``, channel last."""
        return self.functions.expand(x, self.state, self.option)

    forward = expand

    def derivative(self, x: Tensor) -> Tensor:
        """``d f_g / d x`` at ``x``: ``(..., C) -> (..., C, n)``."""
        return self.functions.derivative(x, self.state, self.option)

    def design_matrix(self, x: Tensor) -> Tensor:
        """The least-squares design matrix of coefficient fits: the values, ``(..., C, n)``."""
        return self.expand(x)

    @property
    def is_local(self) -> bool:
        """Whether :meth:`local` is available (compactly supported functions)."""
        return self.functions.local is not None

    def local(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The possibly non-zero functions of each value: ``(index, values)``, ``(..., C, L)``.

        ``expand(x)`` equals ``zeros(..., C, n).scatter_add_(-1, index, values)``.
        """
        if self.functions.local is None:
            raise NotImplementedError(f"basis {self.name!r} has no compact support; use expand")
        return self.functions.local(x, self.state, self.option)

    # -- grid adaptation ---------------------------------------------------------------------------

    def adapted_state(self, samples: Tensor, margin: float, grid_eps: float) -> Tensor:  # pragma: no cover
        """The state fitted to ``samples`` ``(C, S)``, sorted along ``S``, float64."""
        raise NotImplementedError

    @torch.no_grad()
    def update_grid(self, x: Tensor, coefficients: Tensor | None = None, *, margin: float = 0.01,
                    grid_eps: float = 0.02, max_samples: int = 4096) -> Tensor | None:
        """Adapt the state to the values ``x`` and refit coefficients so the functions barely change.

        Args:
            x: ``(..., C)`` values the basis sees, channel last.
            coefficients: optional ``(C, n, R)``: the ``R`` coefficient vectors that read channel
                ``c``. They are refitted by least squares (float64, SVD-based ``gelsd``) so that
                ``expand_new(x) @ c_new`` matches ``expand_old(x) @ c`` on the samples.
            margin: how far the adapted grid reaches beyond the data.
            grid_eps: B-splines: share of the uniform grid in the adapted knots.
            max_samples: evenly spaced order statistics of at most this many samples are used.

        Returns:
            the refitted coefficients (dtype of ``coefficients``), or ``None`` if none were given.
            How closely they reproduce the old functions depends on what the new functions can
            represent: B-splines on knots moved onto the data reproduce a smooth function closely.
        """
        if not self.has_grid:
            raise ValueError(f"basis {self.name!r} has no grid to adapt")
        if not 0.0 <= grid_eps <= 1.0:
            raise ValueError(f"grid_eps must be in [0, 1], got {grid_eps}")
        C = self.state.shape[0]
        if x.dim() < 1 or x.shape[-1] != C:
            raise ValueError(f"update_grid expects values shaped (..., {C}), got {tuple(x.shape)}")
        samples = x.detach().reshape(-1, C).T.to(torch.float64)
        if samples.shape[1] == 0:
            raise ValueError("update_grid needs at least one input sample")
        if not torch.isfinite(samples).all():
            raise ValueError("update_grid got non-finite inputs")
        samples = samples.sort(dim=1).values
        if samples.shape[1] > max_samples:
            pick = torch.linspace(0, samples.shape[1] - 1, max_samples, device=samples.device).round().long()
            samples = samples[:, pick]
        new_state = self.adapted_state(samples, float(margin), float(grid_eps))
        xs = samples.T  # (S, C)
        old = self.functions.expand(xs, self.state.to(torch.float64), self.option) if coefficients is not None else None
        self.state.copy_(new_state.to(self.state))
        if coefficients is None:
            return None
        if coefficients.dim() != 3 or coefficients.shape[:2] != (C, self.num_basis):
            raise ValueError(f"coefficients must be ({C}, {self.num_basis}, R), got {tuple(coefficients.shape)}")
        new = self.functions.expand(xs, new_state, self.option)
        target = old.transpose(0, 1) @ coefficients.to(torch.float64)  # (C, S, R)
        solved = torch.linalg.lstsq(new.transpose(0, 1).cpu(), target.cpu(), driver="gelsd").solution
        return solved.to(coefficients)

    def extra_repr(self) -> str:
        return f"num_basis={self.num_basis}, option={self.option}, state={tuple(self.state.shape)}"


# -- checks shared by the families ---------------------------------------------------------------


def check_int(name: str, value, minimum: int) -> int:
    """``value`` as an int ``>= minimum``, else a ``ValueError``/``TypeError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_range(grid_range) -> tuple[float, float]:
    """``(a, b)`` as finite floats with ``a < b``."""
    try:
        a, b = (float(v) for v in grid_range)
    except (TypeError, ValueError):
        raise TypeError(f"grid_range must be a pair of numbers (low, high), got {grid_range!r}") from None
    if not (torch.isfinite(torch.tensor([a, b])).all() and a < b):
        raise ValueError(f"grid_range must be finite with low < high, got {grid_range!r}")
    return a, b


def check_channels(x: Tensor, state: Tensor, name: str) -> Tensor:
    """The state in ``x``'s dtype after checking ``x`` is ``(..., C)`` for a ``(C, m)`` state."""
    if x.dim() < 1 or x.shape[-1] != state.shape[0]:
        raise ValueError(f"basis {name!r} with {state.shape[0]} channel(s) expects values shaped "
                         f"(..., {state.shape[0]}), got {tuple(x.shape)}")
    return state.to(dtype=x.dtype, device=x.device)


def check_state_rows(name: str, state: Tensor, min_columns: int) -> None:
    """A per-channel state must be ``(C, m)`` with ``C >= 1`` and ``m >= min_columns``."""
    if state.dim() != 2 or state.shape[0] < 1 or state.shape[1] < min_columns:
        raise ValueError(f"basis {name!r} needs a state of shape (C, m >= {min_columns}), got {tuple(state.shape)}")
