"""Tests of kanvolution.experiments.config: option checks and what a resumed run must keep."""
from __future__ import annotations

import pytest

from kanvolution.experiments.config import ConfigError, TrainConfig, check_resume
from kanvolution.experiments.training import train


def test_config_validation(tiny, tmp_path):
    with pytest.raises(ConfigError, match="no KAN layers"):
        train(tiny(grid_size=10), tmp_path, log=None)
    with pytest.raises(ConfigError, match="val_fraction"):
        tiny(val_fraction=1.0).validate()
    with pytest.raises(ConfigError, match="batch_size"):
        tiny(batch_size=0).validate()
    with pytest.raises(ConfigError, match="validation split"):
        tiny(eval_test=False).validate()


def test_precision_must_be_known_and_kept_on_resume(tiny, tmp_path):
    with pytest.raises(ConfigError, match="precision must be one of 32, bf16-mixed"):
        tiny(precision="16").validate()
    train(tiny(epochs=1), tmp_path, log=None)
    with pytest.raises(ConfigError, match="precision"):
        train(tiny(epochs=2, precision="bf16-mixed"), tmp_path, resume=True, log=None)


def test_a_checkpoint_older_than_an_option_resumes_with_its_default():
    stored = TrainConfig(model="cnn_small", epochs=2).to_dict()
    del stored["precision"]  # written before the option existed
    check_resume(stored, TrainConfig(model="cnn_small", epochs=3), done=2)
    with pytest.raises(ConfigError, match="the checkpoint has precision='32'"):
        check_resume(stored, TrainConfig(model="cnn_small", epochs=3, precision="bf16-mixed"), done=2)


def test_basis_and_degree_reach_every_kan_layer_and_are_checked():
    from kanvolution.experiments.config import ConfigError, TrainConfig, build_model
    from kanvolution.layers import kan_layers

    model = build_model(TrainConfig(model="kkan_small", basis="legendre", degree=6))
    layers = [layer for _, layer in kan_layers(model)]
    assert len(layers) == 3 and all(l.basis_name == "legendre" and l.spline_weight.shape[-1] == 7 for l in layers)
    default = build_model(TrainConfig(model="kanc_mlp_medium"))
    assert all(l.basis_name == "bspline" for _, l in kan_layers(default))
    assert TrainConfig.from_dict({"model": "kanc_mlp_medium"}).basis == "bspline"  # older runs
    with pytest.raises(ConfigError, match="basis must be one of"):
        TrainConfig(basis="splines").validate()
    with pytest.raises(ConfigError, match="degree must be"):
        TrainConfig(basis="chebyshev", degree=-1).validate()
    with pytest.raises(ConfigError, match="no basis or degree"):
        build_model(TrainConfig(model="cnn_medium", basis="rbf"))
