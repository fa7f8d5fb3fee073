// Fused CPU loops of the B-spline expansion (uniform knots, order 1..kMaxOrder) and of its input
// gradient, one pass over the data each. Built on first use by kanvolution/ops/build.py; the
// registered op kanvolution::kan_forward/kan_backward calls them on CPU.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

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


// ------------------------------------------------------------------------------------------------
// The other basis families (kanvolution/bases): one pass per value, every function of the value in
// registers, rows written contiguously. `z` is the family's input: tanh(x) for the polynomial
// families (computed by PyTorch's vector code), x itself for the others.
// ------------------------------------------------------------------------------------------------

enum Family : int64_t { kThreeTerm = 0, kBernstein = 1, kRbf = 2, kWavelet = 3, kFourier = 4, kRelu = 5 };

constexpr int kMaxFunctions = 512;

// The n functions of one value (f) and, when df is given, their derivatives with respect to z.
// p: the family's constants (three-term: A_k, B_k, C_k per step; fourier: frequencies) or this
// channel's row (rbf, wavelet: n centres then the width; relu: n starts then the width).
template <typename T>
inline void family_values(int64_t kind, const T* p, int64_t n, int64_t option, T z, T* f, T* df) {
  switch (kind) {
    case kThreeTerm: {  // P_{k+1} = (A_k z + B_k) P_k - C_k P_{k-1}, P_{-1} = 0, P_0 = 1
      T prev = T(0), cur = T(1), dprev = T(0), dcur = T(0);
      f[0] = cur;
      if (df) df[0] = T(0);
      for (int64_t k = 0; k + 1 < n; ++k) {
        const T a = p[3 * k], b = p[3 * k + 1], c = p[3 * k + 2];
        const T factor = a * z + b;
        if (df) {
          const T dnext = a * cur + factor * dcur - c * dprev;
          dprev = dcur;
          dcur = dnext;
          df[k + 1] = dcur;
        }
        const T next = factor * cur - c * prev;
        prev = cur;
        cur = next;
        f[k + 1] = cur;
      }
      break;
    }
    case kBernstein: {
      // b_k = C(D, k) u^k v^(D - k), u = (1 + z) / 2, v = 1 - u; d b_k / dz = D (b_{k-1,D-1} -
      // b_{k,D-1}) / 2. p: C(D, 0..D), then C(D - 1, 0..D - 1).
      const T u = T(0.5) * (T(1) + z), v = T(1) - u;
      const int64_t D = n - 1;
      T pu[kMaxFunctions], pv[kMaxFunctions];
      pu[0] = pv[0] = T(1);
      for (int64_t k = 1; k <= D; ++k) {
        pu[k] = pu[k - 1] * u;
        pv[k] = pv[k - 1] * v;
      }
      for (int64_t k = 0; k <= D; ++k) f[k] = p[k] * pu[k] * pv[D - k];
      if (df) {
        const T* lower = p + D + 1;
        const T half_d = T(0.5) * T(D);
        for (int64_t k = 0; k <= D; ++k) {
          const T left = k >= 1 ? lower[k - 1] * pu[k - 1] * pv[D - k] : T(0);
          const T right = k <= D - 1 ? lower[k] * pu[k] * pv[D - 1 - k] : T(0);
          df[k] = half_d * (left - right);
        }
      }
      break;
    }
    case kRbf:
    case kWavelet: {
      // rbf: e(u) = exp(-u^2); wavelet: e(u) = exp(-u^2 / 2), f = (1 - u^2) e. With option 1 the
      // centres are c_0 + g w (as the family defines them), so u_g = u_0 - g and, walking away
      // from the nearest centre, e(u - 1) = e(u) exp(a (2u - 1)) (a = 1 or 1/2): two exp calls
      // per value instead of n. Every step moves away from the peak, so values only shrink and
      // underflow where the exact ones are smaller still.
      const bool rbf = kind == kRbf;
      const T inv_w = T(1) / p[n];
      const T a = rbf ? T(1) : T(0.5);
      auto put = [&](int64_t g, T u, T e) {
        if (rbf) {
          f[g] = e;
          if (df) df[g] = T(-2) * u * e * inv_w;
        } else {
          const T u2 = u * u;
          f[g] = (T(1) - u2) * e;
          if (df) df[g] = u * (u2 - T(3)) * e * inv_w;
        }
      };
      if (option == 0) {
        for (int64_t g = 0; g < n; ++g) {
          const T u = (z - p[g]) * inv_w;
          put(g, u, std::exp(-a * u * u));
        }
        break;
      }
      const T u0 = (z - p[0]) * inv_w;
      if (!(u0 == u0)) {  // NaN: every function NaN
        for (int64_t g = 0; g < n; ++g) put(g, u0, u0);
        break;
      }
      const T nearest = std::round(u0);
      const int64_t c = nearest < T(0) ? 0 : (nearest > T(n - 1) ? n - 1 : static_cast<int64_t>(nearest));
      // Past -log(smallest normal) the exponentials are below the normal range: 0 (see
      // flush_subnormals), and so is everything further out, without calling exp.
      static const T cutoff = -std::log(std::numeric_limits<T>::min());
      static const T steps[2] = {std::exp(T(-1)), std::exp(T(-2))};  // exp(-2a): wavelet, rbf
      const T step = steps[rbf];
      const T uc = (z - p[c]) * inv_w;
      const T arg = a * uc * uc;
      const T ec = arg < cutoff ? std::exp(-arg) : T(0);
      put(c, uc, ec);
      // exp(a (2 uc - 1)) exp(a (-2 uc - 1)) = exp(-2a): the second ratio from the first. While
      // ec > 0, |uc| is below sqrt(cutoff / a), so the first ratio is far from under- or overflow.
      const T up = ec > T(0) ? std::exp(a * (T(2) * uc - T(1))) : T(0);
      for (int dir = 1; dir >= -1; dir -= 2) {
        T e = ec, ratio = ec > T(0) ? (dir > 0 ? up : step / up) : T(0);
        for (int64_t g = c + dir; g >= 0 && g < n; g += dir) {
          e = e > std::numeric_limits<T>::min() ? e * ratio : T(0);
          ratio *= step;
          put(g, (z - p[g]) * inv_w, e);
        }
      }
      break;
    }
    case kFourier: {  // [1 (option & 1)], cos(k_g z) .., sin(k_g z) ..
      const int64_t first = option & 1;
      const int64_t G = (n - first) / 2;
      if (first) {
        f[0] = T(1);
        if (df) df[0] = T(0);
      }
      // option & 2: the frequencies are 1 .. G, and each (cos, sin) pair is the previous one
      // turned by the angle z (one sin/cos pair per value instead of G).
      const T c1 = (option & 2) ? std::cos(z) : T(0), s1 = (option & 2) ? std::sin(z) : T(0);
      T c = T(1), s = T(0);
      for (int64_t g = 0; g < G; ++g) {
        if (option & 2) {
          const T cn = c * c1 - s * s1;
          s = s * c1 + c * s1;
          c = cn;
        } else {
          const T kz = z * p[g];
          c = std::cos(kz);
          s = std::sin(kz);
        }
        f[first + g] = c;
        f[first + G + g] = s;
        if (df) {
          df[first + g] = -p[g] * s;
          df[first + G + g] = p[g] * c;
        }
      }
      break;
    }
    case kRelu: {  // (relu(z - s_i) relu(s_i + width - z))^2 16 / width^4
      const T width = p[n];
      const T r = T(16) / (width * width * width * width);
      for (int64_t i = 0; i < n; ++i) {
        const T a = z - p[i], b = p[i] + width - z;
        const T pp = a <= T(0) ? T(0) : a, qq = b <= T(0) ? T(0) : b;  // NaN stays NaN, as torch.relu
        const T pq = pp * qq;
        f[i] = pq * pq * r;
        if (df) df[i] = T(2) * pq * (qq - pp) * r;
      }
      break;
    }
  }
}

// Values below the smallest normal number become 0 (below 1.2e-38 in float32, 2.2e-308 in
// float64). Gaussian tails, Mexican hats and high powers of Bernstein factors reach the subnormal
// range for inputs a few widths away, and every later operation on subnormals (the convolution
// over the expansion, its backward) runs many times slower on x86.
// The flush below fixes the results on every platform; on x86 the loops also run with the
// flush-to-zero and denormals-are-zero modes on (restored afterwards), since the steps towards a
// subnormal value are themselves the slow ones.
template <typename T>
inline void flush_subnormals(T* v, int64_t n) {
  for (int64_t g = 0; g < n; ++g) v[g] = std::abs(v[g]) < std::numeric_limits<T>::min() ? T(0) : v[g];
}

struct FlushDenormals {
#if defined(__SSE__) || defined(_M_X64)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

inline bool per_channel(int64_t kind) { return kind == kRbf || kind == kWavelet || kind == kRelu; }

// The constants as T: per channel (C rows of n + 1) or shared.
template <typename T>
std::vector<T> family_params(const at::Tensor& params) {
  const double* p = params.data_ptr<double>();
  return std::vector<T>(p, p + params.numel());
}

void check_family(const at::Tensor& z, int64_t kind, const at::Tensor& params, int64_t n, int64_t option) {
  TORCH_CHECK(z.device().is_cpu() && z.dim() == 2 && z.is_contiguous(), "z must be a contiguous CPU (L, C) tensor");
  TORCH_CHECK(kind >= kThreeTerm && kind <= kRelu, "unknown family kind ", kind);
  TORCH_CHECK(n >= 1 && n <= kMaxFunctions, "number of functions out of range: ", n);
  TORCH_CHECK(params.scalar_type() == at::kDouble && params.is_contiguous() && params.device().is_cpu(),
              "params must be a contiguous CPU float64 tensor");
  const int64_t C = z.size(1);
  int64_t expected = 0;
  switch (kind) {
    case kThreeTerm: expected = 3 * (n - 1); break;
    case kBernstein: expected = 2 * n - 1; break;
    case kFourier: expected = (n - (option & 1)) / 2; break;
    default: expected = C * (n + 1);
  }
  TORCH_CHECK(params.numel() == expected, "params must hold ", expected, " numbers, got ", params.numel());
  TORCH_CHECK(kind != kFourier || (option >= 0 && option <= 3 && (n - (option & 1)) % 2 == 0), "bad fourier layout");
  TORCH_CHECK(!per_channel(kind) || option == 0 || (kind != kRelu && option == 1), "bad option for this family");
}

void family_expand(const at::Tensor& z, int64_t kind, const at::Tensor& params, int64_t n, int64_t option,
                   const at::Tensor& act, at::Tensor out) {
  check_family(z, kind, params, n, option);
  const int64_t L = z.size(0), C = z.size(1);
  TORCH_CHECK(act.sizes() == z.sizes() && act.is_contiguous() && act.scalar_type() == z.scalar_type(),
              "act must be a contiguous tensor like z");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == L && out.size(1) == C && out.size(2) == n + 1 && out.is_contiguous() &&
              out.scalar_type() == z.scalar_type() && out.device().is_cpu(),
              "out must be a contiguous (L, C, n + 1) tensor like z");
  const int64_t stride = per_channel(kind) ? n + 1 : 0;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "kanvolution_family_expand", [&] {
    const std::vector<scalar_t> p = family_params<scalar_t>(params);
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* ap = act.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / (C * (n + 1)));
    at::parallel_for(0, L, grain, [&](int64_t begin, int64_t end) {
      const FlushDenormals ftz;
      for (int64_t i = begin * C; i < end * C; ++i) {
        scalar_t* row = op + i * (n + 1);
        row[0] = ap[i];
        family_values<scalar_t>(kind, p.data() + (i % C) * stride, n, option, zp[i], row + 1, nullptr);
        flush_subnormals(row + 1, n);
      }
    });
  });
}

// out = g_base + dz * sum_g grad_e[.., 1 + g] f_g'(z), dz = dz/dx (1 - tanh^2 for the polynomial
// families; undefined = 1).
void family_grad(const at::Tensor& grad_e, const at::Tensor& z, const c10::optional<at::Tensor>& dz, int64_t kind,
                 const at::Tensor& params, int64_t n, int64_t option, const at::Tensor& g_base, at::Tensor out) {
  check_family(z, kind, params, n, option);
  const int64_t L = z.size(0), C = z.size(1);
  TORCH_CHECK(grad_e.dim() == 3 && grad_e.size(0) == L && grad_e.size(1) == C && grad_e.size(2) == n + 1 &&
              grad_e.scalar_type() == z.scalar_type() && grad_e.device().is_cpu(),
              "grad_e must be an (L, C, n + 1) CPU tensor like z");
  for (const at::Tensor* t : {&g_base, static_cast<const at::Tensor*>(&out)})
    TORCH_CHECK(t->sizes() == z.sizes() && t->is_contiguous() && t->scalar_type() == z.scalar_type() &&
                t->device().is_cpu(), "g_base and out must be contiguous tensors like z");
  const bool has_dz = dz.has_value() && dz->defined();
  if (has_dz)
    TORCH_CHECK(dz->sizes() == z.sizes() && dz->is_contiguous() && dz->scalar_type() == z.scalar_type(),
                "dz must be a contiguous tensor like z");
  const int64_t stride = per_channel(kind) ? n + 1 : 0;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "kanvolution_family_grad", [&] {
    const std::vector<scalar_t> p = family_params<scalar_t>(params);
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* dzp = has_dz ? dz->data_ptr<scalar_t>() : nullptr;
    const scalar_t* gb = g_base.data_ptr<scalar_t>();
    const scalar_t* ge = grad_e.data_ptr<scalar_t>();
    const int64_t sL = grad_e.stride(0), sC = grad_e.stride(1), sB = grad_e.stride(2);
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 8192 / (C * (n + 1)));
    at::parallel_for(0, L, grain, [&](int64_t begin, int64_t end) {
      const FlushDenormals ftz;
      scalar_t f[kMaxFunctions], df[kMaxFunctions];
      for (int64_t l = begin; l < end; ++l) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = l * C + c;
          family_values<scalar_t>(kind, p.data() + c * stride, n, option, zp[i], f, df);
          flush_subnormals(df, n);
          const scalar_t* row = ge + l * sL + c * sC + sB;
          scalar_t acc = scalar_t(0);
          for (int64_t g = 0; g < n; ++g) acc += row[g * sB] * df[g];
          op[i] = gb[i] + (dzp ? dzp[i] * acc : acc);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY(kanvolution_cpu, m) {
  m.def("expand(Tensor x, Tensor t0, Tensor inv_h, Tensor coef, int n_knots, int K, Tensor act, Tensor(a!) out) -> ()",
        &expand);
  m.def("grad_input(Tensor grad_e, Tensor x, Tensor t0, Tensor inv_h, Tensor dcoef, int n_knots, int K, "
        "Tensor g_base, Tensor(a!) out) -> ()",
        &grad_input);
  m.def("family_expand(Tensor z, int kind, Tensor params, int n, int option, Tensor act, Tensor(a!) out) -> ()",
        &family_expand);
  m.def("family_grad(Tensor grad_e, Tensor z, Tensor? dz, int kind, Tensor params, int n, int option, "
        "Tensor g_base, Tensor(a!) out) -> ()",
        &family_grad);
}
