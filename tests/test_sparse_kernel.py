"""The sparse CPU kernels against the dense fused path, the reference loop and gradcheck."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kanvolution import _sparse, reference
from kanvolution import functional as KF

pytestmark = pytest.mark.skipif(not _sparse.available(), reason="the sparse kernels could not be built")

F64 = torch.float64


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


def _sparse_layer(x, params, grid, order, ndim, stride=1, padding=0, dilation=1, groups=1):
    """The layer of kan_conv{n}d computed with the sparse kernels (padding and weights as the layer does)."""
    kernel = tuple(params[0].shape[2:])
    pad = KF.resolve_padding(padding, kernel, KF._ntuple(dilation, ndim, "dilation"), KF._ntuple(stride, ndim, "s"))
    weight = KF.combine_weights(*params)
    return _sparse.sparse_kan(KF.pad_input(x, pad, "zeros"), grid, weight, order, stride, dilation, groups)


CONV_CASES = [
    # ndim, c_in, c_out, kernel, stride, padding, dilation, groups, grid_size, order, spatial
    (2, 3, 5, (3, 3), 1, 1, 1, 1, 5, 3, (9, 8)),
    (2, 4, 6, (3, 2), (2, 1), 0, (1, 2), 2, 3, 1, (11, 9)),
    (2, 2, 40, (3, 3), 1, 1, 1, 1, 50, 2, (7, 7)),  # vector paths over 40 outputs, 50 intervals
    (2, 6, 36, (2, 2), 2, 1, 2, 3, 17, 4, (9, 10)),
    (2, 1, 20, (5, 5), 1, 2, 1, 1, 8, 5, (8, 8)),
    (1, 4, 16, (3,), 2, 1, 1, 2, 10, 3, (17,)),
    (3, 2, 18, (2, 3, 2), (1, 2, 1), 1, 1, 1, 6, 2, (4, 6, 5)),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}d-in{c[1]}-out{c[2]}-G{c[8]}-K{c[9]}")
def test_conv_matches_dense_path(case):
    ndim, c_in, c_out, kernel, stride, padding, dilation, groups, gs, order, spatial = case
    params, grid = _params(c_in, c_out, kernel, groups, gs, order)
    x = (torch.rand(2, c_in, *spatial, dtype=F64) * 2.6 - 1.4).requires_grad_()  # partly outside the knots
    conv = (KF.kan_conv1d, KF.kan_conv2d, KF.kan_conv3d)[ndim - 1]
    expected = conv(x, *params, grid, None, stride, padding, dilation, groups, spline_order=order)
    got = _sparse_layer(x, params, grid, order, ndim, stride, padding, dilation, groups)
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    assert _rel(got, expected) < 1e-9
    grad_out = torch.randn_like(expected)
    want = torch.autograd.grad(expected, [x, *params], grad_out)
    have = torch.autograd.grad(got, [x, *params], grad_out)
    for h, w in zip(have, want):
        assert torch.isfinite(h).all()
        assert _rel(h, w) < 1e-9


@pytest.mark.parametrize("order,gs", [(1, 3), (2, 7), (3, 12), (4, 4)])
def test_conv_matches_reference_loop(order, gs):
    params, grid = _params(3, 4, (3, 3), 1, gs, order)
    x = (torch.rand(2, 3, 7, 6, dtype=F64) * 2.4 - 1.3).requires_grad_()
    expected = reference.kan_conv_reference(x, *params, grid, padding=1, stride=(1, 2), spline_order=order)
    got = _sparse_layer(x, params, grid, order, 2, stride=(1, 2), padding=1)
    assert _rel(got, expected) < 1e-9
    grad_out = torch.randn_like(expected)
    for h, w in zip(torch.autograd.grad(got, [x, *params], grad_out),
                    torch.autograd.grad(expected, [x, *params], grad_out)):
        assert _rel(h, w) < 1e-9


def test_dense_layer_matches_kan_linear_and_reference():
    order, gs = 3, 20
    base = torch.randn(17, 5, dtype=F64)  # 17 outputs: one vector block of float64 and a tail
    spline = torch.randn(17, 5, gs + order, dtype=F64)
    scaler = torch.rand(17, 5, dtype=F64) + 0.5
    params = [t.requires_grad_() for t in (base, spline, scaler)]
    grid = KF.uniform_knots(gs, order, channels=5, dtype=F64)
    x = (torch.rand(6, 5, dtype=F64) * 2.4 - 1.2).requires_grad_()
    got = _sparse.sparse_kan(x, grid, KF.combine_weights(*params), order)
    grad_out = torch.randn(6, 17, dtype=F64)
    for expected in (KF.kan_linear(x, *params, grid, spline_order=order),
                     reference.kan_linear_reference(x, *params, grid, spline_order=order)):
        assert _rel(got, expected) < 1e-9
        for h, w in zip(torch.autograd.grad(got, [x, *params], grad_out, retain_graph=True),
                        torch.autograd.grad(expected, [x, *params], grad_out)):
            assert _rel(h, w) < 1e-9


def test_gradcheck():
    params, grid = _params(2, 2, (2, 2), 1, 3, 2)
    weight = KF.combine_weights(*params).detach().requires_grad_()
    x = (torch.rand(1, 2, 4, 4, dtype=F64) * 2.2 - 1.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w: _sparse.sparse_kan(a, grid, w, 2, stride=(1, 2), dilation=(2, 1)),
                                    (x, weight))


def test_several_batch_chunks_and_threads_agree():
    # 64 channels of 34x34 float64 values: the local form of one sample exceeds half the chunk
    # budget, so the batch is processed in several chunks.
    params, grid = _params(64, 8, (3, 3), 1, 10, 3)
    weight = KF.combine_weights(*params).detach()
    x = torch.rand(3, 64, 34, 34, dtype=F64) * 2 - 1
    t0, inv_h = _sparse.knot_params(grid)
    grad_out = torch.randn(3, 8, 32, 32, dtype=F64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append([_sparse.kan_conv(x, t0, inv_h, weight, 3),
                            _sparse.kan_conv_grad_input(grad_out, x, t0, inv_h, weight, 3),
                            _sparse.kan_conv_grad_weight(grad_out, x, t0, inv_h, weight.shape, 3)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    expanded = KF.expand_bases(x[:1], grid, 3)
    assert _rel(results[0][0][:1], F.conv2d(expanded, weight)) < 1e-9


def test_float32_close_to_float64():
    params, grid = _params(8, 40, (3, 3), 1, 10, 3)
    weight = KF.combine_weights(*params).detach()
    x = torch.rand(2, 8, 10, 10, dtype=F64) * 2 - 1
    out64 = _sparse.kan_conv(x, *_sparse.knot_params(grid), weight, 3)
    out32 = _sparse.kan_conv(x.float(), *_sparse.knot_params(grid.float()), weight.float(), 3)
    assert out32.dtype == torch.float32
    assert _rel(out32.double(), out64) < 1e-5


def test_pack_unpack_round_trip():
    w = torch.randn(6, 3 * 9, 2, 3)
    packed = _sparse.pack_weight(w, 6, 2, 2)
    assert packed.shape == (6, 6, 9 + 4, 3)
    assert (packed[:, :, 1:3] == 0).all() and (packed[:, :, -2:] == 0).all()
    assert torch.equal(_sparse.unpack_weight(packed, w.shape, 2, 2), w)


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
