"""Tests of kanvolution.experiments.models: every registered model against the paper's table, and the registry."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kanvolution import KANConv2d, KANLinear
from kanvolution.experiments import models

# The paper's parameter counts (as its code builds the models): name -> {grid_size: count}; None for plain CNNs.
PAPER_PARAMS = {
    "kanc_mlp_small": {10: 5_310, 20: 8_010},
    "kanc_mlp_medium": {10: 9_935, 20: 14_885},
    "kanc_mlp_big": {10: 33_535, 20: 38_485},
    "kkan_small": {10: 22_800, 20: 38_000},
    "kkan_medium": {10: 44_925, 20: 74_875},
    "conv_kan_small": {10: 19_030, 20: 31_530},
    "conv_kan_medium": {10: 38_010, 20: 63_010},
    "cnn_small": {None: 1_540},
    "cnn_medium": {None: 3_020},
    "cnn_big": {None: 26_620},
    "cnn_more_convs": {None: 6_930},
}

# The row names of the paper's results table, plus CKAN_BN.
PAPER_NAMES = {
    ("cnn_more_convs", None): "CNN (Medium, but with more convs)",
    ("cnn_big", None): "CNN (Big)",
    ("cnn_medium", None): "CNN (Medium)",
    ("cnn_small", None): "CNN (Small)",
    ("conv_kan_medium", 10): "Conv & KAN (Medium) (gs = 10)",
    ("conv_kan_medium", 20): "Conv & KAN (Medium) (gs = 20)",
    ("conv_kan_small", 10): "Conv & KAN (Small) (gs = 10)",
    ("conv_kan_small", 20): "Conv & KAN (Small) (gs = 20)",
    ("kanc_mlp_big", 10): "KANC MLP (Big) (gs = 10)",
    ("kanc_mlp_big", 20): "KANC MLP (Big) (gs = 20)",
    ("kanc_mlp_medium", 10): "KANC MLP (Medium) (gs = 10)",
    ("kanc_mlp_medium", 20): "KANC MLP (Medium) (gs = 20)",
    ("kanc_mlp_small", 10): "KANC MLP (Small) (gs = 10)",
    ("kanc_mlp_small", 20): "KANC MLP (Small) (gs = 20)",
    ("kkan_medium", 10): "KKAN (Medium) (gs = 10)",
    ("kkan_medium", 20): "KKAN (Medium) (gs = 20)",
    ("kkan_small", 10): "KKAN (Small) (gs = 10)",
    ("kkan_small", 20): "KKAN (Small) (gs = 20)",
    ("ckan_bn", 10): "CKAN_BN (gs = 10)",
}

ALL_MODELS = models.list_models()
KAN_MODELS = [name for name in ALL_MODELS if models.model_info(name).has_kan]
SMALL_NETS = [
    "kan_small_net", "cnn_small_net_matched", "kan_bottleneck_net", "cnn_bottleneck_net_matched",
    "kan_stem_bottleneck_net", "kan_early_bottleneck_net",
]  # beyond the paper: own layout and grid size
PAPER_KAN_MODELS = [name for name in KAN_MODELS if name not in SMALL_NETS]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def kan_phi_params(n_phi: int, grid_size: int, spline_order: int = 3) -> int:
    return n_phi * (grid_size + spline_order + 2)  # w_base, w_scale and G + K coefficients


def test_the_zoo_is_complete():
    assert ALL_MODELS == [*PAPER_PARAMS, "ckan_bn", *SMALL_NETS]


@pytest.mark.parametrize("name, grid_size, count", [
    (name, grid_size, count) for name, counts in PAPER_PARAMS.items() for grid_size, count in counts.items()
])
def test_parameter_counts_match_the_paper(name, grid_size, count):
    kwargs = {} if grid_size is None else {"grid_size": grid_size}
    assert n_params(models.create_model(name, **kwargs)) == count


@pytest.mark.parametrize("grid_size", [10, 20])
def test_ckan_bn_parameter_count_from_its_layer_list(grid_size):
    expected = (
        kan_phi_params(1 * 5 * 9, grid_size)  # KAN conv 1->5
        + 2 * 5  # BatchNorm2d(5)
        + kan_phi_params(5 * 25 * 9, grid_size)  # KAN conv 5->25
        + 2 * 25  # BatchNorm2d(25)
        + 625 * 256 + 256  # Linear 625->256
        + 256 * 10 + 10  # Linear 256->10
    )
    assert n_params(models.create_model("ckan_bn", grid_size=grid_size)) == expected


@pytest.mark.parametrize("grid_size, count", [(10, 180_436), (20, 192_136)])
def test_ckan_bn_parameter_count_is_the_published_one(grid_size, count):
    # The counts the results table in the README shows (180.44K and 192.14K).
    assert n_params(models.create_model("ckan_bn", grid_size=grid_size)) == count


def test_default_grid_size_is_ten():
    for name in PAPER_KAN_MODELS:
        assert n_params(models.create_model(name)) == n_params(models.create_model(name, grid_size=10))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward(name):
    model = models.create_model(name)
    x = torch.randn(4, 1, 28, 28)
    out = model(x)
    assert out.shape == (4, 10) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.allclose(out.logsumexp(dim=1), torch.zeros(4), atol=1e-5)  # log-probabilities
    torch.nn.functional.nll_loss(out, torch.arange(4)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", PAPER_KAN_MODELS)
def test_kan_layers_follow_the_spec(name):
    model = models.create_model(name, grid_size=20)
    convs = [m for m in model.modules() if isinstance(m, KANConv2d)]
    linears = [m for m in model.modules() if isinstance(m, KANLinear)]
    assert convs or linears
    for conv in convs:
        assert conv.kernel_size == (3, 3) and conv.padding == (0, 0) and conv.stride == (1, 1)
        assert tuple(conv.grid_range) == (-1.0, 1.0) and conv.grid_size == 20 and conv.spline_order == 3
    for linear in linears:
        assert tuple(linear.grid_range) == (0.0, 1.0) and linear.scale_noise == 0.01
        assert linear.grid_size == 20 and linear.spline_order == 3


def test_kan_options_reach_every_kan_layer():
    model = models.create_model("kkan_small", spline_order=2)
    kan = [m for m in model.modules() if isinstance(m, (KANConv2d, KANLinear))]
    assert len(kan) == 3 and all(m.spline_order == 2 for m in kan)


def test_state_dict_round_trip():
    a, b = models.create_model("kkan_small"), models.create_model("kkan_small")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name, grid_size, expected", [(*key, value) for key, value in PAPER_NAMES.items()])
def test_paper_names(name, grid_size, expected):
    if grid_size is None:
        assert models.paper_name(name) == expected
        assert models.create_model(name).paper_name == expected
    else:
        assert models.paper_name(name, grid_size) == expected
        assert models.create_model(name, grid_size=grid_size).paper_name == expected
    assert expected.startswith(models.model_info(name).table_name)


def test_list_models_patterns():
    assert models.list_models("kanc*") == ["kanc_mlp_small", "kanc_mlp_medium", "kanc_mlp_big"]
    assert models.list_models("*_medium") == ["kanc_mlp_medium", "kkan_medium", "conv_kan_medium", "cnn_medium"]
    assert models.list_models("nothing*") == []
    assert set(KAN_MODELS) == set(ALL_MODELS) - set(models.list_models("cnn*"))


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'kanc_mlp_tiny'") as info:
        models.create_model("kanc_mlp_tiny")
    message = str(info.value)
    assert all(name in message for name in ALL_MODELS)
    assert "Did you mean 'kanc_mlp_small'?" in message or "Did you mean 'kanc_mlp_big'?" in message
    with pytest.raises(ValueError, match="Valid names"):
        models.paper_name("resnet50")


def test_grid_size_for_a_plain_cnn_is_an_error():
    with pytest.raises(ValueError, match="no KAN layers"):
        models.create_model("cnn_small", grid_size=10)


def test_registering_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        models.register_model("CNN (Small)")(models.cnn_small)


def test_model_info_describes_the_layers():
    info = models.model_info("kanc_mlp_big")
    assert info.name == "kanc_mlp_big" and info.table_name == "KANC MLP (Big)" and info.has_kan
    assert "Linear 250->100" in info.description
    assert not models.model_info("cnn_big").has_kan
