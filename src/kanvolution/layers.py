"""KAN layers as modules: ``KANConv1d/2d/3d`` (drop-in for ``nn.Conv1d/2d/3d``) and ``KANLinear``.

One ``_KANLayer`` base owns the KAN options, the knots, initialisation, grid adaptation and the
regulariser; the convolution and dense layers only add their shapes and call :mod:`.functional`.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Literal, Sequence, Union

import torch
from torch import Tensor, nn

from . import functional as KF
from .bases import Basis, basis_from_state, create_basis
from .ops import activation_name, get_basis

__all__ = [
    "KANConv1d",
    "KANConv2d",
    "KANConv3d",
    "KANLinear",
    "kan_layers",
    "regularization_loss",
    "update_grids",
]

Implementation = Literal["fused", "naive", "reference"]
_IMPLEMENTATIONS = ("fused", "naive", "reference")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class _KANLayer(nn.Module):
    """What every KAN layer shares: ``phi(t) = w_base * act(t) + w_scale * sum_g c_g f_g(t)``.

    Parameters ``base_weight``/``spline_scaler`` have the shape ``self._phi_shape`` (one entry per
    phi) and ``spline_weight`` one more trailing axis of ``n`` coefficients, one per function of
    the basis family ``basis_name`` (``G + K`` B-splines by default). The family's state is the
    buffer ``grid``: for B-splines the knots ``(in_channels, G + 2K + 1)``, one knot vector per
    input channel; its int option is ``basis_option`` (``K`` for B-splines).
    """

    in_channels: int
    out_channels: int
    groups: int

    def _init_kan(self, n_inputs: int, phi_shape: tuple[int, ...], fan_in: int, bias: bool, *,
                  grid_size: int, spline_order: int, grid_range: Sequence[float], base_activation,
                  scale_noise: float, scale_base: float, scale_spline: float, grid_eps: float,
                  implementation: str, basis, degree: int, basis_options, device, dtype) -> None:
        self.grid_size = _check_int("grid_size", grid_size, 1)
        self.spline_order = _check_int("spline_order", spline_order, 0)
        self.degree = _check_int("degree", degree, 0)
        try:
            lo, hi = (float(v) for v in grid_range)
        except (TypeError, ValueError):
            raise TypeError(f"grid_range must be a pair of numbers (low, high), got {grid_range!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"grid_range must be finite with low < high, got {grid_range!r}")
        if not 0.0 <= grid_eps <= 1.0:
            raise ValueError(f"grid_eps must be in [0, 1], got {grid_eps}")
        if implementation not in _IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
        self.grid_range = (lo, hi)
        self.scale_noise = float(scale_noise)
        self.scale_base = float(scale_base)
        self.scale_spline = float(scale_spline)
        self.grid_eps = float(grid_eps)
        self.implementation = implementation
        self._fan_in = fan_in
        if isinstance(base_activation, type) and issubclass(base_activation, nn.Module):
            base_activation = base_activation()
        if not callable(base_activation):
            raise TypeError(f"base_activation must be an nn.Module class or a callable, got {base_activation!r}")
        self.base_activation = base_activation

        factory = {"device": device, "dtype": dtype}
        self.base_weight = nn.Parameter(torch.empty(phi_shape, **factory))
        state = self._init_basis(basis, n_inputs, basis_options)
        n_bases = get_basis(self.basis_name).num_basis(state, self.basis_option)
        self.spline_weight = nn.Parameter(torch.empty(phi_shape + (n_bases,), **factory))
        self.spline_scaler = nn.Parameter(torch.empty(phi_shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(phi_shape[0], **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("grid", state.to(self.base_weight))
        self.reset_parameters()

    def _init_basis(self, basis, n_inputs: int, basis_options) -> Tensor:
        """Set ``basis_name``/``basis_option`` and return the family's initial state."""
        if isinstance(basis, Basis):
            if basis_options:
                raise TypeError("basis_options apply to a basis given by name, not to a Basis object")
            self._basis_options = None  # reset_parameters keeps the given state
            name, state, option = basis.op_args()
            state = state.detach().clone()
        elif isinstance(basis, str):
            if basis_options is not None and not isinstance(basis_options, dict):
                raise TypeError(f"basis_options must be a dict, got {type(basis_options).__name__}")
            self._basis_options = {"grid_size": self.grid_size, "spline_order": self.spline_order,
                                   "grid_range": self.grid_range, "degree": self.degree, **(basis_options or {})}
            name, state, option = create_basis(basis, n_inputs, dtype=torch.float64, **self._basis_options).op_args()
        else:
            raise TypeError(f"basis must be a family name or a Basis, got {type(basis).__name__}")
        if state.dim() == 2 and state.shape[0] != n_inputs:
            raise ValueError(f"basis {name!r} holds a state for {state.shape[0]} input channel(s), "
                             f"the layer has {n_inputs}")
        self.basis_name, self.basis_option = name, option
        return state

    @property
    def basis(self) -> Basis:
        """The layer's basis as a :class:`kanvolution.bases.Basis` sharing the buffer ``grid``."""
        return basis_from_state(self.basis_name, self.grid, self.basis_option)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "base_activation":
            # The op's name of the activation, resolved here once rather than in every forward
            # (where compilers would trace the lookup); None: a callable the op does not know.
            super().__setattr__("_activation_op", activation_name(value))

    def __setstate__(self, state):
        super().__setstate__(state)
        super().__setattr__("_activation_op", activation_name(self.base_activation))

    def _activation(self):
        return self._activation_op or self.base_activation

    def _apply(self, fn, recurse=True):
        # Module.to(memory_format=...) restrides every 4-d and 5-d tensor; the spline coefficients
        # carry an extra coefficient axis (4-d in a 1-d layer, 5-d in a 2-d layer) and are no
        # (N, C, *S) tensor, so they are converted through a 6-d view that keeps their layout.
        shape = self.spline_weight.shape

        def convert(t):
            if t.shape == shape and t.dim() in (4, 5):
                return fn(t.view(shape + (1,) * (6 - t.dim()))).view(shape)
            return fn(t)

        return super()._apply(convert, recurse)

    # -- initialisation --------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Initialise as the paper's code does (efficient-kan's scheme with its own fan-in)."""
        with torch.no_grad():
            if self._basis_options is not None:
                fresh = create_basis(self.basis_name, self.in_channels, dtype=torch.float64, **self._basis_options)
                self.grid.copy_(fresh.state)
            # kaiming_uniform_(a) on a tensor of this fan-in: bound = sqrt(6 / ((1 + a^2) fan_in)).
            for tensor, scale in ((self.base_weight, self.scale_base), (self.spline_scaler, self.scale_spline)):
                bound = math.sqrt(6.0 / ((1.0 + 5.0 * scale**2) * self._fan_in))
                tensor.uniform_(-bound, bound)
            # Least-squares (minimum-norm) fit of uniform noise in +-scale_noise/(2P) taken at
            # P+1 points: B-splines' G+1 grid points, else n+1 points spread over grid_range.
            points = self._noise_points().view(-1, 1)
            state = self.grid[:1] if self.grid.dim() == 2 else self.grid
            design = get_basis(self.basis_name).expand(points, state.to(torch.float64), self.basis_option)[:, 0, :]
            P = points.shape[0] - 1
            noise = (torch.rand(self.spline_weight.shape[:-1] + (P + 1,), dtype=torch.float64,
                                device=self.grid.device) - 0.5) * self.scale_noise / P
            coeff = noise @ torch.linalg.pinv(design).T
            self.spline_weight.copy_(coeff.to(self.spline_weight.dtype))
            if self.bias is not None:
                fan = self.base_weight[0].numel()
                bound = 1.0 / math.sqrt(fan)
                self.bias.uniform_(-bound, bound)

    def _noise_points(self) -> Tensor:
        """The points of the initial noise fit, float64."""
        if self.basis_name == "bspline":
            G, K = self.grid_size, self.spline_order
            return self.grid[0, K: G + K + 1].to(torch.float64)
        n = self.spline_weight.shape[-1]
        return torch.linspace(*self.grid_range, n + 1, dtype=torch.float64, device=self.grid.device)

    # -- the learned functions -------------------------------------------------------------------

    def _input_channel_of_phi(self) -> Tensor:
        """For every (out, in/groups) pair, the input channel whose knots it uses."""
        out_c, in_g = self.base_weight.shape[:2]
        o = torch.arange(out_c).view(-1, 1)
        return (o // (out_c // self.groups)) * in_g + torch.arange(in_g).view(1, -1)

    def evaluate_phi(self, t: Tensor) -> Tensor:
        """Evaluate every learned function ``phi`` at the points ``t``.

        Args:
            t: ``(T,)`` points shared by all input channels, or ``(in_channels, T)``.

        Returns:
            ``(*phi_shape, T)``, e.g. ``(out, in/groups, kH, kW, T)`` for ``KANConv2d``.
        """
        C = self.in_channels
        if t.dim() == 1:
            t = t.unsqueeze(0).expand(C, -1)
        if t.dim() != 2 or t.shape[0] != C:
            raise ValueError(f"t must have shape (T,) or ({C}, T), got {tuple(t.shape)}")
        t = t.to(self.grid)
        bases = get_basis(self.basis_name).expand(t.T, self.grid, self.basis_option).transpose(0, 1)  # (C, T, n)
        act = self.base_activation(t)  # (C, T)
        chan = self._input_channel_of_phi().to(t.device)  # (out, in_g)
        out_c, in_g = chan.shape
        sw = self.spline_weight.reshape(out_c, in_g, -1, self.spline_weight.shape[-1])
        spline = torch.einsum("oipb,oitb->oipt", sw, bases[chan])
        shape = (out_c, in_g, -1, 1)
        phi = self.base_weight.reshape(shape) * act[chan].unsqueeze(2) + self.spline_scaler.reshape(shape) * spline
        return phi.reshape(self.base_weight.shape + (t.shape[1],))

    # -- regularisation --------------------------------------------------------------------------

    def regularization_loss(self, regularize_activation: float = 1.0, regularize_entropy: float = 1.0) -> Tensor:
        """L1 of every phi's mean absolute spline coefficient plus the entropy of their distribution.

        The coefficients are taken with their scale ``w_scale`` (what ``phi`` actually uses), so the
        penalty cannot be dodged by moving magnitude from ``c`` into ``w_scale``.
        """
        coeff = self.spline_weight * self.spline_scaler.unsqueeze(-1)
        l1 = coeff.abs().mean(-1)
        total = l1.sum()
        p = l1 / total.clamp_min(torch.finfo(l1.dtype).tiny)
        entropy = -(p * p.clamp_min(torch.finfo(l1.dtype).tiny).log()).sum()
        return regularize_activation * total + regularize_entropy * entropy

    # -- grid adaptation -------------------------------------------------------------------------

    def _grid_samples(self, x: Tensor) -> Tensor:  # (in_channels, S): what each channel's phi see
        raise NotImplementedError

    @torch.no_grad()
    def update_grid(self, x: Tensor, margin: float = 0.01, max_samples: int = 4096) -> None:
        """Adapt each input channel's basis state to the values ``x`` brings, keeping the layer's function.

        B-splines: the ``G + 1`` grid points become ``grid_eps * uniform + (1 - grid_eps) *
        quantiles`` of the channel's inputs (the uniform part spans the data plus ``margin``),
        extended by ``K`` uniform steps on each side. ``rbf``, ``wavelet`` and ``relu`` move their
        evenly spaced centres onto the data range plus ``margin``; the other families have no grid
        (``ValueError``). The coefficients are then refitted by least squares so that every
        ``phi`` takes the same values on those inputs as before (up to what the new state can
        represent). The solver (SVD-based ``gelsd``, in float64) copes with rank-deficient data
        such as constant channels or very few samples.
        """
        basis = self.basis
        if not basis.has_grid:
            raise ValueError(f"basis {self.basis_name!r} has no grid to adapt; update_grid applies to "
                             "bspline, rbf, wavelet and relu")
        samples = self._grid_samples(x).detach()  # (C, S)
        coeff, restore = self._coefficients_by_channel()
        solved = basis.update_grid(samples.T, coeff, margin=margin, grid_eps=self.grid_eps, max_samples=max_samples)
        self.spline_weight.copy_(restore(solved))

    def _coefficients_by_channel(self):
        out_c, in_g = self.base_weight.shape[:2]
        g = self.groups
        nb = self.spline_weight.shape[-1]
        P = self.base_weight[0, 0].numel()
        sw = self.spline_weight.detach().reshape(g, out_c // g, in_g, P, nb)
        coeff = sw.permute(0, 2, 4, 1, 3).reshape(g * in_g, nb, (out_c // g) * P)

        def restore(c: Tensor) -> Tensor:
            c = c.reshape(g, in_g, nb, out_c // g, P).permute(0, 3, 1, 4, 2)
            return c.reshape(self.spline_weight.shape)

        return coeff, restore

    def _kan_repr(self) -> str:
        parts = []
        if self.basis_name != "bspline":
            parts.append(f"basis={self.basis_name!r}")
        if self.degree != 3:
            parts.append(f"degree={self.degree}")
        if self.grid_size != 5:
            parts.append(f"grid_size={self.grid_size}")
        if self.spline_order != 3:
            parts.append(f"spline_order={self.spline_order}")
        if self.grid_range != (-1.0, 1.0):
            parts.append(f"grid_range={self.grid_range}")
        if not isinstance(self.base_activation, nn.SiLU):
            name = getattr(self.base_activation, "__name__", None) or type(self.base_activation).__name__
            parts.append(f"base_activation={name}")
        for name, default in (("scale_noise", 0.1), ("scale_base", 1.0), ("scale_spline", 1.0), ("grid_eps", 0.02)):
            if getattr(self, name) != default:
                parts.append(f"{name}={getattr(self, name)}")
        if self.implementation != "fused":
            parts.append(f"implementation={self.implementation!r}")
        return ", ".join(parts)


class _KANConvNd(_KANLayer):
    """The N-d KAN convolution; ``KANConv1d/2d/3d`` only fix ``N``."""

    _ndim: int = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Sequence[int]],
        stride: Union[int, Sequence[int]] = 1,
        padding: Union[str, int, Sequence[int]] = 0,
        dilation: Union[int, Sequence[int]] = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros",
        device=None,
        dtype=None,
        *,
        grid_size: int = 5,  # intervals of the uniform grid on grid_range
        spline_order: int = 3,  # degree of the B-splines (3 = cubic)
        grid_range: Sequence[float] = (-1.0, 1.0),  # where the initial knots lie; inputs outside get the base term only
        base_activation: Union[type[nn.Module], Callable[[Tensor], Tensor]] = nn.SiLU,
        scale_noise: float = 0.1,  # amplitude of the initial spline noise
        scale_base: float = 1.0,  # kaiming 'a' factor of w_base
        scale_spline: float = 1.0,  # kaiming 'a' factor of w_scale
        grid_eps: float = 0.02,  # update_grid: share of the uniform grid in the adapted knots
        implementation: Implementation = "fused",  # "naive": dense expansion kept by autograd (twice differentiable)
        basis: Union[str, Basis] = "bspline",  # family of the functions f_g (kanvolution.bases)
        degree: int = 3,  # degree D of the polynomial families
        basis_options: dict | None = None,  # further options of the family (e.g. alpha, beta)
    ) -> None:
        super().__init__()
        n = self._ndim
        in_channels = _check_int("in_channels", in_channels, 1)
        out_channels = _check_int("out_channels", out_channels, 1)
        groups = _check_int("groups", groups, 1)
        if in_channels % groups:
            raise ValueError(f"in_channels must be divisible by groups, got in_channels={in_channels}, groups={groups}")
        if out_channels % groups:
            raise ValueError(f"out_channels must be divisible by groups, got out_channels={out_channels}, groups={groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = KF._ntuple(kernel_size, n, "kernel_size")
        self.stride = KF._ntuple(stride, n, "stride")
        self.dilation = KF._ntuple(dilation, n, "dilation")
        for name in ("kernel_size", "stride", "dilation"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if padding_mode not in KF._PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {KF._PADDING_MODES}, got {padding_mode!r}")
        self.padding = padding if isinstance(padding, str) else KF._ntuple(padding, n, "padding")
        self._pad = KF.resolve_padding(self.padding, self.kernel_size, self.dilation, self.stride)
        self.padding_mode = padding_mode
        self._init_kan(
            in_channels, (out_channels, in_channels // groups) + self.kernel_size, math.prod(self.kernel_size), bias,
            grid_size=grid_size, spline_order=spline_order, grid_range=grid_range, base_activation=base_activation,
            scale_noise=scale_noise, scale_base=scale_base, scale_spline=scale_spline, grid_eps=grid_eps,
            implementation=implementation, basis=basis, degree=degree, basis_options=basis_options,
            device=device, dtype=dtype,
        )

    def _check_input(self, input: Tensor) -> tuple[Tensor, bool]:
        n = self._ndim
        if not isinstance(input, Tensor):
            raise TypeError(f"{type(self).__name__} expects a Tensor, got {type(input).__name__}")
        if input.dim() not in (n + 1, n + 2):
            raise ValueError(
                f"{type(self).__name__} expects an input of {n + 2} dimensions (N, C, *spatial) or {n + 1} "
                f"(C, *spatial), got {input.dim()} dimensions of shape {tuple(input.shape)}"
            )
        unbatched = input.dim() == n + 1
        x = input.unsqueeze(0) if unbatched else input
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expected input with {self.in_channels} channels, got "
                f"{x.shape[1]} (input of shape {tuple(input.shape)})"
            )
        return x, unbatched

    def forward(self, input: Tensor) -> Tensor:
        x, unbatched = self._check_input(input)
        if self.implementation == "reference" and self.basis_name != "bspline":
            from .bases import kan_conv_reference

            out = kan_conv_reference(x, self.basis, self.base_weight, self.spline_weight, self.spline_scaler,
                                     self.stride, self.padding, self.dilation, self.groups, self.padding_mode,
                                     self.base_activation, self.bias)
        elif self.implementation == "reference":
            from .reference import kan_conv_reference

            out = kan_conv_reference(x, self.base_weight, self.spline_weight, self.spline_scaler, self.grid,
                                     self.bias, self.stride, self.padding, self.dilation, self.groups,
                                     self.padding_mode, self.spline_order, self.base_activation)
        else:
            out = KF._kan_convnd(self._ndim, x, self.base_weight, self.spline_weight, self.spline_scaler,
                                 self.grid, self.bias, self.stride, self.padding, self.dilation, self.groups,
                                 self.padding_mode, self.basis_option, self._activation(),
                                 naive=self.implementation == "naive", basis=self.basis_name)
        return out.squeeze(0) if unbatched else out

    def _grid_samples(self, x: Tensor) -> Tensor:
        x, _ = self._check_input(x)
        xp = KF.pad_input(x, self._pad, self.padding_mode)
        return xp.transpose(0, 1).reshape(self.in_channels, -1)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        n = self._ndim
        if self.padding != (0,) * n:
            s += f", padding={self.padding!r}" if isinstance(self.padding, str) else f", padding={self.padding}"
        if self.dilation != (1,) * n:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is not None:
            s += ", bias=True"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        kan = self._kan_repr()
        return s + (", " + kan if kan else "")


_CONV_DOC = r"""Applies a {n}-d KAN convolution: ``nn.Conv{n}d`` with a learnable function per kernel tap.

    For output channel ``o`` the layer computes
    ``out[n, o, p] = bias[o] + sum_{{i, u}} phi[o, i, u](xp[n, i, p * stride + u * dilation])``
    where ``xp`` is the input padded FIRST (so a zero-padded pixel contributes ``phi(0)``) and
    ``phi(t) = w_base * silu(t) + w_scale * sum_g c_g B_g(t)`` with ``G + K`` B-splines of degree
    ``K`` on the input channel's knots. Inputs outside the knots get the base term only: keep
    inputs inside ``grid_range`` (e.g. normalise) or call :meth:`update_grid` on typical data.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode, device, dtype: as ``nn.Conv{n}d`` (``bias`` defaults to False, as the paper).
        grid_size: intervals ``G`` of the initial uniform grid on ``grid_range``.
        spline_order: degree ``K`` of the B-splines.
        grid_range: ``(low, high)`` of the initial grid.
        base_activation: module class (or callable) of the base term. SiLU, Identity, ReLU, GELU,
            Tanh, Sigmoid, Mish (modules or torch functions) run in the fused op; any other
            callable runs the naive path (same result, slower, more memory).
        scale_noise, scale_base, scale_spline: initialisation scales (as the paper's code).
        grid_eps: share of the uniform grid when :meth:`update_grid` adapts the knots.
        implementation: ``"fused"`` (default: fast, memory-lean), ``"naive"`` (dense expansion
            kept by autograd; twice differentiable) or ``"reference"`` (the slow per-pair loop of
            :mod:`kanvolution.reference`, :func:`kanvolution.bases.kan_conv_reference` for the
            other families).
        basis: the family of the functions ``f_g`` replacing the B-splines ``B_g``: a name of
            :func:`kanvolution.bases.list_bases` (``"bspline"``, ``"rbf"``, ``"wavelet"``,
            ``"chebyshev"``, ``"legendre"``, ``"gram"``, ``"jacobi"``, ``"bernstein"``,
            ``"fourier"``, ``"relu"``) built from ``grid_size``, ``spline_order``, ``grid_range``,
            ``degree`` and ``basis_options``, or a :class:`kanvolution.bases.Basis` (its state is
            copied). Every family runs in the same fused op; ``spline_weight`` ends in the
            family's number of functions.
        degree: degree ``D`` of the polynomial families (``D + 1`` functions).
        basis_options: further options of the family by name (``alpha``/``beta`` for jacobi,
            ``gram_points`` for gram, ``constant_term`` for fourier).

    Shape:
        - Input: ``(N, C_in, {dims})`` or ``(C_in, {dims})``.
        - Output: ``(N, C_out, {dims_out})`` where, per spatial dimension,
          ``out = floor((in + pad_left + pad_right - dilation * (kernel_size - 1) - 1) / stride + 1)``.

    Examples:
        >>> import torch
        >>> from kanvolution import {name}
        >>> layer = {name}(2, 4, 3, padding=1, grid_size=8)
        >>> layer(torch.randn({example})).shape
        torch.Size([{example_out}])
    """


class KANConv1d(_KANConvNd):
    _ndim = 1


class KANConv2d(_KANConvNd):
    _ndim = 2


class KANConv3d(_KANConvNd):
    _ndim = 3


KANConv1d.__doc__ = _CONV_DOC.format(n=1, name="KANConv1d", dims="L", dims_out="L_out", example="5, 2, 16",
                                     example_out="5, 4, 16")
KANConv2d.__doc__ = _CONV_DOC.format(n=2, name="KANConv2d", dims="H, W", dims_out="H_out, W_out",
                                     example="5, 2, 8, 8", example_out="5, 4, 8, 8")
KANConv3d.__doc__ = _CONV_DOC.format(n=3, name="KANConv3d", dims="D, H, W", dims_out="D_out, H_out, W_out",
                                     example="1, 2, 4, 6, 6", example_out="1, 4, 4, 6, 6")


class KANLinear(_KANLayer):
    """Dense KAN layer: ``out[..., o] = bias[o] + sum_i phi[o, i](x[..., i])`` with the same ``phi``.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear`` (``bias`` defaults to False).
        grid_size, spline_order, grid_range, base_activation, scale_noise, scale_base,
        scale_spline, grid_eps, implementation, basis, degree, basis_options: as :class:`KANConv2d`.

    Shape:
        - Input: ``(*, in_features)``. Output: ``(*, out_features)``.

    Examples:
        >>> import torch
        >>> from kanvolution import KANLinear
        >>> KANLinear(6, 3)(torch.randn(2, 7, 6)).shape
        torch.Size([2, 7, 3])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device=None,
        dtype=None,
        *,
        grid_size: int = 5,
        spline_order: int = 3,
        grid_range: Sequence[float] = (-1.0, 1.0),
        base_activation: Union[type[nn.Module], Callable[[Tensor], Tensor]] = nn.SiLU,
        scale_noise: float = 0.1,
        scale_base: float = 1.0,
        scale_spline: float = 1.0,
        grid_eps: float = 0.02,
        implementation: Implementation = "fused",
        basis: Union[str, Basis] = "bspline",
        degree: int = 3,
        basis_options: dict | None = None,
    ) -> None:
        super().__init__()
        self.in_features = self.in_channels = _check_int("in_features", in_features, 1)
        self.out_features = self.out_channels = _check_int("out_features", out_features, 1)
        self.groups = 1
        self._init_kan(
            in_features, (out_features, in_features), in_features, bias,
            grid_size=grid_size, spline_order=spline_order, grid_range=grid_range, base_activation=base_activation,
            scale_noise=scale_noise, scale_base=scale_base, scale_spline=scale_spline, grid_eps=grid_eps,
            implementation=implementation, basis=basis, degree=degree, basis_options=basis_options,
            device=device, dtype=dtype,
        )

    def _check_input(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"KANLinear expects a Tensor, got {type(input).__name__}")
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            raise ValueError(
                f"KANLinear expected input of shape (*, {self.in_features}), got {tuple(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        if self.implementation == "reference" and self.basis_name != "bspline":
            from .bases import kan_conv_reference

            x = input.reshape(-1, self.in_features, 1)
            out = kan_conv_reference(x, self.basis, self.base_weight[..., None], self.spline_weight[:, :, None],
                                     self.spline_scaler[..., None], activation=self.base_activation,
                                     bias=self.bias)
            return out.reshape(input.shape[:-1] + (self.out_features,))
        if self.implementation == "reference":
            from .reference import kan_linear_reference

            return kan_linear_reference(input, self.base_weight, self.spline_weight, self.spline_scaler,
                                        self.grid, self.bias, self.spline_order, self.base_activation)
        return KF._kan_linear(input, self.base_weight, self.spline_weight, self.spline_scaler, self.grid,
                              self.bias, self.basis_option, self._activation(),
                              naive=self.implementation == "naive", basis=self.basis_name)

    def _grid_samples(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return x.reshape(-1, self.in_features).T

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}"
        if self.bias is not None:
            s += ", bias=True"
        kan = self._kan_repr()
        return s + (", " + kan if kan else "")


# ------------------------------------------------------------------------------------------------
# Model-level helpers
# ------------------------------------------------------------------------------------------------


def kan_layers(model: nn.Module) -> Iterator[tuple[str, _KANLayer]]:
    """``(name, layer)`` for every KAN layer of ``model`` (itself included)."""
    for name, module in model.named_modules():
        if isinstance(module, _KANLayer):
            yield name, module


def regularization_loss(model: nn.Module, regularize_activation: float = 1.0,
                        regularize_entropy: float = 1.0) -> Tensor:
    """Sum of :meth:`regularization_loss` over every KAN layer of ``model``.

    Examples:
        >>> import torch
        >>> from kanvolution import KANConv2d, regularization_loss
        >>> model = torch.nn.Sequential(KANConv2d(1, 2, 3), KANConv2d(2, 2, 3))
        >>> regularization_loss(model).requires_grad
        True
    """
    terms = [m.regularization_loss(regularize_activation, regularize_entropy) for _, m in kan_layers(model)]
    if not terms:
        raise ValueError("the model has no KAN layers to regularise")
    return torch.stack(terms).sum()


@torch.no_grad()
def update_grids(model: nn.Module, *args, **kwargs):
    """Run ``model(*args, **kwargs)`` once, adapting every KAN layer's knots to its actual input.

    Layers are updated in the order the forward pass reaches them, each on the input produced by
    the already-updated layers before it. Returns the model's output.
    """
    handles = [m.register_forward_pre_hook(lambda mod, inputs: mod.update_grid(inputs[0]))
               for _, m in kan_layers(model)]
    if not handles:
        raise ValueError("the model has no KAN layers whose grids could be updated")
    try:
        return model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
