"""``kanvolution.models``: the names of :mod:`kanvolution.experiments.models`, under the path the README documents."""
from .experiments.models import *  # noqa: F403
from .experiments.models import __all__  # noqa: F401
