// Fused CPU loops of the B-spline expansion (uniform knots, order 1..kMaxOrder) and of its input
// gradient, one pass over the data each. Built on first use by kanvolution/ops/build.py; the
// registered op kanvolution::kan_forward/kan_backward calls them on CPU.
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

constexpr int kMaxOrder = 16;

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

TORCH_LIBRARY(kanvolution_cpu, m) {
  m.def("expand(Tensor x, Tensor t0, Tensor inv_h, Tensor coef, int n_knots, int K, Tensor act, Tensor(a!) out) -> ()",
        &expand);
  m.def("grad_input(Tensor grad_e, Tensor x, Tensor t0, Tensor inv_h, Tensor dcoef, int n_knots, int K, "
        "Tensor g_base, Tensor(a!) out) -> ()",
        &grad_input);
}
