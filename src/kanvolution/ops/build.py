"""Build and load the compiled CPU loops (``csrc/bspline_cpu.cpp``) on first use.

The loops are compiled with :func:`torch.utils.cpp_extension.load` into torch's extension cache
(``TORCH_EXTENSIONS_DIR``), never at import. The extension name carries the torch build and the
compiler flags, so environments with different torch builds keep separate cache entries. A lock
left by a killed build is recognised by its dead process id and removed at once. If the build
fails (no compiler, no ninja, ...) a single warning is issued and the portable PyTorch
implementation runs for the rest of the process.

Two extensions are built this way: the B-spline expansion loops (:func:`load`, namespace
``kanvolution_cpu``) and the direct sparse kernels (``kanvolution._sparse``, namespace
``kanvolution_sparse``), each an :class:`Extension` passed to :func:`build`.

``KANVOLUTION_CPU_KERNELS=0`` disables the compiled loops (both extensions), ``=1`` enables them
(the default); :func:`set_enabled` overrides both within a process.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["set_enabled", "is_enabled", "load", "build", "Extension", "extension_name", "build_flags",
           "MAX_ORDER"]

ENV_VAR = "KANVOLUTION_CPU_KERNELS"
# Spline orders the compiled loops accept (kMaxOrder in the source); higher orders run portably.
MAX_ORDER = 16
SOURCE = Path(__file__).with_name("csrc") / "bspline_cpu.cpp"
_NAMESPACE = "kanvolution_cpu"
_LOCK_NAME = "kanvolution.pid"

_override: bool | None = None
_ops = None
# Set before the first build attempt and never cleared: one attempt (and at most one warning) per
# process. A thread that races the first build sees the flag and simply uses the portable path.
_attempted = False


def set_enabled(enabled: bool | None) -> None:
    """Turn the compiled loops on or off in this process; ``None`` restores the default
    (``KANVOLUTION_CPU_KERNELS``, else on)."""
    global _override
    _override = None if enabled is None else bool(enabled)


def is_enabled() -> bool:
    """Whether the compiled loops should be used (does not build them)."""
    if _override is not None:
        return _override
    return os.environ.get(ENV_VAR, "").strip().lower() not in ("0", "false", "off", "no")


@dataclass(frozen=True)
class Extension:
    """One compiled extension: its source, the name prefix of its cache entry, the namespace its
    ops register under (and the ops that must exist after loading), the words of the build line
    and of the fallback warning, and whether it is tuned to the build machine's vector width."""

    source: Path
    prefix: str
    namespace: str
    ops: tuple[str, ...]
    what: str
    fallback: str
    native: bool = False


BSPLINE = Extension(SOURCE, _NAMESPACE, _NAMESPACE, ("expand", "grad_input", "family_expand", "family_grad"),
                    "the compiled CPU kernels", "the portable PyTorch implementation")


def build_flags(native: bool = False) -> tuple[list[str], list[str]]:
    """``(cflags, ldflags)`` of the build on this platform; ``native``: for this machine's vector
    units (GCC/Clang on x86-64 and ARM64; the cache entry is then per machine, as the build is)."""
    if sys.platform == "win32":
        return ["/O2"], []
    cflags = ["-O3", "-fno-trapping-math"]
    if native and platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        cflags.append("-march=native")
    if sys.platform.startswith("linux"):
        # The objects then reference libgomp.so.1, which resolves to the copy torch has loaded:
        # one thread pool, and torch.set_num_threads applies to these loops too.
        return cflags + ["-fopenmp"], ["-fopenmp"]
    # Without OpenMP flags at::parallel_for runs serially, which is still correct.
    return cflags, []


def extension_name(source: str | None = None, flags: tuple[list[str], list[str]] | None = None,
                   prefix: str = _NAMESPACE) -> str:
    """Cache name of an extension: ``prefix``, torch version, then a digest of everything the
    binary depends on (source, flags, torch build, Python version). Defaults: the B-spline loops.

    Examples:
        >>> extension_name("int x;", (["-O3"], [])).startswith("kanvolution_cpu_torch")
        True
    """
    source = SOURCE.read_text() if source is None else source
    cflags, ldflags = build_flags() if flags is None else flags
    torch_build = (torch.__version__, torch.version.git_version, str(torch.version.cuda),
                   str(torch._C._GLIBCXX_USE_CXX11_ABI))
    key = "\0".join([source, " ".join(cflags), " ".join(ldflags), *torch_build, str(sys.version_info[:2])])
    digest = hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:12]
    version = "".join(c if c.isalnum() else "_" for c in torch.__version__)
    return f"{prefix}_torch{version}_{digest}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


@contextmanager
def build_lock(directory: Path, poll: float = 0.2):
    """Hold the build lock of ``directory``: a file holding the builder's process id.

    A lock whose process is gone (a build killed by a timeout or Ctrl-C) is removed at once,
    together with the lock torch's own build step leaves beside it; a live builder is waited for.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / _LOCK_NAME
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and not _pid_alive(pid):
                for stale in (lock, directory / "lock"):
                    stale.unlink(missing_ok=True)
                continue
            if not pid and time.time() - _mtime(lock) > 10.0:  # written by nobody: a crash mid-write
                lock.unlink(missing_ok=True)
                continue
            time.sleep(poll)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        # Held by us: a torch lock beside it can only be a leftover of a killed build.
        (directory / "lock").unlink(missing_ok=True)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


@contextmanager
def _ninja_on_path():
    """Put the running interpreter's folder on PATH while building: a virtual environment's
    ``ninja`` lives there even when the environment is not activated."""
    here = str(Path(sys.executable).parent)
    old = os.environ.get("PATH", "")
    if shutil.which("ninja") is None and (Path(here) / "ninja").exists():
        os.environ["PATH"] = here + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def load():
    """The compiled B-spline loops (``torch.ops.kanvolution_cpu``), building them on the first
    call; ``None`` if they cannot be built. Tries once per process."""
    global _ops, _attempted
    if _ops is not None or _attempted:
        return _ops
    _attempted = True
    _ops = build(BSPLINE)
    return _ops


def build(ext: Extension):
    """Build (or find in the cache) and load ``ext``; its ops namespace, or ``None`` after one
    warning if it cannot be built. Callers keep the result: each call tries again."""
    try:
        from torch.utils import cpp_extension

        cflags, ldflags = build_flags(ext.native)
        name = extension_name(ext.source.read_text(), (cflags, ldflags), ext.prefix)
        directory = Path(cpp_extension._get_build_directory(name, False))
        with _ninja_on_path(), build_lock(directory):
            fresh = not any(directory.glob(f"{name}*.so")) and not any(directory.glob(f"{name}*.pyd"))
            start = time.perf_counter()
            if fresh:
                print(f"kanvolution: building {ext.what} in {directory} ...", end="", file=sys.stderr, flush=True)
            try:
                cpp_extension.load(name=name, sources=[str(ext.source)], extra_cflags=cflags,
                                   extra_ldflags=ldflags, is_python_module=False, verbose=False,
                                   build_directory=str(directory))
            finally:
                if fresh:
                    print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        ops = getattr(torch.ops, ext.namespace)
        for op in ext.ops:  # fail here, not on first use, if registration failed
            getattr(ops, op)
    except Exception as exc:  # anything at all: the fallback always works
        message = " ".join(str(exc).split())
        if len(message) > 400:
            message = message[:400] + " ..."
        warnings.warn(
            f"kanvolution: could not build {ext.what} ({type(exc).__name__}: {message}); "
            f"using {ext.fallback}. Set {ENV_VAR}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    return ops
