// MatMulNBits with 4-bit weights for few rows (decode), called through JAX's FFI
// (native/calls.py): Y[M, N] = A[M, K] @ dequantize(B)^T.
//
// XLA widens the whole packed weight to a float [N, K] array on every call before its dot
// (ops/blockwise_quant.py, issue 24), reading and writing eight times the packed bytes. Here
// each 16 bytes of B (32 values) become floats in registers, `(q - zero) * scale`, and are
// multiplied into every row of A at once: B is read once, as stored, and no float weight exists.
//
// Layouts (onnxruntime's): B [N][blocks][block / 2] bytes, each byte's low nibble first;
// scales [N][blocks] float32; zero points [N][ceil(blocks / 2)] bytes, low nibble first, or
// none (8). K is padded to whole blocks; the padding's A is zero, so its weights add nothing.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The rows computed together: their accumulators (two vectors each) stay in registers.
constexpr int kMaxRows = 8;
// Columns a thread claims at a time.
constexpr int64_t kClaim = 32;

struct Problem {
  int64_t m, n, k, blocks, block;
  const float* a;        // [M][K] as given
  const float* ap;       // [M][blocks * block]: see PermutedA
  const uint8_t* b;      // [N][blocks * block / 2]
  const float* scales;   // [N][blocks]
  const uint8_t* zeros;  // [N][ceil(blocks / 2)] or null
  float* y;              // [M][N]
};

inline float ZeroPoint(const Problem& p, int64_t column, int64_t j) {
  if (p.zeros == nullptr) return 8.0f;
  const uint8_t byte = p.zeros[column * ((p.blocks + 1) / 2) + j / 2];
  return static_cast<float>((byte >> ((j & 1) * 4)) & 0x0F);
}

#if defined(__AVX512F__)

// A's rows padded with zeros to whole blocks, each 16 values reordered as the 8 even ones,
// then the 8 odd ones: the order in which 8 bytes' low nibbles, then high nibbles, come out.
void PermutedA(const Problem& p, float* ap) {
  const int64_t padded = p.blocks * p.block;
  for (int64_t r = 0; r < p.m; ++r) {
    const float* row = p.a + r * p.k;
    float* out = ap + r * padded;
    for (int64_t c = 0; c < padded; c += 16)
      for (int i = 0; i < 16; ++i) {
        const int64_t from = c + 2 * (i % 8) + i / 8;
        out[c + i] = from < p.k ? row[from] : 0.0f;
      }
  }
}

// 8 bytes (16 values) as floats `q * scale - zero * scale` (one multiply-add; `shift` is the
// rounded zero * scale), in PermutedA's order.
inline __m512 Dequantize(__m128i nibbles, __m512 shift, __m512 scale) {
  const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(nibbles));
  return _mm512_fmsub_ps(q, scale, shift);
}

// Columns [first, last) of rows [row, row + R).
template <int R>
void Columns(const Problem& p, int64_t row, int64_t first, int64_t last) {
  const int64_t padded = p.blocks * p.block, blob = p.block / 2;
  const __m128i low = _mm_set1_epi8(0x0F);
  const float* ap = p.ap + row * padded;
  for (int64_t column = first; column < last; ++column) {
    const uint8_t* bq = p.b + column * p.blocks * blob;
    const float* scales = p.scales + column * p.blocks;
    __m512 even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_ps();
    int64_t j = 0;
    // Two 16-value halves at a time: both in one block (block >= 32) or in blocks j, j + 1.
    const int step = p.block == 16 ? 2 : 1;
    for (; j + step <= p.blocks; j += step) {
      const __m512 s0 = _mm512_set1_ps(scales[j]);
      const __m512 z0 = _mm512_set1_ps(ZeroPoint(p, column, j) * scales[j]);
      const __m512 s1 = step == 2 ? _mm512_set1_ps(scales[j + 1]) : s0;
      const __m512 z1 =
          step == 2 ? _mm512_set1_ps(ZeroPoint(p, column, j + 1) * scales[j + 1]) : z0;
      const int64_t end = (j + step) * p.block;
      for (int64_t v = j * p.block; v < end; v += 32) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bq + v / 2));
        const __m128i lo = _mm_and_si128(bytes, low);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
        const __m512 w0 = Dequantize(_mm_unpacklo_epi64(lo, hi), z0, s0);
        const __m512 w1 = Dequantize(_mm_unpackhi_epi64(lo, hi), z1, s1);
        for (int r = 0; r < R; ++r) {
          even[r] = _mm512_fmadd_ps(_mm512_loadu_ps(ap + r * padded + v), w0, even[r]);
          odd[r] = _mm512_fmadd_ps(_mm512_loadu_ps(ap + r * padded + v + 16), w1, odd[r]);
        }
      }
    }
    if (j < p.blocks) {  // block 16, an odd number of blocks: the last 8 bytes alone
      const __m512 s = _mm512_set1_ps(scales[j]);
      const __m512 z = _mm512_set1_ps(ZeroPoint(p, column, j) * scales[j]);
      const int64_t v = j * p.block;
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bq + v / 2));
      const __m128i lo = _mm_and_si128(bytes, low);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
      const __m512 w = Dequantize(_mm_unpacklo_epi64(lo, hi), z, s);
      for (int r = 0; r < R; ++r)
        even[r] = _mm512_fmadd_ps(_mm512_loadu_ps(ap + r * padded + v), w, even[r]);
    }
    for (int r = 0; r < R; ++r)
      p.y[(row + r) * p.n + column] = _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r]));
  }
}

template <int R>
void RowsFrom(const Problem& p, int64_t row, int64_t first, int64_t last) {
  if constexpr (R > 1) {
    if (p.m - row < R) return RowsFrom<R - 1>(p, row, first, last);
  }
  Columns<R>(p, row, first, last);
}

void Compute(const Problem& p, int64_t first, int64_t last) {
  for (int64_t row = 0; row < p.m; row += kMaxRows) RowsFrom<kMaxRows>(p, row, first, last);
}

constexpr bool kPermuted = true;

#else  // no AVX-512: plain loops

void PermutedA(const Problem&, float*) {}

void Compute(const Problem& p, int64_t first, int64_t last) {
  const int64_t blob = p.block / 2;
  for (int64_t column = first; column < last; ++column) {
    const uint8_t* bq = p.b + column * p.blocks * blob;
    for (int64_t r = 0; r < p.m; ++r) {
      const float* a = p.a + r * p.k;
      float sum = 0.0f;
      for (int64_t j = 0; j < p.blocks; ++j) {
        const float scale = p.scales[column * p.blocks + j], zero = ZeroPoint(p, column, j);
        const int64_t end = std::min(p.k, (j + 1) * p.block);
        for (int64_t v = j * p.block; v < end; ++v) {
          const float q = static_cast<float>((bq[v / 2] >> ((v & 1) * 4)) & 0x0F);
          sum += a[v] * ((q - zero) * scale);
        }
      }
      p.y[r * p.n + column] = sum;
    }
  }
}

constexpr bool kPermuted = false;

#endif

ffi::Error NbitsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::U8> b,
                     ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::U8> zeros,
                     ffi::ResultBuffer<ffi::F32> y, int64_t block) {
  auto ad = a.dimensions(), yd = y->dimensions();
  if (ad.size() != 2 || yd.size() != 2 || ad[0] != yd[0])
    return ffi::Error::InvalidArgument("onnx2jax_nbits: A and Y must be [M, K] and [M, N]");
  if (block != 16 && block != 32 && block != 64 && block != 128)
    return ffi::Error::InvalidArgument("onnx2jax_nbits: block must be 16, 32, 64 or 128");
  const int64_t m = ad[0], k = ad[1], n = yd[1], blocks = (k + block - 1) / block;
  const int64_t zero_bytes = static_cast<int64_t>(zeros.element_count());
  if (static_cast<int64_t>(b.element_count()) != n * blocks * (block / 2) ||
      static_cast<int64_t>(scales.element_count()) != n * blocks ||
      (zero_bytes != 0 && zero_bytes != n * ((blocks + 1) / 2)))
    return ffi::Error::InvalidArgument("onnx2jax_nbits: B, scales or zero points do not fit");
  if (m == 0 || n == 0) return ffi::Error::Success();
  // Shared with the pool's tasks, which may start after this call returned (parallel.h).
  auto permuted = std::make_shared<std::vector<float>>(kPermuted ? m * blocks * block : 0);
  Problem problem = {m,
                     n,
                     k,
                     blocks,
                     block,
                     a.typed_data(),
                     permuted->data(),
                     b.typed_data(),
                     scales.typed_data(),
                     zero_bytes ? zeros.typed_data() : nullptr,
                     y->typed_data()};
  if (k == 0) {
    std::fill(problem.y, problem.y + m * n, 0.0f);
    return ffi::Error::Success();
  }
  PermutedA(problem, permuted->data());
  auto body = [problem, permuted](int64_t first, int64_t last) {
    Compute(problem, first, last);
  };
  const int64_t flops = 2 * m * n * blocks * block;
  onnx2jax::SharedWork::RunOn(
      pool, std::make_shared<onnx2jax::SharedWork>(n, kClaim, body), flops);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Onnx2jaxNbits, NbitsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block"));
