"""Basis families: values against independent closed forms, exact derivatives, state, registry,
errors, and the per-tap reference over any basis against one convolution of the expansion."""
from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.polynomial import chebyshev as npcheb
from numpy.polynomial import legendre as npleg

from kanvolution import reference as bspline_reference
from kanvolution.bases import (
    Basis,
    BSplineBasis,
    basis_from_state,
    basis_functions,
    create_basis,
    kan_conv_reference,
    list_bases,
)
from kanvolution.functional import b_splines

FAMILIES = ["bspline", "rbf", "chebyshev", "legendre", "gram", "jacobi", "bernstein", "fourier", "wavelet", "relu"]
GRID_FAMILIES = ["bspline", "rbf", "wavelet", "relu"]
OPTIONS = {  # non-default options, so the tests see them used
    "bspline": dict(grid_size=4, spline_order=3, grid_range=(-1.5, 2.0)),
    "rbf": dict(grid_size=5, grid_range=(-2.0, 1.5)),
    "wavelet": dict(grid_size=4, grid_range=(-1.0, 2.0)),
    "relu": dict(grid_size=4, spline_order=2, grid_range=(-1.5, 1.0)),
    "chebyshev": dict(degree=4),
    "legendre": dict(degree=5),
    "gram": dict(degree=4, gram_points=7),
    "jacobi": dict(degree=4, alpha=0.5, beta=2.0),
    "bernstein": dict(degree=4),
    "fourier": dict(grid_size=3, constant_term=True),
}


def make(name: str, channels: int = 2, dtype=torch.float64, **extra) -> Basis:
    return create_basis(name, channels, dtype=dtype, **{**OPTIONS[name], **extra})


def points(channels: int = 2, n: int = 200, lo: float = -2.5, hi: float = 2.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.rand(n, channels, generator=g, dtype=torch.float64) * (hi - lo) + lo)


# -- independent closed forms (numpy / math, one value at a time where it is simplest) -------------


def cox_de_boor(t: float, knots: list[float], k: int, g: int) -> float:
    if k == 0:
        return 1.0 if knots[g] <= t < knots[g + 1] else 0.0
    left = (t - knots[g]) / (knots[g + k] - knots[g]) * cox_de_boor(t, knots, k - 1, g)
    right = (knots[g + k + 1] - t) / (knots[g + k + 1] - knots[g + 1]) * cox_de_boor(t, knots, k - 1, g + 1)
    return left + right


def jacobi_closed(n: int, a: float, b: float, x: np.ndarray) -> np.ndarray:
    def binom(top: float, k: int) -> float:
        return math.gamma(top + 1) / (math.gamma(k + 1) * math.gamma(top - k + 1))

    return sum(binom(n + a, n - s) * binom(n + b, s) * ((x - 1) / 2) ** s * ((x + 1) / 2) ** (n - s)
               for s in range(n + 1))


def gram_closed(degree: int, m: int, x: np.ndarray) -> list[np.ndarray]:
    """Monic polynomials orthogonal on the m points by Gram-Schmidt on monomials (exact inner
    products on the discrete points), as coefficient vectors evaluated with numpy."""
    nodes = -1 + (2 * np.arange(m) + 1) / m
    polys: list[np.ndarray] = []
    for d in range(degree + 1):
        p = np.zeros(d + 1)
        p[d] = 1.0  # monomial x^d, lowest power first
        for q in polys:
            p[: len(q)] -= (np.polynomial.polynomial.polyval(nodes, p) @ np.polynomial.polynomial.polyval(nodes, q)
                            / (np.polynomial.polynomial.polyval(nodes, q) ** 2).sum()) * q
        polys.append(p)
    return [np.polynomial.polynomial.polyval(x, p) for p in polys]


def closed_form(name: str, t: np.ndarray) -> np.ndarray:
    """Values ``(len(t), n)`` of the family with ``OPTIONS[name]`` at the points ``t``."""
    o = OPTIONS[name]
    s = np.tanh(t)
    if name == "bspline":
        G, K = o["grid_size"], o["spline_order"]
        a, b = o["grid_range"]
        h = (b - a) / G
        knots = [a + (j - K) * h for j in range(G + 2 * K + 1)]
        return np.array([[cox_de_boor(v, knots, K, g) for g in range(G + K)] for v in t])
    if name in ("rbf", "wavelet"):
        G = o["grid_size"]
        a, b = o["grid_range"]
        u = (t[:, None] - np.linspace(a, b, G)[None]) / ((b - a) / (G - 1))
        return np.exp(-u**2) if name == "rbf" else (1 - u**2) * np.exp(-u**2 / 2)
    if name == "relu":
        G, K = o["grid_size"], o["spline_order"]
        a, b = o["grid_range"]
        h = (b - a) / G
        si = a + (np.arange(G + K) - K) * h
        r = np.maximum(t[:, None] - si, 0) * np.maximum(si + (K + 1) * h - t[:, None], 0)
        return r**2 * 16 / ((K + 1) * h) ** 4
    if name == "fourier":
        k = np.arange(1, o["grid_size"] + 1)
        return np.concatenate([np.ones((len(t), 1)), np.cos(t[:, None] * k), np.sin(t[:, None] * k)], axis=1)
    D = o["degree"]
    if name == "chebyshev":
        return np.stack([npcheb.chebval(s, np.eye(D + 1)[n]) for n in range(D + 1)], 1)
    if name == "legendre":
        return np.stack([npleg.legval(s, np.eye(D + 1)[n]) for n in range(D + 1)], 1)
    if name == "jacobi":
        return np.stack([jacobi_closed(n, o["alpha"], o["beta"], s) for n in range(D + 1)], 1)
    if name == "gram":
        return np.stack(gram_closed(D, o["gram_points"], s), 1)
    if name == "bernstein":
        u = (1 + s) / 2
        return np.stack([math.comb(D, k) * u**k * (1 - u) ** (D - k) for k in range(D + 1)], 1)
    raise AssertionError(name)


def test_every_family_is_registered_and_tested():
    assert sorted(list_bases()) == sorted(FAMILIES)
    assert list_bases()[0] == "bspline"


@pytest.mark.parametrize("name", FAMILIES)
def test_values_match_closed_form(name):
    basis = make(name, channels=1)
    t = torch.cat([points(1, 300).view(-1), torch.tensor([0.0, -1.0, 1.0, 0.5])])
    got = basis(t.view(-1, 1))[:, 0].numpy()
    want = closed_form(name, t.numpy())
    assert got.shape == want.shape == (t.numel(), basis.num_basis)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_bspline_is_bit_for_bit_b_splines():
    basis = make("bspline", channels=3)
    x = points(3, 500)
    m = basis.state.shape[1]
    x[:m, 0] = basis.state[0]  # values on every knot too
    want = b_splines(x, basis.state, basis.option)
    assert torch.equal(basis.expand(x), want)
    x3 = x.view(5, 100, 3)
    assert torch.equal(basis.expand(x3), want.view(5, 100, 3, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bspline_initial_knots_are_the_layers_knots(dtype):
    from kanvolution.functional import uniform_knots

    basis = create_basis("bspline", 3, grid_size=7, spline_order=2, grid_range=(-0.3, 1.1), dtype=dtype)
    assert torch.equal(basis.state, uniform_knots(7, 2, (-0.3, 1.1), channels=3, dtype=dtype))


def test_jacobi_zero_zero_is_legendre_and_gram_tends_to_legendre():
    x = points(2)
    legendre = create_basis("legendre", degree=5, dtype=torch.float64)
    jacobi = create_basis("jacobi", degree=5, alpha=0.0, beta=0.0, dtype=torch.float64)
    torch.testing.assert_close(jacobi(x), legendre(x), rtol=0, atol=1e-13)
    # Monic Legendre p_n = P_n * 2^n (n!)^2 / (2n)!; Gram on very many points approaches it.
    gram = create_basis("gram", degree=5, gram_points=10**6, dtype=torch.float64)
    scale = torch.tensor([2**n * math.factorial(n) ** 2 / math.factorial(2 * n) for n in range(6)], dtype=torch.float64)
    torch.testing.assert_close(gram(x), legendre(x) * scale, rtol=0, atol=1e-9)


def test_bernstein_partition_of_unity_and_non_negative():
    b = create_basis("bernstein", degree=7, dtype=torch.float64)
    v = b(points(2, 500, -20.0, 20.0))
    assert (v >= 0).all()
    torch.testing.assert_close(v.sum(-1), torch.ones(500, 2, dtype=torch.float64), rtol=0, atol=1e-14)


# -- derivatives -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_derivative_matches_finite_differences_and_autograd(name):
    basis = make(name)
    x = points(2, 300)
    d = basis.derivative(x)
    eps = 1e-6
    fd = (basis(x + eps) - basis(x - eps)) / (2 * eps)
    torch.testing.assert_close(d, fd, rtol=1e-6, atol=1e-6)
    xr = x.clone().requires_grad_(True)
    values = basis(xr)
    auto = torch.stack([torch.autograd.grad(values[..., g].sum(), xr, retain_graph=True)[0]
                        for g in range(basis.num_basis)], -1)
    torch.testing.assert_close(d, auto, rtol=1e-11, atol=1e-11)
    assert d.abs().max() > 0.1  # the comparison is not between zeros


@pytest.mark.parametrize("name", FAMILIES)
def test_gradcheck_through_expand(name):
    basis = make(name)
    x = points(2, 6).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: basis.expand(v), (x,))


# -- local form --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bspline", "relu"])
@pytest.mark.parametrize("grid_range", [None, (-0.7, 0.3)])
def test_local_form_scatters_to_expansion(name, grid_range):
    extra = {} if grid_range is None else {"grid_range": grid_range}
    basis = make(name, channels=3, **extra)
    x = points(3, 400, -3.0, 3.0)
    x[0] = float("nan")
    index, values = basis.local(x)
    assert basis.is_local
    assert index.shape == values.shape == x.shape + (basis.option + 1,)
    assert index.min() >= 0 and index.max() < basis.num_basis
    dense = torch.zeros(x.shape + (basis.num_basis,), dtype=x.dtype).scatter_add_(-1, index, values)
    torch.testing.assert_close(dense[1:], basis(x)[1:], rtol=0, atol=1e-13)


def test_local_form_on_adapted_nonuniform_knots():
    basis = make("bspline", channels=2)
    basis.update_grid(torch.randn(300, 2, dtype=torch.float64) ** 3)
    x = points(2, 300)
    index, values = basis.local(x)
    dense = torch.zeros(x.shape + (basis.num_basis,), dtype=x.dtype).scatter_add_(-1, index, values)
    torch.testing.assert_close(dense, basis(x), rtol=0, atol=1e-13)
    torch.testing.assert_close(basis.derivative(x), (basis(x + 1e-6) - basis(x - 1e-6)) / 2e-6, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in ("bspline", "relu")])
def test_dense_families_have_no_local_form(name):
    basis = make(name)
    assert not basis.is_local
    with pytest.raises(NotImplementedError, match=name):
        basis.local(points(2))


# -- state, op triple, dtype ------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_pickle_and_op_triple_round_trip(name):
    basis = make(name, channels=3)
    if basis.has_grid:
        basis.update_grid(torch.randn(100, 3, dtype=torch.float64) * 2)
    x = points(3)
    want = basis(x)

    fresh = make(name, channels=3) if name != "jacobi" else make(name, channels=3, alpha=0.0, beta=0.0)
    buffer = io.BytesIO()
    torch.save(basis.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh(x), want)

    assert torch.equal(pickle.loads(pickle.dumps(basis))(x), want)

    op_name, state, option = basis.op_args()
    assert op_name == name and isinstance(option, int)
    fns = basis_functions(op_name)
    assert torch.equal(fns.expand(x, state, option), want)
    assert torch.equal(fns.derivative(x, state, option), basis.derivative(x))
    assert fns.num_basis(state, option) == want.shape[-1] == basis.num_basis
    # num_basis reads only the state's shape: it works on a meta tensor, as a fake kernel needs.
    assert fns.num_basis(state.to("meta"), option) == basis.num_basis
    assert torch.equal(basis_from_state(op_name, state.clone(), option)(x), want)


@pytest.mark.parametrize("name", FAMILIES)
def test_float32_state_and_input(name):
    basis = make(name, dtype=torch.float32)
    assert basis.state.dtype == torch.float32
    x = points(2).float()
    out = basis(x)
    assert out.dtype == torch.float32
    want = make(name)(x.double())
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-5)
    assert basis.to(torch.float64).state.dtype == torch.float64


# -- grid adaptation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GRID_FAMILIES)
def test_update_grid_covers_data_and_keeps_function(name):
    basis = make(name, channels=2, grid_size=8)
    g = torch.Generator().manual_seed(2)
    x = torch.cat([(torch.randn(400, 1, generator=g, dtype=torch.float64) * 0.2 + 0.2).clamp(-0.5, 0.8),
                   torch.rand(400, 1, generator=g, dtype=torch.float64) * 1.4 - 0.9], 1)
    n = basis.num_basis
    # Two smooth functions of the old basis (least-squares fits of sin and cos on [-1, 1]).
    t = torch.linspace(-1.0, 1.0, 200, dtype=torch.float64).view(-1, 1).expand(-1, 2)
    target = torch.stack([torch.sin(2 * t), torch.cos(t)], -1).transpose(0, 1)  # (C, T, 2)
    coeff = torch.linalg.lstsq(basis.design_matrix(t).transpose(0, 1), target, driver="gelsd").solution  # (C, n, 2)
    before = basis(x).transpose(0, 1) @ coeff  # (C, S, 2)
    stale = basis.state.clone()
    refit = basis.update_grid(x, coeff, margin=0.05)
    assert refit.shape == (2, n, 2) and not torch.equal(stale, basis.state)
    design = basis.design_matrix(x).transpose(0, 1)
    after = design @ refit
    # The refit is the least-squares solution (normal equations) and keeps the functions close.
    torch.testing.assert_close(design.transpose(1, 2) @ (after - before), torch.zeros_like(refit), rtol=0, atol=1e-8)
    error = (after - before).abs().max()
    assert error < 0.1 * (design @ coeff - before).abs().max()  # far better than stale coefficients
    if name == "bspline":  # how close depends on what the new functions can represent
        assert error < 2e-3
    # The functions now live over each channel's data range (plus the margin).
    lo, hi = x.min(0).values - 0.05, x.max(0).values + 0.05
    K = basis.option
    if name == "bspline":  # the interior knots blend quantiles and a uniform grid over the range
        torch.testing.assert_close(basis.state[:, K], 0.02 * lo + 0.98 * (lo + 0.05), rtol=0, atol=1e-12)
        torch.testing.assert_close(basis.state[:, -K - 1], 0.02 * hi + 0.98 * (hi - 0.05), rtol=0, atol=1e-12)
    elif name == "relu":  # s_K = a, s_last + (K + 1) h = b + K h
        h = basis.state[:, -1] / (K + 1)
        torch.testing.assert_close(basis.state[:, K], lo, rtol=0, atol=1e-12)
        torch.testing.assert_close(basis.state[:, -2] + basis.state[:, -1] - K * h, hi, rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(basis.state[:, 0], lo, rtol=0, atol=1e-12)
        torch.testing.assert_close(basis.state[:, -2], hi, rtol=0, atol=1e-12)
        torch.testing.assert_close(basis.state[:, -1], (hi - lo) / 7, rtol=0, atol=1e-12)


def test_bspline_update_grid_equals_kan_linear_layer():
    from kanvolution import KANLinear

    layer = KANLinear(3, 2, grid_size=6, dtype=torch.float64)
    basis = create_basis("bspline", 3, grid_size=6, dtype=torch.float64)
    x = torch.randn(500, 3, dtype=torch.float64) * torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    coeff = layer.spline_weight.detach().permute(1, 2, 0).clone()  # (C, n, out)
    layer.update_grid(x)
    refit = basis.update_grid(x, coeff, grid_eps=layer.grid_eps)
    assert torch.equal(basis.state, layer.grid)
    torch.testing.assert_close(refit, layer.spline_weight.detach().permute(1, 2, 0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in GRID_FAMILIES])
def test_families_without_grid_refuse_update_grid(name):
    basis = make(name)
    assert not basis.has_grid
    with pytest.raises(ValueError, match="no grid"):
        basis.update_grid(points(2))


def test_update_grid_bad_input():
    basis = make("rbf", channels=2)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        basis.update_grid(torch.zeros(10, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        basis.update_grid(torch.full((4, 2), float("inf"), dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one"):
        basis.update_grid(torch.zeros(0, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="coefficients"):
        basis.update_grid(torch.zeros(5, 2, dtype=torch.float64), torch.zeros(2, 3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="grid_eps"):
        basis.update_grid(torch.zeros(5, 2, dtype=torch.float64), grid_eps=2.0)


# -- registry and errors -----------------------------------------------------------------------------


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown basis 'spline'.*bspline.*relu"):
        create_basis("spline")
    with pytest.raises(ValueError, match="unknown basis"):
        basis_functions("nope")
    with pytest.raises(TypeError, match="must be a str"):
        basis_functions(3)


def test_common_options_are_accepted_everywhere_and_others_checked():
    for name in FAMILIES:
        create_basis(name, 1, grid_size=6, spline_order=2, grid_range=(-1.0, 1.0), degree=2)
    with pytest.raises(TypeError, match="unknown option.*'alpha'"):
        create_basis("chebyshev", alpha=1.0)
    with pytest.raises(TypeError, match="unknown option.*'degre'"):
        create_basis("legendre", degre=3)


@pytest.mark.parametrize("name, options, error, match", [
    ("bspline", dict(grid_size=0), ValueError, "grid_size must be >= 1"),
    ("bspline", dict(spline_order=-1), ValueError, "spline_order must be >= 0"),
    ("bspline", dict(grid_size=2.5), TypeError, "grid_size must be an int"),
    ("bspline", dict(grid_range=(1.0, -1.0)), ValueError, "low < high"),
    ("relu", dict(grid_range="ab"), TypeError, "pair of numbers"),
    ("rbf", dict(grid_size=1), ValueError, "grid_size must be >= 2"),
    ("wavelet", dict(grid_range=(0.0, float("inf"))), ValueError, "finite"),
    ("chebyshev", dict(degree=-1), ValueError, "degree must be >= 0"),
    ("jacobi", dict(alpha=-1.0), ValueError, "alpha > -1"),
    ("jacobi", dict(beta=float("nan")), ValueError, "beta"),
    ("gram", dict(degree=3, gram_points=3), ValueError, "points > 3"),
    ("fourier", dict(constant_term="yes"), TypeError, "constant_term must be a bool"),
    ("fourier", dict(grid_size=0), ValueError, "grid_size must be >= 1"),
])
def test_bad_options(name, options, error, match):
    with pytest.raises(error, match=match):
        create_basis(name, 2, **options)


def test_bad_states_and_inputs():
    with pytest.raises(ValueError, match="state of shape"):
        basis_from_state("bspline", torch.zeros(7), 3)
    with pytest.raises(ValueError, match="state of shape"):
        basis_from_state("jacobi", torch.zeros(3), 3)
    with pytest.raises(ValueError, match="option 0 or 1"):
        basis_from_state("fourier", torch.ones(3), 2)
    with pytest.raises(TypeError, match="option must be an int"):
        basis_from_state("chebyshev", torch.zeros(0), 2.0)
    with pytest.raises(ValueError, match="in_channels"):
        create_basis("rbf", 0)
    for name in GRID_FAMILIES:
        with pytest.raises(ValueError, match=r"expects values shaped \(\.\.\., 2\)"):
            make(name, channels=2)(torch.zeros(4, 3, dtype=torch.float64))


# -- the per-tap reference over any basis -------------------------------------------------------------

CONV_CASES = [  # (spatial input, kernel, kwargs)
    ((7, 6), (3, 2), dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=1, padding_mode="zeros")),
    ((6, 7), (3, 3), dict(stride=1, padding="same", dilation=1, groups=2, padding_mode="reflect")),
    ((9,), (3,), dict(stride=2, padding=2, dilation=2, groups=1, padding_mode="circular")),
    ((4, 4, 3), (2, 2, 2), dict(stride=1, padding=1, dilation=1, groups=2, padding_mode="replicate")),
]


def conv_weights(c_out: int, c_in_g: int, kernel: tuple[int, ...], n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (c_out, c_in_g) + kernel
    return (torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape + (n,), generator=g, dtype=torch.float64),
            torch.randn(shape, generator=g, dtype=torch.float64))


def pad_first(x, kernel, padding, dilation, padding_mode):
    nd = len(kernel)
    dilation = (dilation,) * nd if isinstance(dilation, int) else dilation
    if padding == "same":
        pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
    else:
        pads = [(p, p) for p in ((padding,) * nd if isinstance(padding, int) else padding)]
    flat = [v for pair in reversed(pads) for v in pair]
    return F.pad(x, flat) if padding_mode == "zeros" else F.pad(x, flat, mode=padding_mode)


def expand_then_one_conv(x, basis, base_weight, coefficients, scaler, stride, padding, dilation, groups,
                         padding_mode, activation=F.silu):
    """Pad first, expand every pixel into ``[act(x), f_0(x), ..]``, then one ``F.convNd``."""
    kernel = tuple(base_weight.shape[2:])
    nd = len(kernel)
    xp = pad_first(x, kernel, padding, dilation, padding_mode)
    xl = xp.movedim(1, -1)
    expansion = torch.cat([activation(xl).unsqueeze(-1), basis(xl)], -1)  # (N, *sp, C, n+1)
    expansion = expansion.flatten(-2).movedim(-1, 1)
    weight = torch.cat([base_weight.unsqueeze(-1), scaler.unsqueeze(-1) * coefficients], -1)
    weight = weight.movedim(-1, 2).flatten(1, 2)  # (O, C/g * (n+1), *kernel), channel major
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(expansion, weight, stride=stride, dilation=dilation, groups=groups)


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
@pytest.mark.parametrize("name", FAMILIES)
def test_reference_equals_expand_then_one_convolution(name, case):
    spatial, kernel, kw = CONV_CASES[case]
    c_in, c_out = 4, 2
    basis = make(name, channels=c_in)
    if basis.has_grid:  # per-channel states that differ
        basis.update_grid(torch.randn(200, c_in, dtype=torch.float64) * torch.linspace(0.5, 2.0, c_in, dtype=torch.float64))
    x = torch.randn((2, c_in) + spatial, dtype=torch.float64) * 1.5
    weights = conv_weights(c_out, c_in // kw["groups"], kernel, basis.num_basis)
    got = kan_conv_reference(x, basis, *weights, **kw)
    want = expand_then_one_conv(x, basis, *weights, **kw)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    # Gradients too (the reference is plain autograd code).
    xr = x.clone().requires_grad_(True)
    wr = [w.clone().requires_grad_(True) for w in weights]
    grad_out = torch.randn_like(got)
    g1 = torch.autograd.grad((kan_conv_reference(xr, basis, *wr, **kw) * grad_out).sum(), [xr, *wr])
    g2 = torch.autograd.grad((expand_then_one_conv(xr, basis, *wr, **kw) * grad_out).sum(), [xr, *wr])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_reference_equals_bspline_reference(case):
    spatial, kernel, kw = CONV_CASES[case]
    c_in, c_out = 4, 2
    basis = make("bspline", channels=c_in, grid_range=(-1.0, 1.0))
    basis.update_grid(torch.randn(200, c_in, dtype=torch.float64))
    x = torch.randn((2, c_in) + spatial, dtype=torch.float64)
    base, coeff, scaler = conv_weights(c_out, c_in // kw["groups"], kernel, basis.num_basis)
    bias = torch.randn(c_out, dtype=torch.float64)
    got = kan_conv_reference(x, basis, base, coeff, scaler, **kw, activation=torch.tanh, bias=bias)
    want = bspline_reference.kan_conv_reference(x, base, coeff, scaler, basis.state, bias,
                                                spline_order=basis.option, base_activation=torch.tanh, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
