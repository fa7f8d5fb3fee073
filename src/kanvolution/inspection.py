"""``kanvolution.inspection``: the names of :mod:`kanvolution.viz.analysis` (numbers) and
:mod:`kanvolution.viz.report` (the report of a run), under the path the README documents."""
from .viz import analysis as _analysis, report as _report
from .viz.analysis import *  # noqa: F403
from .viz.report import *  # noqa: F403

__all__ = [*_analysis.__all__, *_report.__all__]
