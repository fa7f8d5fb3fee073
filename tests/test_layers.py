"""KANConv1d/2d/3d and KANLinear: parity with the reference loop, gradients, shapes, I/O, errors."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import kanvolution
from kanvolution import KANConv1d, KANConv2d, KANConv3d, KANLinear
from kanvolution import functional as KF
from kanvolution.ops import kan
from kanvolution.reference import kan_conv_reference, kan_linear_reference

CONV = {1: KANConv1d, 2: KANConv2d, 3: KANConv3d}
TORCH_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPATIAL = {1: (11,), 2: (9, 8), 3: (6, 5, 7)}

# (ndim, in, out, kernel, options): every option of nn.ConvNd and the KAN options, crossed.
CONFIGS = [
    (2, 3, 4, 3, {}),
    (2, 2, 3, (3, 2), dict(stride=2, padding=1)),
    (2, 4, 6, (2, 3), dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2)),
    (2, 3, 2, 3, dict(padding="same", padding_mode="reflect", spline_order=1)),
    (2, 2, 2, (2, 4), dict(padding="same", dilation=(1, 2), padding_mode="replicate", spline_order=2)),
    (2, 2, 3, 3, dict(padding=2, padding_mode="circular", spline_order=4, grid_size=7)),
    (2, 2, 2, 3, dict(padding="valid", grid_size=1)),
    (2, 3, 3, 1, dict(groups=3, spline_order=0, grid_size=3)),
    (2, 2, 4, 3, dict(padding=1, bias=True, grid_size=8, grid_range=(-2.0, 0.5))),
    (2, 2, 2, 3, dict(padding=1, base_activation=nn.Tanh)),
    (1, 3, 2, 3, dict(padding=1)),
    (1, 2, 4, 4, dict(stride=3, dilation=2, padding="valid", groups=2, spline_order=2)),
    (1, 2, 2, 2, dict(padding="same", padding_mode="reflect", grid_size=6)),
    (3, 2, 2, 2, {}),
    (3, 2, 4, (2, 3, 1), dict(stride=(1, 2, 1), padding=(1, 0, 1), padding_mode="replicate", groups=2)),
    (3, 1, 2, 3, dict(padding="same", padding_mode="circular", spline_order=1, grid_size=4)),
]


def _ids(cfg):
    ndim, cin, cout, k, opts = cfg
    return f"{ndim}d-{cin}x{cout}-k{k}-" + ",".join(f"{key}={val}" for key, val in opts.items())


def _make(cfg, dtype=torch.float64):
    ndim, cin, cout, k, opts = cfg
    torch.manual_seed(1)
    layer = CONV[ndim](cin, cout, k, dtype=dtype, **opts)
    with torch.no_grad():  # make every parameter matter, not only the near-zero initial splines
        layer.spline_weight.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
    # Inputs partly outside the grid (and its extension), to exercise the base-only region.
    x = (torch.randn(2, cin, *SPATIAL[ndim], dtype=dtype) * 1.6).requires_grad_()
    return layer, x


def _reference(layer, x):
    return kan_conv_reference(x, layer.base_weight, layer.spline_weight, layer.spline_scaler, layer.grid,
                              layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups,
                              layer.padding_mode, layer.spline_order, layer.base_activation)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_parity_with_reference_float64(cfg):
    layer, x = _make(cfg)
    out = layer(x)
    ref = _reference(layer, x)
    assert out.shape == ref.shape
    assert _rel(out, ref) < 1e-9
    grad = torch.randn_like(out)
    params = [p for p in layer.parameters()]
    got = torch.autograd.grad(out, [x] + params, grad)
    want = torch.autograd.grad(ref, [x] + params, grad)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-9


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_output_shape_matches_torch_conv(cfg):
    ndim, cin, cout, k, opts = cfg
    conv_opts = {key: v for key, v in opts.items() if key in ("stride", "padding", "dilation", "groups",
                                                             "padding_mode", "bias")}
    layer, x = _make(cfg, torch.float32)
    torch_conv = TORCH_CONV[ndim](cin, cout, k, **conv_opts)
    assert layer(x.detach().float()).shape == torch_conv(x.detach().float()).shape
    # unbatched input, as nn.ConvNd accepts it
    assert layer(x[0].detach().float()).shape == torch_conv(x[0].detach().float()).shape


@pytest.mark.parametrize("cfg", [CONFIGS[2], CONFIGS[4], CONFIGS[11], CONFIGS[14]], ids=_ids)
def test_gradcheck(cfg):
    layer, x = _make(cfg)
    x = x[:1].detach().requires_grad_()

    def fn(inp, base, spline, scaler):
        return KF._kan_convnd(layer._ndim, inp, base, spline, scaler, layer.grid, None, layer.stride,
                              layer.padding, layer.dilation, layer.groups, layer.padding_mode,
                              layer.spline_order, layer.base_activation)

    args = (x, layer.base_weight.detach().requires_grad_(), layer.spline_weight.detach().requires_grad_(),
            layer.spline_scaler.detach().requires_grad_())
    assert torch.autograd.gradcheck(fn, args)


def test_linear_parity_and_gradcheck():
    torch.manual_seed(0)
    layer = KANLinear(5, 3, bias=True, dtype=torch.float64, grid_size=6, spline_order=2)
    with torch.no_grad():
        layer.spline_weight.normal_()
    x = (torch.randn(4, 2, 5, dtype=torch.float64) * 1.5).requires_grad_()
    out = layer(x)
    ref = kan_linear_reference(x, layer.base_weight, layer.spline_weight, layer.spline_scaler, layer.grid,
                               layer.bias, layer.spline_order, layer.base_activation)
    assert out.shape == (4, 2, 3)
    assert _rel(out, ref) < 1e-9
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, [x, *layer.parameters()], grad),
                    torch.autograd.grad(ref, [x, *layer.parameters()], grad)):
        assert _rel(g, w) < 1e-9
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x[:1].detach().requires_grad_(),))


def test_matches_paper_formula_by_hand():
    """One output pixel computed from the paper's formula with the dense Cox-de Boor bases."""
    torch.manual_seed(0)
    layer = KANConv2d(2, 1, 2, padding=1, dtype=torch.float64, grid_size=4)
    with torch.no_grad():
        layer.spline_weight.normal_()
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))  # zero padding FIRST: pads contribute phi(0)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(2):
        for u in range(2):
            for v in range(2):
                t = xp[0, i, u, v]
                bases = KF.b_splines(t.view(1, 1), layer.grid[i:i + 1], 3)[0, 0]
                total += layer.base_weight[0, i, u, v] * torch.nn.functional.silu(t)
                total += layer.spline_scaler[0, i, u, v] * (layer.spline_weight[0, i, u, v] * bases).sum()
    assert torch.allclose(layer(x)[0, 0, 0, 0], total, rtol=1e-12, atol=1e-12)


def test_padding_goes_through_phi():
    """Expanding first and zero-padding the expansion would give 0 at the border, not phi(0)."""
    layer = KANConv2d(1, 1, 3, padding=1, dtype=torch.float64)
    with torch.no_grad():
        layer.base_weight.zero_()
        layer.spline_scaler.fill_(1.0)
        layer.spline_weight.fill_(1.0)  # partition of unity: phi == 1 inside the grid
    out = layer(torch.zeros(1, 1, 4, 4, dtype=torch.float64))
    assert torch.allclose(out, torch.full_like(out, 9.0))


def test_naive_and_fused_agree_and_naive_is_twice_differentiable():
    torch.manual_seed(0)
    layer = KANConv2d(2, 3, 3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    fused = layer(x)
    layer.implementation = "naive"
    naive = layer(x)
    assert _rel(fused, naive) < 1e-12
    assert torch.autograd.gradgradcheck(lambda inp: layer(inp), (x[:1].detach().requires_grad_(),))


def test_non_uniform_grid_parity():
    torch.manual_seed(0)
    layer = KANConv2d(2, 3, 3, padding=1, dtype=torch.float64, grid_size=6)
    data = torch.randn(8, 2, 6, 6, dtype=torch.float64) * torch.tensor([0.5, 2.0], dtype=torch.float64).view(1, 2, 1, 1)
    layer.update_grid(data)
    steps = layer.grid.diff(dim=1)
    assert not torch.allclose(steps, steps[:, :1].expand_as(steps))  # really non-uniform now
    x = (torch.randn(2, 2, 6, 6, dtype=torch.float64) * 2).requires_grad_()
    out, ref = layer(x), _reference(layer, x)
    assert _rel(out, ref) < 1e-9
    grad = torch.randn_like(out)
    assert _rel(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(ref, x, grad)[0]) < 1e-9


def test_float32_close_to_float64_reference():
    layer, x = _make(CONFIGS[1])
    ref = _reference(layer, x).detach()
    layer32 = copy.deepcopy(layer).float()
    out = layer32(x.detach().float())
    assert _rel(out.double(), ref) < 1e-5


def test_outside_grid_is_base_only():
    layer = KANConv1d(1, 1, 1, dtype=torch.float64, grid_size=4)
    with torch.no_grad():
        layer.spline_weight.fill_(5.0)
        layer.base_weight.fill_(2.0)
        layer.spline_scaler.fill_(1.0)
    far = torch.tensor([[[-10.0, 10.0, 1e6]]], dtype=torch.float64)
    assert torch.allclose(layer(far), 2.0 * torch.nn.functional.silu(far))


def test_nan_input_propagates():
    layer = KANConv2d(1, 1, 3, padding=1)
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = float("nan")
    out = layer(x)
    assert torch.isnan(out).any() and torch.isfinite(out[0, 0, 3, 3])


def test_memory_format_follows_input():
    layer = KANConv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    assert layer(x).is_contiguous()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out_cl = layer(x_cl)
    assert torch.allclose(out_cl, layer(x), atol=1e-6)
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()


@pytest.mark.parametrize("ndim", [2, 3])
def test_module_to_memory_format_like_torch_conv(ndim):
    """model.to(memory_format=...) works as for nn.ConvNd models, with the same outputs."""
    torch.manual_seed(0)
    cls, fmt = CONV[ndim], {2: torch.channels_last, 3: torch.channels_last_3d}[ndim]
    model = nn.Sequential(cls(1, 3, 3, padding=1), cls(3, 2, 3))
    x = torch.randn(2, 1, *SPATIAL[ndim])
    expected = model(x)
    grads = torch.autograd.grad(expected.sum(), list(model.parameters()))
    model.to(memory_format=fmt)
    assert model[0].spline_weight.is_contiguous()  # coefficient tensors keep their layout
    out = model(x.to(memory_format=fmt))
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.is_contiguous(memory_format=fmt)  # weights laid out channels-last => output too, as nn.Conv
    for got, want in zip(torch.autograd.grad(out.sum(), list(model.parameters())), grads):
        assert torch.allclose(got, want, atol=1e-5)


def test_large_batch_is_chunked_consistently(monkeypatch):
    torch.manual_seed(0)
    layer = KANConv2d(2, 3, 3, padding=1, dtype=torch.float64)
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    g = torch.autograd.grad(out.sum(), [x, layer.spline_weight])
    monkeypatch.setattr(kan, "EXPANSION_CHUNK_BYTES", 1)  # one sample per chunk
    out2 = layer(x)
    g2 = torch.autograd.grad(out2.sum(), [x, layer.spline_weight])
    assert _rel(out2, out) < 1e-12 and all(_rel(a, b) < 1e-12 for a, b in zip(g2, g))


# ------------------------------------------------------------------------------------------------
# Parameters, initialisation, state
# ------------------------------------------------------------------------------------------------


def test_parameter_shapes_and_count():
    layer = KANConv2d(4, 6, (3, 2), groups=2, grid_size=10)
    assert layer.base_weight.shape == (6, 2, 3, 2)
    assert layer.spline_weight.shape == (6, 2, 3, 2, 13)
    assert layer.spline_scaler.shape == (6, 2, 3, 2)
    assert layer.grid.shape == (4, 17)
    assert layer.bias is None
    assert sum(p.numel() for p in layer.parameters()) == 6 * 2 * 6 * (10 + 3 + 2)
    assert "grid" in dict(layer.named_buffers())
    assert KANConv2d(1, 1, 3, bias=True).bias.shape == (1,)


def test_initialisation_follows_the_paper():
    torch.manual_seed(0)
    layer = KANConv2d(8, 16, 3, grid_size=10)
    bound = (6.0 / (6.0 * 9)) ** 0.5  # kaiming_uniform(a=sqrt(5)) with fan_in = kh * kw (per pair)
    for p in (layer.base_weight, layer.spline_scaler):
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    # spline noise: least-squares fit of +-scale_noise/(2G) noise at the grid points
    phi = layer.evaluate_phi(layer.grid[0, 3:14]) - layer.base_weight.unsqueeze(-1) * torch.nn.functional.silu(
        layer.grid[0, 3:14])
    values = phi / layer.spline_scaler.unsqueeze(-1)
    assert values.abs().max() <= 0.1 / 20 + 1e-6
    assert values.abs().max() > 0.5 * 0.1 / 20
    assert torch.equal(layer.grid[0], KF.uniform_knots(10, 3, (-1.0, 1.0))[0])


def test_device_and_dtype_factory_kwargs():
    layer = KANConv2d(2, 2, 3, device="cpu", dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in layer.state_dict().values())
    assert layer.to(torch.float32).grid.dtype == torch.float32


def test_state_dict_and_pickle_round_trip():
    torch.manual_seed(0)
    layer = KANConv2d(2, 3, 3, padding=1, grid_size=7, bias=True)
    x = torch.randn(2, 2, 6, 6)
    layer.update_grid(x)  # non-default knots must survive too
    expected = layer(x)
    fresh = KANConv2d(2, 3, 3, padding=1, grid_size=7, bias=True)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), expected)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh(x), expected)
    clone = pickle.loads(pickle.dumps(layer))
    assert torch.equal(clone(x), expected)
    lin = KANLinear(4, 2)
    assert torch.equal(pickle.loads(pickle.dumps(lin))(x[:, 0, 0, :4]), lin(x[:, 0, 0, :4]))


def test_repr_shows_non_defaults():
    r = repr(KANConv2d(3, 8, 3, stride=2, padding=1, groups=1, grid_size=10))
    assert "3, 8, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), grid_size=10" in r
    assert "spline_order" not in r
    r = repr(KANConv1d(2, 2, 3, padding="same", padding_mode="reflect", spline_order=2, bias=True))
    assert "padding='same'" in r and "padding_mode='reflect'" in r and "spline_order=2" in r and "bias=True" in r
    assert repr(KANLinear(4, 5, grid_range=(0, 1))).startswith("KANLinear(\n  in_features=4, out_features=5, grid_range=(0.0, 1.0)")


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(in_channels=3, out_channels=4, kernel_size=3, groups=2), ValueError, "in_channels must be divisible by groups"),
        (dict(in_channels=4, out_channels=3, kernel_size=3, groups=2), ValueError, "out_channels must be divisible"),
        (dict(in_channels=2, out_channels=2, kernel_size=3, padding_mode="mirror"), ValueError, "padding_mode must be one of"),
        (dict(in_channels=2, out_channels=2, kernel_size=3, grid_size=0), ValueError, "grid_size must be >= 1"),
        (dict(in_channels=2, out_channels=2, kernel_size=3, grid_size=2.5), TypeError, "grid_size must be an int"),
        (dict(in_channels=2, out_channels=2, kernel_size=3, spline_order=-1), ValueError, "spline_order must be >= 0"),
        (dict(in_channels=2, out_channels=2, kernel_size=3, grid_range=(1, -1)), ValueError, "low < high"),
        (dict(in_channels=2, out_channels=2, kernel_size=3, padding="full"), ValueError, "padding must be 'valid', 'same'"),
        (dict(in_channels=2, out_channels=2, kernel_size=3, padding="same", stride=2), ValueError, "strided"),
        (dict(in_channels=2, out_channels=2, kernel_size=(3, 3, 3)), ValueError, "kernel_size must be an int or a tuple of 2"),
        (dict(in_channels=2, out_channels=2, kernel_size=0), ValueError, "kernel_size must be positive"),
        (dict(in_channels=0, out_channels=2, kernel_size=3), ValueError, "in_channels must be >= 1"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        KANConv2d(**kwargs)


def test_forward_errors():
    layer = KANConv2d(3, 4, 3)
    with pytest.raises(ValueError, match="expected input with 3 channels, got 2"):
        layer(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="expects an input of 4 dimensions"):
        layer(torch.randn(8, 8))
    with pytest.raises(TypeError, match="floating point"):
        layer(torch.ones(1, 3, 8, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="does not match the layer's dtype"):
        layer(torch.ones(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="expects a Tensor"):
        layer([[1.0]])
    with pytest.raises(ValueError, match=r"expected input of shape \(\*, 4\)"):
        KANLinear(4, 2)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="grid must hold one knot vector per input channel"):
        KF.kan_conv2d(torch.randn(1, 3, 5, 5), layer.base_weight, layer.spline_weight, layer.spline_scaler,
                      layer.grid[:2])


# ------------------------------------------------------------------------------------------------
# Grid adaptation and regularisation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 3])
def test_update_grid_keeps_the_function(order):
    torch.manual_seed(0)
    layer = KANConv2d(2, 3, 3, padding=1, grid_size=8, spline_order=order, dtype=torch.float64)
    with torch.no_grad():  # smooth learned-looking functions: coefficients sampled from sines
        knots = layer.grid[0]
        greville = torch.stack([knots[g + 1:g + order + 1].mean() for g in range(layer.spline_weight.shape[-1])])
        phase = torch.rand(layer.spline_weight.shape[:-1] + (1,), dtype=torch.float64) * 6
        layer.spline_weight.copy_(torch.sin(3 * greville + phase))
    x = torch.rand(16, 2, 8, 8, dtype=torch.float64) * 1.2 - 0.7  # inside the grid, off-centre
    before = layer(x)
    old_grid = layer.grid.clone()
    layer.update_grid(x)
    after = layer(x)
    assert not torch.allclose(layer.grid, old_grid)
    lo, hi = x.min().item(), x.max().item()
    assert layer.grid[:, order].max() <= min(lo, 0.0) + 0.02  # padding zeros are data too
    assert layer.grid[:, -order - 1].min() >= hi - 0.02
    assert ((after - before).norm() / before.norm()).item() < 0.01
    assert _rel(after, before) < 0.05


def test_update_grid_is_robust_to_degenerate_data():
    layer = KANConv2d(3, 2, 3, grid_size=5)
    x = torch.zeros(1, 3, 3, 3)
    x[:, 1] = 0.3  # constant channels, a single window
    layer.update_grid(x)
    assert torch.isfinite(layer.grid).all() and torch.isfinite(layer.spline_weight).all()
    assert (layer.grid.diff(dim=1) > 0).all()
    assert torch.isfinite(layer(x)).all()
    lin = KANLinear(4, 2)
    lin.update_grid(torch.randn(2, 4))  # fewer samples than bases
    assert torch.isfinite(lin.spline_weight).all()
    with pytest.raises(ValueError, match="non-finite"):
        lin.update_grid(torch.tensor([[float("nan"), 0.0, 0.0, 0.0]]))


def test_update_grids_on_a_model_runs_in_order():
    torch.manual_seed(0)
    model = nn.Sequential(KANConv2d(1, 2, 3), nn.Flatten(), KANLinear(2 * 4 * 4, 3))
    x = torch.rand(8, 1, 6, 6) * 3
    before = model(x)
    kanvolution.update_grids(model, x)
    after = model(x)
    assert ((after - before).norm() / before.norm()).item() < 0.05
    interior = model[0].grid[0, 3:-3]  # adapted from [-1, 1] to the [0, 3] inputs
    assert abs(interior[0].item()) < 0.05 and abs(interior[-1].item() - 3.0) < 0.05


def test_regularization_loss():
    layer = KANConv2d(2, 2, 3, grid_size=5)
    loss = layer.regularization_loss()
    assert loss.ndim == 0 and loss > 0
    loss.backward()
    assert layer.spline_weight.grad is not None and layer.spline_scaler.grad is not None
    with torch.no_grad():  # all mass on one phi: zero entropy, L1 = that phi's mean |coefficient|
        layer.spline_weight.zero_()
        layer.spline_scaler.fill_(1.0)
        layer.spline_weight[0, 0, 0, 0] = 2.0
    assert torch.allclose(layer.regularization_loss(1.0, 1.0), torch.tensor(2.0))
    assert torch.allclose(layer.regularization_loss(0.0, 1.0), torch.tensor(0.0), atol=1e-6)
    model = nn.Sequential(layer, KANConv2d(2, 2, 1))
    total = kanvolution.regularization_loss(model, 1.0, 0.0)
    assert torch.allclose(total, layer.regularization_loss(1.0, 0.0) + model[1].regularization_loss(1.0, 0.0))
    with pytest.raises(ValueError, match="no KAN layers"):
        kanvolution.regularization_loss(nn.Linear(2, 2))


def test_regularization_shrinks_splines_in_training():
    torch.manual_seed(0)
    layer = KANLinear(3, 2)
    with torch.no_grad():
        layer.spline_weight.normal_()
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    start = layer.regularization_loss(1.0, 0.0).item()
    for _ in range(50):
        opt.zero_grad()
        layer.regularization_loss(1.0, 0.0).backward()
        opt.step()
    assert layer.regularization_loss(1.0, 0.0).item() < 0.2 * start


def test_evaluate_phi_matches_layer():
    torch.manual_seed(0)
    layer = KANConv2d(2, 4, 3, groups=2, dtype=torch.float64)
    with torch.no_grad():
        layer.spline_weight.normal_()
    t = torch.linspace(-1.5, 1.5, 7, dtype=torch.float64)
    phi = layer.evaluate_phi(t)
    assert phi.shape == (4, 1, 3, 3, 7)
    # a constant image gives out[o] = sum over taps (and the group's input channels) of phi(value)
    for j in (0, 3, 6):
        x = torch.full((1, 2, 3, 3), t[j].item(), dtype=torch.float64)
        out = layer(x)[0, :, 0, 0]
        assert torch.allclose(out, phi[..., j].sum(dim=(1, 2, 3)))
