"""The B-spline basis family: dense Cox-de Boor bases, the local (``K + 1`` non-zero) bases used
by the fused op, and the compiled CPU loops for uniform knots.

On uniform knots the ``K + 1`` pieces are fixed polynomials of the position in the span
(closed form, Horner); on any other knots they come from the de Boor recursion on the span's
own knots. Whether the knots are uniform is read from the knot tensor inside the op's kernels
(never while tracing), and cached on that tensor.
"""
from __future__ import annotations

import functools
from fractions import Fraction

import torch
from torch import Tensor

from . import build

__all__ = ["b_splines", "num_bases", "fill", "input_grad", "dense", "cpu_fill", "cpu_input_grad"]

def b_splines(x: Tensor, grid: Tensor, spline_order: int) -> Tensor:
    """Dense B-spline bases by the Cox-de Boor recursion.

    Args:
        x: values of shape ``(N, C, *)``.
        grid: knots of shape ``(C, G + 2K + 1)``, non-decreasing along the last dimension.
        spline_order: the degree ``K``.

    Returns:
        ``(N, C, *, G + K)``: all bases of every value, zero outside ``[t_0, t_{G+2K})``.
    """
    extra = x.dim() - 2
    t = grid.view(1, grid.shape[0], *([1] * extra), grid.shape[1])
    v = x.unsqueeze(-1)
    bases = ((v >= t[..., :-1]) & (v < t[..., 1:])).to(x.dtype)
    for k in range(1, spline_order + 1):
        left = (v - t[..., : -(k + 1)]) / (t[..., k:-1] - t[..., : -(k + 1)]) * bases[..., :-1]
        right = (t[..., k + 1 :] - v) / (t[..., k + 1 :] - t[..., 1:(-k)]) * bases[..., 1:]
        bases = left + right
    return bases


@functools.lru_cache(maxsize=None)
def _uniform_pieces(spline_order: int) -> tuple[tuple[tuple[Fraction, ...], ...], tuple[tuple[Fraction, ...], ...]]:
    """Monomial coefficients of the ``K + 1`` pieces of the uniform B-spline on one span.

    On span ``m`` with local coordinate ``f = (x - t_m) / h`` in ``[0, 1)``, basis ``B_{m-K+r}`` is
    ``sum_p A[p][r] f^p``; its derivative in ``f`` is ``sum_p D[p][r] f^p``. Obtained exactly (in
    rationals) from the de Boor recursion, whose denominators are constant on a uniform grid.
    """
    K = spline_order

    def add(a, b):
        n = max(len(a), len(b))
        return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]

    def mul(a, b):
        out = [Fraction(0)] * (len(a) + len(b) - 1)
        for i, u in enumerate(a):
            for j, v in enumerate(b):
                out[i + j] += u * v
        return out

    values = [[Fraction(1)]]
    for j in range(1, K + 1):
        left = [None] + [[Fraction(i - 1), Fraction(1)] for i in range(1, K + 1)]  # f + i - 1
        right = [None] + [[Fraction(i), Fraction(-1)] for i in range(1, K + 1)]  # i - f
        saved = [Fraction(0)]
        new = []
        for r in range(j):
            temp = [c / j for c in values[r]]  # right[r+1] + left[j-r] == j
            new.append(add(saved, mul(right[r + 1], temp)))
            saved = mul(left[j - r], temp)
        new.append(saved)
        values = new
    A = tuple(tuple(values[r][p] if p < len(values[r]) else Fraction(0) for r in range(K + 1)) for p in range(K + 1))
    D = tuple(tuple((p + 1) * A[p + 1][r] for r in range(K + 1)) for p in range(K))
    return A, D


def _uniform_spacing(grid: Tensor) -> Tensor | None:
    """Per-channel knot spacing if every channel's knots are uniform, else ``None`` (cached)."""
    key = (grid._version, grid.data_ptr())
    cached = getattr(grid, "_kan_uniform_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    m = grid.shape[1] - 1
    h = (grid[:, -1] - grid[:, 0]) / m
    expected = grid[:, :1] + h.unsqueeze(1) * torch.arange(m + 1, device=grid.device, dtype=grid.dtype)
    scale = grid.abs().amax(dim=1) + h.abs()
    tol = 64 * torch.finfo(grid.dtype).eps * scale
    ok = bool(((grid - expected).abs().amax(dim=1) <= tol).all() and (h > 0).all())
    result = h if ok else None
    try:
        grid._kan_uniform_cache = (key, result)
    except (AttributeError, RuntimeError):  # pragma: no cover - tensors that refuse attributes
        pass
    return result


@functools.lru_cache(maxsize=64)
def _uniform_tables(spline_order: int, n_knots: int, dtype: torch.dtype, device: torch.device):
    """Constants of the closed-form path: piece coefficients and per-span slot/validity tables.

    Table index ``row = m + 1`` for span ``m`` in ``-1 .. M`` (``M = n_knots - 1`` spans); rows 0
    and ``M + 1`` stand for "outside the knots". ``slot[r][row]`` is the expansion slot of basis
    ``m - K + r`` (its number plus one), or 0 where that basis does not exist; ``ok[r][row]`` is
    1.0 where it exists, else 0.0.
    """
    K = spline_order
    A, D = _uniform_pieces(K)
    coef = [[float(A[p][r]) for p in range(K + 1)] for r in range(K + 1)]  # coef[r][p]
    dcoef = [[float(D[p][r]) for p in range(K)] for r in range(K + 1)]
    n_spans = n_knots - 1
    n_bases = n_knots - K - 1
    m = torch.arange(-1, n_spans + 1).view(-1, 1)
    g = m - K + torch.arange(K + 1)
    ok = (g >= 0) & (g < n_bases) & (m >= 0) & (m < n_spans)
    slot = torch.where(ok, g + 1, 0).T.contiguous().to(device)
    return coef, dcoef, list(slot), list(ok.T.contiguous().to(dtype=dtype, device=device))


def _polyval(coefs: list[float], f: Tensor) -> Tensor:
    """``sum_p coefs[p] * f ** p`` by Horner's rule (scalar coefficients: vectorised loops)."""
    if len(coefs) == 1:
        return torch.full_like(f, coefs[0])
    out = f * coefs[-1] + coefs[-2]
    for c in reversed(coefs[:-2]):
        out.mul_(f).add_(c)
    return out


def _local_bases(x: Tensor, grid: Tensor, spline_order: int, *, derivative: bool):
    """The ``K + 1`` possibly non-zero bases of every value (and their derivatives).

    Args:
        x: values with the channel LAST, ``(..., C)``.
        grid: ``(C, G + 2K + 1)`` knots.

    A value in knot span ``[t_m, t_{m+1})`` can only have ``B_{m-K} .. B_m`` non-zero. On uniform
    knots these are fixed degree-``K`` polynomials of the position in the span, evaluated in
    closed form (Horner); on any other knots they come from the triangular de Boor recursion on
    the span's own knots. Either way the work is on tensors the size of ``x``, not ``(G + K)``
    times larger, one tensor per piece so that every operation runs over contiguous memory.

    Returns ``(slots, values, slopes)``: lists of ``K + 1`` tensors shaped like ``x``. ``slots[r]``
    is the basis number of ``B_{m-K+r}`` plus one (its position in the expansion; 0 where that
    basis does not exist, and there ``values`` is unspecified: the callers write slot 0 last),
    ``slopes`` the derivatives, zero where the basis does not exist (``None`` unless
    ``derivative``).
    """
    n_knots = grid.shape[1]
    K = spline_order
    spacing = _uniform_spacing(grid) if K > 0 else None
    if spacing is None:
        return _de_boor_local(x, grid, K, derivative)
    coef, dcoef, slot_table, ok_table = _uniform_tables(K, n_knots, x.dtype, x.device)
    inv_h = 1.0 / spacing
    # Position in units of h; NaN goes to "outside" (the base term still carries it).
    u = torch.nan_to_num_((x - grid[:, 0]) * inv_h, nan=-1.0).clamp_(-1.0, n_knots - 1.0)
    m_f = u.floor()
    f = u.sub_(m_f)
    row = m_f.to(torch.long).add_(1)
    slots = [torch.take(t, row) for t in slot_table]
    values = [_polyval(c, f) for c in coef]
    slopes = None
    if derivative:
        slopes = [_polyval(d, f).mul_(torch.take(ok, row)).mul_(inv_h) for d, ok in zip(dcoef, ok_table)]
    return slots, values, slopes


def _de_boor_local(x: Tensor, grid: Tensor, K: int, derivative: bool):
    """:func:`_local_bases` on arbitrary (non-decreasing) knots; ``x`` is ``(..., C)``."""
    c = x.shape[-1]
    n_knots = grid.shape[1]
    n_bases = n_knots - K - 1
    # Knot span by binary search on each channel's own knots: exactly the half-open intervals of
    # the Cox-de Boor recursion, also for values that sit on a knot.
    xc = x.reshape(-1, c).T.contiguous()
    m = (torch.searchsorted(grid, xc, right=True) - 1).T.reshape(x.shape)
    inside = (m >= 0) & (m < n_knots - 1)
    m = m.clamp(0, n_knots - 2)
    values = [torch.ones_like(x)]
    lower = values
    left: list = []
    right: list = []
    if K > 0:
        # Knots t_{m+k}, k = 1-K .. K, from a copy of the knots extended by K steps on each side
        # (the extension only feeds bases outside the range, which are dropped).
        ar = torch.arange(1, K + 1, device=grid.device, dtype=grid.dtype)
        ext = torch.cat([grid[:, :1] - (grid[:, 1:2] - grid[:, :1]) * ar.flip(0), grid,
                         grid[:, -1:] + (grid[:, -1:] - grid[:, -2:-1]) * ar], dim=1)
        flat = ext.reshape(-1)
        base_index = m + torch.arange(c, device=x.device) * ext.shape[1] + K

        def knot(k: int) -> Tensor:
            return flat[base_index + k]

        left = [None] + [x - knot(1 - j) for j in range(1, K + 1)]
        right = [None] + [knot(j) - x for j in range(1, K + 1)]
        for j in range(1, K + 1):
            lower = values
            saved = torch.zeros_like(x)
            new = []
            for r in range(j):
                temp = values[r] / (right[r + 1] + left[j - r])
                new.append(saved + right[r + 1] * temp)
                saved = left[j - r] * temp
            new.append(saved)
            values = new
    valid, slots = [], []
    for r in range(K + 1):
        g = m - K + r
        ok = (g >= 0) & (g < n_bases) & inside
        valid.append(ok)
        slots.append(torch.where(ok, g + 1, 0))
    slopes = None
    if derivative:
        # B'_{g,K} = K (B_{g,K-1} / (t_{g+K} - t_g) - B_{g+1,K-1} / (t_{g+K+1} - t_{g+1})) with
        # g = m - K + r; the degree K-1 bases on this span are B_{m-K+1} .. B_m = lower[0 .. K-1].
        slopes = []
        for r in range(K + 1):
            s = torch.zeros_like(x)
            if K > 0 and r >= 1:
                s = s + lower[r - 1] / (right[r] + left[K - r + 1])
            if K > 0 and r <= K - 1:
                s = s - lower[r] / (right[r + 1] + left[K - r])
            slopes.append(s * K * valid[r])
    return slots, values, slopes


def _scatter_expansion(out: Tensor, slots: list[Tensor], values: list[Tensor]) -> None:
    for slot, value in zip(slots, values):
        out.scatter_(-1, slot.unsqueeze(-1), value.unsqueeze(-1))



# ------------------------------------------------------------------------------------------------
# Compiled CPU loops (uniform knots, 1 <= K <= build.MAX_ORDER)
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _coefficients(spline_order: int) -> tuple[Tensor, Tensor]:
    """Piece and derivative coefficient tables of the compiled loops, ``[r][p]`` in float64."""
    A, D = _uniform_pieces(spline_order)
    K = spline_order
    coef = torch.tensor([[float(A[p][r]) for p in range(K + 1)] for r in range(K + 1)], dtype=torch.float64)
    dcoef = torch.tensor([[float(D[p][r]) for p in range(K)] for r in range(K + 1)], dtype=torch.float64)
    return coef.contiguous(), dcoef.contiguous()


def _compiled_knots(x: Tensor, grid: Tensor, spline_order: int) -> tuple[Tensor, Tensor] | None:
    """``(t_0, 1 / h)`` per channel when the compiled loops can expand ``x`` (``(..., C)``) on
    these knots, else ``None`` (the portable code then runs)."""
    if (
        x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or grid.dtype != x.dtype
        or not 1 <= spline_order <= build.MAX_ORDER
        or x.numel() == 0
        or not build.is_enabled()
    ):
        return None
    spacing = _uniform_spacing(grid)
    if spacing is None or build.load() is None:
        return None
    cached = getattr(grid, "_kan_compiled_knots", None)
    if cached is not None and cached[0] is spacing:  # same spacing object: grid unchanged
        return cached[1]
    # The same two operations as the closed-form path of _local_bases: identical positions.
    knots = (grid[:, 0].contiguous(), (1.0 / spacing).contiguous())
    try:
        grid._kan_compiled_knots = (spacing, knots)
    except (AttributeError, RuntimeError):  # pragma: no cover - tensors that refuse attributes
        pass
    return knots


# ------------------------------------------------------------------------------------------------
# The family's entry points (see kanvolution.ops.bases)
# ------------------------------------------------------------------------------------------------


def num_bases(grid: Tensor, spline_order: int) -> int:
    """``G + K`` bases from ``G + 2K + 1`` knots."""
    return grid.shape[-1] - spline_order - 1


def fill(x: Tensor, grid: Tensor, spline_order: int, act: Tensor, out: Tensor) -> None:
    """Write the expansion rows ``[act, B_0(x), .., B_{G+K-1}(x)]`` of ``x`` (``(..., C)``) into
    ``out`` (``(..., C, G + K + 1)``, contiguous), overwriting every element."""
    slots, values, _ = _local_bases(x, grid, spline_order, derivative=False)
    out.zero_()
    _scatter_expansion(out, slots, values)  # bases that do not exist land in slot 0 ...
    out[..., 0] = act  # ... which is written last


def input_grad(x: Tensor, grid: Tensor, spline_order: int, grad_e: Tensor, g_base: Tensor, out: Tensor) -> None:
    """``out = g_base + sum_g grad_e[..., 1 + g] * dB_g/dx``: the input gradient through the
    expansion (``grad_e`` ``(..., C, G + K + 1)``, any strides; ``out`` contiguous like ``x``)."""
    slots, _, slopes = _local_bases(x, grid, spline_order, derivative=True)
    g = out.copy_(g_base)
    for slot, slope in zip(slots, slopes):
        g.addcmul_(grad_e.gather(-1, slot.unsqueeze(-1)).squeeze(-1), slope)


def cpu_fill(x: Tensor, grid: Tensor, spline_order: int, act: Tensor, out: Tensor) -> bool:
    """:func:`fill` by the compiled loops; ``False`` (nothing written) where they do not apply."""
    knots = _compiled_knots(x, grid, spline_order)
    if knots is None or act.dtype != x.dtype:
        return False
    c, n_slots = x.shape[-1], out.shape[-1]
    build.load().expand(x.reshape(-1, c).contiguous(), *knots, _coefficients(spline_order)[0], grid.shape[1],
                        spline_order, act.reshape(-1, c).contiguous(), out.view(-1, c, n_slots))
    return True


def cpu_input_grad(x: Tensor, grid: Tensor, spline_order: int, grad_e: Tensor, g_base: Tensor, out: Tensor) -> bool:
    """:func:`input_grad` by the compiled loops; ``False`` (nothing written) where they do not apply."""
    knots = _compiled_knots(x, grid, spline_order)
    if knots is None or g_base.dtype != x.dtype or grad_e.dtype != x.dtype:
        return False
    c = x.shape[-1]
    build.load().grad_input(grad_e.reshape(-1, c, grad_e.shape[-1]), x.reshape(-1, c).contiguous(), *knots,
                            _coefficients(spline_order)[1], grid.shape[1], spline_order,
                            g_base.reshape(-1, c).contiguous(), out.view(-1, c))
    return True


def dense(x: Tensor, grid: Tensor, spline_order: int) -> Tensor:
    """All bases of ``x`` (``(N, C, *)``) as ``(N, C, *, G + K)`` by operations that trace
    without reading data (for export and decompositions)."""
    return b_splines(x, grid, spline_order)
