"""``kanvolution.tune``: the names of :mod:`kanvolution.experiments.reproduce`, under the path the README documents."""
from .experiments.reproduce import *  # noqa: F403
from .experiments.reproduce import __all__  # noqa: F401
