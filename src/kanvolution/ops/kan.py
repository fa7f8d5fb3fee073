"""The fused KAN layer as two ``torch.library`` custom ops, with fake kernels and autograd.

Schemas::

    kanvolution::kan_forward(Tensor x, Tensor state, Tensor weight, str basis, int option,
        str activation, int[] stride, int[] dilation, int groups, bool channels_last) -> Tensor
    kanvolution::kan_backward(Tensor grad_out, Tensor x, Tensor state, Tensor weight, str basis,
        int option, str activation, int[] stride, int[] dilation, int groups,
        bool[] output_mask) -> (Tensor, Tensor)

    kanvolution::kan_forward_factored(Tensor x, Tensor state, Tensor base_weight, Tensor spline_weight,
        Tensor spline_scaler, str basis, int option, str activation, int[] stride, int[] dilation,
        int groups, bool channels_last) -> Tensor
    kanvolution::kan_backward_factored(Tensor grad_out, Tensor x, Tensor state, Tensor base_weight,
        Tensor spline_weight, Tensor spline_scaler, str basis, int option, str activation, int[] stride,
        int[] dilation, int groups, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor)

``x`` is the padded input laid out channel-last, ``(N, *S, C)`` (``(N, C)`` for the dense layer;
best contiguous: the layers pass ``input.movedim(1, -1).contiguous()``, a view for channels-last
inputs), ``state`` the basis family's per-channel state (the knots for ``basis="bspline"``,
``option`` the spline order), ``weight`` the combined weight ``(O, C / groups * (1 + n), *kernel)`` (``(O, C * (1 + n))``
dense; ``len(stride)`` is the number of spatial dimensions). The forward expands ``x`` into
``[act(x), b_0(x), .., b_{n-1}(x)]`` per channel and runs ONE convolution (or linear map) of the
expansion with ``weight``. The expansion is built channel-last, batch chunk by batch chunk, and
never kept: autograd saves ``x``, ``state`` and ``weight`` only, and the backward recomputes it.
The output is ``(N, O, *S_out)`` like ``nn.ConvNd``'s (channels-last strides if ``channels_last``).

The ``_factored`` pair computes the same layer from the layer's three weights (``base_weight``
``(O, C / groups, *kernel)``, ``spline_weight`` ``(O, C / groups, *kernel, n)``, ``spline_scaler`` like
``base_weight``) and returns their three gradients (``output_mask``: x, base, spline, scaler): its
value is ``kan_forward`` of :func:`combine_weights` of them, but where the sparse kernels run, the
three are packed for them in one pass and the packed gradient is split into theirs in one pass, so
the combined weight (and the elementwise passes of its combination and of its backward) never
exist. The layers call it; ``kan_forward`` stays for a weight given combined.

Dtypes: the expansion is computed in ``x``'s dtype (which must be ``state``'s), then the
convolution runs in ``weight``'s dtype, which is the output's. Under autocast the layers pass
``x`` and the knots in float32 and ``weight`` in the autocast dtype.

Kernels: on CPU the direct sparse kernels where :mod:`.sparse`'s rule picks them, else the basis
family's compiled loops (``csrc/``) where they apply, the portable
torch operations otherwise and on every other device. :func:`decompositions` maps the forward
onto plain aten operations (dense expansion) for exporters such as ONNX.
"""
from __future__ import annotations

import math
import threading
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import sparse
from .activations import ACTIVATIONS
from .bases import get_basis

__all__ = ["kan_forward", "kan_backward", "kan_forward_factored", "kan_backward_factored", "combine_weights",
           "dense_kan", "decompositions", "release_workspace", "EXPANSION_CHUNK_BYTES", "COMPILE_OPTIONS"]

# The expansion of one batch chunk is kept under this many bytes; larger batches are processed
# chunk by chunk in forward and backward, which bounds peak memory independently of batch size.
EXPANSION_CHUNK_BYTES = 32 * 2**20

# Inductor options for ``torch.compile(model, options=COMPILE_OPTIONS)``. On CPU, torch 2.13's
# inductor loses a kernel's dependency on a max-pool's backward scatter when it re-derives the
# kernel's loops for a fusion; its peak-memory reordering may then run the scatter after that
# kernel: zero gradients for the convolutions before the pool, with or without KAN layers (a
# linear layer whose weight is built from several parameters is enough). Off, the order is kept.
COMPILE_OPTIONS = {"reorder_for_peak_memory": False}

_workspace = threading.local()


def _workspace_tensor(shape: tuple[int, ...], like: Tensor, slot: str = "expansion") -> Tensor:
    """Scratch memory of one kind (``slot``); on CPU it is kept and reused between calls.

    Fresh multi-megabyte allocations on CPU go back to the operating system when freed, and
    every new one pays page faults on first touch (measured: ~8x slower zero-filling of the
    expansion; a 34-MiB packed weight took 40 ms to pack fresh against 15 ms into a kept buffer).
    The buffers are per thread, one per slot: ``"expansion"`` holds at most one expansion chunk
    (``EXPANSION_CHUNK_BYTES``), the sparse kernels' ``"packed"`` and ``"packed_grad"`` the packed
    weight and its gradient of the largest layer run so far. A caller must be done with a slot's
    tensor before the next call for that slot; :func:`release_workspace` frees them all.
    """
    if like.device.type != "cpu":
        return like.new_empty(shape)
    numel = math.prod(shape)
    buffers = getattr(_workspace, "buffers", None)
    if buffers is None:
        buffers = _workspace.buffers = {}
    buf = buffers.get(slot)
    if buf is None or buf.dtype != like.dtype or buf.numel() < numel:
        buffers[slot] = None  # the old buffer is freed before the new one is allocated
        _workspace_contents().pop(slot, None)
        buf = buffers[slot] = torch.empty(numel, dtype=like.dtype)
    return buf[:numel].view(shape)


def _workspace_contents() -> dict:
    """This thread's record of what its kept buffers hold: ``slot -> key`` of whoever filled the
    slot last (forgotten when the slot's buffer is replaced or released), and ``"narrow"``: the
    narrow sparse kernels' kept tables (see ``sparse._narrow_tables``; released with the buffers)."""
    contents = getattr(_workspace, "contents", None)
    if contents is None:
        contents = _workspace.contents = {}
    return contents


def release_workspace() -> None:
    """Free this thread's cached scratch buffers (the expansion chunk, the sparse kernels' packed
    weight and gradient)."""
    _workspace.buffers = {}
    _workspace.contents = {}


def combine_weights(base_weight: Tensor, spline_weight: Tensor, spline_scaler: Tensor) -> Tensor:
    """One weight for the expanded input: ``(out, in * (G+K+1), *kernel)``."""
    out_c, in_c = base_weight.shape[:2]
    kernel = base_weight.shape[2:]
    scaled = (spline_weight * spline_scaler.unsqueeze(-1)).movedim(-1, 2)  # (out, in, G+K, *kernel)
    w = torch.cat([base_weight.unsqueeze(2), scaled], dim=2)
    return w.reshape((out_c, in_c * w.shape[2]) + tuple(kernel))


def _split_grad(grad_w: Tensor, spline_weight: Tensor, spline_scaler: Tensor, need: Sequence[bool]) -> list[Tensor]:
    """The gradient of the combined weight as the three weights' gradients (the backward of
    :func:`combine_weights`), contiguous; empty where ``need`` says so."""
    o, cg = spline_scaler.shape[:2]
    view = grad_w.reshape((o, cg, 1 + spline_weight.shape[-1]) + tuple(spline_scaler.shape[2:]))
    g_spline = view[:, :, 1:].movedim(2, -1)
    return [view[:, :, 0].contiguous() if need[0] else grad_w.new_empty(0),
            (g_spline * spline_scaler.unsqueeze(-1)).contiguous() if need[1] else grad_w.new_empty(0),
            (g_spline * spline_weight).sum(-1).contiguous() if need[2] else grad_w.new_empty(0)]


def _strided_like(grad: Tensor, weight: Tensor) -> Tensor:
    """A weight's gradient with the strides ``torch.empty_like(weight)`` gives, as the fake kernels
    promise (empty gradients, not asked for, pass as they are)."""
    if not grad.numel() or grad.stride() == weight.stride():
        return grad
    return torch.empty_like(weight).copy_(grad)


def _grad_input_like(grad: Tensor, x: Tensor) -> Tensor:
    """An input gradient with the strides ``torch.empty_like(x)`` gives (``x``'s own where it is
    dense: for a layer's channel-first input, passed as its ``movedim`` view, a channel-first
    gradient, which the layer before reads without a copy), as the fake kernels promise."""
    like = torch.empty_like(x)
    return grad if grad.stride() == like.stride() else like.copy_(grad)


def _chunks(n: int, per_sample: int) -> list[tuple[int, int]]:
    if n == 0:  # an empty batch still runs once: empty output, zero weight gradient
        return [(0, 0)]
    size = max(1, EXPANSION_CHUNK_BYTES // max(1, per_sample))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _apply(expanded: Tensor, weight: Tensor, stride: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    ndim = len(stride)
    if ndim == 0:
        return F.linear(expanded, weight)
    conv = (F.conv1d, F.conv2d, F.conv3d)[ndim - 1]
    return conv(expanded, weight, None, stride, 0, dilation, groups)


def _memory_format(ndim: int, channels_last: bool) -> torch.memory_format:
    if channels_last and ndim in (2, 3):
        return torch.channels_last if ndim == 2 else torch.channels_last_3d
    return torch.contiguous_format


def _canonical(out: Tensor, fmt: torch.memory_format) -> Tensor:
    """``out`` with exactly the strides ``torch.empty(..., memory_format=fmt)`` gives, as the fake
    kernel promises (``.contiguous()`` keeps odd strides of size-1 dimensions)."""
    n = out.dim()
    order = {torch.channels_last: [1, 3, 2, 0], torch.channels_last_3d: [1, 4, 3, 2, 0]}.get(fmt, range(n - 1, -1, -1))
    strides, step = [0] * n, 1
    for d in order:
        strides[d] = step
        step *= max(out.shape[d], 1)
    if list(out.stride()) == strides:
        return out
    return torch.empty(out.shape, dtype=out.dtype, device=out.device, memory_format=fmt).copy_(out)


def _expand(xs: Tensor, state: Tensor, basis: str, option: int, activation: str, compiled: bool) -> Tensor:
    """Channel-last expansion rows ``(n, *S, C, 1 + n_bases)`` of a chunk ``xs`` (``(n, *S, C)``)."""
    family = get_basis(basis)
    out = _workspace_tensor(xs.shape + (1 + family.num_basis(state, option),), xs)
    act = ACTIVATIONS[activation][0](xs)
    if not (compiled and family.cpu_fill is not None and family.cpu_fill(xs, state, option, act, out)):
        family.fill(xs, state, option, act, out)
    return out


def _channels_first(rows: Tensor) -> Tensor:
    """``(n, *S, C, B)`` rows as the ``(n, C * B, *S)`` input of the convolution (channels-last strides)."""
    return rows.flatten(-2).movedim(-1, 1)


def _forward(x, state, weight, basis, option, activation, stride, dilation, groups, channels_last, compiled):
    xl = x.contiguous()  # (N, *S, C)
    per_sample = xl[:1].numel() * (1 + get_basis(basis).num_basis(state, option)) * xl.element_size()
    outs = []
    for s, e in _chunks(xl.shape[0], per_sample):
        rows = _expand(xl[s:e], state, basis, option, activation, compiled)
        outs.append(_apply(_channels_first(rows).to(weight.dtype), weight, stride, dilation, groups))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    # oneDNN returns the expansion's channels-last layout; hand back NCHW unless the caller's
    # tensors ask for channels-last, as nn.ConvNd does.
    return _canonical(out, _memory_format(len(stride), channels_last))


def _backward(grad_out, x, state, weight, basis, option, activation, stride, dilation, groups, output_mask,
              compiled):
    need_x, need_w = output_mask
    family = get_basis(basis)
    act_grad = ACTIVATIONS[activation][1]
    xl = x.contiguous()
    grad_xl = torch.empty(xl.shape, dtype=xl.dtype, device=xl.device) if need_x else None
    grad_w = torch.zeros_like(weight) if need_w else None
    zeros = [0] * len(stride)
    per_sample = xl[:1].numel() * (1 + family.num_basis(state, option)) * xl.element_size()
    for s, e in _chunks(xl.shape[0], per_sample):
        xs, go = xl[s:e], grad_out[s:e]
        rows = _expand(xs, state, basis, option, activation, compiled)
        flat = _channels_first(rows).to(weight.dtype)
        if not stride:
            if need_w:
                grad_w += go.T.mm(flat)
            grad_e = go.mm(weight) if need_x else None
        else:
            grad_e, gw, _ = torch.ops.aten.convolution_backward(
                go, flat, weight, None, list(stride), zeros, list(dilation), False, zeros, groups,
                [need_x, need_w, False],
            )
            if need_w:
                grad_w += gw
        if need_x:
            grad_e = grad_e.movedim(1, -1).reshape(rows.shape).to(xs.dtype)
            # The activation's backward runs several times slower on the strided slot-0 view.
            g_base = act_grad(grad_e[..., 0].contiguous(), xs)
            out = grad_xl[s:e]
            if not (compiled and family.cpu_input_grad is not None
                    and family.cpu_input_grad(xs, state, option, grad_e, g_base, out)):
                family.input_grad(xs, state, option, grad_e, g_base, out)
    return (_grad_input_like(grad_xl, x) if need_x else x.new_empty(0)), (grad_w if need_w else weight.new_empty(0))


@torch.library.custom_op("kanvolution::kan_forward", mutates_args=())
def kan_forward(x: Tensor, state: Tensor, weight: Tensor, basis: str, option: int, activation: str,
                stride: list[int], dilation: list[int], groups: int, channels_last: bool) -> Tensor:
    """The fused KAN layer on the padded input ``x`` (see the module docstring)."""
    return _forward(x, state, weight, basis, option, activation, stride, dilation, groups, channels_last, False)


@torch.library.custom_op("kanvolution::kan_backward", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def kan_backward(grad_out: Tensor, x: Tensor, state: Tensor, weight: Tensor, basis: str, option: int,
                 activation: str, stride: list[int], dilation: list[int], groups: int,
                 output_mask: list[bool]) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`kan_forward` with respect to ``x`` and ``weight`` (empty where
    ``output_mask`` says they are not needed)."""
    return _backward(grad_out, x, state, weight, basis, option, activation, stride, dilation, groups,
                     output_mask, False)


@kan_forward.register_kernel("cpu")
def _forward_cpu(x, state, weight, basis, option, activation, stride, dilation, groups, channels_last):
    out = sparse.forward(x, state, weight, basis, option, activation, stride, dilation, groups, channels_last)
    if out is not None:
        return out
    return _forward(x, state, weight, basis, option, activation, stride, dilation, groups, channels_last, True)


@kan_backward.register_kernel("cpu")
def _backward_cpu(grad_out, x, state, weight, basis, option, activation, stride, dilation, groups, output_mask):
    grads = sparse.backward(grad_out, x, state, weight, basis, option, activation, stride, dilation, groups, output_mask)
    if grads is not None:
        return grads
    return _backward(grad_out, x, state, weight, basis, option, activation, stride, dilation, groups,
                     output_mask, True)


@kan_forward.register_fake
def _forward_fake(x, state, weight, basis, option, activation, stride, dilation, groups, channels_last):
    ndim = len(stride)
    size = [x.shape[0], weight.shape[0]]
    for i in range(ndim):
        size.append((x.shape[1 + i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1)
    return torch.empty(size, dtype=weight.dtype, device=x.device, memory_format=_memory_format(ndim, channels_last))


@kan_backward.register_fake
def _backward_fake(grad_out, x, state, weight, basis, option, activation, stride, dilation, groups, output_mask):
    need_x, need_w = output_mask
    grad_x = torch.empty_like(x) if need_x else x.new_empty(0)
    return grad_x, (torch.empty_like(weight) if need_w else weight.new_empty(0))


@torch.library.custom_op("kanvolution::kan_forward_factored", mutates_args=())
def kan_forward_factored(x: Tensor, state: Tensor, base_weight: Tensor, spline_weight: Tensor, spline_scaler: Tensor,
                         basis: str, option: int, activation: str, stride: list[int], dilation: list[int],
                         groups: int, channels_last: bool) -> Tensor:
    """:func:`kan_forward` of ``combine_weights(base_weight, spline_weight, spline_scaler)`` (see the
    module docstring)."""
    weight = combine_weights(base_weight, spline_weight, spline_scaler)
    return _forward(x, state, weight, basis, option, activation, stride, dilation, groups, channels_last, False)


@torch.library.custom_op("kanvolution::kan_backward_factored", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def kan_backward_factored(grad_out: Tensor, x: Tensor, state: Tensor, base_weight: Tensor, spline_weight: Tensor,
                          spline_scaler: Tensor, basis: str, option: int, activation: str, stride: list[int],
                          dilation: list[int], groups: int,
                          output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`kan_forward_factored` with respect to ``x`` and the three weights (empty
    where ``output_mask`` says they are not needed)."""
    return _backward_factored(grad_out, x, state, base_weight, spline_weight, spline_scaler, basis, option,
                              activation, stride, dilation, groups, output_mask, False)


def _backward_factored(grad_out, x, state, base_weight, spline_weight, spline_scaler, basis, option, activation,
                       stride, dilation, groups, output_mask, compiled):
    need_x, need = output_mask[0], list(output_mask[1:])
    weight = combine_weights(base_weight, spline_weight, spline_scaler)
    grad_x, grad_w = _backward(grad_out, x, state, weight, basis, option, activation, stride, dilation, groups,
                               [need_x, any(need)], compiled)
    if not any(need):
        return grad_x, *(w.new_empty(0) for w in (base_weight, spline_weight, spline_scaler))
    grads = _split_grad(grad_w, spline_weight, spline_scaler, need)
    return grad_x, *map(_strided_like, grads, (base_weight, spline_weight, spline_scaler))


@kan_forward_factored.register_kernel("cpu")
def _forward_factored_cpu(x, state, base_weight, spline_weight, spline_scaler, basis, option, activation, stride,
                          dilation, groups, channels_last):
    out = sparse.forward_factored(x, state, base_weight, spline_weight, spline_scaler, basis, option, activation,
                                  stride, dilation, groups, channels_last)
    if out is not None:
        return out
    weight = combine_weights(base_weight, spline_weight, spline_scaler)
    return _forward(x, state, weight, basis, option, activation, stride, dilation, groups, channels_last, True)


@kan_backward_factored.register_kernel("cpu")
def _backward_factored_cpu(grad_out, x, state, base_weight, spline_weight, spline_scaler, basis, option, activation,
                           stride, dilation, groups, output_mask):
    grads = sparse.backward_factored(grad_out, x, state, base_weight, spline_weight, spline_scaler, basis, option,
                                     activation, stride, dilation, groups, output_mask)
    if grads is not None:
        return grads
    return _backward_factored(grad_out, x, state, base_weight, spline_weight, spline_scaler, basis, option,
                              activation, stride, dilation, groups, output_mask, True)


@kan_forward_factored.register_fake
def _forward_factored_fake(x, state, base_weight, spline_weight, spline_scaler, basis, option, activation, stride,
                           dilation, groups, channels_last):
    return _forward_fake(x, state, base_weight, basis, option, activation, stride, dilation, groups, channels_last)


@kan_backward_factored.register_fake
def _backward_factored_fake(grad_out, x, state, base_weight, spline_weight, spline_scaler, basis, option,
                            activation, stride, dilation, groups, output_mask):
    grads = [torch.empty_like(x) if output_mask[0] else x.new_empty(0)]
    for w, need in zip((base_weight, spline_weight, spline_scaler), output_mask[1:]):
        grads.append(torch.empty_like(w) if need else w.new_empty(0))
    return tuple(grads)


def _setup_context(ctx, inputs, output):
    x, state, weight, basis, option, activation, stride, dilation, groups, _ = inputs
    ctx.save_for_backward(x, state, weight)
    ctx.conf = (basis, option, activation, stride, dilation, groups)


def _autograd_backward(ctx, grad):
    x, state, weight = ctx.saved_tensors
    need_x, _, need_w = ctx.needs_input_grad[:3]
    grad_x, grad_w = kan_backward(grad, x, state, weight, *ctx.conf, [need_x, need_w])
    return (grad_x if need_x else None), None, (grad_w if need_w else None), None, None, None, None, None, None, None


kan_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _setup_context_factored(ctx, inputs, output):
    x, state, base_weight, spline_weight, spline_scaler, basis, option, activation, stride, dilation, groups, _ = inputs
    ctx.save_for_backward(x, state, base_weight, spline_weight, spline_scaler)
    ctx.conf = (basis, option, activation, stride, dilation, groups)


def _autograd_backward_factored(ctx, grad):
    x, state, base_weight, spline_weight, spline_scaler = ctx.saved_tensors
    need = [ctx.needs_input_grad[i] for i in (0, 2, 3, 4)]
    grads = kan_backward_factored(grad, x, state, base_weight, spline_weight, spline_scaler, *ctx.conf, need)
    gx, gb, gs, gsc = (g if n else None for g, n in zip(grads, need))
    return (gx, None, gb, gs, gsc) + (None,) * 7


kan_forward_factored.register_autograd(_autograd_backward_factored, setup_context=_setup_context_factored)


def dense_kan(x: Tensor, state: Tensor, weight: Tensor, basis: str, option: int, activation: Callable[[Tensor], Tensor],
              stride: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """:func:`kan_forward` by plain differentiable operations: the dense expansion of ``x`` kept by
    autograd, then one convolution. Twice differentiable, traceable without reading data, any
    callable ``activation``; slower and ``1 + n`` times the input's memory."""
    bases = get_basis(basis).dense(x, state, option).movedim(-1, 2)  # (N, C, n, *S)
    expanded = torch.cat([activation(x).unsqueeze(2), bases], dim=2).flatten(1, 2)
    return _apply(expanded.to(weight.dtype), weight, stride, dilation, groups)


def _forward_decomposition(x, state, weight, basis, option, activation, stride, dilation, groups, channels_last):
    out = dense_kan(x.movedim(-1, 1), state, weight, basis, option, ACTIVATIONS[activation][0], stride, dilation, groups)
    return out.contiguous(memory_format=_memory_format(len(stride), channels_last))


def _forward_factored_decomposition(x, state, base_weight, spline_weight, spline_scaler, basis, option, activation,
                                    stride, dilation, groups, channels_last):
    weight = combine_weights(base_weight, spline_weight, spline_scaler)
    return _forward_decomposition(x, state, weight, basis, option, activation, stride, dilation, groups, channels_last)


def decompositions() -> dict:
    """Decomposition table of the op into aten operations, for
    :meth:`torch.export.ExportedProgram.run_decompositions`.

    Examples:
        >>> torch.ops.kanvolution.kan_forward_factored.default in decompositions()
        True
    """
    return {torch.ops.kanvolution.kan_forward.default: _forward_decomposition,
            torch.ops.kanvolution.kan_forward_factored.default: _forward_factored_decomposition}
