"""Basis families of KAN functions behind one interface, resolved by name.

``create_basis("rbf", C, grid_size=8)`` builds a :class:`Basis` module; ``basis_functions(name)``
(:func:`kanvolution.ops.get_basis`, the one registry) gives the module-free functions the KAN op
computes from ``(name, state, option)``. The layers take ``basis="name"`` or a :class:`Basis`.

With ``a, b = grid_range``, ``G = grid_size``, ``K = spline_order``, ``D = degree``, ``n`` functions
per phi, and parameters per phi counting ``n`` coefficients plus ``w_base`` and ``w_scale``:

=========  ===========  ===============  ======  ============  ================
name       n            state            option  params / phi  update_grid
=========  ===========  ===============  ======  ============  ================
bspline    G + K        (C, G + 2K + 1)  K       G + K + 2     knots (quantiles)
rbf        G            (C, G + 1)       0       G + 2         range
wavelet    G            (C, G + 1)       0       G + 2         range
chebyshev  D + 1        (0,)             D       D + 3         no
legendre   D + 1        (0,)             D       D + 3         no
gram       D + 1        (1,): M          D       D + 3         no
jacobi     D + 1        (2,): alpha,beta D       D + 3         no
bernstein  D + 1        (0,)             D       D + 3         no
fourier    2G (+1)      (G,): 1..G       0 / 1   2G + 2 (+1)   no
relu       G + K        (C, G + K + 1)   K       G + K + 2     range
=========  ===========  ===============  ======  ============  ================
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
