"""kanvolution.export: torch.export programs and ONNX files (checked with onnxruntime) of every zoo model."""
from __future__ import annotations

import pytest
import torch

from kanvolution import KANConv1d, KANConv3d, KANLinear
from kanvolution.export import check_onnx, export_onnx, export_program, save_program
from kanvolution.models import create_model, list_models


def _model(name):
    torch.manual_seed(0)
    model = create_model(name)
    with torch.no_grad():  # splines that matter, not only the small initial noise
        for p in model.parameters():
            if p.dim() >= 3:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("name", list_models())
def test_torch_export_every_zoo_model(name, tmp_path):
    model = _model(name)
    x = torch.randn(3, 1, 28, 28) * 1.5
    program = export_program(model, x)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("kanvolution.kan_forward" in t for t in targets) == (not name.startswith("cnn"))
    model.eval()
    with torch.no_grad():
        want = model(x)
        other = torch.randn(5, 1, 28, 28)
        assert torch.allclose(program.module()(x), want, atol=1e-6)
        assert torch.allclose(program.module()(other), model(other), atol=1e-6)  # dynamic batch
        if name == "kanc_mlp_medium":  # decomposition into aten ops (as for ONNX), .pt2 round trip
            decomposed = export_program(model, x, decompose=True)
            assert not any("kanvolution" in str(n.target) for n in decomposed.graph.nodes)
            assert torch.allclose(decomposed.module()(x), want, atol=1e-5)
            loaded = torch.export.load(save_program(model, x, tmp_path / "model.pt2"))
            assert torch.allclose(loaded.module()(x), want, atol=1e-6)


@pytest.mark.parametrize("name", list_models())
def test_onnx_every_zoo_model_matches_onnxruntime(name, tmp_path):
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    onnx = pytest.importorskip("onnx", reason="the export extra is not installed")
    model = _model(name)
    x = torch.randn(3, 1, 28, 28) * 1.5
    path = export_onnx(model, x, tmp_path / "model.onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert all(op[0].isupper() for op in ops)  # standard operators only, no custom domain op
    assert check_onnx(model, path, x) < 1e-4
    assert check_onnx(model, path, torch.randn(7, 1, 28, 28)) < 1e-4  # another batch size


def test_onnx_layer_kinds_and_a_non_uniform_grid(tmp_path):
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    torch.manual_seed(0)
    model = torch.nn.Sequential(KANConv1d(2, 3, 3, padding=1), torch.nn.Flatten(), KANLinear(27, 4))
    x = torch.randn(4, 2, 9)
    model[0].update_grid(x)  # adapted, non-uniform knots
    assert check_onnx(model, export_onnx(model, x, tmp_path / "a.onnx"), x) < 1e-4
    layer = KANConv3d(1, 2, 2)
    x3 = torch.randn(2, 1, 3, 4, 3)
    assert check_onnx(layer, export_onnx(layer, x3, tmp_path / "b.onnx"), x3) < 1e-4


def test_example_inputs_are_checked():
    with pytest.raises(TypeError, match="example_inputs must be a Tensor"):
        export_program(KANLinear(2, 2), [1, 2])
