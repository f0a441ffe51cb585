// Scaled, masked softmax attention for XLA:CPU, called through JAX's FFI (native/calls.py):
// out = softmax(scale * (q @ kt) + mask) @ v, one query row's scores at a time kept in cache.
//
// Exported transformers spell attention as MatMul -> Mul -> Add -> Softmax -> MatMul
// (runtime/fusion.py turns that chain into one node). As XLA ops, the scores of every head
// are written out and read back by each step, and the two batched products run on one thread
// (XLA's DotThunk loops over the heads; figures in benchmarks/LOG.md). Here each thread takes
// a few query rows of one head, computes their scores in registers, the softmax in its L1
// cache and the product with V, and writes only the result.
//
// Layouts: q [B, H, S, D], kt [B, H, D, T] (keys transposed, as the exported graphs hold
// them), v [B, H, T, E], mask [MB, MH, MS, T] with MB in {1, B}, MH in {1, H}, MS in {1, S}
// (broadcast along the others), out [B, H, S, E]. E a multiple of 16 (AVX-512 only).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <immintrin.h>
#include <memory>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)

constexpr int kLanes = 16;
// Query rows per register tile: 6 rows by 4 vectors of scores (or of the output), 4 vectors
// of keys (or values) and a broadcast: 29 of the 32 registers.
constexpr int kRows = 6;
constexpr int kMaxVectors = 4;
// Query rows per work item: a head's keys and values are read from cache by each.
constexpr int64_t kItemRows = 4 * kRows;

// Loops over a tile's rows and vectors, fully unrolled: otherwise GCC kept the accumulators in
// registers but also stored all 24 to the stack on every step of the products (benchmarks/LOG.md).
#define UNROLL _Pragma("GCC unroll 32")

struct Shape {
  int64_t b, h, s, d, t, e;
  int64_t mask_b, mask_h, mask_s;  // the mask's strides in floats, 0 where it broadcasts
  bool masked;
  int64_t padded_t;  // a row of scores in the scratch buffer: t rounded up to the vector
};

inline __mmask16 LaneMask(int64_t count) {
  return count >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(count, 0)) - 1);
}

// e^x for x <= 0 (scores minus their row's maximum): x = n ln 2 + r, |r| <= ln 2 / 2, e^r by
// its Taylor polynomial of degree 6 (relative error under 2e-7), times 2^n. Below -87 it is 0:
// e^-87 is about the smallest normal float, and subnormal weights would slow the products
// with V. NaN stays NaN (MAXPS returns its second operand when one is NaN, and the compare is
// unordered), so a row of -inf gives NaN, as the softmax of the unfused graph does.
inline __m512 Exp(__m512 x) {
  const __m512 lowest = _mm512_set1_ps(-87.0f);
  const __mmask16 normal = _mm512_cmp_ps_mask(x, lowest, _CMP_NLT_UQ);
  x = _mm512_max_ps(lowest, x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(p, n));
}

// acc[r][v] = sum over k < count of a[r * lda + k] * b[k * ldb + v * 16, ...] (lanes[v] of
// each row of b, zeros elsewhere): the register tile of both products, q kt and p v.
template <int R, int NV>
inline void Products(__m512 (&acc)[R][NV], const float* a, int64_t lda, const float* b,
                     int64_t ldb, int64_t count, const __mmask16 (&lanes)[NV]) {
  UNROLL for (int r = 0; r < R; ++r)
    UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < count; ++k) {
    __m512 row[NV];
    UNROLL for (int v = 0; v < NV; ++v)
      row[v] = _mm512_maskz_loadu_ps(lanes[v], b + k * ldb + v * kLanes);
    UNROLL for (int r = 0; r < R; ++r) {
      const __m512 broadcast = _mm512_set1_ps(a[r * lda + k]);
      UNROLL for (int v = 0; v < NV; ++v)
        acc[r][v] = _mm512_fmadd_ps(broadcast, row[v], acc[r][v]);
    }
  }
}

// scores[r][j0, j0 + NV * 16) = scale * q[r] . kt[:, j] + mask[r][j], for R query rows.
template <int R, int NV>
inline void ScoreTile(const Shape& s, const float* q, const float* kt, int64_t j0,
                      __m512 scale, const float* const (&mask)[R], float* scores) {
  __mmask16 lanes[NV];
  UNROLL for (int v = 0; v < NV; ++v) lanes[v] = LaneMask(s.t - j0 - v * kLanes);
  __m512 acc[R][NV];
  Products<R, NV>(acc, q, s.d, kt + j0, s.t, s.d, lanes);
  UNROLL for (int r = 0; r < R; ++r)
    UNROLL for (int v = 0; v < NV; ++v) {
      __m512 score = _mm512_mul_ps(acc[r][v], scale);
      if (s.masked)
        score = _mm512_add_ps(score, _mm512_maskz_loadu_ps(lanes[v], mask[r] + j0 + v * kLanes));
      _mm512_storeu_ps(scores + r * s.padded_t + j0 + v * kLanes, score);
    }
}

// scores <- e^(scores - max), in place; returns the row's sum (over its t values only).
inline float SoftmaxNumerators(const Shape& s, float* scores) {
  __m512 peak = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < s.t; j += kLanes)
    peak = _mm512_mask_max_ps(peak, LaneMask(s.t - j), peak, _mm512_loadu_ps(scores + j));
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(peak));
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < s.t; j += kLanes) {
    const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(scores + j), top);
    const __m512 e = _mm512_maskz_mov_ps(LaneMask(s.t - j), Exp(x));
    _mm512_storeu_ps(scores + j, e);
    total = _mm512_add_ps(total, e);
  }
  return _mm512_reduce_add_ps(total);
}

// out[r][e0, e0 + NV * 16) = inverse[r] * sum over j of p[r][j] * v[j][e0...], for R rows.
template <int R, int NV>
inline void OutputTile(const Shape& s, const float* p, const float* v, int64_t e0,
                       const float (&inverse)[R], float* out) {
  __mmask16 lanes[NV];
  UNROLL for (int u = 0; u < NV; ++u) lanes[u] = 0xFFFF;  // e is a multiple of 16
  __m512 acc[R][NV];
  Products<R, NV>(acc, p, s.padded_t, v + e0, s.e, s.t, lanes);
  UNROLL for (int r = 0; r < R; ++r)
    UNROLL for (int u = 0; u < NV; ++u)
      _mm512_storeu_ps(out + r * s.e + e0 + u * kLanes,
                       _mm512_mul_ps(acc[r][u], _mm512_set1_ps(inverse[r])));
}

template <template <int, int> class F, int R, typename... Args>
inline void ByVectors(int64_t vectors, Args&&... args) {
  switch (vectors) {
    case 4: F<R, 4>::Run(args...); break;
    case 3: F<R, 3>::Run(args...); break;
    case 2: F<R, 2>::Run(args...); break;
    default: F<R, 1>::Run(args...); break;
  }
}

template <int R, int NV>
struct Scores {
  static void Run(const Shape& s, const float* q, const float* kt, int64_t j0, __m512 scale,
                  const float* const (&mask)[R], float* scores) {
    ScoreTile<R, NV>(s, q, kt, j0, scale, mask, scores);
  }
};

template <int R, int NV>
struct Outputs {
  static void Run(const Shape& s, const float* p, const float* v, int64_t e0,
                  const float (&inverse)[R], float* out) {
    OutputTile<R, NV>(s, p, v, e0, inverse, out);
  }
};

// R query rows from row i of head (bi, hi).
template <int R>
void Rows(const Shape& s, const float* q, const float* kt, const float* v, const float* mask,
          float scale, float* out, int64_t bi, int64_t hi, int64_t i, float* scores) {
  const int64_t head = bi * s.h + hi;
  q += (head * s.s + i) * s.d;
  kt += head * s.d * s.t;
  v += head * s.t * s.e;
  out += (head * s.s + i) * s.e;
  const float* rows_mask[R];
  UNROLL for (int r = 0; r < R; ++r)
    rows_mask[r] = s.masked ? mask + bi * s.mask_b + hi * s.mask_h + (i + r) * s.mask_s : nullptr;
  const __m512 scaled = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < s.t; j += kMaxVectors * kLanes) {
    const int64_t vectors = std::min<int64_t>(kMaxVectors, (s.t - j + kLanes - 1) / kLanes);
    ByVectors<Scores, R>(vectors, s, q, kt, j, scaled, rows_mask, scores);
  }
  float inverse[R];
  UNROLL for (int r = 0; r < R; ++r)
    inverse[r] = 1.0f / SoftmaxNumerators(s, scores + r * s.padded_t);
  for (int64_t e = 0; e < s.e; e += kMaxVectors * kLanes) {
    const int64_t vectors = std::min<int64_t>(kMaxVectors, (s.e - e) / kLanes);
    ByVectors<Outputs, R>(vectors, s, scores, v, e, inverse, out);
  }
}

// Rows [first, last) of head (bi, hi), kRows at a time.
void Item(const Shape& s, const float* q, const float* kt, const float* v, const float* mask,
          float scale, float* out, int64_t bi, int64_t hi, int64_t first, int64_t last,
          float* scores) {
  int64_t i = first;
  for (; i + kRows <= last; i += kRows)
    Rows<kRows>(s, q, kt, v, mask, scale, out, bi, hi, i, scores);
  auto rest = [&](auto rows) {
    Rows<decltype(rows)::value>(s, q, kt, v, mask, scale, out, bi, hi, i, scores);
  };
  switch (last - i) {
    case 5: rest(std::integral_constant<int, 5>{}); break;
    case 4: rest(std::integral_constant<int, 4>{}); break;
    case 3: rest(std::integral_constant<int, 3>{}); break;
    case 2: rest(std::integral_constant<int, 2>{}); break;
    case 1: rest(std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

#endif  // __AVX512F__

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                         ffi::Buffer<ffi::F32> kt, ffi::Buffer<ffi::F32> v,
                         ffi::Buffer<ffi::F32> mask, ffi::Buffer<ffi::F32> scale,
                         ffi::ResultBuffer<ffi::F32> out, bool masked) {
#if defined(__AVX512F__)
  auto qd = q.dimensions(), kd = kt.dimensions(), vd = v.dimensions(), od = out->dimensions(),
       md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || od.size() != 4 ||
      scale.element_count() != 1)
    return ffi::Error::InvalidArgument("onnx2jax_attention: wrong ranks");
  Shape s{qd[0], qd[1], qd[2], qd[3], kd[3], vd[3], 0, 0, 0, masked, 0};
  s.padded_t = (s.t + kLanes - 1) / kLanes * kLanes;
  const bool broadcasts = md.size() == 4 && (md[0] == 1 || md[0] == s.b) &&
                          (md[1] == 1 || md[1] == s.h) && (md[2] == 1 || md[2] == s.s) &&
                          md[3] == s.t;
  if (kd[0] != s.b || kd[1] != s.h || kd[2] != s.d || vd[0] != s.b || vd[1] != s.h ||
      vd[2] != s.t || od[0] != s.b || od[1] != s.h || od[2] != s.s || od[3] != s.e ||
      s.e % kLanes != 0 || (masked && !broadcasts))
    return ffi::Error::InvalidArgument("onnx2jax_attention: inconsistent shapes");
  if (masked) {
    s.mask_s = md[2] == 1 ? 0 : s.t;
    s.mask_h = md[1] == 1 ? 0 : md[2] * s.t;
    s.mask_b = md[0] == 1 ? 0 : md[1] * md[2] * s.t;
  }
  const float *qp = q.typed_data(), *kp = kt.typed_data(), *vp = v.typed_data();
  const float* mp = masked ? mask.typed_data() : nullptr;
  const float scale_value = scale.typed_data()[0];
  float* op = out->typed_data();
  const int64_t chunks = (s.s + kItemRows - 1) / kItemRows;
  auto body = [=](int64_t first, int64_t last) {
    // One scratch row of scores per query row of a tile, per thread.
    thread_local std::vector<float> scores;
    scores.resize(std::max<size_t>(scores.size(), kRows * s.padded_t));
    for (int64_t item = first; item < last; ++item) {
      const int64_t head = item / chunks, row = (item % chunks) * kItemRows;
      Item(s, qp, kp, vp, mp, scale_value, op, head / s.h, head % s.h, row,
           std::min(s.s, row + kItemRows), scores.data());
    }
  };
  const int64_t items = s.b * s.h * chunks;
  if (items > 0)
    onnx2jax::SharedWork::RunOn(pool, std::make_shared<onnx2jax::SharedWork>(items, 1, body),
                                2 * s.b * s.h * s.s * s.t * (s.d + s.e));
  return ffi::Error::Success();
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "onnx2jax_attention needs AVX-512");
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Onnx2jaxAttention, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("masked"));
