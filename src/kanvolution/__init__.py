"""kanvolution: Convolutional Kolmogorov-Arnold Networks for PyTorch.

``KANConv1d/2d/3d`` and ``KANLinear`` are drop-in replacements for ``nn.Conv1d/2d/3d`` and
``nn.Linear`` whose kernel taps are learnable functions (B-splines plus a SiLU base term). The
fused layer is the registered op ``torch.ops.kanvolution.kan_forward_factored`` (:mod:`kanvolution.ops`),
which ``torch.compile``, ``torch.export`` and ONNX export (:mod:`kanvolution.export`) see through.
"""
from . import functional, ops
from .layers import (
    KANConv1d,
    KANConv2d,
    KANConv3d,
    KANLinear,
    kan_layers,
    regularization_loss,
    update_grids,
)

__version__ = "0.1.0"

__all__ = [
    "KANConv1d",
    "KANConv2d",
    "KANConv3d",
    "KANLinear",
    "functional",
    "ops",
    "kan_layers",
    "regularization_loss",
    "update_grids",
    "__version__",
]
