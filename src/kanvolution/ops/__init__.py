"""The KAN layer as registered PyTorch operators (namespace ``kanvolution``).

- :mod:`.kan`: the ops ``kanvolution::kan_forward`` / ``kan_backward`` (and their ``_factored`` pair,
  which takes the layer's three weights), their fake kernels,
  autograd and a decomposition table into aten operations;
- :mod:`.bases`: the registry of basis families the ops expand into (the families themselves
  live in :mod:`kanvolution.bases`);
- :mod:`.activations`: the base activations the ops know by name;
- :mod:`.build`: building and loading the compiled CPU loops in ``csrc/``.
"""
from .activations import ACTIVATIONS, activation_name
from .bases import BasisFunctions, get_basis, list_bases, register_basis
from .build import is_enabled, set_enabled
from .kan import (COMPILE_OPTIONS, decompositions, dense_kan, kan_backward, kan_backward_factored, kan_forward,
                  kan_forward_factored, release_workspace)

__all__ = [
    "COMPILE_OPTIONS",
    "ACTIVATIONS",
    "BasisFunctions",
    "activation_name",
    "decompositions",
    "dense_kan",
    "get_basis",
    "is_enabled",
    "kan_backward",
    "kan_forward",
    "kan_forward_factored",
    "kan_backward_factored",
    "list_bases",
    "register_basis",
    "release_workspace",
    "set_enabled",
]

from .. import bases as _families  # noqa: E402,F401  (registers every family)
