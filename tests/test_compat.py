"""The paper's layer name, arguments and checkpoint layout load into kanvolution unchanged."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kanvolution import KANConv2d
from kanvolution.compat import KAN_Convolutional_Layer
from kanvolution.reference import bspline_bases


def _paper_grid(G, K, taps, lo=-1.0, hi=1.0):
    h = (hi - lo) / G  # as the paper's code builds it: float32 arange * h + low, one row per tap
    return ((torch.arange(-K, G + K + 1) * h + lo).expand(taps, -1)).contiguous().float()


def _paper_state(cin, cout, k, G, K):
    torch.manual_seed(0)
    taps = k[0] * k[1]
    state = {}
    for p in range(cin * cout):
        state[f"convs.{p}.conv.base_weight"] = torch.randn(1, taps)
        state[f"convs.{p}.conv.spline_weight"] = torch.randn(1, taps, G + K)
        state[f"convs.{p}.conv.spline_scaler"] = torch.randn(1, taps)
        state[f"convs.{p}.conv.grid"] = _paper_grid(G, K, taps)
    return state


def _paper_forward(state, x, cin, cout, k, K, padding):
    """The paper's computation, pair by pair: unfold, one small KAN linear per pair, sum over inputs."""
    n, _, h, w = x.shape
    oh, ow = h + 2 * padding[0] - k[0] + 1, w + 2 * padding[1] - k[1] + 1
    out = torch.zeros(n, cout, oh, ow, dtype=torch.float64)
    for o in range(cout):
        for i in range(cin):
            p = o * cin + i
            cols = F.unfold(x[:, i:i + 1], k, padding=padding).transpose(1, 2)  # (N, L, taps)
            base = state[f"convs.{p}.conv.base_weight"].double()[0]
            spline = state[f"convs.{p}.conv.spline_weight"].double()[0]
            scaler = state[f"convs.{p}.conv.spline_scaler"].double()[0]
            grid = state[f"convs.{p}.conv.grid"].double()
            total = 0
            for tap in range(k[0] * k[1]):
                t = cols[..., tap]
                bases = bspline_bases(t, grid[tap], K)
                total = total + base[tap] * F.silu(t) + scaler[tap] * sum(c * b for c, b in zip(spline[tap], bases))
            out[:, o] += total.view(n, oh, ow)
    return out


def test_constructor_takes_the_papers_arguments():
    layer = KAN_Convolutional_Layer(in_channels=2, out_channels=3, kernel_size=(3, 3), stride=(1, 1),
                                    padding=(1, 1), dilation=(1, 1), grid_size=10, spline_order=3, scale_noise=0.1,
                                    scale_base=1.0, scale_spline=1.0, base_activation=nn.SiLU, grid_eps=0.02,
                                    grid_range=[-1, 1], device="cpu")
    assert isinstance(layer, KANConv2d)
    assert layer(torch.zeros(1, 2, 5, 5)).shape == (1, 3, 5, 5)
    assert sum(p.numel() for p in layer.parameters()) == 2 * 3 * 9 * (10 + 3 + 2)


@pytest.mark.parametrize("padding", [(0, 0), (1, 2)])
def test_paper_state_dict_loads_and_matches_the_papers_computation(padding):
    cin, cout, k, G, K = 2, 3, (3, 2), 6, 3
    state = _paper_state(cin, cout, k, G, K)
    layer = KAN_Convolutional_Layer(cin, cout, k, padding=padding, grid_size=G, spline_order=K).double()
    layer.load_state_dict(state)
    torch.manual_seed(1)
    x = torch.randn(2, cin, 6, 7, dtype=torch.float64) * 1.5
    expected = _paper_forward(state, x, cin, cout, k, K, padding)
    assert torch.allclose(layer(x), expected, rtol=1e-6, atol=1e-6)  # the paper's float32 knots


def test_paper_layer_inside_a_model_and_our_layout_round_trip():
    cin, cout, k, G, K = 1, 2, (3, 3), 5, 3
    model = nn.Sequential(KAN_Convolutional_Layer(cin, cout, k, grid_size=G), nn.Flatten())
    state = {f"0.{key}": v for key, v in _paper_state(cin, cout, k, G, K).items()}
    model.load_state_dict(state)
    ours = model.state_dict()
    assert set(ours) == {"0.base_weight", "0.spline_weight", "0.spline_scaler", "0.grid"}
    fresh = nn.Sequential(KAN_Convolutional_Layer(cin, cout, k, grid_size=G), nn.Flatten())
    fresh.load_state_dict(ours)
    x = torch.randn(2, 1, 5, 5)
    assert torch.equal(fresh(x), model(x))


def test_refuses_non_uniform_or_inconsistent_grids():
    cin, cout, k, G, K = 2, 1, (2, 2), 4, 3
    state = _paper_state(cin, cout, k, G, K)
    bad = dict(state)
    grid = bad["convs.0.conv.grid"].clone()
    grid[:, 5] += 0.05
    bad["convs.0.conv.grid"] = grid
    layer = KAN_Convolutional_Layer(cin, cout, k, grid_size=G)
    with pytest.raises(ValueError, match="not a uniform knot vector"):
        layer.load_state_dict(bad)
    other = _paper_state(1, 2, k, G, K)
    other["convs.1.conv.grid"] = _paper_grid(G, K, 4, lo=-2.0, hi=2.0)  # same input channel, other output
    with pytest.raises(ValueError, match="differ between output channels"):
        KAN_Convolutional_Layer(1, 2, k, grid_size=G).load_state_dict(other)
    taps = dict(state)
    g = taps["convs.0.conv.grid"].clone()
    g[1] = _paper_grid(G, K, 1, lo=-3.0, hi=3.0)[0]
    taps["convs.0.conv.grid"] = g
    with pytest.raises(ValueError, match="differs between kernel taps"):
        layer.load_state_dict(taps)
    missing = {key: v for key, v in state.items() if not key.startswith("convs.1.")}
    with pytest.raises(ValueError, match="needs pairs"):
        layer.load_state_dict(missing)
    wrong = dict(state)
    wrong["convs.0.conv.spline_weight"] = torch.randn(1, 4, 9)
    with pytest.raises(ValueError, match="has shape"):
        layer.load_state_dict(wrong)


def test_non_default_grid_range_loads():
    cin, cout, k, G, K = 1, 1, (2, 2), 4, 3
    state = _paper_state(cin, cout, k, G, K)
    state["convs.0.conv.grid"] = _paper_grid(G, K, 4, lo=0.0, hi=1.0)
    layer = KAN_Convolutional_Layer(cin, cout, k, grid_size=G, grid_range=(0, 1)).double()
    layer.load_state_dict(state)
    x = torch.rand(1, 1, 4, 4, dtype=torch.float64)
    assert torch.allclose(layer(x), _paper_forward(state, x, cin, cout, k, K, (0, 0)), rtol=1e-6, atol=1e-6)
