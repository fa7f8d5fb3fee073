"""The compiled CPU loops of the B-spline family (kanvolution.ops.build, ops.bspline): parity with
the portable path, dispatch from the op's CPU kernel, the build (name, lock, ninja, fallback)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from kanvolution import KANConv1d, KANConv2d, KANLinear
from kanvolution import functional as KF
from kanvolution.ops import bases
from kanvolution.ops import bspline as B
from kanvolution.ops import build as ck
from kanvolution.ops import kan

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-12, F32: 2e-6}


@pytest.fixture(scope="module")
def ops():
    if os.environ.get(ck.ENV_VAR, "").strip().lower() in ("0", "false", "off", "no"):
        pytest.skip(f"{ck.ENV_VAR} disables the compiled kernels")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = ck.load()
    if loaded is None:
        pytest.skip("the compiled kernels could not be built on this machine")
    return loaded


@pytest.fixture
def switch():
    """Turn the kernels on/off for one test; the default comes back afterwards."""
    yield ck.set_enabled
    ck.set_enabled(None)


@pytest.fixture
def calls(monkeypatch):
    """Counts of the op's calls that the compiled loops handled (the dense path: the sparse kernels
    are off for the test)."""
    from kanvolution.ops import sparse

    monkeypatch.setattr(sparse, "_override", "never")
    counts = {"expand": 0, "grad_input": 0}
    family = bases.get_basis("bspline")

    def counted(name, original):
        def run(*args):
            done = original(*args)
            counts[name] += bool(done)
            return done
        return run

    patched = dataclasses.replace(family, cpu_fill=counted("expand", family.cpu_fill),
                                  cpu_input_grad=counted("grad_input", family.cpu_input_grad))
    monkeypatch.setitem(bases.BASES, "bspline", patched)
    return counts


def _grid(grid_size, order, channels, dtype):
    """Uniform knots with a different first knot and spacing in every channel."""
    knots = KF.uniform_knots(grid_size, order, channels=channels, dtype=F64)
    scale = torch.linspace(0.3, 2.5, channels, dtype=F64).unsqueeze(1)
    shift = torch.linspace(-0.7, 0.9, channels, dtype=F64).unsqueeze(1)
    grid = (knots * scale + shift).to(dtype)
    assert B._uniform_spacing(grid) is not None
    return grid


def _values(grid, n, dtype):
    """Random values inside and on both sides of each channel's knots, every knot exactly,
    values just below/above knots, +-inf and NaN: ``(L, C)``."""
    lo, hi = grid[:, 0].to(F64), grid[:, -1].to(F64)
    inside = lo + (torch.rand(n, grid.shape[0], dtype=F64) * 1.4 - 0.2) * (hi - lo)
    knots = grid.T.contiguous()
    inf = torch.tensor(float("inf"), dtype=dtype)
    rows = [inside.to(dtype), knots, torch.nextafter(knots, -inf), torch.nextafter(knots, inf)]
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0], dtype=dtype)
    rows.append(special.unsqueeze(1).expand(-1, grid.shape[0]))
    x = torch.cat(rows)
    return x[torch.randperm(x.shape[0])].contiguous()


def _knot_params(grid):
    spacing = B._uniform_spacing(grid)
    return grid[:, 0].contiguous(), (1.0 / spacing).contiguous()


def _rel_err(got, want):
    finite = want.isfinite()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~finite & ~want.isnan()], want[~finite & ~want.isnan()])
    scale = want[finite].abs().max().clamp_min(1e-300)
    return ((got[finite] - want[finite]).abs().max() / scale).item()


CASES = [(order, grid_size) for order in (1, 2, 3, 4) for grid_size in (1, 3, 10)] + [(5, 4), (7, 2)]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("order,grid_size", CASES)
def test_expand_matches_portable_path(ops, switch, order, grid_size, dtype):
    grid = _grid(grid_size, order, 3, dtype)
    x = _values(grid, 200, dtype)
    act = torch.nn.functional.silu(x)
    want = torch.full(x.shape + (grid.shape[1] - order,), 7.0, dtype=dtype)
    B.fill(x, grid, order, act, want)
    got = torch.full_like(want, 123.0)  # every element must be written
    assert B.cpu_fill(x, grid, order, act, got)
    assert _rel_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("order,grid_size", CASES)
def test_grad_input_matches_portable_path(ops, order, grid_size, dtype):
    grid = _grid(grid_size, order, 4, dtype)
    x = _values(grid, 150, dtype)
    n_slots = grid.shape[1] - order
    # Strided (L, C, B) gradient, as a permuted view.
    grad_e = torch.randn(n_slots, x.shape[1], x.shape[0], dtype=dtype).permute(2, 1, 0)
    g_base = torch.randn_like(x)
    want = torch.empty_like(x)
    B.input_grad(x, grid, order, grad_e, g_base, want)
    got = torch.full_like(x, 123.0)
    assert B.cpu_input_grad(x, grid, order, grad_e, g_base, got)
    assert _rel_err(got, want) <= TOL[dtype]


def test_compiled_loops_decline_what_they_do_not_handle(ops, switch):
    grid = _grid(4, 3, 2, F64)
    x = _values(grid, 10, F64)
    out = torch.empty(x.shape + (grid.shape[1] - 3,), dtype=F64)
    bent = grid.clone()
    bent[0, 3] += 0.05
    assert not B.cpu_fill(x, bent, 3, x, out)  # non-uniform knots
    assert not B.cpu_fill(x.float(), grid.float(), 0, x.float(), out.float())  # order 0
    switch(False)
    assert not B.cpu_fill(x, grid, 3, x, out)


def _layer_grads(layer, x, enabled):
    ck.set_enabled(enabled)
    x = x.detach().requires_grad_()
    out = layer(x)
    grads = torch.autograd.grad(out, [x, *layer.parameters()], torch.ones_like(out))
    return [out.detach(), *grads]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_layer_forward_backward_match(ops, switch, calls, order):
    torch.manual_seed(order)
    layer = KANConv2d(3, 4, 3, padding=1, grid_size=5, spline_order=order, grid_range=(-1.5, 0.5), dtype=F64)
    with torch.no_grad():
        layer.spline_weight.normal_()
        layer.grid[1].mul_(2.0).add_(0.3)  # channels with their own knots
    x = torch.randn(3, 3, 7, 6, dtype=F64) * 1.5
    want = _layer_grads(layer, x, False)
    assert calls == {"expand": 0, "grad_input": 0}
    got = _layer_grads(layer, x, True)
    assert calls["expand"] >= 2 and calls["grad_input"] >= 1  # forward, recomputed in backward
    for g, w in zip(got, want):
        assert _rel_err(g, w) <= 1e-12


@pytest.mark.parametrize("activation", [nn.Tanh, nn.SiLU])
def test_linear_and_1d_float32_and_other_activation(ops, switch, calls, activation):
    torch.manual_seed(0)
    for layer, x in [
        (KANLinear(6, 3, grid_size=4, base_activation=activation), torch.randn(5, 6) * 1.5),
        (KANConv1d(2, 3, 3, grid_size=7, base_activation=activation), torch.randn(2, 2, 9) * 1.5),
    ]:
        with torch.no_grad():
            layer.spline_weight.normal_()
        want = _layer_grads(layer, x, False)
        got = _layer_grads(layer, x, True)
        for g, w in zip(got, want):
            assert _rel_err(g, w) <= 1e-5
    assert calls["expand"] >= 4 and calls["grad_input"] >= 2


def test_chunked_batch_matches(ops, switch, calls, monkeypatch):
    layer = KANConv2d(2, 3, 3, grid_size=6, dtype=F64)
    with torch.no_grad():
        layer.spline_weight.normal_()
    x = torch.randn(7, 2, 8, 8, dtype=F64)
    want = _layer_grads(layer, x, False)
    monkeypatch.setattr(kan, "EXPANSION_CHUNK_BYTES", 2 * (8 * 8) * 2 * 10 * 8)  # two samples per chunk
    got = _layer_grads(layer, x, True)
    assert calls["expand"] == 8 and calls["grad_input"] == 4
    for g, w in zip(got, want):
        assert _rel_err(g, w) <= 1e-12


def test_unsupported_cases_use_the_portable_path(ops, switch, calls):
    switch(True)
    x = torch.randn(2, 3, 5, 5, dtype=F64, requires_grad=True)
    # Non-uniform knots and spline order 0.
    layer = KANConv2d(3, 2, 3, grid_size=4, dtype=F64)
    with torch.no_grad():
        layer.grid[0, 3] += 0.05
    layer(x).sum().backward()
    KANConv2d(3, 2, 3, grid_size=4, spline_order=0, dtype=F64)(x).sum().backward()
    assert calls == {"expand": 0, "grad_input": 0}


def test_build_failure_warns_once_and_falls_back(switch, monkeypatch):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(ck, "_ops", None)
    monkeypatch.setattr(ck, "_attempted", False)
    switch(True)
    layer = KANConv2d(2, 2, 3, dtype=F64)
    x = torch.randn(1, 2, 5, 5, dtype=F64)
    with pytest.warns(RuntimeWarning, match="could not build the compiled CPU kernels.*no compiler here"):
        out = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(layer(x), out)
        assert ck.load() is None
    switch(False)
    assert torch.equal(layer(x), out)


def test_build_says_that_it_builds_and_how_long(ops, monkeypatch, tmp_path, capsys):
    from torch.utils import cpp_extension

    seen = {}
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(ck, "_ops", None)
    monkeypatch.setattr(ck, "_attempted", False)
    assert ck.load() is not None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "building the compiled CPU kernels" in err and err.rstrip().endswith(" s")
    assert seen["name"] == ck.extension_name() and Path(seen["sources"][0]) == ck.SOURCE


def test_switches(switch, monkeypatch):
    monkeypatch.delenv(ck.ENV_VAR, raising=False)
    assert ck.is_enabled()
    monkeypatch.setenv(ck.ENV_VAR, "0")
    assert not ck.is_enabled()
    switch(True)
    assert ck.is_enabled()
    switch(None)
    monkeypatch.setenv(ck.ENV_VAR, "1")
    assert ck.is_enabled()
    switch(False)
    assert not ck.is_enabled()


def test_import_and_layer_creation_do_not_build():
    code = (
        "import sys, kanvolution; from kanvolution.ops import build\n"
        "kanvolution.KANConv2d(2, 3, 3)\n"
        "print(build._attempted, 'torch.utils.cpp_extension' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_extension_name_carries_torch_version_and_flags():
    name = ck.extension_name()
    version = "".join(c if c.isalnum() else "_" for c in torch.__version__)
    assert name.startswith(f"kanvolution_cpu_torch{version}_")
    cflags, ldflags = ck.build_flags()
    source = ck.SOURCE.read_text()
    assert ck.extension_name(source, (cflags, ldflags)) == name
    assert ck.extension_name(source, (cflags + ["-DX"], ldflags)) != name
    assert ck.extension_name(source + "\n", (cflags, ldflags)) != name


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_of_a_dead_build_is_removed_at_once(tmp_path):
    (tmp_path / ck._LOCK_NAME).write_text(str(_dead_pid()))
    (tmp_path / "lock").touch()  # torch's own lock, left by the same killed build
    start = time.monotonic()
    with ck.build_lock(tmp_path, poll=5.0):
        assert (tmp_path / ck._LOCK_NAME).read_text() == str(os.getpid())
        assert not (tmp_path / "lock").exists()
    assert time.monotonic() - start < 2.0
    assert not (tmp_path / ck._LOCK_NAME).exists()


def test_lock_of_a_live_build_is_waited_for(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ck._LOCK_NAME).write_text(str(proc.pid))
        acquired = threading.Event()

        def take():
            with ck.build_lock(tmp_path, poll=0.05):
                acquired.set()

        thread = threading.Thread(target=take)
        thread.start()
        assert not acquired.wait(0.5)  # the builder is alive
        proc.kill()
        proc.wait()
        assert acquired.wait(5.0)  # gone: taken over at once
        thread.join()
    finally:
        proc.kill()


def test_ninja_beside_the_interpreter_is_found(tmp_path, monkeypatch):
    import shutil

    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    ninja = bindir / "ninja"
    ninja.write_text("#!/bin/sh\necho 1.11\n")
    ninja.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert shutil.which("ninja") is None
    with ck._ninja_on_path():
        assert shutil.which("ninja") == str(ninja)
    assert shutil.which("ninja") is None
