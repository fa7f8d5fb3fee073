"""``kanvolution.bench``: the names of :mod:`kanvolution.experiments.bench`, under the path the README documents."""
from .experiments.bench import *  # noqa: F403
from .experiments.bench import __all__  # noqa: F401
