"""Builds ``csrc/sparse_kan.cpp`` on first use into torch's extension cache and returns its ops."""
from __future__ import annotations

import functools
import hashlib
import platform
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "sparse_kan.cpp"
NAMESPACE = "kanvolution_sparse"


def _flags() -> tuple[list[str], list[str]]:
    if sys.platform == "win32":
        return ["/O2", "/openmp"], []
    cflags = ["-O3", "-fno-trapping-math"]
    if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        # The inner loops are plain loops over output channels: the compiler vectorises them for
        # the build machine's vector width (the cache is per machine, as the build is).
        cflags.append("-march=native")
    if sys.platform.startswith("linux"):
        # libgomp then resolves to torch's copy: one thread pool, torch.set_num_threads applies.
        return cflags + ["-fopenmp"], ["-fopenmp"]
    return cflags, []


def extension_name(source: str, cflags: list[str]) -> str:
    """The torch version and a digest of the source and flags: a cache built otherwise is never reused."""
    version = torch.__version__.replace(".", "_").replace("+", "_")
    key = f"{source}\0{' '.join(cflags)}\0{sys.version_info[:2]}".encode()
    digest = hashlib.sha1(key, usedforsecurity=False).hexdigest()[:10]
    return f"kanvolution_sparse_torch{version}_{digest}"


@functools.lru_cache(maxsize=None)
def load():
    """The compiled ops (``torch.ops.kanvolution_sparse``), built on the first call.

    Raises:
        RuntimeError: when the extension cannot be built (no compiler, no ninja, ...).
    """
    from torch.utils import cpp_extension

    cflags, ldflags = _flags()
    name = extension_name(SOURCE.read_text(), cflags)
    try:
        cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=cflags, extra_ldflags=ldflags,
                           is_python_module=False, verbose=False)
    except Exception as exc:
        raise RuntimeError(f"could not build the sparse KAN CPU kernels: {type(exc).__name__}: {exc}") from exc
    return getattr(torch.ops, NAMESPACE)
