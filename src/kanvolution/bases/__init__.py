"""Basis families of KAN functions behind one interface, resolved by name.

``create_basis("rbf", C, grid_size=8)`` builds a :class:`Basis` module; ``basis_functions(name)``
gives the module-free functions an op computes from ``(name, state, option)``.
"""
from ._base import Basis, BasisFunctions, basis_from_state, basis_functions, create_basis, list_bases, register_basis
from .bspline import BSplineBasis
from .radial import RBFBasis, WaveletBasis
from .polynomial import BernsteinBasis, ChebyshevBasis, GramBasis, JacobiBasis, LegendreBasis
from .fourier import FourierBasis
from .relu import ReLUBasis
from .reference import kan_conv_reference

__all__ = [
    "Basis",
    "BasisFunctions",
    "basis_from_state",
    "basis_functions",
    "create_basis",
    "list_bases",
    "register_basis",
    "BSplineBasis",
    "RBFBasis",
    "ChebyshevBasis",
    "LegendreBasis",
    "GramBasis",
    "JacobiBasis",
    "BernsteinBasis",
    "FourierBasis",
    "WaveletBasis",
    "ReLUBasis",
    "kan_conv_reference",
]
