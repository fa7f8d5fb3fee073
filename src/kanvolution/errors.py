"""The one exception base of the experiment and viewing tools.

Every failure a user can cause or fix (a bad option, a missing or corrupt file, a busy run
folder, an unavailable device) derives from :class:`KanvolutionError`; the command line prints
its message as one line and exits with status 2. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["KanvolutionError"]


class KanvolutionError(Exception):
    """An expected failure, reported to the user as one line.

    Examples:
        >>> class ChannelError(KanvolutionError, ValueError):
        ...     pass
        >>> isinstance(ChannelError("channel 9 does not exist"), ValueError)
        True
    """
