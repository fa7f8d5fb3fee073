"""The base activations the KAN op knows by name, and how a layer's ``base_activation`` maps to one.

Ops take no Python callables, so the base term ``act(x)`` is one of a fixed set of names, each
with its forward and its derivative in plain aten operations. :func:`activation_name` maps the
usual spellings (``nn.SiLU()``, ``F.silu``, ``torch.tanh``, ``nn.GELU(approximate="tanh")``, ...)
to a name; for any other callable it returns ``None`` and the layers take the naive path
(dense expansion under autograd: same result, slower, more memory).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "activation_name"]

# name -> (act(x), d/dx given (grad, x)): the derivative without an autograd graph.
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]] = {
    "silu": (F.silu, torch.ops.aten.silu_backward),
    "identity": (lambda x: x.clone(), lambda g, x: g.clone()),
    "relu": (torch.relu, lambda g, x: torch.ops.aten.threshold_backward(g, x, 0)),
    "gelu": (F.gelu, lambda g, x: torch.ops.aten.gelu_backward(g, x)),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"),
                  lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh")),
    "tanh": (torch.tanh, lambda g, x: torch.ops.aten.tanh_backward(g, torch.tanh(x))),
    "sigmoid": (torch.sigmoid, lambda g, x: torch.ops.aten.sigmoid_backward(g, torch.sigmoid(x))),
    "mish": (F.mish, torch.ops.aten.mish_backward),
}

_FUNCTIONS = {
    F.silu: "silu", F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", torch.tanh: "tanh", F.tanh: "tanh",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.mish: "mish",
}
_MODULES = {nn.SiLU: "silu", nn.Identity: "identity", nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
            nn.Mish: "mish"}


def activation_name(activation) -> str | None:
    """The op's name for ``activation``, or ``None`` for a callable outside the fixed set.

    Examples:
        >>> activation_name(nn.SiLU()), activation_name(torch.tanh), activation_name(lambda x: x * 2)
        ('silu', 'tanh', None)
    """
    if isinstance(activation, str):
        return activation if activation in ACTIVATIONS else None
    kind = type(activation)
    if kind in _MODULES:
        return _MODULES[kind]
    if kind is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(activation.approximate)
    try:
        return _FUNCTIONS.get(activation)
    except TypeError:  # unhashable callable
        return None
