"""The compiled CPU loops of the basis families other than B-splines (kanvolution.ops.families):
parity with each family's portable PyTorch forms, the op's CPU kernel running them, and the cases
they leave to the portable code."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kanvolution import KANConv2d
from kanvolution.bases import create_basis, list_bases
from kanvolution.ops import bases
from kanvolution.ops import build as ck

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-12, F32: 5e-6}
FAMILIES = [name for name in list_bases() if name != "bspline"]
# Options that make every constant of a family matter (per-channel rows differ after update_grid).
OPTIONS = {
    "rbf": {"grid_size": 7}, "wavelet": {"grid_size": 6}, "relu": {"grid_size": 5, "spline_order": 2},
    "fourier": {"grid_size": 4, "constant_term": True}, "chebyshev": {"degree": 9}, "legendre": {"degree": 7},
    "gram": {"degree": 6, "gram_points": 11}, "jacobi": {"degree": 5, "alpha": 0.5, "beta": 2.0},
    "bernstein": {"degree": 8},
}


@pytest.fixture(scope="module", autouse=True)
def ops():
    loaded = ck.load() if ck.is_enabled() else None
    if loaded is None:
        pytest.skip("the compiled kernels are switched off or could not be built")
    return loaded


@pytest.fixture
def switch():
    yield ck.set_enabled
    ck.set_enabled(None)


def _basis(name, channels=3, dtype=F64):
    torch.manual_seed(0)
    basis = create_basis(name, channels, dtype=dtype, **OPTIONS[name])
    if name in ("rbf", "wavelet", "relu"):  # every channel its own range
        basis.update_grid(torch.randn(200, channels, dtype=dtype) * torch.linspace(0.5, 2.0, channels, dtype=dtype))
    return basis


def _values(channels, dtype):
    x = torch.randn(57, channels, dtype=F64) * 2.0
    x[3, 0] = float("nan")
    return x.to(dtype)


def _close(got, want, dtype):
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    scale = want[finite].abs().max().clamp_min(1.0)
    assert ((got[finite] - want[finite]).abs().max() / scale).item() <= TOL[dtype]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("name", FAMILIES)
def test_fill_and_input_grad_match_the_portable_forms(name, dtype):
    basis = _basis(name, dtype=dtype)
    family = bases.get_basis(name)
    state, option = basis.state, basis.option
    x = _values(3, dtype)
    act = torch.nn.functional.silu(x)
    n = family.num_basis(state, option)
    want = torch.empty(x.shape + (1 + n,), dtype=dtype)
    family.fill(x, state, option, act, want)
    got = torch.full_like(want, 123.0)
    assert family.cpu_fill(x, state, option, act, got)
    _close(got, want, dtype)

    grad_e = torch.randn(x.shape[0], x.shape[1], 1 + n, dtype=F64).to(dtype)
    grad_e = grad_e.transpose(0, 1).contiguous().transpose(0, 1)  # strided, as the op passes it
    g_base = torch.randn_like(x)
    want_g = torch.empty_like(x)
    family.input_grad(x, state, option, grad_e, g_base, want_g)
    got_g = torch.full_like(x, 123.0)
    assert family.cpu_input_grad(x, state, option, grad_e, g_base, got_g)
    _close(got_g, want_g, dtype)


@pytest.mark.parametrize("name", FAMILIES)
def test_layer_runs_the_loops_and_matches_the_portable_path(name, switch, monkeypatch):
    counts = {"fill": 0, "grad": 0}
    family = bases.get_basis(name)

    def counted(key, original):
        def run(*args):
            done = original(*args)
            counts[key] += bool(done)
            return done
        return run

    monkeypatch.setitem(bases.BASES, name, dataclasses.replace(
        family, cpu_fill=counted("fill", family.cpu_fill), cpu_input_grad=counted("grad", family.cpu_input_grad)))
    torch.manual_seed(1)
    common = {k: v for k, v in OPTIONS[name].items() if k in ("grid_size", "spline_order", "degree")}
    other = {k: v for k, v in OPTIONS[name].items() if k not in common}
    layer = KANConv2d(3, 4, 3, padding=1, basis=name, dtype=F64, basis_options=other, **common)
    with torch.no_grad():
        layer.spline_weight.normal_()
    x = torch.randn(2, 3, 6, 5, dtype=F64) * 1.5

    def run(enabled):
        switch(enabled)
        xi = x.clone().requires_grad_()
        out = layer(xi)
        return [out.detach(), *torch.autograd.grad(out, [xi, *layer.parameters()], torch.ones_like(out))]

    want = run(False)
    assert counts == {"fill": 0, "grad": 0}
    got = run(True)
    assert counts["fill"] >= 1 and counts["grad"] >= 1
    for g, w in zip(got, want):
        _close(g, w, F64)


def test_loops_decline_what_they_do_not_handle(switch):
    family = bases.get_basis("chebyshev")
    state, option = _basis("chebyshev").state, 9
    x = _values(3, F64)
    out = torch.empty(x.shape + (option + 2,), dtype=F64)
    assert not family.cpu_fill(x.half(), state, option, x.half(), out.half())  # dtype
    assert not family.cpu_fill(x[:0], state, option, x[:0], out[:0])  # empty
    assert not family.cpu_fill(x, state, option, x.float(), out)  # mixed dtypes
    rbf = bases.get_basis("rbf")
    wrong = _basis("rbf", channels=2).state  # rows for 2 channels, values of 3: the portable code reports it
    assert not rbf.cpu_fill(x, wrong, 0, x, torch.empty(x.shape + (8,), dtype=F64))
    switch(False)
    assert not family.cpu_fill(x, state, option, x, out)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("name", ["rbf", "wavelet", "fourier"])
@pytest.mark.parametrize("shortcut", [True, False])
def test_recurrences_and_their_direct_forms_match_far_from_the_centres(name, dtype, shortcut):
    """rbf/wavelet walk from the nearest centre and fourier turns the previous pair only on the
    states their families define (even centres, frequencies 1..G); a state that is not of that
    shape takes the direct form. Both match the portable code, also far outside the range."""
    from kanvolution.ops import families

    basis = _basis(name, dtype=dtype)
    state = basis.state.clone()
    if not shortcut:
        if name == "fourier":
            state[1] += 0.25
        else:
            state[:, 2] += 0.1 * state[:, -1]
    params = families.fourier if name == "fourier" else families.centred
    loop_option = params(state, basis.option, state.new_zeros(1, 3))[2]
    assert bool(loop_option & 2 if name == "fourier" else loop_option) == shortcut
    family = bases.get_basis(name)
    x = torch.cat([torch.linspace(-60, 60, 241, dtype=F64).unsqueeze(1).expand(-1, 3),
                   torch.randn(40, 3, dtype=F64) * 3]).to(dtype).contiguous()
    n = family.num_basis(state, basis.option)
    want, got = (torch.empty(x.shape + (1 + n,), dtype=dtype) for _ in range(2))
    family.fill(x, state, basis.option, x, want)
    assert family.cpu_fill(x, state, basis.option, x, got)
    tol = 1e-12 if dtype == F64 else 2e-5
    if name == "fourier":  # |k x| up to 240: both forms round the angle, by up to |k x| eps
        tol *= 300
    assert (got - want).abs().max() <= tol
    grad_e = torch.randn(x.shape + (1 + n,), dtype=dtype)
    want_g, got_g = torch.empty_like(x), torch.empty_like(x)
    family.input_grad(x, state, basis.option, grad_e, torch.zeros_like(x), want_g)
    assert family.cpu_input_grad(x, state, basis.option, grad_e, torch.zeros_like(x), got_g)
    scale = 1.0 if name != "fourier" else n * 4.0  # derivatives carry the frequency
    assert (got_g - want_g).abs().max() <= tol * scale * 10
