"""The sparse CPU kernels against the dense fused path, the reference loop and gradcheck."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kanvolution import _sparse, reference
from kanvolution import functional as KF

pytestmark = pytest.mark.skipif(not _sparse.available(), reason="the sparse kernels could not be built")

F64 = torch.float64
KERNELS = _sparse.KERNELS  # every test of the kernels runs on both: "wide" and "narrow"


def _params(c_in, c_out, kernel, groups, grid_size, order, dtype=F64):
    """Random KAN parameters (spline scalers away from 1, so that they matter) and uniform knots."""
    shape = (c_out, c_in // groups, *kernel)
    base = torch.randn(shape, dtype=dtype)
    spline = torch.randn(shape + (grid_size + order,), dtype=dtype)
    scaler = torch.rand(shape, dtype=dtype) + 0.5
    grid = KF.uniform_knots(grid_size, order, (-1.0, 0.8), channels=c_in, dtype=dtype)
    return [t.requires_grad_() for t in (base, spline, scaler)], grid


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _sparse_layer(x, params, grid, order, ndim, stride=1, padding=0, dilation=1, groups=1, impl=None):
    """The layer of kan_conv{n}d computed with the sparse kernels (padding and weights as the layer does)."""
    kernel = tuple(params[0].shape[2:])
    pad = KF.resolve_padding(padding, kernel, KF._ntuple(dilation, ndim, "dilation"), KF._ntuple(stride, ndim, "s"))
    weight = KF.combine_weights(*params)
    return _sparse.sparse_kan(KF.pad_input(x, pad, "zeros"), grid, weight, order, stride, dilation, groups, impl)


CONV_CASES = [
    # ndim, c_in, c_out, kernel, stride, padding, dilation, groups, grid_size, order, spatial
    (2, 3, 5, (3, 3), 1, 1, 1, 1, 5, 3, (9, 8)),
    (2, 4, 6, (3, 2), (2, 1), 0, (1, 2), 2, 3, 1, (11, 9)),
    (2, 2, 40, (3, 3), 1, 1, 1, 1, 50, 2, (7, 7)),  # vector paths over 40 outputs, 50 intervals
    (2, 6, 36, (2, 2), 2, 1, 2, 3, 17, 4, (9, 10)),
    (2, 1, 20, (5, 5), 1, 2, 1, 1, 8, 5, (8, 8)),
    (1, 4, 16, (3,), 2, 1, 1, 2, 10, 3, (17,)),
    (3, 2, 18, (2, 3, 2), (1, 2, 1), 1, 1, 1, 6, 2, (4, 6, 5)),
    # narrow layers: the paper's 1->5 and 5->10 (3x3, no padding), orders 1..4, strides, dilations, groups
    (2, 1, 5, (3, 3), 1, 0, 1, 1, 10, 3, (12, 11)),
    (2, 5, 10, (3, 3), 1, 0, 1, 1, 20, 3, (9, 9)),
    (2, 2, 3, (3, 3), 1, 0, 1, 1, 4, 1, (7, 8)),
    (2, 3, 7, (2, 3), (2, 1), 1, (1, 2), 1, 6, 2, (9, 10)),
    (2, 4, 6, (3, 3), 1, 1, 1, 2, 5, 4, (8, 7)),
    (2, 2, 4, (3, 2), (1, 3), 0, 1, 1, 9, 3, (8, 11)),
    (2, 3, 3, (1, 4), 1, (0, 2), (1, 2), 1, 3, 2, (5, 9)),
    (1, 2, 5, (4,), 1, 1, 1, 1, 7, 4, (13,)),
    (3, 2, 3, (2, 2, 3), 1, 1, (2, 1, 1), 1, 4, 3, (5, 4, 6)),
]


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}d-in{c[1]}-out{c[2]}-G{c[8]}-K{c[9]}")
def test_conv_matches_dense_path(case, impl):
    ndim, c_in, c_out, kernel, stride, padding, dilation, groups, gs, order, spatial = case
    params, grid = _params(c_in, c_out, kernel, groups, gs, order)
    x = (torch.rand(2, c_in, *spatial, dtype=F64) * 2.6 - 1.4).requires_grad_()  # partly outside the knots
    conv = (KF.kan_conv1d, KF.kan_conv2d, KF.kan_conv3d)[ndim - 1]
    expected = conv(x, *params, grid, None, stride, padding, dilation, groups, spline_order=order)
    got = _sparse_layer(x, params, grid, order, ndim, stride, padding, dilation, groups, impl)
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    assert _rel(got, expected) < 1e-9
    grad_out = torch.randn_like(expected)
    want = torch.autograd.grad(expected, [x, *params], grad_out)
    have = torch.autograd.grad(got, [x, *params], grad_out)
    for h, w in zip(have, want):
        assert torch.isfinite(h).all()
        assert _rel(h, w) < 1e-9


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("order,gs", [(1, 3), (2, 7), (3, 12), (4, 4)])
def test_conv_matches_reference_loop(order, gs, kernel):
    params, grid = _params(3, 4, (3, 3), 1, gs, order)
    x = (torch.rand(2, 3, 7, 6, dtype=F64) * 2.4 - 1.3).requires_grad_()
    expected = reference.kan_conv_reference(x, *params, grid, padding=1, stride=(1, 2), spline_order=order)
    got = _sparse_layer(x, params, grid, order, 2, stride=(1, 2), padding=1, impl=kernel)
    assert _rel(got, expected) < 1e-9
    grad_out = torch.randn_like(expected)
    for h, w in zip(torch.autograd.grad(got, [x, *params], grad_out),
                    torch.autograd.grad(expected, [x, *params], grad_out)):
        assert _rel(h, w) < 1e-9


@pytest.mark.parametrize("kernel", KERNELS)
def test_dense_layer_matches_kan_linear_and_reference(kernel):
    order, gs = 3, 20
    base = torch.randn(17, 5, dtype=F64)  # 17 outputs: one vector block of float64 and a tail
    spline = torch.randn(17, 5, gs + order, dtype=F64)
    scaler = torch.rand(17, 5, dtype=F64) + 0.5
    params = [t.requires_grad_() for t in (base, spline, scaler)]
    grid = KF.uniform_knots(gs, order, channels=5, dtype=F64)
    x = (torch.rand(6, 5, dtype=F64) * 2.4 - 1.2).requires_grad_()
    got = _sparse.sparse_kan(x, grid, KF.combine_weights(*params), order, kernel=kernel)
    grad_out = torch.randn(6, 17, dtype=F64)
    for expected in (KF.kan_linear(x, *params, grid, spline_order=order),
                     reference.kan_linear_reference(x, *params, grid, spline_order=order)):
        assert _rel(got, expected) < 1e-9
        for h, w in zip(torch.autograd.grad(got, [x, *params], grad_out, retain_graph=True),
                        torch.autograd.grad(expected, [x, *params], grad_out)):
            assert _rel(h, w) < 1e-9


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck(kernel):
    params, grid = _params(2, 2, (2, 2), 1, 3, 2)
    weight = KF.combine_weights(*params).detach().requires_grad_()
    x = (torch.rand(1, 2, 4, 4, dtype=F64) * 2.2 - 1.1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, w: _sparse.sparse_kan(a, grid, w, 2, stride=(1, 2), dilation=(2, 1), kernel=kernel), (x, weight))
    # stride 1, no dilation: the narrow kernels' contiguous path
    x = (torch.rand(2, 2, 4, 5, dtype=F64) * 2.2 - 1.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w: _sparse.sparse_kan(a, grid, w, 2, kernel=kernel), (x, weight))


@pytest.mark.parametrize("c_out, groups", [(8, 1), (80, 1), (16, 2)], ids=["one-block", "blocks", "groups"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_several_batch_chunks_and_threads_agree(kernel, c_out, groups):
    # 64 channels of 34x34 float64 values: the local form of one sample exceeds half the chunk
    # budget, so the batch is processed in several chunks. With several blocks of output channels
    # (80: blocks of 4, 3 and 3 vectors) or groups, the wide forward's tasks sum in scratch of their own.
    params, grid = _params(64, c_out, (3, 3), groups, 10, 3)
    weight = KF.combine_weights(*params).detach()
    x = torch.rand(3, 64, 34, 34, dtype=F64) * 2 - 1
    t0, inv_h = _sparse.knot_params(grid)
    grad_out = torch.randn(3, c_out, 32, 32, dtype=F64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append([_sparse.kan_conv(x, t0, inv_h, weight, 3, groups=groups, kernel=kernel),
                            _sparse.kan_conv_grad_input(grad_out, x, t0, inv_h, weight, 3, groups=groups,
                                                        kernel=kernel),
                            _sparse.kan_conv_grad_weight(grad_out, x, t0, inv_h, weight.shape, 3, groups=groups,
                                                         kernel=kernel)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    expanded = KF.expand_bases(x[:1], grid, 3)
    assert _rel(results[0][0][:1], F.conv2d(expanded, weight, groups=groups)) < 1e-9


def test_wide_weight_gradient_groups_do_not_depend_on_the_chunks():
    """The weight gradient sums each span over groups of samples (2 here: 16 float64 outputs on 42x42);
    the backward with the input gradient takes the batch in smaller chunks (its local form holds the
    derivatives too) than the weight gradient alone, and both give the same sums, bit for bit."""
    params, grid = _params(16, 16, (3, 3), 1, 10, 3)
    weight = KF.combine_weights(*params).detach()
    x = torch.rand(8, 16, 44, 44, dtype=F64) * 2.6 - 1.3
    conv = _sparse._Conv(x, *_sparse.knot_params(grid), weight.shape, 3, 1, 1, 1, "wide")
    packed = conv.pack(weight)
    grad_out = torch.randn_like(conv.forward(packed))
    _, gw = conv.backward(grad_out, packed, x.shape, True, True)
    assert torch.equal(gw, conv.grad_weight(grad_out))
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    F.conv2d(KF.expand_bases(xr, grid, 3), wr).backward(grad_out)
    assert _rel(gw, wr.grad) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("c_in, threads", [(8, 1), (8, 2), (1, 2)])  # one task per channel for both; or not
def test_wide_backward_in_one_call_equals_the_two_kernels(dtype, c_in, threads):
    params, grid = _params(c_in, 70, (3, 3), 1, 10, 3, dtype=dtype)  # 70 outputs: vector blocks and a tail
    weight = KF.combine_weights(*params).detach()
    x = (torch.rand(5, c_in, 12, 11, dtype=dtype) * 2.6 - 1.3)
    t0, inv_h = _sparse.knot_params(grid)
    conv = _sparse._Conv(x, t0, inv_h, weight.shape, 3, 1, 1, 1, "wide")
    packed = conv.pack(weight)
    grad_out = torch.randn_like(conv.forward(packed))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        gx, gw = conv.backward(grad_out, packed, x.shape, True, True)
        gx_alone, gw_alone = conv.grad_input(grad_out, packed, x.shape), conv.grad_weight(grad_out)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(gx, gx_alone) and torch.equal(gw, gw_alone)
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    F.conv2d(KF.expand_bases(xr, grid, 3), wr).backward(grad_out)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert _rel(gx, xr.grad) < tol and _rel(gw, wr.grad) < tol


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("c_out", [40, 5])
def test_float32_close_to_float64(kernel, c_out):
    params, grid = _params(8, c_out, (3, 3), 1, 10, 3)
    weight = KF.combine_weights(*params).detach()
    x = torch.rand(2, 8, 10, 10, dtype=F64) * 2 - 1
    args64 = (x, *_sparse.knot_params(grid))
    args32 = (x.float(), *_sparse.knot_params(grid.float()))
    out64 = _sparse.kan_conv(*args64, weight, 3, kernel=kernel)
    out32 = _sparse.kan_conv(*args32, weight.float(), 3, kernel=kernel)
    assert out32.dtype == torch.float32
    assert _rel(out32.double(), out64) < 1e-5
    grad_out = torch.randn_like(out64)
    gx64 = _sparse.kan_conv_grad_input(grad_out, *args64, weight, 3, kernel=kernel)
    gx32 = _sparse.kan_conv_grad_input(grad_out.float(), *args32, weight.float(), 3, kernel=kernel)
    gw64 = _sparse.kan_conv_grad_weight(grad_out, *args64, weight.shape, 3, kernel=kernel)
    gw32 = _sparse.kan_conv_grad_weight(grad_out.float(), *args32, weight.shape, 3, kernel=kernel)
    assert _rel(gx32.double(), gx64) < 1e-5 and _rel(gw32.double(), gw64) < 1e-5


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("stride", [1, 2])
def test_non_finite_and_outside_values_as_on_the_dense_path(kernel, dtype, stride):
    # Values far outside the knots, on their ends, NaN and +-inf, in the layers' 3x3 geometry
    # (narrow: 5 outputs, wide: 40): the same NaN / inf pattern and the same finite values.
    torch.manual_seed(5)
    c_out = 5 if kernel == "narrow" else 40
    params, grid = _params(2, c_out, (3, 3), 1, 6, 3, dtype)
    weight = KF.combine_weights(*params).detach()
    x = torch.rand(2, 2, 8, 9, dtype=dtype) * 2 - 1
    x[0, 0, 0, :5] = torch.tensor([-1e6, 1e6, grid[0, 0].item(), grid[0, -1].item(), float("nan")], dtype=dtype)
    x[1, 1, 4, 4], x[1, 0, 7, 8], x[0, 1, 3, 0] = float("inf"), float("-inf"), float("nan")
    t0, inv_h = _sparse.knot_params(grid)
    expanded = KF.expand_bases(x, grid, 3).to(dtype)
    want = F.conv2d(expanded, weight, stride=stride)
    got = _sparse.kan_conv(x, t0, inv_h, weight, 3, stride, kernel=kernel)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    tol = 1e-9 if dtype == F64 else 1e-5
    assert ((got - want)[fin].abs().max() / want[fin].abs().max()).item() < tol
    # The input gradient of the non-finite values is NaN, as on the dense path, also where a value feeds
    # no output (stride 2: the last row, -inf at (1, 0, 7, 8)).
    grad_out = torch.randn_like(want)
    gx_nf = _sparse.kan_conv_grad_input(grad_out, x, t0, inv_h, weight, 3, stride, kernel=kernel)
    xn = x.clone().requires_grad_()
    (gx_nf_want,) = torch.autograd.grad(F.conv2d(KF.expand_bases(xn, grid, 3), weight, stride=stride), [xn], grad_out)
    assert torch.equal(torch.isnan(gx_nf), torch.isnan(gx_nf_want)) and not torch.isinf(gx_nf).any()
    # Gradients with finite values only, outside the knots included.
    xf = torch.nan_to_num(x, nan=0.3, posinf=2.0, neginf=-3.0)
    exp_f = KF.expand_bases(xf, grid, 3).to(dtype).requires_grad_()
    w = weight.clone().requires_grad_()
    (gw_want,) = torch.autograd.grad(F.conv2d(exp_f, w, stride=stride), [w], grad_out)
    gw = _sparse.kan_conv_grad_weight(grad_out, xf, t0, inv_h, weight.shape, 3, stride, kernel=kernel)
    assert _rel(gw, gw_want) < tol
    gx = _sparse.kan_conv_grad_input(grad_out, xf, t0, inv_h, weight, 3, stride, kernel=kernel)
    xr = xf.clone().requires_grad_()
    (gx_want,) = torch.autograd.grad(F.conv2d(KF.expand_bases(xr, grid, 3), weight, stride=stride), [xr], grad_out)
    assert _rel(gx, gx_want) < tol


def test_default_kernel_and_bad_kernel():
    assert _sparse.default_kernel(5, 4) == "narrow" and _sparse.default_kernel(31, 4) == "narrow"
    assert _sparse.default_kernel(32, 4) == "wide" and _sparse.default_kernel(16, 8) == "wide"
    assert _sparse.default_kernel(15, 8) == "narrow"
    params, grid = _params(2, 3, (3, 3), 1, 5, 3)
    x = torch.rand(1, 2, 5, 5, dtype=F64)
    with pytest.raises(ValueError, match="kernel must be one of wide, narrow"):
        _sparse.kan_conv(x, *_sparse.knot_params(grid), KF.combine_weights(*params), 3, kernel="medium")


def test_pack_unpack_round_trip():
    w = torch.randn(6, 3 * 9, 2, 3)
    packed = _sparse.pack_weight(w, 6, 2, 2)
    assert packed.shape == (6, 6, 9 + 4, 3)
    assert (packed[:, :, 1:3] == 0).all() and (packed[:, :, -2:] == 0).all()
    assert torch.equal(_sparse.unpack_weight(packed, w.shape, 2, 2), w)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("o, c, groups, order, kernel", [
    (6, 6, 2, 2, (2, 3)), (5, 1, 1, 3, (3, 3)), (40, 8, 4, 1, (3,)), (3, 4, 1, 4, (1, 2, 2)), (17, 5, 1, 3, (1,)),
])
def test_compiled_pack_equals_pack_weight(o, c, groups, order, kernel, dtype):
    slots = 7 + order + 1  # G = 7
    w = torch.randn(o, c // groups * slots, *kernel, dtype=dtype)
    t0, inv_h = (t.to(dtype) for t in _sparse.knot_params(KF.uniform_knots(7, order, channels=c, dtype=F64)))
    conv = _sparse._Conv(torch.zeros(1, c, *[4] * len(kernel), dtype=dtype), t0, inv_h, w.shape, order, 1, 1, groups)
    assert torch.equal(conv.pack(w), _sparse.pack_weight(w, c, groups, order))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("o, c, groups, order, kernel", [
    (6, 6, 2, 2, (2, 3)), (5, 1, 1, 3, (3, 3)), (40, 8, 4, 1, (3,)), (3, 4, 1, 4, (1, 2, 2)), (17, 5, 1, 3, (1,)),
])
def test_compiled_unpack_equals_unpack_weight(o, c, groups, order, kernel, dtype):
    slots = 7 + order + 1  # G = 7
    taps = math.prod(kernel)
    packed = torch.randn(c, taps, slots + 2 * order, o // groups, dtype=dtype)
    shape = (o, c // groups * slots, *kernel)
    out = torch.full(shape, float("nan"), dtype=dtype)
    _sparse._ops().unpack(packed, groups, order, out.view(o, -1, taps))
    assert torch.equal(out, _sparse.unpack_weight(packed, shape, groups, order))


def test_bad_input_raises():
    grid = KF.uniform_knots(5, 3, channels=2)
    weight = torch.randn(4, 2 * 9, 3, 3)
    x = torch.rand(1, 2, 6, 6)
    t0, inv_h = _sparse.knot_params(grid)
    bent = grid.clone()
    bent[0, 4] += 0.05
    with pytest.raises(ValueError, match="uniform"):
        _sparse.knot_params(bent)
    with pytest.raises(TypeError, match="float32 or float64"):
        _sparse.kan_conv(x.to(torch.int64), t0, inv_h, weight, 3)
    with pytest.raises(ValueError, match="t0 must be"):
        _sparse.kan_conv(x.double(), t0, inv_h, weight.double(), 3)
    with pytest.raises(ValueError, match="weight must be"):
        _sparse.kan_conv(x, t0, inv_h, weight[..., 0], 3)
    for groups in (3, 0):
        with pytest.raises(ValueError, match=f"groups={groups}"):
            _sparse.kan_conv(x, t0, inv_h, weight, 3, groups=groups)
    with pytest.raises(ValueError, match="stride must be"):
        _sparse.kan_conv(x, t0, inv_h, weight, 3, stride=0)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        _sparse.kan_conv(x, t0, inv_h, weight, 3, dilation=3)
    with pytest.raises(ValueError, match="spline_order"):
        _sparse.kan_conv(x, t0, inv_h, weight, 0)


# -- behind the registered ops (kanvolution.ops.sparse) ------------------------------------------

from torch import nn  # noqa: E402

from kanvolution import KANConv1d, KANConv2d, KANConv3d, KANLinear  # noqa: E402
from kanvolution.models import create_model  # noqa: E402
from kanvolution.ops import kan_backward, kan_backward_factored, kan_forward, kan_forward_factored  # noqa: E402
from kanvolution.ops import sparse as S  # noqa: E402

F32 = torch.float32
OP_LAYERS = {
    "linear": (lambda **kw: KANLinear(5, 17, grid_size=12, **kw), (4, 5)),
    "conv1d": (lambda **kw: KANConv1d(2, 3, 3, padding=1, **kw), (2, 2, 9)),
    "conv2d": (lambda **kw: KANConv2d(2, 40, 3, stride=(1, 2), groups=2, grid_size=10, **kw), (2, 2, 7, 8)),
    "conv3d": (lambda **kw: KANConv3d(2, 3, 2, dilation=(1, 2, 1), **kw), (2, 2, 4, 6, 5)),
}


@pytest.fixture
def sparse_calls(monkeypatch):
    """Set the sparse mode for one test (``sparse_calls.mode = ...``) and count the op calls the
    sparse kernels handled; the default mode comes back afterwards."""
    counts = {"forward": 0, "backward": 0}

    def counted(name, original):
        def run(*args):
            done = original(*args)
            counts[name] += done is not None
            return done
        return run

    monkeypatch.setattr(S, "forward", counted("forward", S.forward))
    monkeypatch.setattr(S, "backward", counted("backward", S.backward))
    monkeypatch.setattr(S, "forward_factored", counted("forward", S.forward_factored))
    monkeypatch.setattr(S, "backward_factored", counted("backward", S.backward_factored))
    yield counts
    S.set_mode(None)


def _op_layer(kind, dtype=F64):
    make, shape = OP_LAYERS[kind]
    torch.manual_seed(3)
    layer = make(dtype=dtype)
    with torch.no_grad():
        layer.spline_weight.normal_()
    return layer, torch.randn(shape, dtype=dtype) * 1.3


@pytest.mark.parametrize("kind", list(OP_LAYERS))
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_opcheck_on_the_sparse_path(sparse_calls, kind, dtype):
    S.set_mode("always")
    layer, x = _op_layer(kind, dtype)
    channels_last = kind == "conv2d" and dtype == F32
    xl = x.movedim(1, -1).contiguous() if channels_last else x.movedim(1, -1)
    weight = KF.combine_weights(layer.base_weight, layer.spline_weight, layer.spline_scaler).detach()
    conf = ("bspline", layer.spline_order, "silu", list(getattr(layer, "stride", ())),
            list(getattr(layer, "dilation", ())), layer.groups)
    args = (xl.requires_grad_(), layer.grid, weight.requires_grad_(), *conf, channels_last)
    torch.library.opcheck(kan_forward, args)
    grad = torch.randn_like(kan_forward(*args))
    for mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(kan_backward, (grad, xl.detach(), layer.grid, weight.detach(), *conf, mask))
    assert sparse_calls["forward"] > 0 and sparse_calls["backward"] > 0


def _factored_args(layer, x, channels_last=False):
    xl = x.movedim(1, -1).contiguous() if channels_last else x.movedim(1, -1)
    conf = ("bspline", layer.spline_order, "silu", list(getattr(layer, "stride", ())),
            list(getattr(layer, "dilation", ())), layer.groups)
    weights = [w.detach().requires_grad_() for w in (layer.base_weight, layer.spline_weight, layer.spline_scaler)]
    return xl.detach().requires_grad_(), weights, conf


@pytest.mark.parametrize("mode", ["always", "never"])
@pytest.mark.parametrize("kind", list(OP_LAYERS))
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_opcheck_factored_op_on_both_paths(sparse_calls, mode, kind, dtype):
    """The op on the layer's three weights: opcheck (fake kernel, autograd, schema) on the sparse
    kernels (narrow and wide: 20 outputs per group in float32 and float64) and the dense path, every
    output mask of its backward."""
    S.set_mode(mode)
    layer, x = _op_layer(kind, dtype)
    channels_last = kind == "conv2d" and dtype == F32
    xl, weights, conf = _factored_args(layer, x, channels_last)
    args = (xl, layer.grid, *weights, *conf, channels_last)
    torch.library.opcheck(kan_forward_factored, args)
    grad = torch.randn_like(kan_forward_factored(*args))
    detached = (xl.detach(), layer.grid, *(w.detach() for w in weights))
    for mask in ([True, True, True, True], [True, False, False, False], [False, True, False, True],
                 [False, False, True, False]):
        torch.library.opcheck(kan_backward_factored, (grad, *detached, *conf, mask))
    expected = 0 if mode == "never" else 1
    assert (sparse_calls["forward"] > 0) == bool(expected) and (sparse_calls["backward"] > 0) == bool(expected)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_factored_op_is_the_combined_op(sparse_calls, kind):
    """On the sparse kernels the factored op packs the very weight the combined one packs (the same
    output bit for bit); its weight gradients are the combination's backward of kan_backward's;
    gradcheck in float64."""
    S.set_mode("always")
    layer, x = _op_layer(kind)
    xl, weights, conf = _factored_args(layer, x)
    combined = KF.combine_weights(*weights)
    assert torch.equal(kan_forward_factored(xl, layer.grid, *weights, *conf, False),
                       kan_forward(xl, layer.grid, combined, *conf, False))
    grad = torch.randn_like(kan_forward(xl, layer.grid, combined, *conf, False))
    gx, gw = kan_backward(grad, xl.detach(), layer.grid, combined.detach(), *conf, [True, True])
    want = torch.autograd.grad(combined, weights, gw)
    got = kan_backward_factored(grad, xl.detach(), layer.grid, *(w.detach() for w in weights), *conf,
                                [True, True, True, True])
    assert torch.equal(got[0], gx)
    for g, w in zip(got[1:], want):
        assert _rel(g, w) < 1e-12
    small = [w.detach()[:2].clone().requires_grad_() for w in weights]  # 2 outputs: a quick gradcheck
    assert torch.autograd.gradcheck(lambda a, b, c, d: kan_forward_factored(a, layer.grid, b, c, d, *conf, False),
                                    (xl, *small))
    assert sparse_calls["forward"] > 0


def test_pack3_and_unpack3_against_the_combination():
    """pack3 of the three weights is pack of their combination, bit for bit (groups, 3x3 kernel);
    unpack3 of a packed gradient is the combination's backward of unpack."""
    torch.manual_seed(2)
    params, grid = _params(6, 8, (3, 3), 2, 7, 2, torch.float32)
    x = torch.rand(1, 6, 5, 5) * 2 - 1
    weight = KF.combine_weights(*params).detach()
    conv = _sparse._Conv(x, *_sparse.knot_params(grid), weight.shape, 2, 1, 1, 2)
    assert torch.equal(conv.pack(tuple(p.detach() for p in params)), conv.pack(weight))
    packed_grad = torch.randn(conv.packed_shape())
    w = [p.detach().requires_grad_() for p in params]
    want = torch.autograd.grad(KF.combine_weights(*w), w, conv._unpack(packed_grad))
    got = conv.unpack3(packed_grad, params[1].detach(), params[2].detach())
    for g, e in zip(got, want):
        assert g.shape == e.shape and _rel(g, e) < 1e-6
    only = conv.unpack3(packed_grad, params[1].detach(), params[2].detach(), (False, True, False))
    assert only[0] is None and only[2] is None and torch.equal(only[1], got[1])


@pytest.mark.parametrize("o, c, groups, gs, dtype", [(40, 3, 1, 10, torch.float32), (36, 4, 2, 6, F64)],
                         ids=["float32", "float64-groups"])
def test_pack3_and_unpack3_tiles(o, c, groups, gs, dtype):
    """Wide enough for the transposed tiles of pack3 / unpack3 (40 float32 outputs: two tiles of 16 and
    8 left over; 18 float64 outputs per group: two tiles of 8 and 2 left over; 9 * (gs + 3) columns,
    some left over): pack3 is pack of the combination bit for bit, unpack3's spline gradient is the
    combination's backward bit for bit (the same products), its base and scaler gradients match it."""
    torch.manual_seed(3)
    params, grid = _params(c, o, (3, 3), groups, gs, 3, dtype)
    weight = KF.combine_weights(*params).detach()
    conv = _sparse._Conv(torch.zeros(1, c, 4, 4, dtype=dtype), *_sparse.knot_params(grid), weight.shape, 3, 1, 1,
                         groups)
    assert torch.equal(conv.pack(tuple(p.detach() for p in params)), conv.pack(weight))
    packed_grad = torch.randn(conv.packed_shape(), dtype=dtype)
    w = [p.detach().requires_grad_() for p in params]
    want = torch.autograd.grad(KF.combine_weights(*w), w, conv._unpack(packed_grad))
    got = conv.unpack3(packed_grad, params[1].detach(), params[2].detach())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert _rel(got[2], want[2]) < (1e-6 if dtype == torch.float32 else 1e-13)


@pytest.mark.parametrize("c_in, c_out, hw, groups, n, threads", [
    (64, 70, (34, 34), 1, 3, 2),  # float64 64x34x34: several batch chunks; 70 outputs: vector blocks, a tail
    (8, 32, (12, 11), 2, 5, 1),   # groups, one chunk, one thread
    (4, 40, (6, 6), 1, 0, 2),     # an empty batch: zero gradients
], ids=["chunks", "groups", "empty"])
def test_backward3_is_backward_then_unpack3(c_in, c_out, hw, groups, n, threads):
    """The wide backward that splits each channel's packed weight gradient into the three weights'
    gradients as soon as the channel's rows are final gives what the backward followed by unpack3
    gives, bit for bit, for every subset of the gradients (the packed gradient's room reused)."""
    torch.manual_seed(5)
    params, grid = _params(c_in, c_out, (3, 3), groups, 10, 3, F64)
    weights = tuple(p.detach() for p in params)
    x = torch.rand(n, c_in, *hw, dtype=F64) * 2.6 - 1.3
    conv = _sparse._Conv(x, *_sparse.knot_params(grid), KF.combine_weights(*weights).shape, 3, 1, 1, groups,
                         "wide")
    packed = conv.pack(weights)
    grad_out = torch.randn_like(conv.forward(packed))
    room = torch.full(conv.packed_shape(), float("nan"), dtype=F64)  # a kept buffer's stale contents
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        gx, gw = conv.backward(grad_out, packed, x.shape, True, True, unpack=False)
        want = conv.unpack3(gw, weights[1], weights[2])
        for need_x, need in [(True, (True, True, True)), (False, (True, True, True)), (True, (False, True, False)),
                             (False, (True, False, True))]:
            got_x, got = conv.backward3(grad_out, packed, x.shape, need_x, weights[1], weights[2], need,
                                        scratch=room)
            assert (got_x is None) == (not need_x) and (got_x is None or torch.equal(got_x, gx))
            for g, w, e in zip(got, want, need):
                assert (g is None) == (not e) and (g is None or torch.equal(g, w))
            assert torch.equal(room, gw)  # the room holds the packed gradient
    finally:
        torch.set_num_threads(old)
    if n == 0:
        assert all(not g.any() for g in want)
    with pytest.raises(ValueError, match="wide kernels"):
        narrow = _sparse._Conv(x, *_sparse.knot_params(grid), KF.combine_weights(*weights).shape, 3, 1, 1, groups,
                               "narrow")
        narrow.backward3(grad_out, None, x.shape, False, weights[1], weights[2])


@pytest.mark.parametrize("mode", ["always", "never"])
@pytest.mark.parametrize("kind", list(OP_LAYERS))
def test_layers_match_reference_on_both_paths(sparse_calls, mode, kind):
    from kanvolution.reference import kan_conv_reference, kan_linear_reference

    S.set_mode(mode)
    layer, x = _op_layer(kind)
    x.requires_grad_()
    out = layer(x)
    args = (x, layer.base_weight, layer.spline_weight, layer.spline_scaler, layer.grid, layer.bias)
    if kind == "linear":
        want = kan_linear_reference(*args, layer.spline_order, layer.base_activation)
    else:
        want = kan_conv_reference(*args, layer.stride, layer.padding, layer.dilation, layer.groups,
                                  layer.padding_mode, layer.spline_order, layer.base_activation)
    assert _rel(out, want) < 1e-9
    params = [x, layer.base_weight, layer.spline_weight, layer.spline_scaler]
    for got, exp in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        assert _rel(got, exp) < 1e-9
    expected_calls = 1 if mode == "always" else 0
    assert sparse_calls == {"forward": expected_calls, "backward": expected_calls}


def test_kept_buffers_shared_by_layers_and_calls(sparse_calls):
    """The wide kernels pack into kept per-thread buffers: two same-shaped layers in a row (their
    backward passes reuse the buffers the forwards filled) give the dense path's gradients, and
    returned gradients never alias a buffer (a later call leaves them as they were)."""
    from kanvolution.ops.kan import _workspace, release_workspace

    torch.manual_seed(5)
    model = nn.Sequential(KANConv2d(40, 40, 3, padding=1, grid_size=10, dtype=F64),
                          KANConv2d(40, 40, 3, padding=1, grid_size=10, dtype=F64))
    x = torch.randn(2, 40, 6, 6, dtype=F64)
    S.set_mode("never")
    want = _train_step(model, x)
    S.set_mode("always")
    release_workspace()
    got = _train_step(model, x)
    assert sparse_calls == {"forward": 2, "backward": 2}
    assert set(_workspace.buffers) == {"packed", "packed_grad"}
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-9
    kept = [p.grad for p in model.parameters()]
    snapshot = [g.clone() for g in kept]
    _train_step(model, torch.randn(2, 40, 6, 6, dtype=F64))
    assert all(torch.equal(k, s) for k, s in zip(kept, snapshot))
    release_workspace()
    assert not _workspace.buffers


def _assert_grads_are_the_dense_paths(a, b, x):
    """The gradients that b(a(x)).sum().backward() left are those of the dense path (which then runs
    once, mode "never", and leaves its own)."""
    tensors = (*a.parameters(), *b.parameters(), x)
    got = [p.grad.clone() for p in tensors]
    for p in tensors:
        p.grad = None
    S.set_mode("never")
    b(a(x)).sum().backward()
    assert all(_rel(g, p.grad) < 1e-9 for g, p in zip(got, tensors))


def test_backward_reuses_the_forwards_packing(sparse_calls, monkeypatch):
    """The wide kernels' backward right after its forward finds the forward's packed weight in the
    kept buffer and does not pack again; another layer's packing in between, or an in-place change
    of the weights (their version counter), makes it pack again, with the dense path's results. A
    forward always packs."""
    ops = _sparse._ops()
    packs = []

    class Counting:
        def __getattr__(self, name):
            if name == "pack3":
                return lambda *args: (packs.append(args[0].data_ptr()), ops.pack3(*args))[1]
            return getattr(ops, name)

    monkeypatch.setattr(_sparse, "_ops", lambda: Counting())
    torch.manual_seed(6)
    a = KANConv2d(40, 40, 3, padding=1, grid_size=10, dtype=F64)
    b = KANConv2d(40, 40, 3, padding=1, grid_size=10, dtype=F64)
    x = torch.randn(2, 40, 6, 6, dtype=F64, requires_grad=True)  # a's backward then needs its packing
    S.set_mode("always")
    a(x).sum().backward()
    assert len(packs) == 1  # the forward's; the backward reused it
    packs.clear()
    for p in (*a.parameters(), x):
        p.grad = None
    b(a(x)).sum().backward()
    # the two forwards pack, b's backward reuses b's packing, a's packs again
    assert len(packs) == 3
    _assert_grads_are_the_dense_paths(a, b, x)
    S.set_mode("always")
    packs.clear()
    y0 = a(x)  # a forward always packs
    assert len(packs) == 1
    y0.sum().backward()
    assert len(packs) == 1
    with torch.no_grad():
        a.spline_weight.mul_(2)
        y1 = a(x)
        a.spline_weight.data.mul_(0.5)  # .data: the version counter does not move, the forward sees it
        y2 = a(x)
        S.set_mode("never")
        assert _rel(y2, a(x)) < 1e-9 and _rel(y2, y0) < 1e-12 and _rel(y0, y1) > 1e-3


def test_narrow_backward_reuses_each_layers_tables(sparse_calls, monkeypatch):
    """The narrow kernels' tables built by each layer's forward are kept (several of them) and found
    by the layer's backward; a forward always builds its own (an in-place change through .data, which
    the version counter does not see, still changes the next output), and the gradients are the dense
    path's."""
    built = []
    prepare = _sparse._Conv.prepare

    def counted(self, *args, **kwargs):
        built.append(self.weight_shape)
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(_sparse._Conv, "prepare", counted)
    torch.manual_seed(8)
    a = KANConv2d(3, 5, 3, grid_size=10, dtype=F64)
    b = KANConv2d(5, 4, 3, grid_size=10, dtype=F64)
    x = torch.randn(2, 3, 9, 9, dtype=F64, requires_grad=True)
    S.set_mode("always")
    b(a(x)).sum().backward()
    assert len(built) == 2  # the two forwards'; both backwards found them
    _assert_grads_are_the_dense_paths(a, b, x)
    S.set_mode("always")
    with torch.no_grad():
        y0 = a(x)
        a.spline_weight.data.mul_(2)
        y1 = a(x)
        S.set_mode("never")
        assert _rel(y1, a(x)) < 1e-9 and _rel(y0, y1) > 1e-3


def test_packing_is_not_taken_for_a_new_layer_at_a_freed_layers_addresses(sparse_calls):
    """A layer freed after its forward and a new one whose weights the allocator puts at the same
    addresses, with the same version counters (the same initialisation): the kept buffer's packing
    is the old layer's, and the new layer must pack its own (it did not when the key was addresses
    and versions only)."""
    import gc

    x = torch.rand(2, 40, 6, 6, dtype=F64) * 2 - 1
    coincided = 0
    for trial in range(8):
        S.set_mode("always")
        torch.manual_seed(trial)
        a = KANConv2d(40, 40, 3, padding=1, grid_size=10, dtype=F64)
        with torch.no_grad():
            a(x)
        seen = [(p.data_ptr(), p._version) for p in a.parameters()]
        del a
        gc.collect()
        torch.manual_seed(100 + trial)
        b = KANConv2d(40, 40, 3, padding=1, grid_size=10, dtype=F64)
        coincided += [(p.data_ptr(), p._version) for p in b.parameters()] == seen
        with torch.no_grad():
            got = b(x)
            S.set_mode("never")
            want = b(x)
        assert _rel(got, want) < 1e-9
    if not coincided:
        pytest.skip("the allocator never put the new layer's weights at the old one's addresses")


@pytest.mark.parametrize("mode, c_out", [("always", 40), ("always", 4), ("never", 40)], ids=["wide", "narrow", "dense"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_input_gradient_has_the_inputs_layout(sparse_calls, mode, c_out, memory_format):
    """The input's gradient has the input's strides on every path: a channel-first input gets a
    channel-first gradient (the layer before, a max-pool's backward say, then reads it without a
    copy), a channels-last input a channels-last one; the values are the reference's."""
    from kanvolution.reference import kan_conv_reference

    torch.manual_seed(9)
    layer = KANConv2d(6, c_out, 3, padding=1, grid_size=10, dtype=F64)
    x = (torch.rand(3, 6, 7, 7, dtype=F64) * 2 - 1).contiguous(memory_format=memory_format).requires_grad_()
    S.set_mode(mode)
    grad = torch.randn(3, c_out, 7, 7, dtype=F64)
    h = x * 1  # not a leaf: its gradient reaches the hook as the layer's backward gives it
    seen = []
    h.register_hook(lambda g: seen.append(g.stride()))
    layer(h).backward(grad)
    assert seen == [x.stride()]
    xr = x.detach().clone().requires_grad_()
    kan_conv_reference(xr, layer.base_weight, layer.spline_weight, layer.spline_scaler, layer.grid, layer.bias,
                       padding=1).backward(grad)
    assert _rel(x.grad, xr.grad) < 1e-9


def _train_step(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return [out.detach()] + [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["linear", "conv2d", "zoo"])
def test_compile_aot_eager_on_the_sparse_path(sparse_calls, kind):
    S.set_mode("always")
    if kind == "zoo":
        model, x = create_model("kanc_mlp_small"), torch.randn(4, 1, 28, 28)
    else:
        model, x = _op_layer(kind, F32)
    want = _train_step(model, x)
    calls = dict(sparse_calls)
    torch._dynamo.reset()
    got = _train_step(torch.compile(model, fullgraph=True, backend="aot_eager"), x)
    assert sparse_calls["forward"] > calls["forward"] and sparse_calls["backward"] > calls["backward"]
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


def _decision(layer, x, mode="auto"):
    S.set_mode(mode)
    weight = KF.combine_weights(layer.base_weight, layer.spline_weight, layer.spline_scaler)
    return S.use_sparse(x, layer.grid, weight, "bspline", layer.spline_order, "silu", layer.groups)


def test_rule(sparse_calls):
    x32, x64 = torch.rand(1, 8, 6, 6), torch.rand(1, 8, 6, 6, dtype=F64)
    # Narrow kernels (under 128 bytes of outputs per group) from grid size 7, wide ones from 10.
    assert _decision(KANConv2d(8, 5, 3, grid_size=7), x32)
    assert not _decision(KANConv2d(8, 5, 3, grid_size=6), x32)
    assert _decision(KANConv2d(8, 31, 3, grid_size=7), x32)
    assert not _decision(KANConv2d(8, 32, 3, grid_size=9), x32)
    assert _decision(KANConv2d(8, 32, 3, grid_size=10), x32)
    assert _decision(KANConv2d(8, 64, 3, grid_size=10), x32)
    assert _decision(KANConv2d(8, 96, 3, grid_size=8, groups=4), x32)  # 24 per group: narrow
    assert not _decision(KANConv2d(8, 16, 3, grid_size=9, dtype=F64), x64)  # 128 bytes: wide
    assert _decision(KANConv2d(8, 15, 3, grid_size=7, dtype=F64), x64)
    assert _decision(KANConv2d(8, 5, 3, grid_size=5), x32, "always")
    assert not _decision(KANConv2d(8, 64, 3, grid_size=50), x32, "never")
    # Never: adapted knots, another base activation, mixed dtypes (autocast), an empty batch.
    adapted = KANConv2d(8, 64, 3, grid_size=50)
    adapted.update_grid(torch.randn(4, 8, 6, 6))
    assert not _decision(adapted, x32, "always")
    layer = KANConv2d(8, 64, 3, grid_size=50)
    weight = KF.combine_weights(layer.base_weight, layer.spline_weight, layer.spline_scaler)
    assert not S.use_sparse(x32, layer.grid, weight, "bspline", 3, "tanh", 1)
    assert not S.use_sparse(x32, layer.grid, weight.bfloat16(), "bspline", 3, "silu", 1)
    assert not S.use_sparse(x32[:0], layer.grid, weight, "bspline", 3, "silu", 1)
    # Each of them still runs, on the dense path.
    adapted(x32).sum().backward()
    KANConv2d(8, 64, 3, grid_size=50, base_activation=nn.Tanh)(x32).sum().backward()
    assert sparse_calls == {"forward": 0, "backward": 0}


def test_rule_for_dense_layers(sparse_calls):
    """KANLinear: the wide-width layers from grid size 10; the narrow-width ones on the narrow
    kernels from DENSE_NARROW_MIN_BATCH values per channel and grid size 10, on the wide kernels
    below that batch, and then from grid size 20."""
    small, large = torch.rand(S.DENSE_NARROW_MIN_BATCH - 1, 8), torch.rand(S.DENSE_NARROW_MIN_BATCH, 8)
    assert _decision(KANLinear(8, 64, grid_size=10), small)
    assert not _decision(KANLinear(8, 64, grid_size=9), large)
    assert _decision(KANLinear(8, 10, grid_size=10), large)
    assert not _decision(KANLinear(8, 10, grid_size=9), large)
    assert not _decision(KANLinear(8, 10, grid_size=19), small)
    assert _decision(KANLinear(8, 10, grid_size=20), small)
    assert _decision(KANLinear(8, 10, grid_size=5), small, "always")
    layer = KANLinear(8, 10, grid_size=20)
    weight = KF.combine_weights(layer.base_weight, layer.spline_weight, layer.spline_scaler)
    kinds = {n: S._conv(torch.rand(n, 8), layer.grid, weight.shape, 3, (), (), 1).kernel_kind
             for n in (1, S.DENSE_NARROW_MIN_BATCH - 1, S.DENSE_NARROW_MIN_BATCH)}
    assert kinds == {1: "wide", S.DENSE_NARROW_MIN_BATCH - 1: "wide", S.DENSE_NARROW_MIN_BATCH: "narrow"}


@pytest.mark.parametrize("batch", [1, 37, S.DENSE_NARROW_MIN_BATCH], ids=["one", "wide", "narrow"])
@pytest.mark.parametrize("c_out", [6, 40])
def test_dense_layer_on_both_kernels_matches_the_dense_path(sparse_calls, batch, c_out):
    """A dense layer runs as a kernel-1 convolution over its batch (both kernel kinds, by batch and
    width): outputs and all gradients are the dense path's (float64)."""
    torch.manual_seed(0)
    layer = KANLinear(7, c_out, grid_size=11, bias=True, dtype=F64)
    x = (torch.rand(batch, 7, dtype=F64) * 2.6 - 1.3).requires_grad_()
    results = {}
    for mode in ("always", "never"):
        S.set_mode(mode)
        out = layer(x)
        g = torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)
        results[mode] = (out, *torch.autograd.grad(out, (x, *layer.parameters()), g))
    assert sparse_calls == {"forward": 1, "backward": 1}
    for got, want in zip(results["always"], results["never"]):
        assert got.shape == want.shape and got.stride() == want.stride()
        assert _rel(got, want) < 1e-12


def test_mode_switches(monkeypatch):
    monkeypatch.delenv(S.ENV_VAR, raising=False)
    assert S.mode() == "auto"
    monkeypatch.setenv(S.ENV_VAR, "Never")
    assert S.mode() == "never"
    S.set_mode("always")
    assert S.mode() == "always"
    S.set_mode(None)
    assert S.mode() == "never"
    monkeypatch.setenv(S.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="KANVOLUTION_SPARSE must be one of auto, always, never; got 'sometimes'"):
        S.mode()
    with pytest.raises(ValueError, match="sparse mode must be one of"):
        S.set_mode("yes")


def test_build_failure_warns_once_and_falls_back_to_dense(sparse_calls, monkeypatch):
    import warnings

    from torch.utils import cpp_extension

    from kanvolution._sparse import _loader

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    layer, x = _op_layer("conv2d")
    S.set_mode("never")
    want = layer(x)
    monkeypatch.setattr(cpp_extension, "load", broken)
    _loader.load.cache_clear()
    try:
        S.set_mode("always")
        with pytest.warns(RuntimeWarning, match="could not build the sparse CPU kernels.*no compiler here.*dense path"):
            out = layer(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(layer(x), out)
        assert torch.equal(out, want)
        assert not _sparse.available()
    finally:
        monkeypatch.undo()
        _loader.load.cache_clear()
    assert sparse_calls == {"forward": 0, "backward": 0}


def test_one_build_mechanism_for_both_extensions(monkeypatch, tmp_path, capsys):
    from torch.utils import cpp_extension

    from kanvolution._sparse import _loader
    from kanvolution.ops import build

    seen = {}
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: seen.update(kwargs))
    assert build.build(_loader.SPARSE) is not None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "building the sparse CPU kernels" in err
    assert seen["name"].startswith("kanvolution_sparse_torch") and seen["name"] != build.extension_name()
    assert seen["extra_cflags"] == build.build_flags(native=True)[0]
    assert (tmp_path / seen["name"]).is_dir() and not (tmp_path / seen["name"] / "kanvolution.pid").exists()


@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (1, 2)], ids=["fast", "stride", "groups"])
def test_narrow_kernels_any_output_layout(stride, groups):
    # The narrow kernels write (N, O, *S) or channel-last outputs and read output gradients of any strides.
    params, grid = _params(4, 6, (3, 3), groups, 5, 3)
    weight = KF.combine_weights(*params).detach()
    x = torch.rand(3, 4, 9, 8, dtype=F64) * 2.4 - 1.2
    conv = _sparse._Conv(x, *_sparse.knot_params(grid), weight.shape, 3, stride, 1, groups, "narrow")
    prepared = conv.prepare(weight)
    last, first = conv.forward(prepared), conv.forward(prepared, channels_last=False)
    assert first.is_contiguous() and last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(first, last)
    grad_out = torch.randn_like(first)
    want = conv.backward(grad_out.contiguous(memory_format=torch.channels_last), prepared, x.shape)
    for got in (conv.backward(grad_out, prepared, x.shape), conv.backward(grad_out.transpose(2, 3).contiguous()
                                                                           .transpose(2, 3), prepared, x.shape)):
        assert all(torch.equal(g, w) for g, w in zip(got, want))
