"""Builds ``csrc/sparse_kan.cpp`` on first use with :mod:`kanvolution.ops.build` and returns its ops."""
from __future__ import annotations

import functools
from pathlib import Path

from ..ops import build

SPARSE = build.Extension(
    source=Path(__file__).with_name("csrc") / "sparse_kan.cpp",
    prefix="kanvolution_sparse",
    namespace="kanvolution_sparse",
    ops=("pack", "unpack", "pack3", "unpack3", "forward", "grad_input", "grad_weight", "narrow_forward", "narrow_backward"),
    what="the sparse CPU kernels",
    fallback="the dense path",
    # The inner loops are plain loops over output channels: the compiler vectorises them for the
    # build machine's vector width.
    native=True,
)


@functools.lru_cache(maxsize=None)
def load():
    """The compiled ops (``torch.ops.kanvolution_sparse``), built on the first call; ``None`` (after
    one warning) when they cannot be built. Tries once per process."""
    return build.build(SPARSE)
