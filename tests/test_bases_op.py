"""Every basis family through the layers' fused op: float64 parity with the per-tap reference of
kanvolution.bases (output and every gradient), gradcheck, opcheck, torch.compile, torch.export and
ONNX; the layer features per family (evaluate_phi, update_grid, state dicts, repr, init)."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from kanvolution import KANConv2d, KANLinear
from kanvolution.functional import combine_weights
from kanvolution.bases import create_basis, kan_conv_reference, list_bases
from kanvolution.ops import kan_forward

F64 = torch.float64
FAMILIES = list_bases()
GRIDDED = ("bspline", "rbf", "wavelet", "relu")
# Small options so that every family stays quick; jacobi with non-default alpha, beta.
OPTIONS = {"jacobi": {"basis_options": {"alpha": 0.5, "beta": 2.0}}, "fourier": {"grid_size": 3}}


def _layer(name, dtype=F64, channels=(2, 3), **kwargs):
    torch.manual_seed(0)
    kw = dict(grid_size=4, spline_order=2, degree=4, bias=True, dtype=dtype, basis=name)
    kw.update(OPTIONS.get(name, {}))
    kw.update(kwargs)
    layer = KANConv2d(*channels, 3, padding=1, padding_mode="reflect", **kw)
    with torch.no_grad():  # coefficients far from the initial noise, so every term matters
        layer.spline_weight.normal_()
    return layer


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_op_matches_the_per_tap_reference_with_every_gradient(name):
    layer = _layer(name, stride=(2, 1), dilation=(1, 2))
    x = (torch.randn(2, 2, 7, 8, dtype=F64) * 1.5).requires_grad_()
    params = [layer.base_weight, layer.spline_weight, layer.spline_scaler, layer.bias]
    out = layer(x)
    want = kan_conv_reference(x, layer.basis, layer.base_weight, layer.spline_weight, layer.spline_scaler,
                              layer.stride, layer.padding, layer.dilation, 1, "reflect", F.silu, layer.bias)
    assert out.shape == want.shape
    assert (out - want).abs().max() < 1e-9
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x] + params, g)
    ref = torch.autograd.grad(want, [x] + params, g)
    for a, b in zip(got, ref):
        assert (a - b).abs().max() < 1e-9


@pytest.mark.parametrize("name", FAMILIES)
def test_gradcheck_and_opcheck(name):
    layer = _layer(name)
    weight = combine_weights(layer.base_weight, layer.spline_weight, layer.spline_scaler)[:1, :, :2, :2]
    weight = weight.detach().requires_grad_()
    xl = torch.randn(1, 3, 3, 2, dtype=F64, requires_grad=True)  # channel-last, as the layers pass it
    conf = (name, layer.basis_option, "silu", [1, 1], [1, 1], 1, False)
    torch.library.opcheck(kan_forward, (xl, layer.grid, weight) + conf)
    assert torch.autograd.gradcheck(lambda a, w: kan_forward(a, layer.grid, w, *conf), (xl, weight))


@pytest.mark.parametrize("name", FAMILIES)
def test_compile_fullgraph_forward_and_backward(name):
    layer = _layer(name, dtype=torch.float32)
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    eager = torch.autograd.grad(layer(x).square().sum(), (x, layer.spline_weight))
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x).square().sum(), (x, layer.spline_weight))
    for a, b in zip(got, eager):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_export_and_onnx_of_a_layer_of_every_family(tmp_path):
    from kanvolution.export import check_onnx, export_onnx, export_program

    # One small layer per family in a chain: one export covers them all (each a few seconds alone).
    model = torch.nn.Sequential(*[_layer(name, dtype=torch.float32, channels=(2, 2)) for name in FAMILIES]).eval()
    with torch.no_grad():
        for layer in model:
            layer.spline_weight.mul_(0.1)
    x = torch.randn(2, 2, 6, 6)
    want = model(x)
    program = export_program(model, x, decompose=True)
    assert torch.allclose(program.module()(x), want, atol=1e-5)
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("kanvolution" in op for op in ops)  # decomposed into standard aten operations
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    assert check_onnx(model, export_onnx(model, x, tmp_path / "families.onnx"), x) < 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_evaluate_phi_is_what_the_layer_computes(name):
    layer = KANLinear(3, 2, dtype=F64, basis=name, **{"grid_size": 4, "degree": 3, **OPTIONS.get(name, {})})
    t = torch.linspace(-1.2, 1.2, 9, dtype=F64)
    phi = layer.evaluate_phi(t)  # (2, 3, 9)
    assert phi.shape == (2, 3, 9)
    x = t.view(-1, 1).expand(-1, 3)
    assert torch.allclose(layer(x), phi.sum(1).T, atol=1e-12)
    layer.implementation = "reference"
    assert torch.allclose(layer(x), phi.sum(1).T, atol=1e-12)


@pytest.mark.parametrize("name", FAMILIES)
def test_update_grid_keeps_the_function_or_is_refused(name):
    layer = _layer(name, grid_size=6)
    x = torch.rand(4, 2, 6, 6, dtype=F64) * 1.4 - 0.5  # inside [-1, 1] but off-centre
    if name not in GRIDDED:
        with pytest.raises(ValueError, match="has no grid"):
            layer.update_grid(x)
        return
    before, state = layer(x), layer.grid.clone()
    layer.update_grid(x)
    assert not torch.equal(layer.grid, state)
    # the refit keeps the layer's output close on the data it was fitted to
    assert (layer(x) - before).abs().max() < 0.05 * before.abs().max()


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_round_trip_repr_and_sizes(name):
    layer = _layer(name)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = _layer(name)
    with torch.no_grad():
        fresh.spline_weight.zero_()
        fresh.grid.add_(0.1 if fresh.grid.numel() else 0.0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(1, 2, 5, 5, dtype=F64)
    assert torch.equal(fresh(x), layer(x))
    assert ("basis=" in repr(layer)) == (name != "bspline")
    assert layer.spline_weight.shape == (3, 2, 3, 3, layer.basis.num_basis)
    assert layer.basis.num_basis == {"bspline": 6, "relu": 6, "rbf": 4, "wavelet": 4, "fourier": 6}.get(name, 5)


def test_basis_object_and_bad_arguments():
    basis = create_basis("rbf", 2, grid_size=7, grid_range=(-2, 2), dtype=F64)
    layer = KANConv2d(2, 1, 3, basis=basis, dtype=F64)
    assert layer.basis_name == "rbf" and layer.spline_weight.shape[-1] == 7
    assert torch.equal(layer.grid, basis.state) and layer.grid.data_ptr() != basis.state.data_ptr()
    with pytest.raises(ValueError, match="unknown basis 'spline'"):
        KANConv2d(2, 1, 3, basis="spline")
    with pytest.raises(TypeError, match="basis must be"):
        KANConv2d(2, 1, 3, basis=3)
    with pytest.raises(ValueError, match="holds a state for 2 input channel"):
        KANConv2d(3, 1, 3, basis=basis)
    with pytest.raises(TypeError, match="unknown option"):
        KANConv2d(2, 1, 3, basis="rbf", basis_options={"alpha": 1.0})


def test_initial_noise_fit_is_small_for_every_family():
    for name in FAMILIES:
        layer = KANLinear(4, 4, basis=name, dtype=F64, degree=5)
        phi = layer.evaluate_phi(torch.linspace(-1, 1, 11, dtype=F64))
        base = layer.base_weight.unsqueeze(-1) * F.silu(torch.linspace(-1, 1, 11, dtype=F64))
        spline = (phi - base) / layer.spline_scaler.unsqueeze(-1)
        assert 0 < spline.abs().max() < 0.2, name
