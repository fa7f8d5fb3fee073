"""``kanvolution.data``: the names of :mod:`kanvolution.experiments.data`, under the path the README documents."""
from .experiments.data import *  # noqa: F403
from .experiments.data import __all__  # noqa: F401
