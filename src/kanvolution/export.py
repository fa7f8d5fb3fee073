"""Export KAN models: ``torch.export`` programs (``.pt2``) and ONNX files checked with onnxruntime.

The exported program keeps the layers' op ``kanvolution::kan_forward_factored`` (load it back
after ``import kanvolution``). ONNX has no such op: :func:`export_onnx` first replaces it by its
decomposition into standard aten operations (the dense expansion and one convolution), so the
ONNX graph holds plain operators only. ONNX needs the ``export`` extra
(``pip install "kanvolution[export]"``: onnx, onnxscript, onnxruntime).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from .ops import decompositions

__all__ = ["export_program", "save_program", "export_onnx", "check_onnx"]


def _inputs(example_inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    inputs = tuple(example_inputs)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError(f"example_inputs must be a Tensor or a sequence of Tensors, got {example_inputs!r}")
    return inputs


def export_program(model: nn.Module, example_inputs: Tensor | Sequence[Tensor], *,
                   decompose: bool = False, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` in eval mode (its mode is restored afterwards).

    Args:
        model: any module, KAN layers included.
        example_inputs: one tensor or a sequence of positional inputs.
        decompose: replace the KAN op by plain aten operations (as for ONNX).
        dynamic_batch: leave dimension 0 of every input free (it is fixed where the model
            needs a fixed size, or where the example's batch is 1).

    Returns:
        The exported program.

    Examples:
        >>> from kanvolution import KANConv2d
        >>> program = export_program(KANConv2d(1, 2, 3), torch.randn(1, 1, 5, 5))
        >>> program.module()(torch.randn(1, 1, 5, 5)).shape
        torch.Size([1, 2, 3, 3])
    """
    inputs = _inputs(example_inputs)
    training = model.training
    model.eval()
    try:
        dims = tuple({0: torch.export.Dim.AUTO} if dynamic_batch else None for _ in inputs)
        program = torch.export.export(model, inputs, dynamic_shapes=dims)
    finally:
        model.train(training)
    return program.run_decompositions(decompositions()) if decompose else program


def save_program(model: nn.Module, example_inputs: Tensor | Sequence[Tensor], path: str | Path) -> Path:
    """Export ``model`` and save the program as a ``.pt2`` file; returns the path.

    Load it with ``torch.export.load(path)`` after ``import kanvolution`` (which registers the op).
    """
    path = Path(path)
    torch.export.save(export_program(model, example_inputs), path)
    return path


def export_onnx(model: nn.Module, example_inputs: Tensor | Sequence[Tensor], path: str | Path) -> Path:
    """Write ``model`` as an ONNX file of standard operators; returns the path.

    The batch size is dynamic (see :func:`export_program`).

    Args:
        model: any module, KAN layers included.
        example_inputs: one tensor or a sequence of positional inputs.
        path: the ``.onnx`` file to write.
    """
    inputs = _inputs(example_inputs)
    program = export_program(model, inputs, decompose=True)
    path = Path(path)
    onnx_program = torch.onnx.export(program, inputs, dynamo=True)
    onnx_program.save(str(path))
    return path


def check_onnx(model: nn.Module, path: str | Path, example_inputs: Tensor | Sequence[Tensor]) -> float:
    """Run the ONNX file with onnxruntime on ``example_inputs`` and compare with ``model`` in eval mode.

    Returns:
        The largest absolute difference over all outputs.
    """
    import numpy as np
    import onnxruntime

    inputs = _inputs(example_inputs)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {arg.name: t.detach().cpu().numpy() for arg, t in zip(session.get_inputs(), inputs)}
    got = session.run(None, feed)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(*inputs)
    finally:
        model.train(training)
    want = [want] if isinstance(want, Tensor) else list(want)
    if len(got) != len(want):
        raise ValueError(f"the ONNX model has {len(got)} outputs, the module {len(want)}")
    return max(float(np.abs(g - w.detach().cpu().numpy()).max(initial=0.0)) for g, w in zip(got, want))
