// Direct sparse KAN convolution on CPU: forward, input gradient, weight gradient.
//
// A value x of input channel c on uniform knots lies in span m with position f in the span; only
// the K + 1 B-splines B_{m-K} .. B_m are non-zero there, and they are fixed polynomials of f. So
// instead of convolving the dense expansion [silu(x), B_0(x), .., B_{G+K-1}(x)] (G + K + 1 maps per
// channel), each value is reduced to its "local" form: K + 2 values [silu(x), b_0(f), .., b_K(f)]
// and one row index, and every kernel tap does K + 2 multiply-adds per output channel.
//
// Packed weight layout (one row of Og output channels per slot, Og = O / groups):
//   wp[c][tap][s][o], s = 0: base term; s = 1 .. K: zero rows; s = 1 + K + g: basis g;
//   then K more zero rows (S = G + 3K + 1 = n_knots + K slots in all).
// With the zero rows, a value in span m reads rows 1 + m .. 1 + m + K for b_0 .. b_K whatever m,
// with no test for the bases that do not exist at the ends of the grid. Values outside the knots
// (and NaN) get b_r = 0.
//
// Shapes are handled as 3-d (1-d and 2-d convolutions and the dense layer have size-1 dimensions).

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sigmoid.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int kMaxOrder = 16;
// The local form of the input is built batch chunk by batch chunk (chunk_samples), each under a
// budget of bytes. Every chunk reads the whole packed weight (the backward also writes the whole
// gradient), so the backward's chunks may hold as many bytes as the packed weight (from kChunkBytes
// to kMaxChunkBytes); the forward's are kSmallChunkBytes (about one core's L2: the chunk's values
// stay in cache while they are used) unless the packed weight reaches kLargeWeightBytes, where they
// are kChunkBytes, and they hold at least enough samples for every thread. Measured on 64->64 and
// 128->128 layers at gs = 10-50 (1-4% against 8 MiB chunks for both, 1 thread); chunking does not
// change any result.
constexpr int64_t kChunkBytes = int64_t(8) << 20;
constexpr int64_t kSmallChunkBytes = int64_t(2) << 20;
constexpr int64_t kMaxChunkBytes = int64_t(64) << 20;
constexpr int64_t kLargeWeightBytes = int64_t(16) << 20;
// The forward reads a channel's packed rows once for a set of up to kSampleSet samples whose
// outputs (one block of output channels) fit in kSetBytes, so that they stay in cache together.
constexpr int64_t kSampleSet = 8;
constexpr int64_t kSetBytes = int64_t(512) << 10;

struct Geometry {
  int64_t N, C, D, H, W;  // padded input
  int64_t kd, kh, kw, sd, sh, sw, dd, dh, dw;
  int64_t Do, Ho, Wo;
  int64_t groups, Cg, Og, O;
  int64_t S;  // packed slots
  int64_t taps() const { return kd * kh * kw; }
  int64_t in_size() const { return D * H * W; }
  int64_t out_size() const { return Do * Ho * Wo; }
};

// Highest coefficient first, the order of the library's other uniform-knot code.
template <typename T>
inline T horner(const T* c, int n, T f) {
  if (n == 1) return c[0];
  T v = f * c[n - 1] + c[n - 2];
  for (int p = n - 3; p >= 0; --p) v = v * f + c[p];
  return v;
}

// Local form of a batch chunk, channel-first like the input: for value i (i = (n * C + c) * L + l)
// vals[i * V .. i * V + V) = [silu(x), b_0, .., b_K] and row[i] = 1 + m (the packed slot of b_0);
// with derivatives, dvals holds their derivatives in x: [silu'(x), b_0'(f) / h, .., b_K'(f) / h].
template <typename T>
struct Local {
  int K, V;
  std::vector<T> vals, dvals;
  std::vector<int32_t> row;

  Local(int k, int64_t n_values, bool derivative) : K(k), V(k + 2), vals(n_values * (k + 2)), row(n_values) {
    if (derivative) dvals.resize(n_values * V);
  }

  // The local form of n_rows rows of L values (row nc is channel nc % C). The sigmoid of the chunk
  // comes from one vectorised ATen pass; the rest runs on blocks of kBlock values whose spans,
  // positions and bases are computed as arrays (vectorised) and then interleaved into vals / dvals.
  template <int KC>
  void build(const T* x, const T* t0, const T* inv_h, const T* coef, const T* dcoef, int64_t n_rows,
             int64_t C, int64_t L, int64_t n_knots) {
    constexpr int kBlock = 64;
    constexpr int RMAX = KC > 0 ? KC + 1 : kMaxOrder + 1;
    const int Kb = KC > 0 ? KC : K;
    const T n_spans = static_cast<T>(n_knots - 1);
    const bool derivative = !dvals.empty();
    const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    const at::Tensor sig_t = at::sigmoid(at::from_blob(const_cast<T*>(x), {n_rows * L}, options));
    const T* sig = sig_t.data_ptr<T>();
    const T nan = std::numeric_limits<T>::quiet_NaN();
    at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
      alignas(64) T f_[kBlock], in_[kBlock], b_[RMAX][kBlock], d_[RMAX][kBlock];
      alignas(64) int32_t m_[kBlock];
      for (int64_t nc = begin; nc < end; ++nc) {
        const int64_t c = nc % C;
        const T a = t0[c], s = inv_h[c];
        for (int64_t l0 = nc * L; l0 < (nc + 1) * L; l0 += kBlock) {
          const int nb = static_cast<int>(std::min<int64_t>(kBlock, (nc + 1) * L - l0));
          const T* xb = x + l0;
          for (int i = 0; i < nb; ++i) {
            const T u = (xb[i] - a) * s;
            const bool inside = u >= T(0) && u < n_spans;  // false for NaN
            const T uu = inside ? u : T(0);
            const int32_t m = static_cast<int32_t>(uu);  // floor, as uu >= 0
            f_[i] = uu - static_cast<T>(m);
            in_[i] = inside ? T(1) : T(0);
            m_[i] = m;
          }
          for (int r = 0; r <= Kb; ++r) {
            const T* cr = coef + r * (Kb + 1);
            for (int i = 0; i < nb; ++i) b_[r][i] = in_[i] * horner(cr, Kb + 1, f_[i]);
          }
          if (derivative) {
            for (int r = 0; r <= Kb; ++r) {
              const T* cr = dcoef + r * Kb;
              for (int i = 0; i < nb; ++i) d_[r][i] = in_[i] * (horner(cr, Kb, f_[i]) * s);
            }
          }
          T* v = vals.data() + l0 * V;
          for (int i = 0; i < nb; ++i, v += V) {
            // +-inf: NaN, as the dense path's bases of an infinite value are NaN.
            v[0] = std::isinf(xb[i]) ? nan : xb[i] * sig[l0 + i];
            for (int r = 0; r <= Kb; ++r) v[1 + r] = b_[r][i];
            row[l0 + i] = 1 + m_[i];
          }
          if (derivative) {
            T* dv = dvals.data() + l0 * V;
            for (int i = 0; i < nb; ++i, dv += V) {
              const T sg = sig[l0 + i];
              dv[0] = std::isinf(xb[i]) ? nan : sg * (T(1) + xb[i] * (T(1) - sg));
              for (int r = 0; r <= Kb; ++r) dv[1 + r] = d_[r][i];
            }
          }
        }
      }
    });
  }
};

template <typename T>
struct Tables {
  T coef[(kMaxOrder + 1) * (kMaxOrder + 1)];
  T dcoef[(kMaxOrder + 1) * kMaxOrder];
  Tables(const at::Tensor& coef_t, const at::Tensor& dcoef_t) {
    const double* c = coef_t.data_ptr<double>();
    const double* d = dcoef_t.data_ptr<double>();
    for (int64_t i = 0; i < coef_t.numel(); ++i) coef[i] = static_cast<T>(c[i]);
    for (int64_t i = 0; i < dcoef_t.numel(); ++i) dcoef[i] = static_cast<T>(d[i]);
  }
};


// out[o] += v . (rows of one value and one kernel tap) for the output channels o in [o0, o1): the
// forward's path for the channels left over by its vector blocks. KC > 0 fixes the order at
// compile time; the restrict qualifiers let the compiler vectorise without run-time alias checks.
template <typename T, int KC>
inline void axpy_rows(int K, int64_t o0, int64_t o1, int64_t Og, const T* __restrict__ v, const T* __restrict__ w0,
                      const T* __restrict__ r0, T* __restrict__ acc) {
  T c[kMaxOrder + 2];
  for (int r = 0; r < K + 2; ++r) c[r] = v[r];
  for (int64_t o = o0; o < o1; ++o) {
    T sum = acc[o] + c[0] * w0[o];
    for (int r = 0; r < (KC > 0 ? KC + 1 : K + 1); ++r) sum += c[1 + r] * r0[r * Og + o];
    acc[o] = sum;
  }
}

// One 64-byte vector of T (GCC/Clang vector extension): accumulators the compiler keeps in registers.
template <typename T>
struct Vec64 {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int lanes = 64 / sizeof(T);
  // The same vector with the alignment of T: unaligned loads and stores the compiler emits as
  // single instructions (a memcpy of several vectors may go through the stack).
  typedef T utype __attribute__((vector_size(64), aligned(alignof(T)), may_alias));
  static type load(const T* p) { return *reinterpret_cast<const utype*>(p); }
  static void store(T* p, const type& v) { *reinterpret_cast<utype*>(p) = v; }
};

// Samples per group of the weight gradient, which sorts one channel's positions of several samples
// together (SpanOrder::sort_group) and adds a span's sums to its rows once per group instead of once
// per sample (at fine grids a sample has few values per span). A group's output gradients stay
// under kWeightGroupBytes (they are read once per tap and block, from L2). Measured on the weight
// gradient alone (1 thread): 128->128 on 16x16, 4 samples: 16% faster at gs = 50, 3% at gs = 10;
// 64->64 on 32x32 with 4 samples (1 MiB of output gradients) 3% slower.
constexpr int64_t kWeightGroup = 4;
constexpr int64_t kWeightGroupBytes = int64_t(512) << 10;
inline int64_t weight_group(int64_t out_size, int64_t O, size_t elem) {
  const int64_t per_sample = std::max<int64_t>(1, out_size * O * int64_t(elem));
  return std::max<int64_t>(1, std::min<int64_t>(kWeightGroup, kWeightGroupBytes / per_sample));
}

// Buckets of entries: bucket b is order[start[b] .. start[b + 1]).
struct Buckets {
  int64_t n;
  const int64_t* start;
  const int64_t* order;
};

// The positions of one channel, sorted by row (1 + knot span) with a counting sort: bucket b (row
// 1 + b) is order[start[b] .. start[b + 1]). Values outside the knots have all-zero bases and sit in
// the first bucket. sort: the positions q of one sample (entries q); sort_group: those of up to
// kWeightGroup samples, entries (j << 32) | q for position q of sample j (for j = 0 the same as sort).
struct SpanOrder {
  std::vector<int64_t> start, next, order;
  SpanOrder(int64_t n_buckets, int64_t L) : start(n_buckets + 1), next(n_buckets), order(L * kWeightGroup) {}
  int64_t buckets() const { return int64_t(next.size()); }
  void sort(const int32_t* rows, int64_t L) { sort_group(rows, 0, 1, L); }
  // rows of sample j: rows0 + j * stride.
  void sort_group(const int32_t* rows0, int64_t stride, int64_t n_samples, int64_t L) {
    std::fill(start.begin(), start.end(), 0);
    for (int64_t j = 0; j < n_samples; ++j)  // bucket rows[q] - 1 counted at its end
      for (int64_t q = 0; q < L; ++q) ++start[rows0[j * stride + q]];
    for (size_t b = 1; b < start.size(); ++b) start[b] += start[b - 1];
    std::copy(start.begin(), start.end() - 1, next.begin());
    for (int64_t j = 0; j < n_samples; ++j)
      for (int64_t q = 0; q < L; ++q) order[next[rows0[j * stride + q] - 1]++] = (j << 32) | q;
  }
};

// Output position of every input position through one kernel tap (-1: it feeds no output there).
struct TapMap {
  std::vector<int64_t> od_of, oh_of, ow_of;  // per dimension: [offset * n_in + i] -> output index or -1
  static std::vector<int64_t> table(int64_t n_in, int64_t n_out, int64_t k, int64_t s, int64_t dl) {
    std::vector<int64_t> t(k * n_in, -1);
    for (int64_t j = 0; j < k; ++j)
      for (int64_t i = j * dl; i < n_in; ++i)
        if ((i - j * dl) % s == 0 && (i - j * dl) / s < n_out) t[j * n_in + i] = (i - j * dl) / s;
    return t;
  }
  explicit TapMap(const Geometry& g)
      : od_of(table(g.D, g.Do, g.kd, g.sd, g.dd)), oh_of(table(g.H, g.Ho, g.kh, g.sh, g.dh)),
        ow_of(table(g.W, g.Wo, g.kw, g.sw, g.dw)) {}
  void fill(const Geometry& g, int64_t a, int64_t b, int64_t e, int64_t* out_pos) const {
    for (int64_t d = 0, q = 0; d < g.D; ++d) {
      for (int64_t h = 0; h < g.H; ++h) {
        for (int64_t w = 0; w < g.W; ++w, ++q) {
          const int64_t od = od_of[a * g.D + d], oh = oh_of[b * g.H + h], ow = ow_of[e * g.W + w];
          out_pos[q] = (od | oh | ow) < 0 ? -1 : (od * g.Ho + oh) * g.Wo + ow;
        }
      }
    }
  }
};

// Sum of a vector's lanes, pairwise (a short dependency chain, and a fixed order).
template <typename T>
inline T lane_sum(const typename Vec64<T>::type& v) {
  constexpr int LW = Vec64<T>::lanes;
  T t[LW];
  std::memcpy(t, &v, sizeof t);
  for (int w = LW / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) t[l] += t[l + w];
  return t[0];
}

// In-place transpose of an LW x LW tile held as LW vectors (after it, lane l of vector i is what
// lane i of vector l was): butterfly stages that swap the off-diagonal blocks of d lanes
// (d = LW / 2 .. 1) of vector pairs (i, i + d), one two-source shuffle per vector and stage.
template <typename T>
struct Transposer {
  using vec = typename Vec64<T>::type;
  using ivec = typename Vec64<typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type>::type;
  static constexpr int LW = Vec64<T>::lanes;
  ivec lo[5], hi[5];
  Transposer() {
    for (int s = 0, d = LW / 2; d >= 1; d /= 2, ++s)
      for (int l = 0; l < LW; ++l) {
        lo[s][l] = (l & d) ? LW + l - d : l;
        hi[s][l] = (l & d) ? LW + l : l + d;
      }
  }
  void operator()(vec* r) const {
#pragma GCC unroll 4
    for (int s = 0, d = LW / 2; d >= 1; d /= 2, ++s)
#pragma GCC unroll 16
      for (int i = 0; i < LW; ++i)
        if ((i & d) == 0) {
          const vec a = r[i], b = r[i + d];
          r[i] = __builtin_shuffle(a, b, lo[s]);
          r[i + d] = __builtin_shuffle(a, b, hi[s]);
        }
  }
};

// Zeroed scratch aligned to 64 bytes (whole vectors never straddle two cache lines).
template <typename T>
struct AlignedBuf {
  T* p = nullptr;
  int64_t n = 0;
  AlignedBuf() = default;
  explicit AlignedBuf(int64_t count) { reset(count); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
  ~AlignedBuf() { std::free(p); }
  void reset(int64_t count) {
    std::free(p);
    n = count;
    const size_t bytes = (size_t(std::max<int64_t>(count, 1)) * sizeof(T) + 63) / 64 * 64;
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(p != nullptr, "out of memory for a scratch buffer of ", bytes, " bytes");
    std::fill(p, p + count, T(0));
  }
  T* data() { return p; }
  const T* data() const { return p; }
  T& operator[](int64_t i) { return p[i]; }
};

// TapMap for every kernel tap at once, as element offsets in one sample's channel-last output of
// row stride `stride` (default: O): at[tap * L + q] = (output position of input position q through
// tap) * stride, or -1. Built once per call.
struct TapOffsets {
  std::vector<int64_t> at;
  explicit TapOffsets(const Geometry& g) : TapOffsets(g, g.O) {}
  TapOffsets(const Geometry& g, int64_t stride) : at(g.taps() * g.in_size()) {
    const TapMap map(g);
    std::vector<int64_t> pos(g.in_size());
    for (int64_t a = 0, t = 0; a < g.kd; ++a)
      for (int64_t b = 0; b < g.kh; ++b)
        for (int64_t e = 0; e < g.kw; ++e, ++t) {
          map.fill(g, a, b, e, pos.data());
          for (int64_t q = 0; q < g.in_size(); ++q) at[t * g.in_size() + q] = pos[q] < 0 ? -1 : pos[q] * stride;
        }
  }
  const int64_t* tap(int64_t t, int64_t L) const { return at.data() + t * L; }
};

// For one kernel tap, the entries of a SpanOrder whose positions feed an output through the tap
// (out_off >= 0), in the same order, bucket by bucket: the kernels then spend nothing on the values
// that a tap maps outside the output (a 3x3 layer with padding 1 on 16x16: 21% of the value-taps,
// 11% on 32x32). Built tap by tap, just before the tap's updates (one tap's entries: in L1 / L2).
struct TapList {
  std::vector<int64_t> start, order;
  TapList(int64_t n_buckets, int64_t capacity) : start(n_buckets + 1), order(capacity) {}
  Buckets build(const SpanOrder& s, const int64_t* out_off) {
    const int64_t nb = s.buckets();
    int64_t n = 0;
    for (int64_t b = 0; b < nb; ++b) {
      start[b] = n;
      for (int64_t j = s.start[b]; j < s.start[b + 1]; ++j) {  // no branch: kept entries advance n
        const int64_t e = s.order[j];
        order[n] = e;
        n += out_off[e & 0xffffffff] >= 0;
      }
    }
    start[nb] = n;
    return {nb, start.data(), order.data()};
  }
};

// Output channels [0, Og) as blocks of whole vectors: (first channel, vectors), at most max_nv
// vectors each, as few blocks as possible of near-equal size; the Og % lanes channels left over are
// handled apart.
inline std::vector<std::pair<int64_t, int>> vector_blocks(int64_t Og, int64_t lanes, int max_nv) {
  const int64_t nv = Og / lanes;
  std::vector<std::pair<int64_t, int>> blocks;
  if (nv == 0) return blocks;
  const int64_t n = (nv + max_nv - 1) / max_nv;
  for (int64_t b = 0, v = 0; b < n; ++b) {
    const int64_t take = (nv - v) / (n - b);
    blocks.emplace_back(v * lanes, int(take));
    v += take;
  }
  return blocks;
}

// One kernel tap, a block of NV vectors of output channels, the values of one (sample, channel)
// that feed an output through the tap (TapList), bucketed by knot span: for every span, its
// K + 2 weight rows (base row, rows 1 + span .. 1 + span + K of ws) stay in registers while each of
// its values q forms h = c[0] w_base + sum_r c[1 + r] w_{1+span+r} from its coefficients
// c = coefs + q * (K + 2) (the forward's local values, or the input gradient's derivatives) and
// hands it to use(q, p, h), p being q's output offset through the tap.
template <typename T, int KC, int NV, typename Use>
inline __attribute__((always_inline)) void span_rows_apply(int k_rt, int64_t Og, const Buckets& sorted,
                                                          const int64_t* __restrict__ out_off,
                                                          const T* __restrict__ coefs, const T* __restrict__ ws,
                                                          Use&& use) {
  using Vc = Vec64<T>;
  using vec = typename Vc::type;
  constexpr int LW = Vc::lanes;
  constexpr int RMAX = KC > 0 ? KC + 1 : kMaxOrder + 1;
  const int K = KC > 0 ? KC : k_rt;
  const int V = K + 2, R = K + 1;
  vec w0[NV];
  for (int u = 0; u < NV; ++u) w0[u] = Vc::load(ws + u * LW);
  for (int64_t bucket = 0; bucket < sorted.n; ++bucket) {
    const int64_t j0 = sorted.start[bucket], j1 = sorted.start[bucket + 1];
    if (j0 == j1) continue;
    vec wr[RMAX][NV];
#pragma GCC unroll 17
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < NV; ++u) wr[r][u] = Vc::load(ws + (1 + bucket + r) * Og + u * LW);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t q = sorted.order[j];
      const T* c = coefs + q * V;
      vec h[NV];
      for (int u = 0; u < NV; ++u) h[u] = c[0] * w0[u];
#pragma GCC unroll 17
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < NV; ++u) h[u] += c[1 + r] * wr[r][u];
      use(q, out_off[q], h);
    }
  }
}

// The forward's updates from one input channel to a block of NV vectors of output channels: for
// every kernel tap and knot span, the K + 2 weight rows of the block stay in registers while the
// span's values update their outputs. wc: the channel's packed weight at the block's first channel;
// os: the sample's channel-last output at the block's first channel.
template <typename T, int KC, int NV>
inline void forward_channel(const Geometry& g, int k_rt, const TapOffsets& map, const SpanOrder& sorted,
                            TapList& list, const T* __restrict__ vals, const T* __restrict__ wc, T* __restrict__ os) {
  using Vc = Vec64<T>;
  using vec = typename Vc::type;
  constexpr int LW = Vc::lanes;
  for (int64_t t = 0; t < g.taps(); ++t) {
    const int64_t* out_off = map.tap(t, g.in_size());
    span_rows_apply<T, KC, NV>(k_rt, g.Og, list.build(sorted, out_off), out_off, vals, wc + t * g.S * g.Og,
                               [&](int64_t, int64_t p, const vec (&h)[NV]) {
      T* op = os + p;  // the lists hold only the values that feed an output through the tap
      // h and the outputs' load are independent chains, joined last: the load is off the critical path.
      vec s[NV];
      for (int u = 0; u < NV; ++u) s[u] = Vc::load(op + u * LW) + h[u];
      for (int u = 0; u < NV; ++u) Vc::store(op + u * LW, s[u]);
    });
  }
}

int64_t chunk_samples(const Geometry& g, int K, size_t elem, bool derivative, bool backward, int64_t min_samples = 1) {
  const int64_t per_value = (K + 2) * int64_t(elem) * (derivative ? 2 : 1) + int64_t(sizeof(int32_t));
  const int64_t per_sample = std::max<int64_t>(1, g.C * g.in_size() * per_value);
  const int64_t weight = g.C * g.taps() * g.S * g.Og * int64_t(elem);
  const int64_t budget = backward ? std::min(kMaxChunkBytes, std::max(kChunkBytes, weight))
                                  : (weight >= kLargeWeightBytes ? kChunkBytes : kSmallChunkBytes);
  int64_t n = std::max<int64_t>(1, std::min(g.N, std::max(min_samples, budget / per_sample)));
  // The backward's chunks hold whole groups of the weight gradient (weight_group) where they can, so
  // the groups (and the gradient's sums) are the same whatever the chunk size.
  const int64_t group = weight_group(g.out_size(), g.O, elem);
  if (backward && n < g.N && n >= group) n -= n % group;
  return n;
}

// out[n][od][oh][ow][o] (channel-last) = sum over c, taps, slots of local value * packed weight.
// Output channels in blocks of two vectors: one task per (sample, group, block). The positions of a
// channel are bucketed by knot span; for one tap, every value of a bucket reads the same K + 2
// weight rows, which stay in registers while the bucket's outputs are updated.
template <typename T, int KC>
void forward_impl(const T* x, const T* t0, const T* inv_h, const Tables<T>& tab, const T* wp, const Geometry& g,
                  int k_rt, int64_t n_knots, T* out) {
  using Vc = Vec64<T>;
  using vec = typename Vc::type;
  constexpr int LW = Vc::lanes;
  constexpr int RMAX = KC > 0 ? KC + 1 : kMaxOrder + 1;
  const int K = KC > 0 ? KC : k_rt;
  const int V = K + 2, R = K + 1;
  const int64_t L = g.in_size(), P = g.out_size(), Og = g.Og, S = g.S, taps = g.taps();
  const std::vector<std::pair<int64_t, int>> blocks = vector_blocks(Og, LW, KC > 0 ? 4 : 2);
  const int64_t n_blocks = int64_t(blocks.size());
  const int64_t Ov = blocks.empty() ? 0 : blocks.back().first + blocks.back().second * LW;
  const int64_t per_set = g.groups * n_blocks;  // tasks per set of samples
  // At least enough samples per chunk for one task per thread and, with several threads, for one
  // whole set of samples (set_max, below): with 2 MiB chunks a 128 -> 128 layer on 16x16 at gs = 10
  // got sets of 2 samples, re-reading its 11.8-MiB packed weight every 2 samples, and its forward did
  // not scale to a second thread. Sets of 8 there: about 20% faster at 2 threads, but 5% slower at 1
  // thread (interleaved, two runs each); 64 -> 64 (sets of 2 either way) unchanged.
  const int64_t threads = at::get_num_threads(), set_tasks = std::max<int64_t>(1, per_set);
  const int64_t block_bytes = std::max<int64_t>(1, P * (blocks.empty() ? 1 : blocks[0].second) * 64);
  const int64_t set_max = std::max<int64_t>(1, std::min<int64_t>(kSampleSet, kSetBytes / block_bytes));
  const int64_t min_samples = std::max<int64_t>(threads > 1 ? set_max : 1, (threads + set_tasks - 1) / set_tasks);
  const int64_t chunk = chunk_samples(g, K, sizeof(T), false, false, min_samples);
  // Where several tasks write parts of one output row (several blocks or groups), each task sums its
  // set's outputs in a compact scratch of its own (rows of `width` channels, offsets `own`) and
  // writes them out at the end: the threads then never update the same cache lines' neighbours
  // over and over. Updating their own channels of shared rows in place, two threads at 128 -> 128
  // ran their forward at the speed of one in some processes (each task took twice as long, from
  // some call on, presumably the cores' prefetchers pulling each other's lines); sums unchanged.
  const bool private_out = per_set > 1;
  int width = 0;
  for (const auto& b : blocks) width = std::max(width, b.second * LW);
  const TapOffsets own(g, private_out ? width : g.O);
  Local<T> loc(K, chunk * g.C * L, false);
  for (int64_t n0 = 0; n0 < g.N; n0 += chunk) {
    const int64_t nn = std::min(chunk, g.N - n0);
    loc.template build<KC>(x + n0 * g.C * L, t0, inv_h, tab.coef, tab.dcoef, nn * g.C, g.C, L, n_knots);
    if (!private_out || Ov < Og) std::fill(out + n0 * P * g.O, out + (n0 + nn) * P * g.O, T(0));
    // Samples in sets (smaller where there would be fewer tasks than threads): a channel's packed
    // rows are read once per set, while they are in cache, instead of once per sample. Each
    // output's sum keeps its order (channels, taps, spans), whatever the sets.
    int64_t ns = std::min(set_max, nn);
    while (ns > 1 && (nn + ns - 1) / ns * per_set < threads) --ns;
    const int64_t n_sets = (nn + ns - 1) / ns;
    at::parallel_for(0, n_sets * per_set, 1, [&](int64_t begin, int64_t end) {
      SpanOrder sorted(n_knots - 1, L);
      TapList list(n_knots - 1, L);
      AlignedBuf<T> acc(private_out ? ns * P * width : 0);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t set = task / per_set, gr = task / n_blocks % g.groups;
        const int64_t blk = task % n_blocks;
        const int64_t ob = blocks[blk].first;
        const int64_t s0 = set * ns, s1 = std::min(nn, s0 + ns);
        if (private_out) std::fill(acc.data(), acc.data() + (s1 - s0) * P * width, T(0));
        for (int64_t c = gr * g.Cg; c < (gr + 1) * g.Cg; ++c) {
          const T* wc = wp + c * taps * S * Og + ob;
          for (int64_t nl = s0; nl < s1; ++nl) {
            T* os = private_out ? acc.data() + (nl - s0) * P * width : out + (n0 + nl) * P * g.O + gr * Og + ob;
            const int64_t base = (nl * g.C + c) * L;
            sorted.sort(loc.row.data() + base, L);
            const T* vals = loc.vals.data() + base * V;
            switch (blocks[blk].second) {
              case 4: forward_channel<T, KC, 4>(g, K, own, sorted, list, vals, wc, os); break;
              case 3: forward_channel<T, KC, 3>(g, K, own, sorted, list, vals, wc, os); break;
              case 2: forward_channel<T, KC, 2>(g, K, own, sorted, list, vals, wc, os); break;
              default: forward_channel<T, KC, 1>(g, K, own, sorted, list, vals, wc, os);
            }
          }
        }
        if (!private_out) continue;
        const size_t bytes = size_t(blocks[blk].second) * LW * sizeof(T);
        for (int64_t nl = s0; nl < s1; ++nl)
          for (int64_t p = 0; p < P; ++p)
            std::memcpy(out + ((n0 + nl) * P + p) * g.O + gr * Og + ob, acc.data() + ((nl - s0) * P + p) * width, bytes);
      }
    });
    if (Ov == Og) continue;
    // The last Og % (2 * LW) output channels of each group: value by value over output rows.
    at::parallel_for(0, nn * g.Do * g.Ho, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t nl = task / (g.Do * g.Ho), od = task / g.Ho % g.Do, oh = task % g.Ho;
        T* orow = out + (((n0 + nl) * g.Do + od) * g.Ho + oh) * g.Wo * g.O;
        for (int64_t c = 0; c < g.C; ++c) {
          const int64_t ocol = c / g.Cg * Og;
          for (int64_t a = 0; a < g.kd; ++a) {
            for (int64_t b = 0; b < g.kh; ++b) {
              const int64_t in_row = ((nl * g.C + c) * g.D + od * g.sd + a * g.dd) * g.H + oh * g.sh + b * g.dh;
              const T* vrow = loc.vals.data() + in_row * g.W * V;
              const int32_t* rrow = loc.row.data() + in_row * g.W;
              for (int64_t e = 0; e < g.kw; ++e) {
                const T* ws = wp + ((c * taps + (a * g.kh + b) * g.kw + e) * S) * Og;
                for (int64_t ow = 0; ow < g.Wo; ++ow) {
                  const int64_t w = ow * g.sw + e * g.dw;
                  axpy_rows<T, KC>(K, Ov, Og, Og, vrow + w * V, ws, ws + rrow[w] * Og, orow + ow * g.O + ocol);
                }
              }
            }
          }
        }
      }
    });
  }
}

// The input gradient's terms of one sample, input channel and kernel tap for a block of NV vectors
// of output channels. For a value in span m, d out / dx is the block's phi'(x) = silu'(x) w0 +
// sum_r b_r'(f) / h w_{1+m+r}: the K + 2 rows of a span stay in registers, each value forms its
// phi' and adds its products with the output gradient to its own vector acc[q] (reduced at the end).
template <typename T, int KC, int NV>
inline void grad_input_tap(int k_rt, int64_t Og, const Buckets& sorted, const int64_t* __restrict__ out_off,
                           const T* __restrict__ dvals, const T* __restrict__ gos, const T* __restrict__ ws,
                           T* __restrict__ acc) {
  using Vc = Vec64<T>;
  using vec = typename Vc::type;
  constexpr int LW = Vc::lanes;
  span_rows_apply<T, KC, NV>(k_rt, Og, sorted, out_off, dvals, ws, [&](int64_t q, int64_t p, const vec (&h)[NV]) {
    const T* gp = gos + p;  // the lists hold only the values that feed an output through the tap
    vec a = Vc::load(acc + q * LW);
    for (int u = 0; u < NV; ++u) a += Vc::load(gp + u * LW) * h[u];
    Vc::store(acc + q * LW, a);
  });
}

// The weight gradient's updates of a group of samples (sorted together, SpanOrder::sort_group), one input
// channel and kernel tap, for a block of NV vectors of output channels: the sums over each knot
// span's values stay in registers and are added to the span's K + 1 rows once (the base row once
// for all spans). Sample j's values are at vals[j], its channel-last output gradient at gos[j]
// (at the block's first channel); ws: the gradient's rows of the tap, same channel.
template <typename T, int KC, int NV>
inline void grad_weight_group_tap(int k_rt, int64_t Og, const Buckets& sorted, const int64_t* __restrict__ out_off,
                                  const T* const* vals, const T* const* gos, T* __restrict__ ws) {
  using Vc = Vec64<T>;
  using vec = typename Vc::type;
  constexpr int LW = Vc::lanes;
  constexpr int RMAX = KC > 0 ? KC + 1 : kMaxOrder + 1;
  const int K = KC > 0 ? KC : k_rt;
  const int V = K + 2, R = K + 1;
  vec b[NV];
  for (int u = 0; u < NV; ++u) b[u] = vec{};
  for (int64_t bucket = 0; bucket < sorted.n; ++bucket) {
    const int64_t j0 = sorted.start[bucket], j1 = sorted.start[bucket + 1];
    if (j0 == j1) continue;
    vec acc[RMAX][NV];
#pragma GCC unroll 17
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < NV; ++u) acc[r][u] = vec{};
    for (int64_t e = j0; e < j1; ++e) {
      const int64_t entry = sorted.order[e];
      const int64_t s = entry >> 32, q = entry & 0xffffffff;
      const T* gp = gos[s] + out_off[q];  // the lists hold only the values that feed an output
      const T* v = vals[s] + q * V;
      vec gv[NV];
      for (int u = 0; u < NV; ++u) {
        gv[u] = Vc::load(gp + u * LW);
        b[u] += v[0] * gv[u];
      }
#pragma GCC unroll 17
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < NV; ++u) acc[r][u] += v[1 + r] * gv[u];
    }
    T* r0 = ws + (1 + bucket) * Og;  // rows 1 + span .. 1 + span + K
#pragma GCC unroll 17
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < NV; ++u) Vc::store(r0 + r * Og + u * LW, Vc::load(r0 + r * Og + u * LW) + acc[r][u]);
  }
  for (int u = 0; u < NV; ++u) Vc::store(ws + u * LW, Vc::load(ws + u * LW) + b[u]);
}

// The spline weight of one (output, input channel) as a slab of taps * nb columns, column k = u * nb + j
// (tap u, basis j): the packed row (u * S + K + 1 + j) and the tap of each column (pack3, Unpack3).
struct SlabColumns {
  std::vector<int64_t> row, tap;  // per column k: its packed row and its tap
  SlabColumns(int64_t taps, int64_t nb, int64_t S, int64_t K) : row(taps * nb), tap(taps * nb) {
    for (int64_t k = 0; k < taps * nb; ++k) {
      tap[k] = k / nb;
      row[k] = tap[k] * S + K + 1 + k % nb;
    }
  }
};

// The scalers of a tile's LW outputs o0 .. o0 + LW - 1 (first: the group's o = 0 and the input
// channel), tap by tap: scv[u * LW + l] for output o0 + l and tap u.
template <typename T>
inline void tile_scalers(const T* scaler, int64_t first, int64_t o0, int64_t cg, int64_t taps, T* scv) {
  constexpr int LW = Vec64<T>::lanes;
  for (int64_t u = 0; u < taps; ++u)
    for (int l = 0; l < LW; ++l) scv[u * LW + l] = scaler[(first + (o0 + l) * cg) * taps + u];
}

// The inverse of pack3 for gradients: from a packed weight gradient g, the three weights' gradients
// through the combination: g_base = row 0, g_spline = g_basis * scaler, g_scaler = sum over bases
// of g_basis * spline (each in the parameter's layout; any of them may be null: not needed), one
// input channel at a time (its rows of g, once they are final: the backward calls it for a channel
// right after the channel's last updates, while its rows are in cache). The spline part on tiles as
// in pack3_impl; each scaler's sum keeps its order (bases in turn).
template <typename T>
struct Unpack3 {
  using Vc = Vec64<T>;
  using vec = typename Vc::type;
  static constexpr int LW = Vc::lanes;
  const T* packed;
  const T* spline;
  const T* scaler;
  T *gb, *gs, *gsc;
  const int64_t C, nb, taps, og, K, cg, S, o_stride, ncol, ov, kv;
  const SlabColumns cols;
  const Transposer<T> transpose;
  Unpack3(const T* packed_, const T* spline_, const T* scaler_, T* gb_, T* gs_, T* gsc_, int64_t C_, int64_t groups,
          int64_t nb_, int64_t taps_, int64_t og_, int64_t K_)
      : packed(packed_), spline(spline_), scaler(scaler_), gb(gb_), gs(gs_), gsc(gsc_), C(C_), nb(nb_), taps(taps_),
        og(og_), K(K_), cg(C_ / groups), S(nb_ + 1 + 2 * K_), o_stride(cg * taps_), ncol(taps_ * nb_),
        ov(og_ / LW * LW), kv(ncol / LW * LW), cols(taps_, nb_, S, K_) {}
  // Scratch of one thread (T elements): the scalers of a tile's outputs and their sums, per tap.
  int64_t scratch_size() const { return 2 * taps * LW; }
  void channel(int64_t c, T* scratch) const {
    T* scv = scratch;
    T* sums = scratch + taps * LW;
    const int64_t first = (c / cg) * og * cg + c % cg;
    const T* src_c = packed + c * taps * S * og;
    if (gb != nullptr) {
      for (int64_t u = 0; u < taps; ++u) {
        const T* a = src_c + u * S * og;
        T* d = gb + first * taps + u;
        for (int64_t o = 0; o < og; ++o) d[o * o_stride] = a[o];
      }
    }
    if (gs == nullptr && gsc == nullptr) return;
    for (int64_t o0 = 0; o0 < ov; o0 += LW) {
      tile_scalers(scaler, first, o0, cg, taps, scv);
      std::fill(sums, sums + taps * LW, T(0));
      for (int64_t k0 = 0; k0 < kv; k0 += LW) {
        vec a[LW];  // a[jj]: column k0 + jj of the LW outputs
        for (int jj = 0; jj < LW; ++jj) a[jj] = Vc::load(src_c + cols.row[k0 + jj] * og + o0);
        if (gsc != nullptr) {
          vec sp[LW];
          for (int l = 0; l < LW; ++l) sp[l] = Vc::load(spline + (first + (o0 + l) * cg) * ncol + k0);
          transpose(sp);
          for (int jj = 0; jj < LW; ++jj) {
            T* sum = sums + cols.tap[k0 + jj] * LW;
            Vc::store(sum, Vc::load(sum) + a[jj] * sp[jj]);
          }
        }
        if (gs != nullptr) {
          for (int jj = 0; jj < LW; ++jj) a[jj] = a[jj] * Vc::load(scv + cols.tap[k0 + jj] * LW);
          transpose(a);
          for (int l = 0; l < LW; ++l) Vc::store(gs + (first + (o0 + l) * cg) * ncol + k0, a[l]);
        }
      }
      for (int64_t k = kv; k < ncol; ++k) {
        for (int l = 0; l < LW; ++l) {
          const int64_t i = (first + (o0 + l) * cg) * ncol + k;
          const T v = src_c[cols.row[k] * og + o0 + l];
          if (gs != nullptr) gs[i] = v * scv[cols.tap[k] * LW + l];
          if (gsc != nullptr) sums[cols.tap[k] * LW + l] += v * spline[i];
        }
      }
      if (gsc != nullptr)
        for (int64_t u = 0; u < taps; ++u)
          for (int l = 0; l < LW; ++l) gsc[(first + (o0 + l) * cg) * taps + u] = sums[u * LW + l];
    }
    for (int64_t o = ov; o < og; ++o) {
      for (int64_t u = 0; u < taps; ++u) {
        const int64_t i = (first + o * cg) * taps + u;
        const T* a = src_c + (u * S + K + 1) * og + o;
        if (gs != nullptr) {
          const T sc = scaler[i];
          for (int64_t j = 0; j < nb; ++j) gs[i * nb + j] = a[j * og] * sc;
        }
        if (gsc != nullptr) {
          const T* sp = spline + i * nb;
          T sum = T(0);
          for (int64_t j = 0; j < nb; ++j) sum += a[j * og] * sp[j];
          gsc[i] = sum;
        }
      }
    }
  }
};

// Unpack3 over all input channels (the packed gradient complete).
template <typename T>
void unpack3_impl(const Unpack3<T>& u) {
  at::parallel_for(0, u.C, 1, [&](int64_t begin, int64_t end) {
    AlignedBuf<T> scratch(u.scratch_size());
    for (int64_t c = begin; c < end; ++c) u.channel(c, scratch.data());
  });
}

// One batch chunk's backward: the input gradient of one (sample, channel) and the weight
// gradient's updates from it, each given the positions of that sample and channel sorted by span.
template <typename T, int KC>
struct BackwardChunk {
  using Vc = Vec64<T>;
  static constexpr int LW = Vc::lanes;
  const T* go;
  const T* wp;
  const Geometry& g;
  const Local<T>& loc;
  const int k_rt;  // the spline order when KC is 0 (the methods fold it when KC fixes it)
  const int64_t n_knots, n0, nn, L, Og, S, taps;
  const std::vector<std::pair<int64_t, int>> blocks;
  const int64_t Ov;
  const TapOffsets offsets;
  const int64_t group;  // samples per weight-gradient group (weight_group)
  const Unpack3<T>* unpack;  // null, or the split of the weight gradient into the three weights'
  std::vector<int64_t> orphans;  // the positions that feed no output through any tap (strides)

  BackwardChunk(const T* go_, const T* wp_, const Geometry& g_, int k_rt_, int64_t n_knots_, const Local<T>& loc_,
                int64_t n0_, int64_t nn_, const Unpack3<T>* unpack_)
      : go(go_), wp(wp_), g(g_), loc(loc_), k_rt(k_rt_), n_knots(n_knots_), n0(n0_),
        nn(nn_), L(g_.in_size()), Og(g_.Og), S(g_.S), taps(g_.taps()), blocks(vector_blocks(Og, LW, KC > 0 ? 4 : 2)),
        Ov(blocks.empty() ? 0 : blocks.back().first + blocks.back().second * LW), offsets(g_),
        group(weight_group(g_.out_size(), g_.O, sizeof(T))), unpack(unpack_) {
    for (int64_t q = 0; q < L; ++q) {
      bool feeds = false;
      for (int64_t t = 0; t < taps; ++t) feeds = feeds || offsets.tap(t, L)[q] >= 0;
      if (!feeds) orphans.push_back(q);
    }
  }

  // gx of sample nl, channel c, given its positions sorted by span; acc: scratch of L vectors.
  void input(int64_t nl, int64_t c, const SpanOrder& sorted, TapList& list, T* acc_p, T* gx) const {
    const int K = KC > 0 ? KC : k_rt;
    const int V = K + 2;
    const int64_t base = (nl * g.C + c) * L;
    const int32_t* rows = loc.row.data() + base;
    const T* dvals = loc.dvals.data() + base * V;
    const T* gos = go + (n0 + nl) * g.out_size() * g.O + c / g.Cg * Og;
    const T* wc = wp + c * taps * S * Og;
    std::fill(acc_p, acc_p + L * LW, T(0));
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t* out_off = offsets.tap(t, L);
      const T* ws = wc + t * S * Og;
      const Buckets b = list.build(sorted, out_off);
      for (const auto& blk : blocks) {
        const int64_t ob = blk.first;
        switch (blk.second) {
          case 4: grad_input_tap<T, KC, 4>(K, Og, b, out_off, dvals, gos + ob, ws + ob, acc_p); break;
          case 3: grad_input_tap<T, KC, 3>(K, Og, b, out_off, dvals, gos + ob, ws + ob, acc_p); break;
          case 2: grad_input_tap<T, KC, 2>(K, Og, b, out_off, dvals, gos + ob, ws + ob, acc_p); break;
          default: grad_input_tap<T, KC, 1>(K, Og, b, out_off, dvals, gos + ob, ws + ob, acc_p);
        }
      }
    }
    T* gxc = gx + (n0 * g.C * L) + base;
    for (int64_t q = 0; q < L; ++q) {
      T total = lane_sum<T>(Vc::load(acc_p + q * LW));
      if (Ov < Og) {  // the last Og % lanes output channels
        const T* dv = dvals + q * V;
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t p = offsets.tap(t, L)[q];
          if (p < 0) continue;
          const T* ws = wc + t * S * Og;
          const T* r0 = ws + rows[q] * Og;
          for (int64_t o = Ov; o < Og; ++o) {
            T h = dv[0] * ws[o];
            for (int r = 0; r < K + 1; ++r) h += dv[1 + r] * r0[r * Og + o];
            total += gos[p + o] * h;
          }
        }
      }
      gxc[q] = total;
    }
    // A value that feeds no output has a zero gradient, NaN where its derivatives are not finite
    // (as on the dense path: zero output gradients times the expansion's derivatives).
    for (const int64_t q : orphans) {
      T sum = T(0);
      for (int r = 0; r < V; ++r) sum += dvals[q * V + r];
      gxc[q] = T(0) * sum + T(0);
    }
  }

  // Before the weight gradient's first updates of channel c in a call (its first chunk): its rows of gw
  // zeroed, by the thread that updates them (no weight-sized pass on one thread before the chunks).
  void begin_channel(int64_t c, T* gw) const {
    if (n0 == 0) std::fill(gw + c * taps * S * Og, gw + (c + 1) * taps * S * Og, T(0));
  }
  // After its last updates (the last chunk): channel c's rows are final, and split (unpack) while in
  // cache. scratch: unpack->scratch_size() elements.
  void end_channel(int64_t c, T* scratch) const {
    if (unpack != nullptr && n0 + nn == g.N) unpack->channel(c, scratch);
  }
  int64_t end_scratch() const { return unpack != nullptr ? unpack->scratch_size() : 0; }

  // gw's rows of channel c += the terms of samples [s0, s1) of the chunk (at most kWeightGroup).
  void weight(int64_t s0, int64_t s1, int64_t c, SpanOrder& sorted, TapList& list, T* gw) const {
    const int K = KC > 0 ? KC : k_rt;
    const int V = K + 2, R = K + 1;
    const int64_t ocol = c / g.Cg * Og;
    const int64_t ns = s1 - s0;
    const T* vals[kWeightGroup];
    const T* gos[kWeightGroup];
    for (int64_t j = 0; j < ns; ++j) {
      vals[j] = loc.vals.data() + ((s0 + j) * g.C + c) * L * V;
      gos[j] = go + (n0 + s0 + j) * g.out_size() * g.O + ocol;
    }
    sorted.sort_group(loc.row.data() + (s0 * g.C + c) * L, g.C * L, ns, L);
    for (int64_t t = 0; t < taps; ++t) {
      T* ws = gw + (c * taps + t) * S * Og;
      const int64_t* out_off = offsets.tap(t, L);
      const Buckets b = list.build(sorted, out_off);
      for (const auto& blk : blocks) {
        const T* gb[kWeightGroup];  // the group's output gradients at the block's first channel
        for (int64_t j = 0; j < ns; ++j) gb[j] = gos[j] + blk.first;
        switch (blk.second) {
          case 4: grad_weight_group_tap<T, KC, 4>(K, Og, b, out_off, vals, gb, ws + blk.first); break;
          case 3: grad_weight_group_tap<T, KC, 3>(K, Og, b, out_off, vals, gb, ws + blk.first); break;
          case 2: grad_weight_group_tap<T, KC, 2>(K, Og, b, out_off, vals, gb, ws + blk.first); break;
          default: grad_weight_group_tap<T, KC, 1>(K, Og, b, out_off, vals, gb, ws + blk.first);
        }
      }
      if (Ov == Og) continue;
      for (int64_t j = 0; j < ns; ++j) {  // the last Og % lanes output channels
        const int32_t* rows = loc.row.data() + ((s0 + j) * g.C + c) * L;
        for (int64_t q = 0; q < L; ++q) {
          const int64_t p = out_off[q];
          if (p < 0) continue;
          const T* gp = gos[j] + p;
          const T* v = vals[j] + q * V;
          T* r0 = ws + rows[q] * Og;
          for (int64_t o = Ov; o < Og; ++o) {
            ws[o] += v[0] * gp[o];
            for (int r = 0; r < R; ++r) r0[r * Og + o] += v[1 + r] * gp[o];
          }
        }
      }
    }
  }
};

// grad_x[n][c][d][h][w] = sum over taps that read it and o of grad_out * d(local value)/dx * weight.
// One task per channel of one sample, channel-major: (c, n). The tasks of one thread that read the
// same channel's packed rows follow each other, so the rows stay in cache between them.
template <typename T, int KC>
void grad_input_chunk(const BackwardChunk<T, KC>& bc, T* gx) {
  at::parallel_for(0, bc.nn * bc.g.C, 1, [&](int64_t begin, int64_t end) {
    SpanOrder sorted(bc.n_knots - 1, bc.L);
    TapList list(bc.n_knots - 1, bc.L);
    AlignedBuf<T> acc(bc.L * bc.LW);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nl = task % bc.nn, c = task / bc.nn;
      sorted.sort(bc.loc.row.data() + (nl * bc.g.C + c) * bc.L, bc.L);
      bc.input(nl, c, sorted, list, acc.data(), gx);
    }
  });
}

// gw[c][tap][slot][o] += local value * grad_out. One task per input channel, so no two threads write
// the same rows and no per-thread copies are needed. The values of a channel are bucketed by knot
// span: all values of one span add to the same K + 1 rows, so the sums over a bucket are kept in
// registers (blocks of up to four vectors of output channels) and each row is written once per bucket.
template <typename T, int KC>
void grad_weight_chunk(const BackwardChunk<T, KC>& bc, T* gw) {
  at::parallel_for(0, bc.g.C, 1, [&](int64_t begin, int64_t end) {
    SpanOrder sorted(bc.n_knots - 1, bc.L);
    TapList list(bc.n_knots - 1, bc.L * kWeightGroup);
    AlignedBuf<T> scratch(bc.end_scratch());
    for (int64_t c = begin; c < end; ++c) {
      bc.begin_channel(c, gw);
      for (int64_t s0 = 0; s0 < bc.nn; s0 += bc.group)
        bc.weight(s0, std::min(bc.nn, s0 + bc.group), c, sorted, list, gw);
      bc.end_channel(c, scratch.data());
    }
  });
}

// Both, one task per input channel: for each group of samples, the input gradient of each (sample,
// channel), then the group's weight gradient, their values and output gradients read while in cache.
template <typename T, int KC>
void grad_both_chunk(const BackwardChunk<T, KC>& bc, T* gx, T* gw) {
  at::parallel_for(0, bc.g.C, 1, [&](int64_t begin, int64_t end) {
    SpanOrder sorted(bc.n_knots - 1, bc.L);
    TapList list(bc.n_knots - 1, bc.L * kWeightGroup);
    AlignedBuf<T> acc(bc.L * bc.LW), scratch(bc.end_scratch());
    for (int64_t c = begin; c < end; ++c) {
      bc.begin_channel(c, gw);
      for (int64_t s0 = 0; s0 < bc.nn; s0 += bc.group) {
        const int64_t s1 = std::min(bc.nn, s0 + bc.group);
        for (int64_t nl = s0; nl < s1; ++nl) {
          sorted.sort(bc.loc.row.data() + (nl * bc.g.C + c) * bc.L, bc.L);
          bc.input(nl, c, sorted, list, acc.data(), gx);
        }
        bc.weight(s0, s1, c, sorted, list, gw);
      }
      bc.end_channel(c, scratch.data());
    }
  });
}

// Both gradients (gx or gw may be null: not needed) from one local form per batch chunk, built
// with derivatives when gx is needed: the input gradient reads its derivatives, the weight
// gradient its values. gw is zeroed here (channel by channel, in the first chunk) and accumulates
// over the chunks; unpack (or null): gw split into the three weights' gradients as it is final.
template <typename T, int KC>
void backward_impl(const T* go, const T* x, const T* t0, const T* inv_h, const Tables<T>& tab, const T* wp,
                   const Geometry& g, int k_rt, int64_t n_knots, T* gx, T* gw, const Unpack3<T>* unpack = nullptr) {
  const int K = KC > 0 ? KC : k_rt;
  const int64_t L = g.in_size();
  const bool derivative = gx != nullptr;
  if (gw == nullptr) unpack = nullptr;
  if (g.N == 0) {  // no chunk: the weight gradient is zero
    if (gw != nullptr) std::fill(gw, gw + g.C * g.taps() * g.S * g.Og, T(0));
    if (unpack != nullptr) unpack3_impl(*unpack);
    return;
  }
  const int64_t chunk = chunk_samples(g, K, sizeof(T), derivative, true);
  Local<T> loc(K, chunk * g.C * L, derivative);
  for (int64_t n0 = 0; n0 < g.N; n0 += chunk) {
    const int64_t nn = std::min(chunk, g.N - n0);
    loc.template build<KC>(x + n0 * g.C * L, t0, inv_h, tab.coef, tab.dcoef, nn * g.C, g.C, L, n_knots);
    const BackwardChunk<T, KC> bc(go, wp, g, k_rt, n_knots, loc, n0, nn, unpack);
    if (gx != nullptr && gw != nullptr && g.C >= 2 * at::get_num_threads())
      grad_both_chunk(bc, gx, gw);
    else {
      if (gx != nullptr) grad_input_chunk(bc, gx);
      if (gw != nullptr) grad_weight_chunk(bc, gw);
    }
  }
}

// ---- Narrow layers: vectorised over (kernel tap, output channel) per input value ------------------
//
// With few output channels per group, vectors over output channels are mostly empty. These kernels
// instead evaluate, for one input value, all of its phi (every kernel tap and output channel) as
// lanes of vectors, from per-span tables in power form built by kanvolution._sparse:
//   P[c][m][i][lane]  (m = 0 .. n_spans, i = 0 .. K): coefficient of f^i of the spline part of phi
//                     in span m; span n_spans is all zero (values outside the knots, and NaN);
//   Dt[c][m][i][lane] (i = 0 .. K - 1): the derivative in x, (i + 1) P[c][m][i + 1][lane] inv_h[c];
//   Wb[c][lane]: the base weights.
// Lanes: kernel row (a, b) (kd * kh of them) owns Lb lanes (kw * Og rounded up to whole 64-byte
// vectors; padding lanes zero): lane e' * Og + o is tap (a, b, kw - 1 - e') and output channel o, so
// that with groups == 1, horizontal stride 1 and dilation 1 the lanes of one kernel row are the
// channel-last outputs (oh, w - kw + 1 .. w) in memory order: one contiguous block. Outputs (and
// output gradients) are then kept in a per-thread scratch with kw - 1 extra columns on each side.
// Other geometries scatter (gather) tap by tap. silu(x) and its derivative come precomputed.

// One input value's span (table index) and position; outside the knots (and NaN) the zero span.
template <typename T>
struct SpanPos {
  int64_t m;
  T f;
  bool inside;
  SpanPos(T xv, T a, T s, int64_t n_spans) {
    const T u = (xv - a) * s;
    inside = u >= T(0) && u < static_cast<T>(n_spans);  // false for NaN
    const T uu = inside ? u : T(0);
    const int64_t k = static_cast<int64_t>(uu);
    f = uu - static_cast<T>(k);
    m = inside ? k : n_spans;
  }
};

// Element strides of an (N, Do, Ho, Wo, O) output or output gradient (any layout: channel-last or
// the layers' (N, O, *spatial)).
struct OutStrides {
  int64_t n, d, h, w, o;
  explicit OutStrides(const at::Tensor& t) : n(t.stride(0)), d(t.stride(1)), h(t.stride(2)), w(t.stride(3)), o(t.stride(4)) {}
  int64_t at(int64_t od, int64_t oh, int64_t ow) const { return od * d + oh * h + ow * w; }
};

template <typename T>
struct NarrowGeom {
  int64_t n_spans, blocks, Lb, Lp, nv, RS;
  bool fast;
  NarrowGeom(const Geometry& g, int64_t n_knots, int64_t lp) {
    n_spans = n_knots - 1;
    blocks = g.kd * g.kh;
    Lp = lp;
    Lb = lp / blocks;
    nv = Lp / Vec64<T>::lanes;
    fast = g.groups == 1 && g.sw == 1 && g.dw == 1;
    RS = (g.W - 1) * g.O + Lb;  // scratch row: columns -(kw-1) .. W-1 of one output row, and the last block's tail
  }
  // The kernel rows (a, b) that read input row (d, h): lane offset and scratch row offset of each.
  int64_t rows(const TapMap& map, const Geometry& g, int64_t d, int64_t h, int64_t* off, int64_t* dst) const {
    int64_t nb = 0;
    for (int64_t a = 0; a < g.kd; ++a) {
      const int64_t od = map.od_of[a * g.D + d];
      if (od < 0) continue;
      for (int64_t b = 0; b < g.kh; ++b) {
        const int64_t oh = map.oh_of[b * g.H + h];
        if (oh < 0) continue;
        off[nb] = (a * g.kh + b) * Lb;
        dst[nb++] = (od * g.Ho + oh) * RS;
      }
    }
    return nb;
  }
};

template <typename T, int KC>
void narrow_forward_impl(const T* x, const T* sx, const T* t0, const T* inv_h, const T* P, const T* Wb,
                         const Geometry& g, int k_rt, int64_t n_knots, int64_t lp, T* out, const OutStrides& st) {
  using Vc = Vec64<T>;
  using vec = typename Vc::type;
  constexpr int LW = Vc::lanes;
  const int K = KC > 0 ? KC : k_rt;
  const NarrowGeom<T> ng(g, n_knots, lp);
  const int64_t L = g.in_size(), PO = g.out_size(), Lp = ng.Lp, Lb = ng.Lb, span_stride = (K + 1) * Lp;
  const int64_t row_lanes = g.kw * g.Og;
  const TapMap map(g);
  at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
    AlignedBuf<T> ybuf(Lp);
    AlignedBuf<T> scratch(ng.fast ? g.Do * g.Ho * ng.RS : 0);
    std::vector<int64_t> boff(ng.blocks), bdst(ng.blocks);
    for (int64_t n = n0; n < n1; ++n) {
      T* os = out + n * st.n;
      if (ng.fast) {
        std::fill(scratch.data(), scratch.data() + scratch.n, T(0));
      } else {
        for (int64_t od = 0; od < g.Do; ++od)
          for (int64_t oh = 0; oh < g.Ho; ++oh)
            for (int64_t ow = 0; ow < g.Wo; ++ow)
              for (int64_t o = 0; o < g.O; ++o) os[st.at(od, oh, ow) + o * st.o] = T(0);
      }
      for (int64_t c = 0; c < g.C; ++c) {
        const T a0 = t0[c], s = inv_h[c];
        const T* Pc = P + c * (ng.n_spans + 1) * span_stride;
        const T* Wc = Wb + c * Lp;
        const int64_t ocol = c / g.Cg * g.Og;
        const int64_t base = (n * g.C + c) * L;
        for (int64_t d = 0; d < g.D; ++d) {
          for (int64_t h = 0; h < g.H; ++h) {
            const int64_t nb = ng.rows(map, g, d, h, boff.data(), bdst.data());
            for (int64_t w = 0; w < g.W; ++w) {
              const int64_t i = base + (d * g.H + h) * g.W + w;
              const SpanPos<T> sp(x[i], a0, s, ng.n_spans);
              const T sv = std::isinf(x[i]) ? std::numeric_limits<T>::quiet_NaN() : sx[i];  // as the wide kernels
              const T* Pm = Pc + sp.m * span_stride;
              const bool finite = std::isfinite(sv);
              if (ng.fast && finite) {  // evaluate each kernel row's lanes straight into its output block
                for (int64_t k = 0; k < nb; ++k) {
                  {
                    const int64_t off = boff[k];
                    const T* Pb = Pm + off;
                    const T* Wcb = Wc + off;
                    T* so = scratch.data() + bdst[k] + w * g.O;
                    for (int64_t v = 0; v < Lb; v += LW) {  // whole vectors: the padding lanes add exact zeros
                      vec y = Vc::load(Pb + K * Lp + v);
                      for (int r = K - 1; r >= 0; --r) y = y * sp.f + Vc::load(Pb + r * Lp + v);
                      const vec u = Vc::load(so + v) + (y + sv * Vc::load(Wcb + v));
                      std::memcpy(so + v, &u, sizeof u);
                    }
                  }
                }
                continue;
              }
              for (int64_t v = 0; v < ng.nv; ++v) {
                vec y = Vc::load(Pm + K * Lp + v * LW);
                for (int r = K - 1; r >= 0; --r) y = y * sp.f + Vc::load(Pm + r * Lp + v * LW);
                y += sv * Vc::load(Wc + v * LW);
                std::memcpy(ybuf.data() + v * LW, &y, sizeof y);
              }
              for (int64_t a = 0; a < g.kd; ++a) {
                const int64_t od = map.od_of[a * g.D + d];
                if (od < 0) continue;
                for (int64_t b = 0; b < g.kh; ++b) {
                  const int64_t oh = map.oh_of[b * g.H + h];
                  if (oh < 0) continue;
                  const T* yb = ybuf.data() + (a * g.kh + b) * Lb;
                  if (ng.fast) {
                    T* sp_out = scratch.data() + (od * g.Ho + oh) * ng.RS + w * g.O;
                    if (finite) {  // whole vectors: the padding lanes add exact zeros
                      for (int64_t v = 0; v < Lb; v += LW) {
                        const vec u = Vc::load(sp_out + v) + Vc::load(yb + v);
                        std::memcpy(sp_out + v, &u, sizeof u);
                      }
                    } else {  // inf * 0 in the padding lanes: only the real ones
                      for (int64_t j = 0; j < row_lanes; ++j) sp_out[j] += yb[j];
                    }
                    continue;
                  }
                  for (int64_t e1 = 0; e1 < g.kw; ++e1) {
                    const int64_t ow = map.ow_of[(g.kw - 1 - e1) * g.W + w];
                    if (ow < 0) continue;
                    T* op = os + st.at(od, oh, ow) + ocol * st.o;
                    const T* ye = yb + e1 * g.Og;
                    for (int64_t o = 0; o < g.Og; ++o) op[o * st.o] += ye[o];
                  }
                }
              }
            }
          }
        }
      }
      if (ng.fast) {
        for (int64_t r = 0; r < g.Do * g.Ho; ++r)
          if (st.o == 1 && st.w == g.O) {
            std::memcpy(os + st.at(r / g.Ho, r % g.Ho, 0), scratch.data() + r * ng.RS + (g.kw - 1) * g.O,
                        g.Wo * g.O * sizeof(T));
          } else {  // channel-first: one output channel at a time
            const T* src = scratch.data() + r * ng.RS + (g.kw - 1) * g.O;
            T* dst = os + st.at(r / g.Ho, r % g.Ho, 0);
            for (int64_t o = 0; o < g.O; ++o)
              for (int64_t ow = 0; ow < g.Wo; ++ow) dst[o * st.o + ow * st.w] = src[ow * g.O + o];
          }
      }
    }
  });
}

// Both gradients in one pass over the input values (either may be skipped: gx or gw null).
// gw: (C, S, Lp), slot s as in the packed weight (0: base, 1 + m + r: basis b_r of span m).
// Samples are processed in a fixed number of blocks, whatever the number of threads, each with its
// own weight-gradient accumulator, summed in block order at the end: results independent of it.
template <typename T, int KC>
void narrow_backward_impl(const T* go, const T* x, const T* sx, const T* dsx, const T* t0, const T* inv_h,
                          const Tables<T>& tab, const T* Dt, const T* Wb, const Geometry& g, int k_rt,
                          int64_t n_knots, int64_t lp, T* gx, T* gw, const OutStrides& st) {
  using Vc = Vec64<T>;
  using vec = typename Vc::type;
  using IT = typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type;
  using ivec = typename Vec64<IT>::type;
  constexpr int LW = Vc::lanes;
  const int K = KC > 0 ? KC : k_rt;
  const NarrowGeom<T> ng(g, n_knots, lp);
  const int64_t L = g.in_size(), PO = g.out_size(), Lp = ng.Lp, Lb = ng.Lb, dspan = K * Lp;
  const int64_t row_lanes = g.kw * g.Og, S = n_knots + K;
  const int64_t acc_size = gw ? g.C * S * Lp : 0;
  const TapMap map(g);
  // Lane masks of one kernel row's vectors (the padding lanes read neighbouring outputs).
  std::vector<ivec> masks(Lb / LW);
  for (int64_t v = 0; v < Lb / LW; ++v)
    for (int l = 0; l < LW; ++l) masks[v][l] = v * LW + l < row_lanes ? IT(-1) : IT(0);
  const int64_t max_blocks = 16;
  int64_t n_blocks = std::min<int64_t>(g.N, max_blocks);
  if (gw) n_blocks = std::max<int64_t>(1, std::min<int64_t>(n_blocks, (int64_t(64) << 20) / (acc_size * int64_t(sizeof(T)))));
  const int64_t per_block = (g.N + n_blocks - 1) / n_blocks;
  n_blocks = (g.N + per_block - 1) / per_block;
  std::vector<AlignedBuf<T>> accs(gw ? n_blocks : 0);
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    AlignedBuf<T> gbuf(Lp);
    AlignedBuf<T> gpad(ng.fast ? g.Do * g.Ho * ng.RS : 0);  // margins stay zero
    std::vector<int64_t> boff(ng.blocks), bdst(ng.blocks);
    for (int64_t blk = b0; blk < b1; ++blk) {
      T* acc = nullptr;
      if (gw) {
        accs[blk].reset(acc_size);
        acc = accs[blk].data();
      }
      for (int64_t n = blk * per_block; n < std::min(g.N, (blk + 1) * per_block); ++n) {
        const T* gs = go + n * st.n;
        if (ng.fast) {
          for (int64_t r = 0; r < g.Do * g.Ho; ++r)
          {
            T* dst = gpad.data() + r * ng.RS + (g.kw - 1) * g.O;
            const T* src = gs + st.at(r / g.Ho, r % g.Ho, 0);
            if (st.o == 1 && st.w == g.O) {
              std::memcpy(dst, src, g.Wo * g.O * sizeof(T));
            } else {
              for (int64_t o = 0; o < g.O; ++o)
                for (int64_t ow = 0; ow < g.Wo; ++ow) dst[ow * g.O + o] = src[o * st.o + ow * st.w];
            }
          }
        }
        for (int64_t c = 0; c < g.C; ++c) {
          const T a0 = t0[c], s = inv_h[c];
          const T* Dc = Dt + c * (ng.n_spans + 1) * dspan;
          const T* Wc = Wb + c * Lp;
          T* Ac = acc ? acc + c * S * Lp : nullptr;
          const int64_t ocol = c / g.Cg * g.Og;
          const int64_t base = (n * g.C + c) * L;
          for (int64_t d = 0; d < g.D; ++d) {
            for (int64_t h = 0; h < g.H; ++h) {
              const int64_t nb = ng.rows(map, g, d, h, boff.data(), bdst.data());
              for (int64_t w = 0; w < g.W; ++w) {
                const int64_t i = base + (d * g.H + h) * g.W + w;
                const SpanPos<T> sp(x[i], a0, s, ng.n_spans);
                const bool inf = std::isinf(x[i]);  // NaN terms, as the wide kernels
                const T sv = inf ? std::numeric_limits<T>::quiet_NaN() : sx[i];
                const T dv = gx ? (inf ? std::numeric_limits<T>::quiet_NaN() : dsx[i]) : T(0);
                if (ng.fast && std::isfinite(sv) && std::isfinite(dv)) {
                  // Each kernel row's output gradients straight from the padded copy, vector by vector.
                  T bv[kMaxOrder + 1];
                  const int R = Ac && sp.inside ? K + 1 : 0;
                  for (int r = 0; r < R; ++r) bv[r] = horner(tab.coef + r * (K + 1), K + 1, sp.f);
                  const T* Dm = gx ? Dc + sp.m * dspan : nullptr;
                  T* Ar = Ac ? Ac + (1 + sp.m) * Lp : nullptr;
                  vec t = {};
                  for (int64_t k = 0; k < nb; ++k) {
                    {
                      const int64_t off = boff[k];
                      const T* src = gpad.data() + bdst[k] + w * g.O;
                      for (int64_t v = 0; v < Lb / LW; ++v) {
                        const int64_t j = off + v * LW;
                        const vec gv = (vec)((ivec)Vc::load(src + v * LW) & masks[v]);
                        if (Dm) {
                          vec y = dv * Vc::load(Wc + j);
                          if (K > 1) {
                            vec p = Vc::load(Dm + (K - 1) * Lp + j);
                            for (int r = K - 2; r >= 0; --r) p = p * sp.f + Vc::load(Dm + r * Lp + j);
                            y += p;
                          } else {
                            y += Vc::load(Dm + j);
                          }
                          t += gv * y;
                        }
                        if (Ac) {
                          const vec u = Vc::load(Ac + j) + sv * gv;
                          std::memcpy(Ac + j, &u, sizeof u);
                          for (int r = 0; r < R; ++r) {
                            const vec ur = Vc::load(Ar + r * Lp + j) + bv[r] * gv;
                            std::memcpy(Ar + r * Lp + j, &ur, sizeof ur);
                          }
                        }
                      }
                    }
                  }
                  if (gx) gx[i] = lane_sum<T>(t);
                  continue;
                }
                // Gather the output gradients this value feeds, in lane order.
                bool any = false;
                for (int64_t a = 0; a < g.kd; ++a) {
                  const int64_t od = map.od_of[a * g.D + d];
                  for (int64_t b = 0; b < g.kh; ++b) {
                    const int64_t oh = map.oh_of[b * g.H + h];
                    T* gb = gbuf.data() + (a * g.kh + b) * Lb;
                    if ((od | oh) < 0) {
                      std::fill(gb, gb + Lb, T(0));
                      continue;
                    }
                    any = true;
                    if (ng.fast) {
                      const T* src = gpad.data() + (od * g.Ho + oh) * ng.RS + w * g.O;
                      for (int64_t v = 0; v < Lb / LW; ++v) {
                        const vec u = (vec)((ivec)Vc::load(src + v * LW) & masks[v]);
                        std::memcpy(gb + v * LW, &u, sizeof u);
                      }
                      continue;
                    }
                    std::fill(gb, gb + Lb, T(0));
                    for (int64_t e1 = 0; e1 < g.kw; ++e1) {
                      const int64_t ow = map.ow_of[(g.kw - 1 - e1) * g.W + w];
                      if (ow < 0) continue;
                      const T* src = gs + st.at(od, oh, ow) + ocol * st.o;
                      for (int64_t o = 0; o < g.Og; ++o) gb[e1 * g.Og + o] = src[o * st.o];
                    }
                  }
                }
                if (gx) {
                  T total = T(0);
                  {  // even when it feeds no output: 0 * silu'(NaN) is NaN, as on the dense path
                    const T* Dm = Dc + sp.m * dspan;
                    vec t = {};
                    for (int64_t v = 0; v < ng.nv; ++v) {
                      vec y = dv * Vc::load(Wc + v * LW);
                      if (K > 1) {
                        vec p = Vc::load(Dm + (K - 1) * Lp + v * LW);
                        for (int r = K - 2; r >= 0; --r) p = p * sp.f + Vc::load(Dm + r * Lp + v * LW);
                        y += p;
                      } else {
                        y += Vc::load(Dm + v * LW);
                      }
                      t += Vc::load(gbuf.data() + v * LW) * y;
                    }
                    total = lane_sum<T>(t);
                  }
                  gx[i] = total;
                }
                if (Ac && any) {
                  T bv[kMaxOrder + 1];
                  const int R = sp.inside ? K + 1 : 0;
                  for (int r = 0; r < R; ++r) bv[r] = horner(tab.coef + r * (K + 1), K + 1, sp.f);
                  T* A0 = Ac;
                  T* Ar = Ac + (1 + sp.m) * Lp;
                  const bool finite = std::isfinite(sv);
                  for (int64_t v = 0; v < ng.nv; ++v) {
                    const vec gv = Vc::load(gbuf.data() + v * LW);
                    if (finite) {
                      const vec u = Vc::load(A0 + v * LW) + sv * gv;
                      std::memcpy(A0 + v * LW, &u, sizeof u);
                    }
                    for (int r = 0; r < R; ++r) {
                      const vec ur = Vc::load(Ar + r * Lp + v * LW) + bv[r] * gv;
                      std::memcpy(Ar + r * Lp + v * LW, &ur, sizeof ur);
                    }
                  }
                  if (!finite) {  // inf or NaN times the zeros of the taps that do not read this value: skip those
                    for (int64_t a = 0; a < g.kd; ++a) {
                      if (map.od_of[a * g.D + d] < 0) continue;
                      for (int64_t b = 0; b < g.kh; ++b) {
                        if (map.oh_of[b * g.H + h] < 0) continue;
                        const int64_t off = (a * g.kh + b) * Lb;
                        for (int64_t e1 = 0; e1 < g.kw; ++e1) {
                          if (map.ow_of[(g.kw - 1 - e1) * g.W + w] < 0) continue;
                          for (int64_t o = 0; o < g.Og; ++o) A0[off + e1 * g.Og + o] += sv * gbuf[off + e1 * g.Og + o];
                        }
                      }
                    }
                  }
                }
              }
            }
          }
        }
      }
    }
  });
  if (gw) {
    std::fill(gw, gw + acc_size, T(0));
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const T* a = accs[blk].data();
      for (int64_t j = 0; j < acc_size; ++j) gw[j] += a[j];
    }
  }
}

void check_cpu(const at::Tensor& t, const at::Tensor& like, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type() && t.dim() == dim,
              name, " must be a contiguous CPU tensor of ", dim, " dimensions and dtype ", like.scalar_type(),
              ", got ", t.sizes(), " ", t.scalar_type(), t.is_contiguous() ? "" : " (not contiguous)");
}

// x (N, C, D, H, W), t0 and inv_h (C,), coef ((K+1)^2 doubles), dcoef ((K+1)K doubles),
// wp (C, taps, S, Og); kernel, stride, dilation: 3 ints each.
Geometry geometry(const at::Tensor& x, const at::Tensor& t0, const at::Tensor& inv_h, const at::Tensor& coef,
                  const at::Tensor& dcoef, const at::Tensor& wp, int64_t K, int64_t n_knots,
                  at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64");
  check_cpu(x, x, "x", 5);
  check_cpu(t0, x, "t0", 1);
  check_cpu(inv_h, x, "inv_h", 1);
  check_cpu(wp, x, "packed weight", 4);
  TORCH_CHECK(K >= 1 && K <= kMaxOrder, "spline order must be in 1..", kMaxOrder, ", got ", K);
  TORCH_CHECK(n_knots >= 2 * K + 2, "too few knots (", n_knots, ") for spline order ", K);
  TORCH_CHECK(coef.scalar_type() == at::kDouble && coef.is_contiguous() && coef.numel() == (K + 1) * (K + 1) &&
                  dcoef.scalar_type() == at::kDouble && dcoef.is_contiguous() && dcoef.numel() == (K + 1) * K,
              "bad piece coefficient tables");
  TORCH_CHECK(kernel.size() == 3 && stride.size() == 3 && dilation.size() == 3, "kernel, stride, dilation: 3 ints");
  Geometry g;
  g.N = x.size(0), g.C = x.size(1), g.D = x.size(2), g.H = x.size(3), g.W = x.size(4);
  g.kd = kernel[0], g.kh = kernel[1], g.kw = kernel[2];
  g.sd = stride[0], g.sh = stride[1], g.sw = stride[2];
  g.dd = dilation[0], g.dh = dilation[1], g.dw = dilation[2];
  TORCH_CHECK(g.kd >= 1 && g.kh >= 1 && g.kw >= 1 && g.sd >= 1 && g.sh >= 1 && g.sw >= 1 && g.dd >= 1 && g.dh >= 1 &&
                  g.dw >= 1, "kernel, stride and dilation must be positive");
  TORCH_CHECK(t0.size(0) == g.C && inv_h.size(0) == g.C, "t0 and inv_h need one entry per input channel");
  TORCH_CHECK(groups >= 1 && g.C % groups == 0, "groups must divide the input channels");
  g.groups = groups;
  g.Cg = g.C / groups;
  g.S = n_knots + K;
  TORCH_CHECK(wp.size(0) == g.C && wp.size(1) == g.taps() && wp.size(2) == g.S,
              "packed weight must be (C, taps, n_knots + K, O / groups), got ", wp.sizes());
  g.Og = wp.size(3);
  g.O = g.Og * groups;
  g.Do = (g.D - g.dd * (g.kd - 1) - 1) / g.sd + 1;
  g.Ho = (g.H - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.D >= g.dd * (g.kd - 1) + 1 && g.H >= g.dh * (g.kh - 1) + 1 && g.W >= g.dw * (g.kw - 1) + 1,
              "input smaller than the (dilated) kernel");
  return g;
}

// Calls f.template operator()<KC>() with KC the compile-time order (1..5) or 0 (run-time order).
template <typename F>
void dispatch_order(int64_t K, F&& f) {
  switch (K) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    default: f(std::integral_constant<int, 0>());
  }
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& x, const Geometry& g) {
  check_cpu(grad_out, x, "grad_out", 5);
  TORCH_CHECK(grad_out.size(0) == g.N && grad_out.size(1) == g.Do && grad_out.size(2) == g.Ho &&
              grad_out.size(3) == g.Wo && grad_out.size(4) == g.O,
              "grad_out must be (N, Do, Ho, Wo, O), got ", grad_out.sizes());
}

void forward(const at::Tensor& x, const at::Tensor& t0, const at::Tensor& inv_h, const at::Tensor& coef,
             const at::Tensor& dcoef, const at::Tensor& wp, int64_t K, int64_t n_knots, at::IntArrayRef kernel,
             at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups, at::Tensor out) {
  const Geometry g = geometry(x, t0, inv_h, coef, dcoef, wp, K, n_knots, kernel, stride, dilation, groups);
  check_cpu(out, x, "out", 5);
  TORCH_CHECK(out.size(0) == g.N && out.size(1) == g.Do && out.size(2) == g.Ho && out.size(3) == g.Wo &&
              out.size(4) == g.O, "out must be (N, Do, Ho, Wo, O), got ", out.sizes());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kan_sparse_forward", [&] {
    const Tables<scalar_t> tab(coef, dcoef);
    dispatch_order(K, [&](auto kc) {
      forward_impl<scalar_t, decltype(kc)::value>(x.data_ptr<scalar_t>(), t0.data_ptr<scalar_t>(),
                                                  inv_h.data_ptr<scalar_t>(), tab, wp.data_ptr<scalar_t>(), g,
                                                  int(K), n_knots, out.data_ptr<scalar_t>());
    });
  });
}

// The checks of unpack3's arguments (packed: the packed gradient, or anything of its shape).
void check_unpack3(const at::Tensor& packed, const at::Tensor& spline, const at::Tensor& scaler, int64_t groups,
                   int64_t K, const at::Tensor& gb, const at::Tensor& gs, const at::Tensor& gsc) {
  TORCH_CHECK(packed.scalar_type() == at::kFloat || packed.scalar_type() == at::kDouble,
              "packed must be float32 or float64");
  check_cpu(packed, packed, "packed", 4);
  check_cpu(spline, packed, "spline", 4);
  check_cpu(scaler, packed, "scaler", 3);
  const int64_t C = packed.size(0), taps = packed.size(1), S = packed.size(2), og = packed.size(3);
  const int64_t nb = S - 2 * K - 1;
  TORCH_CHECK(groups >= 1 && C % groups == 0 && nb >= 1 &&
                  spline.sizes() == at::IntArrayRef({og * groups, C / groups, taps, nb}) &&
                  scaler.sizes() == at::IntArrayRef({og * groups, C / groups, taps}),
              "unpack3: packed ", packed.sizes(), " does not match spline ", spline.sizes(), ", scaler ",
              scaler.sizes(), " with groups ", groups, ", K ", K);
  const bool need_b = gb.numel() > 0, need_s = gs.numel() > 0, need_sc = gsc.numel() > 0;
  if (need_b) check_cpu(gb, packed, "gb", 3);
  if (need_s) check_cpu(gs, packed, "gs", 4);
  if (need_sc) check_cpu(gsc, packed, "gsc", 3);
  TORCH_CHECK((!need_b || gb.sizes() == scaler.sizes()) && (!need_s || gs.sizes() == spline.sizes()) &&
                  (!need_sc || gsc.sizes() == scaler.sizes()),
              "unpack3: the gradients must be shaped like their weights (or empty)");
}

template <typename T>
Unpack3<T> unpack3_of(const at::Tensor& packed, const at::Tensor& spline, const at::Tensor& scaler, int64_t groups,
                      int64_t K, const at::Tensor& gb, const at::Tensor& gs, const at::Tensor& gsc) {
  const int64_t S = packed.size(2);
  return Unpack3<T>(packed.data_ptr<T>(), spline.data_ptr<T>(), scaler.data_ptr<T>(),
                    gb.numel() > 0 ? gb.data_ptr<T>() : nullptr, gs.numel() > 0 ? gs.data_ptr<T>() : nullptr,
                    gsc.numel() > 0 ? gsc.data_ptr<T>() : nullptr, packed.size(0), groups, S - 2 * K - 1,
                    packed.size(1), packed.size(3), K);
}

// The three weights' gradients that the backward splits its packed weight gradient into (unpack3).
struct Unpack3Args {
  const at::Tensor& spline;
  const at::Tensor& scaler;
  int64_t groups;
  const at::Tensor& gb;
  const at::Tensor& gs;
  const at::Tensor& gsc;
};

// Both gradients in one call (one local form per chunk for both); gx or gw empty: not computed.
// With `split`, also the three weights' gradients from gw, each channel's right after its last update.
void backward_split(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& t0, const at::Tensor& inv_h,
                    const at::Tensor& coef, const at::Tensor& dcoef, const at::Tensor& wp, int64_t K, int64_t n_knots,
                    at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups,
                    const at::Tensor& gx, const at::Tensor& gw, const Unpack3Args* split) {
  const Geometry g = geometry(x, t0, inv_h, coef, dcoef, wp, K, n_knots, kernel, stride, dilation, groups);
  check_grad_out(grad_out, x, g);
  const bool need_x = gx.numel() > 0, need_w = gw.numel() > 0;
  if (need_x) {
    check_cpu(gx, x, "gx", 5);
    TORCH_CHECK(gx.sizes() == x.sizes(), "gx must be shaped like x");
  }
  if (need_w) {
    check_cpu(gw, x, "gw", 4);
    TORCH_CHECK(gw.sizes() == wp.sizes(), "gw must be shaped like the packed weight");
  }
  if (split != nullptr) {
    TORCH_CHECK(need_w, "backward3: gw (the packed weight gradient's room) must not be empty");
    TORCH_CHECK(split->groups == groups, "backward3: groups differ");
    check_unpack3(gw, split->spline, split->scaler, groups, K, split->gb, split->gs, split->gsc);
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kan_sparse_backward", [&] {
    const Tables<scalar_t> tab(coef, dcoef);
    std::optional<Unpack3<scalar_t>> unpack;
    if (split != nullptr)
      unpack.emplace(unpack3_of<scalar_t>(gw, split->spline, split->scaler, groups, K, split->gb, split->gs, split->gsc));
    dispatch_order(K, [&](auto kc) {
      backward_impl<scalar_t, decltype(kc)::value>(grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                   t0.data_ptr<scalar_t>(), inv_h.data_ptr<scalar_t>(), tab,
                                                   wp.data_ptr<scalar_t>(), g, int(K), n_knots,
                                                   need_x ? gx.data_ptr<scalar_t>() : nullptr,
                                                   need_w ? gw.data_ptr<scalar_t>() : nullptr,
                                                   unpack ? &*unpack : nullptr);
    });
  });
}

void backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& t0, const at::Tensor& inv_h,
              const at::Tensor& coef, const at::Tensor& dcoef, const at::Tensor& wp, int64_t K, int64_t n_knots,
              at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups,
              at::Tensor gx, at::Tensor gw) {
  backward_split(grad_out, x, t0, inv_h, coef, dcoef, wp, K, n_knots, kernel, stride, dilation, groups, gx, gw, nullptr);
}

// backward, and gw (the packed gradient's room) split into the gradients of the three weights as unpack3
// does (gb, gs, gsc empty: not needed), each channel while its rows are in cache. wp: the packed
// weight, or gw where gx is empty (only its shape is read then).
void backward3(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& t0, const at::Tensor& inv_h,
               const at::Tensor& coef, const at::Tensor& dcoef, const at::Tensor& wp, int64_t K, int64_t n_knots,
               at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups,
               const at::Tensor& spline, const at::Tensor& scaler, at::Tensor gx, at::Tensor gw, at::Tensor gb,
               at::Tensor gs, at::Tensor gsc) {
  const Unpack3Args split{spline, scaler, groups, gb, gs, gsc};
  backward_split(grad_out, x, t0, inv_h, coef, dcoef, wp, K, n_knots, kernel, stride, dilation, groups, gx, gw, &split);
}

void grad_input(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& t0, const at::Tensor& inv_h,
                const at::Tensor& coef, const at::Tensor& dcoef, const at::Tensor& wp, int64_t K, int64_t n_knots,
                at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups,
                at::Tensor out) {
  TORCH_CHECK(out.numel() > 0 || x.numel() == 0, "out must be shaped like x");
  backward(grad_out, x, t0, inv_h, coef, dcoef, wp, K, n_knots, kernel, stride, dilation, groups, out, x.new_empty({0}));
}

void grad_weight(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& t0, const at::Tensor& inv_h,
                 const at::Tensor& coef, const at::Tensor& dcoef, int64_t K, int64_t n_knots, at::IntArrayRef kernel,
                 at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups, at::Tensor out) {
  // out is the packed weight's gradient and has the packed weight's shape (all the geometry reads).
  backward(grad_out, x, t0, inv_h, coef, dcoef, out, K, n_knots, kernel, stride, dilation, groups, x.new_empty({0}), out);
}


// x, sx (N, C, D, H, W); P (C, n_spans + 1, K + 1, Lp); Wb (C, Lp); out (N, Do, Ho, Wo, O).
Geometry narrow_geometry(const at::Tensor& x, const at::Tensor& t0, const at::Tensor& inv_h, const at::Tensor& Wb,
                         int64_t K, int64_t n_knots, at::IntArrayRef kernel, at::IntArrayRef stride,
                         at::IntArrayRef dilation, int64_t groups, int64_t O) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64");
  check_cpu(x, x, "x", 5);
  check_cpu(t0, x, "t0", 1);
  check_cpu(inv_h, x, "inv_h", 1);
  check_cpu(Wb, x, "base table", 2);
  TORCH_CHECK(K >= 1 && K <= kMaxOrder, "spline order must be in 1..", kMaxOrder, ", got ", K);
  TORCH_CHECK(n_knots >= 2 * K + 2, "too few knots (", n_knots, ") for spline order ", K);
  TORCH_CHECK(kernel.size() == 3 && stride.size() == 3 && dilation.size() == 3, "kernel, stride, dilation: 3 ints");
  Geometry g;
  g.N = x.size(0), g.C = x.size(1), g.D = x.size(2), g.H = x.size(3), g.W = x.size(4);
  g.kd = kernel[0], g.kh = kernel[1], g.kw = kernel[2];
  g.sd = stride[0], g.sh = stride[1], g.sw = stride[2];
  g.dd = dilation[0], g.dh = dilation[1], g.dw = dilation[2];
  TORCH_CHECK(g.kd >= 1 && g.kh >= 1 && g.kw >= 1 && g.sd >= 1 && g.sh >= 1 && g.sw >= 1 && g.dd >= 1 && g.dh >= 1 &&
                  g.dw >= 1, "kernel, stride and dilation must be positive");
  TORCH_CHECK(t0.size(0) == g.C && inv_h.size(0) == g.C, "t0 and inv_h need one entry per input channel");
  TORCH_CHECK(groups >= 1 && g.C % groups == 0 && O % groups == 0, "groups must divide the channels");
  g.groups = groups;
  g.Cg = g.C / groups;
  g.S = n_knots + K;
  g.O = O;
  g.Og = O / groups;
  const int64_t lanes = 64 / x.element_size(), blocks = g.kd * g.kh;
  const int64_t lb = (g.kw * g.Og + lanes - 1) / lanes * lanes;
  TORCH_CHECK(Wb.size(0) == g.C && Wb.size(1) == blocks * lb, "base table must be (C, ", blocks * lb, "), got ",
              Wb.sizes());
  g.Do = (g.D - g.dd * (g.kd - 1) - 1) / g.sd + 1;
  g.Ho = (g.H - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.D >= g.dd * (g.kd - 1) + 1 && g.H >= g.dh * (g.kh - 1) + 1 && g.W >= g.dw * (g.kw - 1) + 1,
              "input smaller than the (dilated) kernel");
  return g;
}

void check_table(const at::Tensor& t, const at::Tensor& x, const Geometry& g, int64_t n_knots, int64_t rows,
                 int64_t lp, const char* name) {
  check_cpu(t, x, name, 4);
  TORCH_CHECK(t.size(0) == g.C && t.size(1) == n_knots && t.size(2) == rows && t.size(3) == lp, name,
              " must be (C, n_knots, ", rows, ", Lp), got ", t.sizes());
}

// Any strides: the narrow kernels address outputs and their gradients through OutStrides.
void check_out_shaped(const at::Tensor& t, const at::Tensor& x, const Geometry& g, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == x.scalar_type() && t.dim() == 5, name,
              " must be a 5-d CPU tensor of dtype ", x.scalar_type(), ", got ", t.sizes(), " ", t.scalar_type());
  TORCH_CHECK(t.size(0) == g.N && t.size(1) == g.Do && t.size(2) == g.Ho && t.size(3) == g.Wo && t.size(4) == g.O,
              name, " must be (N, Do, Ho, Wo, O), got ", t.sizes());
}

void narrow_forward(const at::Tensor& x, const at::Tensor& sx, const at::Tensor& t0, const at::Tensor& inv_h,
                    const at::Tensor& P, const at::Tensor& Wb, int64_t K, int64_t n_knots, at::IntArrayRef kernel,
                    at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups, at::Tensor out) {
  TORCH_CHECK(out.dim() == 5, "out must be (N, Do, Ho, Wo, O)");
  const Geometry g = narrow_geometry(x, t0, inv_h, Wb, K, n_knots, kernel, stride, dilation, groups, out.size(4));
  check_cpu(sx, x, "silu(x)", 5);
  TORCH_CHECK(sx.sizes() == x.sizes(), "silu(x) must be shaped like x");
  check_table(P, x, g, n_knots, K + 1, Wb.size(1), "power table");
  check_out_shaped(out, x, g, "out");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kan_sparse_narrow_forward", [&] {
    dispatch_order(K, [&](auto kc) {
      narrow_forward_impl<scalar_t, decltype(kc)::value>(
          x.data_ptr<scalar_t>(), sx.data_ptr<scalar_t>(), t0.data_ptr<scalar_t>(), inv_h.data_ptr<scalar_t>(),
          P.data_ptr<scalar_t>(), Wb.data_ptr<scalar_t>(), g, int(K), n_knots, Wb.size(1), out.data_ptr<scalar_t>(),
          OutStrides(out));
    });
  });
}

// grad_x (shaped like x) and grad_w ((C, n_knots + K, Lp)) are written where they have elements.
void narrow_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& sx, const at::Tensor& dsx,
                     const at::Tensor& t0, const at::Tensor& inv_h, const at::Tensor& coef, const at::Tensor& dcoef,
                     const at::Tensor& Dt, const at::Tensor& Wb, int64_t K, int64_t n_knots, at::IntArrayRef kernel,
                     at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups, at::Tensor grad_x,
                     at::Tensor grad_w) {
  TORCH_CHECK(grad_out.dim() == 5, "grad_out must be (N, Do, Ho, Wo, O)");
  const Geometry g = narrow_geometry(x, t0, inv_h, Wb, K, n_knots, kernel, stride, dilation, groups,
                                     grad_out.size(4));
  check_out_shaped(grad_out, x, g, "grad_out");
  TORCH_CHECK(coef.scalar_type() == at::kDouble && coef.is_contiguous() && coef.numel() == (K + 1) * (K + 1) &&
                  dcoef.scalar_type() == at::kDouble && dcoef.is_contiguous() && dcoef.numel() == (K + 1) * K,
              "bad piece coefficient tables");
  const int64_t lp = Wb.size(1);
  const bool need_x = grad_x.numel() > 0, need_w = grad_w.numel() > 0;
  check_cpu(sx, x, "silu(x)", 5);
  TORCH_CHECK(sx.sizes() == x.sizes(), "silu(x) must be shaped like x");
  if (need_x) {
    check_cpu(dsx, x, "silu'(x)", 5);
    check_cpu(grad_x, x, "grad_x", 5);
    TORCH_CHECK(dsx.sizes() == x.sizes() && grad_x.sizes() == x.sizes(), "silu'(x) and grad_x must be shaped like x");
    check_table(Dt, x, g, n_knots, K, lp, "derivative table");
  }
  if (need_w) {
    check_cpu(grad_w, x, "grad_w", 3);
    TORCH_CHECK(grad_w.size(0) == g.C && grad_w.size(1) == n_knots + K && grad_w.size(2) == lp,
                "grad_w must be (C, n_knots + K, Lp), got ", grad_w.sizes());
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kan_sparse_narrow_backward", [&] {
    const Tables<scalar_t> tab(coef, dcoef);
    dispatch_order(K, [&](auto kc) {
      narrow_backward_impl<scalar_t, decltype(kc)::value>(
          grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), sx.data_ptr<scalar_t>(),
          need_x ? dsx.data_ptr<scalar_t>() : nullptr, t0.data_ptr<scalar_t>(), inv_h.data_ptr<scalar_t>(), tab,
          need_x ? Dt.data_ptr<scalar_t>() : nullptr, Wb.data_ptr<scalar_t>(), g, int(K), n_knots, lp,
          need_x ? grad_x.data_ptr<scalar_t>() : nullptr, need_w ? grad_w.data_ptr<scalar_t>() : nullptr,
          OutStrides(grad_out));
    });
  });
}

// The combined weight (O, C/groups * slots, taps) to the packed (C, taps, slots + 2K, O/groups) in one
// pass (see pack_weight in __init__.py): row 0 the base weight, rows 1..K zero, row K + s basis s - 1
// for s = 1..slots - 1, then K zero rows. Blocks of 16 output channels, each reading its rows' contiguous
// (slot, tap) block of channel c.
template <typename T>
void pack_impl(const T* w, T* out, int64_t C, int64_t groups, int64_t slots, int64_t taps, int64_t og, int64_t K) {
  const int64_t cg = C / groups, S = slots + 2 * K, o_stride = cg * slots * taps;
  constexpr int64_t kBlock = 16;
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const T* src = w + ((c / cg) * og * cg + c % cg) * slots * taps;
      T* dst_c = out + c * taps * S * og;
      for (int64_t u = 0; u < taps; ++u) {
        T* d = dst_c + u * S * og;
        std::fill(d + og, d + (1 + K) * og, T(0));
        std::fill(d + (K + slots) * og, d + S * og, T(0));
      }
      for (int64_t o0 = 0; o0 < og; o0 += kBlock) {
        const int64_t o1 = std::min(og, o0 + kBlock);
        for (int64_t s = 0; s < slots; ++s) {
          const int64_t row = s == 0 ? 0 : K + s;
          for (int64_t u = 0; u < taps; ++u) {
            T* d = dst_c + (u * S + row) * og;
            const T* a = src + s * taps + u;
            for (int64_t o = o0; o < o1; ++o) d[o] = a[o * o_stride];
          }
        }
      }
    }
  });
}

void pack(const at::Tensor& weight, int64_t groups, int64_t K, const at::Tensor& out) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble, "weight must be float32 or float64");
  check_cpu(weight, weight, "weight", 3);
  check_cpu(out, weight, "out", 4);
  const int64_t C = out.size(0), taps = out.size(1), S = out.size(2), og = out.size(3);
  const int64_t slots = S - 2 * K;
  TORCH_CHECK(groups >= 1 && C % groups == 0 && slots >= 1 && weight.size(0) == og * groups &&
                  weight.size(1) == C / groups * slots && weight.size(2) == taps,
              "pack: weight ", weight.sizes(), " does not match out ", out.sizes(), " with groups ", groups, ", K ", K);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "kanvolution_sparse_pack", [&] {
    pack_impl<scalar_t>(weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), C, groups, slots, taps, og, K);
  });
}

// The inverse of pack_impl (the zero rows dropped): a packed (C, taps, slots + 2K, O/groups) gradient
// to the combined layout (O, C/groups * slots, taps), in one pass over blocks of 16 output channels.
template <typename T>
void unpack_impl(const T* packed, T* w, int64_t C, int64_t groups, int64_t slots, int64_t taps, int64_t og,
                 int64_t K) {
  const int64_t cg = C / groups, S = slots + 2 * K, o_stride = cg * slots * taps;
  constexpr int64_t kBlock = 16;
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      T* dst = w + ((c / cg) * og * cg + c % cg) * slots * taps;
      const T* src_c = packed + c * taps * S * og;
      for (int64_t o0 = 0; o0 < og; o0 += kBlock) {
        const int64_t o1 = std::min(og, o0 + kBlock);
        for (int64_t s = 0; s < slots; ++s) {
          const int64_t row = s == 0 ? 0 : K + s;
          for (int64_t u = 0; u < taps; ++u) {
            const T* a = src_c + (u * S + row) * og;
            T* d = dst + s * taps + u;
            for (int64_t o = o0; o < o1; ++o) d[o * o_stride] = a[o];
          }
        }
      }
    }
  });
}

void unpack(const at::Tensor& packed, int64_t groups, int64_t K, const at::Tensor& out) {
  TORCH_CHECK(packed.scalar_type() == at::kFloat || packed.scalar_type() == at::kDouble,
              "packed must be float32 or float64");
  check_cpu(packed, packed, "packed", 4);
  check_cpu(out, packed, "out", 3);
  const int64_t C = packed.size(0), taps = packed.size(1), S = packed.size(2), og = packed.size(3);
  const int64_t slots = S - 2 * K;
  TORCH_CHECK(groups >= 1 && C % groups == 0 && slots >= 1 && out.size(0) == og * groups &&
                  out.size(1) == C / groups * slots && out.size(2) == taps,
              "unpack: packed ", packed.sizes(), " does not match out ", out.sizes(), " with groups ", groups, ", K ", K);
  AT_DISPATCH_FLOATING_TYPES(packed.scalar_type(), "kanvolution_sparse_unpack", [&] {
    unpack_impl<scalar_t>(packed.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), C, groups, slots, taps, og, K);
  });
}

// The layer's three weights straight to the packed layout, what pack_impl makes of their combination
// (combine_weights: the base weight, then spline * scaler per basis), without the combined weight:
// base (O, C/groups, taps), spline (O, C/groups, taps, nb), scaler (O, C/groups, taps). The products
// are the ones combine_weights rounds, so the packed weight is the same bit for bit.
//
// The spline weight of one (output, input channel) is a slab of taps * nb contiguous values, column
// k = u * nb + j (tap u, basis j), which goes to packed row u * S + K + 1 + j of that output's lane:
// a transpose. It runs on tiles of LW outputs x LW columns (LW contiguous loads, a register
// transpose, LW contiguous stores; scalar code for the outputs and columns left over): at 128 -> 128,
// 2 threads, 1.6x-2.1x as fast as element by element (unpack3: 1.2x-1.8x), the packed weight bit
// for bit the same.
template <typename T>
void pack3_impl(const T* base, const T* spline, const T* scaler, T* out, int64_t C, int64_t groups, int64_t nb,
                int64_t taps, int64_t og, int64_t K) {
  using Vc = Vec64<T>;
  using vec = typename Vc::type;
  constexpr int LW = Vc::lanes;
  const int64_t cg = C / groups, S = nb + 1 + 2 * K, o_stride = cg * taps, ncol = taps * nb;
  const int64_t ov = og / LW * LW, kv = ncol / LW * LW;  // the tiles: outputs below ov, columns below kv
  const SlabColumns cols(taps, nb, S, K);
  const Transposer<T> transpose;
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    AlignedBuf<T> scv(taps * LW);  // the scalers of a tile's outputs, per tap
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = (c / cg) * og * cg + c % cg;  // (o = 0 of the group, c's index in it)
      T* dst_c = out + c * taps * S * og;
      for (int64_t u = 0; u < taps; ++u) {
        T* d = dst_c + u * S * og;
        std::fill(d + og, d + (1 + K) * og, T(0));
        std::fill(d + (K + 1 + nb) * og, d + S * og, T(0));
        const T* b = base + first * taps + u;
        for (int64_t o = 0; o < og; ++o) d[o] = b[o * o_stride];
      }
      for (int64_t o0 = 0; o0 < ov; o0 += LW) {
        tile_scalers(scaler, first, o0, cg, taps, scv.data());
        for (int64_t k0 = 0; k0 < kv; k0 += LW) {
          vec r[LW];
          for (int l = 0; l < LW; ++l) r[l] = Vc::load(spline + (first + (o0 + l) * cg) * ncol + k0);
          transpose(r);  // r[jj]: column k0 + jj of the LW outputs
          for (int jj = 0; jj < LW; ++jj)
            Vc::store(dst_c + cols.row[k0 + jj] * og + o0, r[jj] * Vc::load(scv.data() + cols.tap[k0 + jj] * LW));
        }
        for (int64_t k = kv; k < ncol; ++k)
          for (int l = 0; l < LW; ++l)
            dst_c[cols.row[k] * og + o0 + l] = spline[(first + (o0 + l) * cg) * ncol + k] * scv[cols.tap[k] * LW + l];
      }
      for (int64_t o = ov; o < og; ++o) {
        for (int64_t k = 0; k < ncol; ++k) {
          const int64_t i = (first + o * cg) * taps + cols.tap[k];
          dst_c[cols.row[k] * og + o] = spline[(first + o * cg) * ncol + k] * scaler[i];
        }
      }
    }
  });
}

void pack3(const at::Tensor& base, const at::Tensor& spline, const at::Tensor& scaler, int64_t groups, int64_t K,
           const at::Tensor& out) {
  TORCH_CHECK(base.scalar_type() == at::kFloat || base.scalar_type() == at::kDouble, "weights must be float32 or float64");
  check_cpu(base, base, "base", 3);
  check_cpu(spline, base, "spline", 4);
  check_cpu(scaler, base, "scaler", 3);
  check_cpu(out, base, "out", 4);
  const int64_t C = out.size(0), taps = out.size(1), S = out.size(2), og = out.size(3);
  const int64_t nb = S - 2 * K - 1;
  TORCH_CHECK(groups >= 1 && C % groups == 0 && nb >= 1 && base.size(0) == og * groups && base.size(1) == C / groups &&
                  base.size(2) == taps && spline.sizes() == at::IntArrayRef({base.size(0), base.size(1), taps, nb}) &&
                  scaler.sizes() == base.sizes(),
              "pack3: base ", base.sizes(), ", spline ", spline.sizes(), ", scaler ", scaler.sizes(),
              " do not match out ", out.sizes(), " with groups ", groups, ", K ", K);
  AT_DISPATCH_FLOATING_TYPES(base.scalar_type(), "kanvolution_sparse_pack3", [&] {
    pack3_impl<scalar_t>(base.data_ptr<scalar_t>(), spline.data_ptr<scalar_t>(), scaler.data_ptr<scalar_t>(),
                         out.data_ptr<scalar_t>(), C, groups, nb, taps, og, K);
  });
}

void unpack3(const at::Tensor& packed, const at::Tensor& spline, const at::Tensor& scaler, int64_t groups, int64_t K,
             const at::Tensor& gb, const at::Tensor& gs, const at::Tensor& gsc) {
  check_unpack3(packed, spline, scaler, groups, K, gb, gs, gsc);
  AT_DISPATCH_FLOATING_TYPES(packed.scalar_type(), "kanvolution_sparse_unpack3", [&] {
    unpack3_impl(unpack3_of<scalar_t>(packed, spline, scaler, groups, K, gb, gs, gsc));
  });
}

}  // namespace

TORCH_LIBRARY(kanvolution_sparse, m) {
  m.def("pack(Tensor weight, int groups, int K, Tensor(a!) out) -> ()", &pack);
  m.def("unpack(Tensor packed, int groups, int K, Tensor(a!) out) -> ()", &unpack);
  m.def("pack3(Tensor base, Tensor spline, Tensor scaler, int groups, int K, Tensor(a!) out) -> ()", &pack3);
  m.def("unpack3(Tensor packed, Tensor spline, Tensor scaler, int groups, int K, Tensor(a!) gb, Tensor(b!) gs, "
        "Tensor(c!) gsc) -> ()",
        &unpack3);
  m.def("forward(Tensor x, Tensor t0, Tensor inv_h, Tensor coef, Tensor dcoef, Tensor wp, int K, int n_knots, "
        "int[] kernel, int[] stride, int[] dilation, int groups, Tensor(a!) out) -> ()",
        &forward);
  m.def("grad_input(Tensor grad_out, Tensor x, Tensor t0, Tensor inv_h, Tensor coef, Tensor dcoef, Tensor wp, "
        "int K, int n_knots, int[] kernel, int[] stride, int[] dilation, int groups, Tensor(a!) out) -> ()",
        &grad_input);
  m.def("grad_weight(Tensor grad_out, Tensor x, Tensor t0, Tensor inv_h, Tensor coef, Tensor dcoef, int K, "
        "int n_knots, int[] kernel, int[] stride, int[] dilation, int groups, Tensor(a!) out) -> ()",
        &grad_weight);
  m.def("backward(Tensor grad_out, Tensor x, Tensor t0, Tensor inv_h, Tensor coef, Tensor dcoef, Tensor wp, int K, "
        "int n_knots, int[] kernel, int[] stride, int[] dilation, int groups, Tensor(a!) gx, Tensor(b!) gw) -> ()",
        &backward);
  m.def("backward3(Tensor grad_out, Tensor x, Tensor t0, Tensor inv_h, Tensor coef, Tensor dcoef, Tensor wp, int K, "
        "int n_knots, int[] kernel, int[] stride, int[] dilation, int groups, Tensor spline, Tensor scaler, "
        "Tensor(a!) gx, Tensor(b!) gw, Tensor(c!) gb, Tensor(d!) gs, Tensor(e!) gsc) -> ()",
        &backward3);
  m.def("narrow_forward(Tensor x, Tensor sx, Tensor t0, Tensor inv_h, Tensor P, Tensor Wb, int K, int n_knots, "
        "int[] kernel, int[] stride, int[] dilation, int groups, Tensor(a!) out) -> ()",
        &narrow_forward);
  m.def("narrow_backward(Tensor grad_out, Tensor x, Tensor sx, Tensor dsx, Tensor t0, Tensor inv_h, Tensor coef, "
        "Tensor dcoef, Tensor Dt, Tensor Wb, int K, int n_knots, int[] kernel, int[] stride, int[] dilation, "
        "int groups, Tensor(a!) grad_x, Tensor(b!) grad_w) -> ()",
        &narrow_backward);
}
