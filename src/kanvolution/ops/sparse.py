"""When the op's CPU kernels run the direct sparse kernels (:mod:`kanvolution._sparse`).

The dense fused path pays ``G + K + 1`` multiply-adds per kernel tap and output channel; the sparse
kernels pay ``K + 2`` whatever the grid size, but at a lower rate per multiply-add. They come in
two forms, chosen by :func:`kanvolution._sparse.default_kernel` from the layer's width. The CPU
kernels of ``kanvolution::kan_forward`` / ``kan_backward`` call :func:`forward` / :func:`backward`
first (those of the ``_factored`` pair :func:`forward_factored` / :func:`backward_factored`); they
return ``None`` (nothing done) and the dense path runs when the rule says dense.

The sparse kernels apply to B-spline bases on uniform knots (adapted knots: dense), the SiLU base
term, spline order 1..16, float32/float64 with ``x``, knots and weight of one dtype (so not under
autocast), a non-empty batch, and the compiled CPU kernels enabled and built. Where they apply,
the mode decides:

- ``"auto"`` (the default): on layers with fewer than ``128 / itemsize`` output channels per group
  (32 in float32, 16 in float64), which run the narrow kernels (vectorised over the kernel taps
  and output channels of each input value), sparse when ``grid_size >= 7``; on wider layers, which
  run the wide kernels (vectorised over output channels), sparse when ``grid_size >= 10``;
- dense layers (``KANLinear``: ``x`` of shape ``(N, C)``) run as a kernel-1 convolution over a
  sequence of length ``N``; those of fewer outputs per group than above take the narrow kernels
  only from ``N >= 2048`` values per channel (the wide ones below, in every mode: the narrow
  kernels' per-weight tables cost more than they save on fewer values), and in ``"auto"`` go
  sparse from ``grid_size >= 10`` on the narrow or wide-width layers' kernels, from
  ``grid_size >= 20`` on the wide kernels standing in for the narrow ones;
- ``"always"``: sparse wherever they apply;
- ``"never"``: the dense path only.

The environment variable ``KANVOLUTION_SPARSE`` sets the mode; :func:`set_mode` overrides it
within a process.

Examples:
    >>> set_mode("never"); mode()
    'never'
    >>> set_mode(None)
"""
from __future__ import annotations

import os
import weakref

import torch
from torch import Tensor

from . import build
from .bspline import _uniform_spacing

__all__ = ["MODES", "ENV_VAR", "set_mode", "mode", "use_sparse", "forward", "backward", "forward_factored",
           "backward_factored", "combined_shape"]

ENV_VAR = "KANVOLUTION_SPARSE"
MODES = ("auto", "always", "never")
# The rule of "auto" (see the module docstring), from same-run ratios to nn.Conv2d of forward +
# backward (benchmarks/sparse_kernel.py --sweep: 1 thread, float32, a quiet 2-core Xeon with
# AVX-512; dense / narrow / wide):
#   1->5 on (128, 1, 28, 28):    gs 3: 1.4 / 1.1, 5: 1.8 / 1.4, 7: 1.9 / 1.1, 10: 2.1 / 1.0
#   5->10 on (128, 5, 13, 13):   gs 3: 3.9 / 5.5, 5: 4.4 / 4.5, 7: 5.4 / 4.4, 10: 6.6 / 4.3
#   16->8 / 16->16 on (16, 16, 32, 32), padding 1: gs 5: 7.8 / 7.1 and 8.1 / 9.3; gs 10: 11.1 / 7.8
#   and 12.2 / 8.9 (wide 10.2)
#   16->32, gs 10: 10.3-10.7 / 10.0-10.1 / 7.4-8.8 (three runs); 16->64: 9.5 / - / 7.3-7.7
# So the narrow kernels below 32 float32 outputs per group from gs = 7, the wide kernels above
# from gs = 10 (64->64 at gs = 10: dense 15.0, wide 8.5).
NARROW_MIN_GRID_SIZE = 7
MIN_GRID_SIZE = 10
# Dense layers (KANLinear), forward + backward over the dense path (1 thread, float32, 2-core AMD
# EPYC; narrow / wide kernels):
#   64->10: batch 128: gs 10 1.28 / 1.05, gs 20 1.72 / 1.04; 512: 1.11 / 1.35, 1.11 / 1.21;
#           2048: 0.90 / 1.40, 0.54 / 0.83
#   784->24: 128: 4.18 / 1.09, 4.30 / 0.89; 512: 1.16 / 1.08, 1.19 / 0.61; 2048: 0.82 / 1.30, 0.53 / 0.68
#   256->16: 128: 1.97 / 0.99, 2.05 / 0.78; 512: 1.00 / 0.83, 0.86 / 0.57; 2048: 0.73 / 0.86, 0.51 / 0.60
#   wider (wide kernels, 2 threads): 512->512 batch 1024 gs 5 / 10 / 20 / 50: 0.80 / 0.54 / 0.37 / 0.17;
#   784->64: 0.98 / 0.71 / 0.41 / 0.19; 256->256 batch 4096: 0.92 / 0.61 / 0.40 / 0.19
DENSE_NARROW_MIN_BATCH = 2048
DENSE_MIN_GRID_SIZE = 10
DENSE_STAND_IN_MIN_GRID_SIZE = 20

_override: str | None = None


def _check_mode(value: str, source: str) -> str:
    if value not in MODES:
        raise ValueError(f"{source} must be one of {', '.join(MODES)}; got {value!r}")
    return value


def set_mode(value: str | None) -> None:
    """Set the sparse mode (``"auto"``, ``"always"``, ``"never"``) in this process; ``None``
    restores the default (``KANVOLUTION_SPARSE``, else ``"auto"``)."""
    global _override
    _override = None if value is None else _check_mode(value, "the sparse mode")


def mode() -> str:
    """The sparse mode in effect."""
    if _override is not None:
        return _override
    return _check_mode(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


def use_sparse(x: Tensor, state: Tensor, weight: Tensor, basis: str, option: int, activation: str, groups: int) -> bool:
    """Whether the op's CPU kernel runs the sparse kernels for these arguments (may build them)."""
    chosen = mode()
    if (
        chosen == "never"
        or basis != "bspline"
        or activation != "silu"
        or not 1 <= option <= build.MAX_ORDER
        or x.dtype not in (torch.float32, torch.float64)
        or not x.dtype == state.dtype == weight.dtype
        or x.numel() == 0
        or not build.is_enabled()
    ):
        return False
    from .. import _sparse

    if chosen == "auto":
        grid_size = state.shape[-1] - 2 * option - 1
        width = _sparse.default_kernel(weight.shape[0] // groups, x.element_size())
        if x.dim() == 2:  # a dense layer
            stand_in = width == "narrow" and _kernel(x) == "wide"
            least = DENSE_STAND_IN_MIN_GRID_SIZE if stand_in else DENSE_MIN_GRID_SIZE
        else:
            least = NARROW_MIN_GRID_SIZE if width == "narrow" else MIN_GRID_SIZE
        if grid_size < least:
            return False
    if _uniform_spacing(state) is None:
        return False

    return _sparse.available()


def combined_shape(base_weight: Tensor, spline_weight: Tensor) -> tuple[int, ...]:
    """The shape :func:`kanvolution.functional.combine_weights` gives the layer's three weights:
    ``(O, C/groups * (1 + n), *kernel)``."""
    o, cg = base_weight.shape[:2]
    return (o, cg * (1 + spline_weight.shape[-1])) + tuple(base_weight.shape[2:])


def _conv(x: Tensor, state: Tensor, weight_shape, option: int, stride, dilation, groups: int):
    """The sparse kernels' call for the op's channel-last ``x`` ``(N, *S, C)``.

    A dense layer's ``(N, C)`` (no spatial dimensions) runs as a kernel-1 convolution over one
    sequence of length ``N`` (``(1, C, N)``): the kernels tile and bucket values along the spatial
    positions, so a bucket's weight rows then serve many samples instead of one (see :func:`_out`,
    :func:`_grad_out` for the matching views)."""
    from .. import _sparse

    if not stride:
        return _sparse._Conv(x.t().unsqueeze(0), *_sparse.knot_params(state), tuple(weight_shape) + (1,), option,
                             1, 1, groups, _kernel(x))
    return _sparse._Conv(x.movedim(-1, 1), *_sparse.knot_params(state), weight_shape, option, list(stride) or 1,
                         list(dilation) or 1, groups)


def _kernel(x: Tensor) -> str | None:
    """The kernels of a call (``None``: :func:`kanvolution._sparse.default_kernel`'s, by width): a
    dense layer's ``(N, C)`` takes the wide kernels where the narrow ones would serve fewer than
    :data:`DENSE_NARROW_MIN_BATCH` values per channel."""
    if x.dim() != 2 or x.shape[0] >= DENSE_NARROW_MIN_BATCH:
        return None
    return "wide"


def _grad_out(grad_out: Tensor, stride) -> Tensor:
    """The op's output gradient as the kernels' call of :func:`_conv` sees it (a dense layer's
    ``(N, O)`` as ``(1, O, N)``, a view)."""
    return grad_out if stride else grad_out.t().unsqueeze(0)


class _PackedKey:
    """What packing weights into a kept buffer put there: the weights' storage, version counter,
    shape, strides and dtype (an in-place change moves the version), the packing's geometry and the
    buffer, and the weight tensors themselves, held weakly: a key matches only while the same tensor
    objects are alive. (Storage addresses and version counters alone do not tell a freed layer's
    weights from a new layer's allocated at the same addresses with the same number of in-place
    initialisations: its packed weight would be taken for the new layer's.)"""

    def __init__(self, conv, weights: tuple[Tensor, ...], buffer: Tensor | None):
        self.fields = (conv.packed_shape(), conv.groups, conv.K, conv.kernel_kind,
                       None if buffer is None else buffer.data_ptr()) + tuple(
            (w.data_ptr(), w._version, tuple(w.shape), w.stride(), w.dtype) for w in weights)
        self.refs = tuple(weakref.ref(w) for w in weights)

    def matches(self, other: "_PackedKey") -> bool:
        return self.fields == other.fields and all(
            a() is not None and a() is b() for a, b in zip(self.refs, other.refs))


def _packed_key(conv, weight, buffer: Tensor | None) -> _PackedKey | None:
    """The :class:`_PackedKey` of packing ``weight`` (one tensor or the three weights) into
    ``buffer`` (``None``: the narrow kernels' tables); ``None`` where a weight has no version
    counter (an inference tensor)."""
    try:
        return _PackedKey(conv, weight if isinstance(weight, tuple) else (weight,), buffer)
    except RuntimeError:
        return None


def _prepare_packed(conv, weight, forward: bool, derivative: bool):
    """``conv.prepare``: the forward always packs (into the kept ``"packed"`` buffer on the wide
    kernels) and records what it packed; the backward reuses the forward's packing where the record
    still matches these weights (the backward right after its forward: a lone layer's, or the last
    layer's in a network on the wide kernels; every layer's on the narrow kernels, whose small tables
    are kept for several weights), and packs again otherwise.

    Only the backward reuses: an in-place change through ``.data`` does not move a tensor's version
    counter, so between two forwards it would go unseen (``p.data.mul_(2)`` before the next forward
    must change its output). Between a forward and its backward such a change is not seen either:
    the backward then differentiates the weights the forward used."""
    from .kan import _workspace_contents

    scratch = _scratch(conv, weight, "packed")
    if scratch is None:
        return _narrow_tables(conv, weight, forward)
    key = _packed_key(conv, weight, scratch)
    contents = _workspace_contents()
    held = contents.get("packed")
    if not forward and key is not None and held is not None and key.matches(held):
        return scratch
    contents.pop("packed", None)
    prepared = conv.prepare(weight, forward=forward, derivative=derivative, out=scratch)
    if key is not None:
        contents["packed"] = key
    return prepared


# The narrow kernels' tables kept for the last few weights (small: the narrow layers have few outputs).
NARROW_TABLES_KEPT = 8


def _narrow_tables(conv, weight, forward: bool):
    """The narrow kernels' tables of ``weight`` (both the power form and the derivative): built by
    the forward and kept (this thread's ``"narrow"`` record, newest first, at most
    :data:`NARROW_TABLES_KEPT`), found by the backward (see :func:`_prepare_packed`)."""
    from .kan import _workspace_contents

    key = _packed_key(conv, weight, None)
    kept = _workspace_contents().setdefault("narrow", [])
    if key is not None:
        for i, (held, tables) in enumerate(kept):
            if key.matches(held):
                if not forward:
                    return tables
                del kept[i]
                break
    tables = conv.prepare(weight, forward=True, derivative=True)
    if key is not None:
        kept.insert(0, (key, tables))
        del kept[NARROW_TABLES_KEPT:]
    return tables


def _forward(x, state, weight, weight_shape, option, stride, dilation, groups, channels_last) -> Tensor:
    from .kan import _canonical, _memory_format

    conv = _conv(x, state, weight_shape, option, stride, dilation, groups)
    prepared = _prepare_packed(conv, weight, True, False)
    if not stride:  # (1, O, N) with channels-last strides: (N, O), contiguous
        return conv.forward(prepared, channels_last=True)[0].t()
    fmt = _memory_format(len(stride), channels_last)
    return _canonical(conv.forward(prepared, channels_last=fmt != torch.contiguous_format), fmt)


def forward(x, state, weight, basis, option, activation, stride, dilation, groups, channels_last) -> Tensor | None:
    """``kan_forward`` by the sparse kernels, or ``None`` where the rule says dense."""
    if not use_sparse(x, state, weight, basis, option, activation, groups):
        return None
    return _forward(x, state, weight, weight.shape, option, stride, dilation, groups, channels_last)


def _use_sparse_factored(x, state, weights, basis, option, activation, groups) -> bool:
    """:func:`use_sparse` for the three weights (which must share one dtype)."""
    return (all(w.dtype == weights[0].dtype for w in weights)
            and use_sparse(x, state, weights[0], basis, option, activation, groups))


def forward_factored(x, state, base_weight, spline_weight, spline_scaler, basis, option, activation, stride,
                     dilation, groups, channels_last) -> Tensor | None:
    """``kan_forward_factored`` by the sparse kernels (the three weights packed in one pass, their
    combination never built), or ``None`` where the rule says dense."""
    weights = (base_weight, spline_weight, spline_scaler)
    if not _use_sparse_factored(x, state, weights, basis, option, activation, groups):
        return None
    return _forward(x, state, weights, combined_shape(base_weight, spline_weight), option, stride, dilation, groups,
                    channels_last)


def _scratch(conv, weight, slot: str) -> Tensor | None:
    """A kept buffer of the packed weight's shape, dtype of ``weight`` (or of the first of the three
    weights), for the wide kernels (``None``: the narrow kernels, which keep their own tables). The
    packed weight and its gradient only live within one call, and at tens of MiB a fresh one costs as
    much in page faults as packing it."""
    if conv.narrow:
        return None
    from .kan import _workspace_tensor

    return _workspace_tensor(conv.packed_shape(), weight[0] if isinstance(weight, tuple) else weight, slot)


def _backward(conv, grad_out, x, weight, need_x, need_w, unpack: bool):
    """The input gradient (``(N, *S, C)`` or empty) and the weight gradient: combined layout (of
    ``conv.weight_shape``), or packed (``unpack=False``: possibly a kept buffer, to be consumed before
    the next call)."""
    prepared = None
    if need_x or conv.narrow:
        prepared = _prepare_packed(conv, weight, False, need_x)
    scratch = _scratch(conv, weight, "packed_grad") if need_w else None
    gx, gw = conv.backward(grad_out, prepared, conv.x.shape, need_x, need_w, scratch=scratch, unpack=unpack)
    return _grad_x(gx, x, need_x), gw


def _grad_x(gx, x, need_x: bool) -> Tensor:
    """The kernels' input gradient ``(N, C, *S)`` (channel-first, flat spatial) shaped like ``x``
    (with ``x``'s strides: no copy for a layer's channel-first input)."""
    from .kan import _grad_input_like

    return _grad_input_like(gx.movedim(1, -1).reshape(x.shape), x) if need_x else x.new_empty(0)


def backward(grad_out, x, state, weight, basis, option, activation, stride, dilation, groups,
             output_mask) -> tuple[Tensor, Tensor] | None:
    """``kan_backward`` by the sparse kernels, or ``None`` where the rule says dense."""
    if not use_sparse(x, state, weight, basis, option, activation, groups):
        return None
    need_x, need_w = output_mask
    conv = _conv(x, state, weight.shape, option, stride, dilation, groups)
    grad_x, gw = _backward(conv, _grad_out(grad_out, stride), x, weight, need_x, need_w, True)
    from .kan import _strided_like

    return grad_x, (_strided_like(gw.view(weight.shape), weight) if need_w else weight.new_empty(0))


def backward_factored(grad_out, x, state, base_weight, spline_weight, spline_scaler, basis, option, activation,
                      stride, dilation, groups, output_mask) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """``kan_backward_factored`` by the sparse kernels (the packed weight gradient split into the
    three weights' gradients: by the wide kernels channel by channel as each is final, else in one
    pass after the backward), or ``None`` where the rule says dense."""
    weights = (base_weight, spline_weight, spline_scaler)
    if not _use_sparse_factored(x, state, weights, basis, option, activation, groups):
        return None
    need_x, need = output_mask[0], list(output_mask[1:])
    weight_shape = combined_shape(base_weight, spline_weight)
    conv = _conv(x, state, weight_shape, option, stride, dilation, groups)
    grad_out = _grad_out(grad_out, stride)
    if any(need) and not conv.narrow:
        # The wide kernels split each channel's packed gradient as soon as it is final (in cache).
        prepared = _prepare_packed(conv, weights, False, True) if need_x else None
        gx, grads = conv.backward3(grad_out, prepared, conv.x.shape, need_x, spline_weight, spline_scaler, need,
                                   scratch=_scratch(conv, weights, "packed_grad"))
        grad_x = _grad_x(gx, x, need_x)
    else:
        grad_x, gw = _backward(conv, grad_out, x, weights, need_x, any(need), False)
        grads = conv.unpack3(gw, spline_weight, spline_scaler, need) if any(need) else (None, None, None)
    from .kan import _strided_like

    return (grad_x, *(w.new_empty(0) if g is None else _strided_like(g, w) for g, w in zip(grads, weights)))
