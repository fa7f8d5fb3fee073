"""Fused CPU loops for the B-spline expansion of the KAN layers and for its input gradient.

Why these exist: in eager PyTorch the expansion takes about fifteen separate element-wise, gather
and scatter passes per batch chunk (and as many again for its gradient); on CPU their dispatch
and memory sweeps cost as much as the convolution itself for the paper's small models. These
loops find each value's knot span, evaluate its ``K + 1`` basis pieces and write its row of the
expansion (or reduce its row of the gradient) in one pass over the data.

Only uniform knots and ``K >= 1`` are handled (the closed-form pieces of the uniform B-spline);
:mod:`kanvolution.functional` keeps its PyTorch implementation for everything else and whenever
the extension is unavailable. The extension is compiled on first use with
:func:`torch.utils.cpp_extension.load_inline` into torch's extension cache (``TORCH_EXTENSIONS_DIR``),
never at import. If the build fails for any reason a single warning is issued and the PyTorch
path is used for the rest of the process.

``KANVOLUTION_CPU_KERNELS=0`` disables the kernels, ``=1`` enables them;
:func:`set_enabled` overrides both within a process.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import os
import sys
import time
import warnings

import torch
from torch import Tensor

__all__ = ["set_enabled", "is_enabled", "load", "expand", "grad_input", "MAX_ORDER"]

ENV_VAR = "KANVOLUTION_CPU_KERNELS"
# On by default: measured on 2 CPU threads, a training step of KANC MLP (Medium) at batch 128
# takes about 21 ms with these loops against 29 ms without (grid 20: 27 ms against 35 ms).
DEFAULT_ENABLED = True
# Spline orders the compiled loops accept; higher orders stay on the PyTorch path.
MAX_ORDER = 16
_NAMESPACE = "kanvolution_cpu"
# A build lock older than this is taken to be left by a killed build (a build takes 10-30 s).
STALE_LOCK_SECONDS = 300.0

_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

constexpr int kMaxOrder = @MAX_ORDER@;

// Highest coefficient first, in the same order as the PyTorch path's Horner loop, so that the
// two paths agree to the last bits in float64.
template <typename T>
inline T horner(const T* c, int n, T f) {
  if (n == 1) return c[0];
  T v = f * c[n - 1] + c[n - 2];
  for (int p = n - 3; p >= 0; --p) v = v * f + c[p];
  return v;
}

// Values are processed in blocks of about kBlock: a first pass over contiguous arrays finds spans
// and evaluates the K + 1 pieces (loops the compiler vectorises), a second pass scatters them.
// Interleaving both per value, as a plain loop would, keeps every step scalar and branchy.
constexpr int64_t kBlock = 64;

// Per-task scratch: the channel parameters tiled over one block (so that the position pass needs
// no index arithmetic), spans, and the piece values of every value of the block.
template <typename T>
struct Scratch {
  std::vector<T> t0, inv_h, f, piece;
  std::vector<int32_t> span;
  Scratch(const T* t0_c, const T* inv_h_c, int64_t C, int64_t blk, int n_pieces)
      : t0(blk), inv_h(blk), f(blk), piece(blk * n_pieces), span(blk) {
    for (int64_t j = 0; j < blk; ++j) {
      t0[j] = t0_c[j % C];
      inv_h[j] = inv_h_c[j % C];
    }
  }
  // Span index (-1 outside [t_0, t_last) and for NaN) and position in the span, for n values.
  void locate(const T* x, int64_t n, T n_spans) {
    for (int64_t j = 0; j < n; ++j) {
      // Written with max/min and integer masks so that the loop compiles to vector code without
      // branches: the inside/outside pattern of real data is close to random.
      const T u = (x[j] - t0[j]) * inv_h[j];
      T v = u > T(0) ? u : T(0);  // NaN -> 0
      v = v < n_spans ? v : n_spans;
      const int32_t m = static_cast<int32_t>(v);  // floor, as v >= 0; v == u inside
      const int32_t outside = static_cast<int32_t>(!(u >= T(0))) | static_cast<int32_t>(!(u < n_spans));
      f[j] = v - static_cast<T>(m);
      span[j] = m | -outside;  // -1 outside [t_0, t_last) and for NaN
    }
  }
  // piece[r * blk + j] = sum_p coef[r * n_coef + p] f_j^p (times inv_h when scaled).
  void pieces(const T* coef, int n_pieces, int n_coef, int64_t n, int64_t blk, bool scaled) {
    for (int r = 0; r < n_pieces; ++r) {
      const T* c = coef + r * n_coef;
      T* out = piece.data() + r * blk;
      for (int64_t j = 0; j < n; ++j) {
        T v = horner(c, n_coef, f[j]);
        out[j] = scaled ? v * inv_h[j] : v;
      }
    }
  }
};

// KC > 0 fixes the order at compile time so that the small loops unroll; KC == 0 reads it at run time.
template <typename T, int KC>
void expand_loop(const T* x, const T* act, const T* t0, const T* inv_h, const double* coef_in,
                 int64_t L, int64_t C, int64_t n_knots, int k_rt, T* out) {
  const int K = KC > 0 ? KC : k_rt;
  T coef[(kMaxOrder + 1) * (kMaxOrder + 1)];
  for (int i = 0; i < (K + 1) * (K + 1); ++i) coef[i] = static_cast<T>(coef_in[i]);
  const int64_t B = n_knots - K;
  const int64_t n_bases = B - 1;
  const T n_spans = static_cast<T>(n_knots - 1);
  const int64_t per = std::max<int64_t>(1, kBlock / C);  // whole positions (all C channels) per block
  const int64_t blk = per * C;
  const int64_t grain = std::max<int64_t>(1, 32768 / (C * B));
  at::parallel_for(0, L, grain, [&](int64_t begin, int64_t end) {
    Scratch<T> s(t0, inv_h, C, blk, K + 1);
    for (int64_t l0 = begin; l0 < end; l0 += per) {
      const int64_t i0 = l0 * C;
      const int64_t n = std::min(per, end - l0) * C;
      s.locate(x + i0, n, n_spans);
      s.pieces(coef, K + 1, K + 1, n, blk, false);
      T* o = out + i0 * B;
      std::fill(o, o + n * B, T(0));
      for (int64_t j = 0; j < n; ++j, o += B) {
        // Pieces of bases that do not exist (and all pieces of values outside the knots) are
        // dumped into slot 0, overwritten last: no data-dependent branch.
        const int64_t m = s.span[j];
        const T* pv = s.piece.data() + j;
        for (int r = 0; r <= K; ++r) {
          const int64_t g = m - K + r;
          const bool exists = static_cast<uint64_t>(g) < static_cast<uint64_t>(n_bases);
          o[exists ? 1 + g : 0] = pv[r * blk];
        }
        o[0] = act[i0 + j];
      }
    }
  });
}

template <typename T, int KC>
void grad_loop(const T* ge, int64_t sL, int64_t sC, int64_t sB, const T* x, const T* t0,
               const T* inv_h, const double* dcoef_in, int64_t L, int64_t C, int64_t n_knots,
               int k_rt, const T* g_base, T* out) {
  const int K = KC > 0 ? KC : k_rt;
  T dcoef[(kMaxOrder + 1) * kMaxOrder];
  for (int i = 0; i < (K + 1) * K; ++i) dcoef[i] = static_cast<T>(dcoef_in[i]);
  const int64_t n_bases = n_knots - K - 1;
  const T n_spans = static_cast<T>(n_knots - 1);
  const int64_t per = std::max<int64_t>(1, kBlock / C);
  const int64_t blk = per * C;
  const int64_t grain = std::max<int64_t>(1, 8192 / C);
  at::parallel_for(0, L, grain, [&](int64_t begin, int64_t end) {
    Scratch<T> s(t0, inv_h, C, blk, K + 1);
    for (int64_t l0 = begin; l0 < end; l0 += per) {
      const int64_t i0 = l0 * C;
      const int64_t n = std::min(per, end - l0) * C;
      s.locate(x + i0, n, n_spans);
      s.pieces(dcoef, K + 1, K, n, blk, true);
      int64_t l = l0, c = 0;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = i0 + j;
        T acc = g_base[i];
        const int64_t m = s.span[j];
        const T* row = ge + l * sL + c * sC;
        const T* pv = s.piece.data() + j;
        for (int r = 0; r <= K; ++r) {  // branch-free, as in expand_loop
          const int64_t g = m - K + r;
          const bool exists = static_cast<uint64_t>(g) < static_cast<uint64_t>(n_bases);
          const T term = row[(exists ? 1 + g : 0) * sB] * pv[r * blk];
          acc += exists ? term : T(0);
        }
        out[i] = acc;
        if (++c == C) {
          c = 0;
          ++l;
        }
      }
    }
  });
}

void check_common(const at::Tensor& x, const at::Tensor& t0, const at::Tensor& inv_h,
                  int64_t n_knots, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous CPU (L, C) tensor");
  TORCH_CHECK(K >= 1 && K <= kMaxOrder, "spline order out of range");
  TORCH_CHECK(n_knots >= 2 * K + 2, "too few knots for the spline order");
  const int64_t C = x.size(1);
  for (const at::Tensor* t : {&t0, &inv_h}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 1 && t->size(0) == C && t->is_contiguous(),
                "knot parameters must be contiguous CPU (C,) tensors");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "dtype mismatch");
  }
}

void expand(const at::Tensor& x, const at::Tensor& t0, const at::Tensor& inv_h, const at::Tensor& coef,
            int64_t n_knots, int64_t K, const at::Tensor& act, at::Tensor out) {
  check_common(x, t0, inv_h, n_knots, K);
  const int64_t L = x.size(0), C = x.size(1);
  TORCH_CHECK(act.sizes() == x.sizes() && act.is_contiguous() && act.scalar_type() == x.scalar_type(),
              "act must be a contiguous tensor like x");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == L && out.size(1) == C && out.size(2) == n_knots - K &&
              out.is_contiguous() && out.scalar_type() == x.scalar_type() && out.device().is_cpu(),
              "out must be a contiguous (L, C, n_knots - K) tensor like x");
  TORCH_CHECK(coef.scalar_type() == at::kDouble && coef.is_contiguous() && coef.numel() == (K + 1) * (K + 1),
              "bad coefficient table");
  const int k = static_cast<int>(K);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kanvolution_expand", [&] {
    const auto args = std::make_tuple(x.data_ptr<scalar_t>(), act.data_ptr<scalar_t>(), t0.data_ptr<scalar_t>(),
                                      inv_h.data_ptr<scalar_t>(), coef.data_ptr<double>(), L, C, n_knots, k,
                                      out.data_ptr<scalar_t>());
    switch (k) {
      case 1: std::apply(expand_loop<scalar_t, 1>, args); break;
      case 2: std::apply(expand_loop<scalar_t, 2>, args); break;
      case 3: std::apply(expand_loop<scalar_t, 3>, args); break;
      case 4: std::apply(expand_loop<scalar_t, 4>, args); break;
      default: std::apply(expand_loop<scalar_t, 0>, args);
    }
  });
}

void grad_input(const at::Tensor& grad_e, const at::Tensor& x, const at::Tensor& t0, const at::Tensor& inv_h,
                const at::Tensor& dcoef, int64_t n_knots, int64_t K, const at::Tensor& g_base, at::Tensor out) {
  check_common(x, t0, inv_h, n_knots, K);
  const int64_t L = x.size(0), C = x.size(1);
  TORCH_CHECK(grad_e.dim() == 3 && grad_e.size(0) == L && grad_e.size(1) == C && grad_e.size(2) == n_knots - K &&
              grad_e.scalar_type() == x.scalar_type() && grad_e.device().is_cpu(),
              "grad_e must be an (L, C, n_knots - K) CPU tensor like x");
  TORCH_CHECK(g_base.sizes() == x.sizes() && g_base.is_contiguous() && g_base.scalar_type() == x.scalar_type(),
              "g_base must be a contiguous tensor like x");
  TORCH_CHECK(out.sizes() == x.sizes() && out.is_contiguous() && out.scalar_type() == x.scalar_type() &&
              out.device().is_cpu(), "out must be a contiguous tensor like x");
  TORCH_CHECK(dcoef.scalar_type() == at::kDouble && dcoef.is_contiguous() && dcoef.numel() == (K + 1) * K,
              "bad coefficient table");
  const int k = static_cast<int>(K);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kanvolution_grad_input", [&] {
    const auto args = std::make_tuple(grad_e.data_ptr<scalar_t>(), grad_e.stride(0), grad_e.stride(1),
                                      grad_e.stride(2), x.data_ptr<scalar_t>(), t0.data_ptr<scalar_t>(),
                                      inv_h.data_ptr<scalar_t>(), dcoef.data_ptr<double>(), L, C, n_knots, k,
                                      g_base.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    switch (k) {
      case 1: std::apply(grad_loop<scalar_t, 1>, args); break;
      case 2: std::apply(grad_loop<scalar_t, 2>, args); break;
      case 3: std::apply(grad_loop<scalar_t, 3>, args); break;
      case 4: std::apply(grad_loop<scalar_t, 4>, args); break;
      default: std::apply(grad_loop<scalar_t, 0>, args);
    }
  });
}

}  // namespace

TORCH_LIBRARY(@NAMESPACE@, m) {
  m.def("expand(Tensor x, Tensor t0, Tensor inv_h, Tensor coef, int n_knots, int K, Tensor act, Tensor(a!) out) -> ()",
        &expand);
  m.def("grad_input(Tensor grad_e, Tensor x, Tensor t0, Tensor inv_h, Tensor dcoef, int n_knots, int K, "
        "Tensor g_base, Tensor(a!) out) -> ()",
        &grad_input);
}
"""

_override: bool | None = None
_ops = None
# Set before the first build attempt and never cleared: one attempt (and at most one warning) per
# process. A thread that races the first build sees the flag and simply uses the PyTorch path.
_attempted = False


def set_enabled(enabled: bool | None) -> None:
    """Turn the fused kernels on or off in this process; ``None`` restores the default
    (``KANVOLUTION_CPU_KERNELS``, else on)."""
    global _override
    _override = None if enabled is None else bool(enabled)


def is_enabled() -> bool:
    """Whether the kernels should be used (does not build them)."""
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in ("0", "false", "off", "no"):
        return False
    if env in ("1", "true", "on", "yes"):
        return True
    return DEFAULT_ENABLED


def _source() -> str:
    return _SOURCE.replace("@MAX_ORDER@", str(MAX_ORDER)).replace("@NAMESPACE@", _NAMESPACE)


def _build_name(source: str) -> str:
    # Source and torch version in the name: a cache built against other headers is never reused.
    key = f"{source}\0{torch.__version__}\0{sys.version_info[:2]}".encode()
    digest = hashlib.sha1(key, usedforsecurity=False).hexdigest()[:12]
    return f"kanvolution_cpu_{digest}"


def _wait_for_build_lock(cpp_extension, name: str) -> None:
    """Wait for another process's build of ``name``, and clear its lock file if that process died.

    torch's own wait has no timeout: a build interrupted by a kill (a test-run timeout, Ctrl-C)
    leaves a lock behind, and every later process would hang on it for good.
    """
    try:
        lock = os.path.join(cpp_extension._get_build_directory(name, False), "lock")
    except Exception:  # private helper: without it, keep torch's behaviour
        return
    while True:
        try:
            age = time.time() - os.stat(lock).st_mtime
        except OSError:  # no lock
            return
        if age > STALE_LOCK_SECONDS:
            try:
                os.remove(lock)
            except OSError:
                pass
            return
        time.sleep(0.2)


def load():
    """The compiled ops (``torch.ops.kanvolution_cpu``), building them on the first call; ``None``
    if they cannot be built. Tries once per process."""
    global _ops, _attempted
    if _ops is not None or _attempted:
        return _ops
    _attempted = True
    try:
        from torch.utils import cpp_extension

        source = _source()
        if sys.platform.startswith("linux"):
            # The objects then reference libgomp.so.1, which resolves to the copy torch has loaded:
            # one thread pool, and torch.set_num_threads applies to these loops too.
            cflags, ldflags = ["-O3", "-fno-trapping-math", "-fopenmp"], ["-fopenmp"]
        else:  # without OpenMP flags at::parallel_for runs serially, which is still correct
            cflags, ldflags = (["/O2"] if sys.platform == "win32" else ["-O3", "-fno-trapping-math"]), []
        kwargs = {}
        if "no_implicit_headers" in inspect.signature(cpp_extension.load_inline).parameters:
            kwargs["no_implicit_headers"] = True  # ATen headers only: a much faster first build
        name = _build_name(source)
        _wait_for_build_lock(cpp_extension, name)
        cpp_extension.load_inline(
            name=name, cpp_sources=[source], extra_cflags=cflags, extra_ldflags=ldflags,
            is_python_module=False, verbose=False, **kwargs,
        )
        ops = getattr(torch.ops, _NAMESPACE)
        ops.expand, ops.grad_input  # noqa: B018 - fail here, not on first use, if registration failed
    except Exception as exc:  # anything at all: the PyTorch path always works
        message = " ".join(str(exc).split())
        if len(message) > 400:
            message = message[:400] + " ..."
        warnings.warn(
            f"kanvolution: could not build the fused CPU kernels ({type(exc).__name__}: {message}); "
            f"using the slower PyTorch implementation. Set {ENV_VAR}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    _ops = ops
    return _ops


@functools.lru_cache(maxsize=None)
def _coefficients(spline_order: int) -> tuple[Tensor, Tensor]:
    from .functional import _uniform_pieces

    A, D = _uniform_pieces(spline_order)
    K = spline_order
    coef = torch.tensor([[float(A[p][r]) for p in range(K + 1)] for r in range(K + 1)], dtype=torch.float64)
    dcoef = torch.tensor([[float(D[p][r]) for p in range(K)] for r in range(K + 1)], dtype=torch.float64)
    return coef.contiguous(), dcoef.contiguous()


def _ops_or_raise():
    ops = load()
    if ops is None:
        raise RuntimeError("the fused CPU kernels are not available")
    return ops


def expand(x: Tensor, t0: Tensor, inv_h: Tensor, n_knots: int, spline_order: int, act: Tensor, out: Tensor) -> Tensor:
    """Write the channel-last expansion of ``x`` on uniform knots into ``out`` (every element).

    Args:
        x, act: contiguous ``(L, C)``; ``act`` is the base term ``act(x)``.
        t0, inv_h: ``(C,)`` first knot and inverse spacing of each channel's knots.
        n_knots: knots per channel (``G + 2K + 1``).
        out: contiguous ``(L, C, n_knots - K)``: slot 0 ``act``, slot ``1 + g`` basis ``g``.
    """
    _ops_or_raise().expand(x, t0, inv_h, _coefficients(spline_order)[0], n_knots, spline_order, act, out)
    return out


def grad_input(grad_e: Tensor, x: Tensor, t0: Tensor, inv_h: Tensor, n_knots: int, spline_order: int,
               g_base: Tensor, out: Tensor) -> Tensor:
    """``out = g_base + sum_g grad_e[..., 1 + g] * dB_g/dx`` on uniform knots.

    Args:
        grad_e: ``(L, C, n_knots - K)`` gradient of the expansion (any strides).
        x, g_base, out: contiguous ``(L, C)``; ``g_base`` carries the base term's gradient.
    """
    _ops_or_raise().grad_input(grad_e, x, t0, inv_h, _coefficients(spline_order)[1], n_knots, spline_order,
                               g_base, out)
    return out
