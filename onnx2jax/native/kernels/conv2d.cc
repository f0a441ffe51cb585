// A direct 2-D float32 convolution for XLA:CPU, called through JAX's FFI (native/calls.py).
//
// XLA:CPU's convolutions (Eigen) were well behind onnxruntime's MLAS on ResNet's shapes
// (benchmarks/LOG.md). This kernel keeps a tile of RW output pixels by NV vectors of
// output channels in registers and, for every (kh, kw, input channel), broadcasts one input
// value per pixel against NV weight vectors: NV fused multiply-adds per input value loaded.
//
// The bias, and optionally a residual addend and a ReLU, are applied to the tile in registers:
// as separate XLA ops they read and wrote ResNet-50's activations again (see
// benchmarks/LOG.md). So is the padding: no padded copy of the input is made.
//
// 3x3 convolutions of stride 1 have a second kernel here, Winograd F(2x2, 3x3), which does 16
// multiply-adds per output tile and channel pair where this one does 36 (WinogradImpl below).
//
// Layouts: input NHWC, output NHWC, bias O; weights HWIO, or blocked: [O / B][KH][KW]
// [I][B] for B = kMaxVectors * kLanes output channels, so that a tile reads its weights as one
// stream (HWIO strides them O floats apart, slower when the weights are not in cache).
// Compiled on the machine that runs it (-march=native), so the vector width is the
// machine's own.

#include <algorithm>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <unistd.h>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
// 7 x 4 accumulators, 4 weight vectors and the broadcast input: one more than the 32
// registers, and GCC keeps one accumulator on the stack. A 6-wide tile, which fits, was no
// faster on ResNet-50 (its widths 56, 28, 14 and 7 then leave remainders; benchmarks/LOG.md).
constexpr int kMaxVectors = 4;
constexpr int kTileWidth = 7;
#else
// Builds without AVX-512 report 8 (or 4) lanes, and native/__init__.py leaves them unused: an
// AVX2 build of this kernel (6 x 2 tiles) was slower than XLA's kernels limited to AVX2
// (benchmarks/LOG.md).
#if defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
constexpr int kMaxVectors = 2;
constexpr int kTileWidth = 6;
#endif

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// A store that bypasses the caches (p 64-byte aligned): for outputs too large to stay in
// them, it saves reading each line before writing it.
inline void StreamStore(float* p, Vec v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
#else
  Store(p, v);
#endif
}

// Outputs larger than this are written with StreamStore: ResNet-50's largest outputs (the
// stem's, the 1x1 expansions' at 56x56) gained; a lower threshold gained nothing more
// (benchmarks/LOG.md).
constexpr int64_t kStreamBytes = int64_t{16} << 20;

// Convolutions whose weights take at most half this CPU's L2 cache compute every channel block
// of a pixel tile before the next tile (OutputRowAllBlocks), the others one block over all rows
// before the next: the input is then read once, not once per block, while the weights stay in
// L2. Larger weights no longer stay in L2 and lose; the limit follows the CPU's own L2 rather
// than a fixed size (both measured on ResNet-50's shapes: benchmarks/LOG.md).
int64_t TileMajorWeightBytes() {
  static const int64_t bytes = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return l2 > 0 ? int64_t{l2} / 2 : int64_t{512} << 10;
  }();
  return bytes;
}

struct Shape {
  int64_t n, h, w, c;       // input
  int64_t oh, ow, o;        // output
  int64_t kh, kw;           // kernel
  int64_t sh, sw, dh, dw;   // strides, dilations
  int64_t pad_h, pad_w;     // zero rows above the input, zero columns left of it
  bool blocked;  // weights [O / B][KH][KW][I][B] rather than HWIO
  int64_t wo;    // weights per (kh, kw, input channel): O in HWIO, B when blocked
  bool relu;     // max(0, .) after the bias (and the residual)
  bool stream;   // the output written with StreamStore
};

// acc[r] += sum over t < count of pixel[r][t] * weights[t * stride, ...]: the products of
// `count` consecutive input values of each pixel with as many rows of weights; `runs` such
// runs, the i-th at pixel[r] + i * pixel_step and weights + i * weight_step (a tile's kernel
// rows: one call for all of them, the sums staying in registers from one to the next).
//
// Not inlined, and on local copies: inlined into Tile, the loop's register allocation depended
// on the code around each call, and on the path for tiles inside the input GCC parked Tile's
// pointers in mask registers, whose moves back take the FMA ports (the gain, per convolution
// and whole model: benchmarks/LOG.md). The copies keep the sums in registers: `acc` may alias
// the floats the loop reads, so updating it in place would store every step.
template <int RW, int NV>
__attribute__((noinline)) void Accumulate(Vec (&acc)[RW][NV], const float* const (&pixel)[RW],
                                          const float* weights, int64_t count, int64_t stride,
                                          int64_t runs = 1, int64_t pixel_step = 0,
                                          int64_t weight_step = 0) {
  Vec sum[RW][NV];
  const float* rows[RW];
  for (int r = 0; r < RW; ++r) {
    rows[r] = pixel[r];
    for (int v = 0; v < NV; ++v) sum[r][v] = acc[r][v];
  }
  for (int64_t run = 0; run < runs; ++run) {
    for (int64_t t = 0; t < count; ++t) {
      Vec wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = Load(weights + t * stride + v * kLanes);
      for (int r = 0; r < RW; ++r) {
        const float x = rows[r][t];
        for (int v = 0; v < NV; ++v) sum[r][v] += x * wv[v];
      }
    }
    for (int r = 0; r < RW; ++r) rows[r] += pixel_step;
    weights += weight_step;
  }
  for (int r = 0; r < RW; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = sum[r][v];
}

// One tile: RW output pixels of output row `oh` from column ow0, NV * kLanes output channels.
// Padding is not stored: kernel rows above or below the input are skipped, and a pixel whose
// kernel column falls outside reads `zeros` (c floats) instead. `residual`, when given, is
// added before the ReLU, at the same offsets as `out`.
template <int RW, int NV>
inline void Tile(const Shape& s, const float* image, const float* zeros, int64_t oh,
                 int64_t ow0, const float* weights, const float* bias, const float* residual,
                 float* out) {
  // The residual and the output are read and written once, after the products: ask for their
  // cache lines now, so that memory works while the products are computed. Into L2 only
  // (locality 1): they are used a tile's products later, and the weights and input the
  // products stream through L1 would evict them (L2 was the faster of the two for ResNet-50's
  // convolutions with a residual: benchmarks/LOG.md).
  for (int r = 0; r < RW; ++r)
    for (int v = 0; v < NV; ++v) {
      if (residual) __builtin_prefetch(residual + r * s.o + v * kLanes, 0, 1);
      if (!s.stream) __builtin_prefetch(out + r * s.o + v * kLanes, 1, 1);
    }
  Vec acc[RW][NV];
  for (int v = 0; v < NV; ++v) {
    Vec b = Load(bias + v * kLanes);
    for (int r = 0; r < RW; ++r) acc[r][v] = b;
  }
  const int64_t top = oh * s.sh - s.pad_h, left = ow0 * s.sw - s.pad_w;
  const int64_t first = top >= 0 ? 0 : (s.dh - 1 - top) / s.dh;
  const int64_t last = top >= s.h ? 0 : std::min(s.kh, (s.h - top + s.dh - 1) / s.dh);
  // Every kernel column of every pixel inside the input, undilated: a kernel row's input
  // values are then one run of kw * c floats per pixel, as are its weights (in both layouts),
  // and one loop covers them (per kernel column, the stem's 3 channels left a loop of 3).
  const bool inside = s.dw == 1 && left >= 0 && left + (RW - 1) * s.sw + s.kw <= s.w;
  // Inside, all kernel rows are one call, so the sums stay in registers across them (faster
  // for the 7x7 stem and strided 3x3 convolutions: benchmarks/LOG.md).
  if (inside && first < last) {
    const float* row = image + (top + first * s.dh) * s.w * s.c;
    const float* pixel[RW];
    for (int r = 0; r < RW; ++r) pixel[r] = row + (left + r * s.sw) * s.c;
    Accumulate<RW, NV>(acc, pixel, weights + first * s.kw * s.c * s.wo, s.kw * s.c, s.wo,
                       last - first, s.dh * s.w * s.c, s.kw * s.c * s.wo);
  } else if (!inside) {
    for (int64_t i = first; i < last; ++i) {
      const float* row = image + (top + i * s.dh) * s.w * s.c;
      const float* w = weights + i * s.kw * s.c * s.wo;
      for (int64_t j = 0; j < s.kw; ++j) {
        const float* pixel[RW];
        for (int r = 0; r < RW; ++r) {
          const int64_t column = left + r * s.sw + j * s.dw;
          pixel[r] = column >= 0 && column < s.w ? row + column * s.c : zeros;
        }
        Accumulate<RW, NV>(acc, pixel, w + j * s.c * s.wo, s.c, s.wo);
      }
    }
  }
  if (residual)
    for (int r = 0; r < RW; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] += Load(residual + r * s.o + v * kLanes);
  if (s.relu) {
    const Vec zero = {};
    for (int r = 0; r < RW; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = acc[r][v] > zero ? acc[r][v] : zero;
  }
  for (int r = 0; r < RW; ++r)
    for (int v = 0; v < NV; ++v) {
      if (s.stream)
        StreamStore(out + r * s.o + v * kLanes, acc[r][v]);
      else
        Store(out + r * s.o + v * kLanes, acc[r][v]);
    }
}

template <int NV>
void RowOfTiles(const Shape& s, const float* image, const float* zeros, int64_t oh,
                const float* weights, const float* bias, const float* residual, float* out) {
  int64_t ow = 0;
  auto at = [&](int64_t column) { return residual ? residual + column * s.o : nullptr; };
  for (; ow + kTileWidth <= s.ow; ow += kTileWidth)
    Tile<kTileWidth, NV>(s, image, zeros, oh, ow, weights, bias, at(ow), out + ow * s.o);
  // The row's last RW < kTileWidth pixels.
  auto rest = [&](auto rw) {
    Tile<decltype(rw)::value, NV>(s, image, zeros, oh, ow, weights, bias, at(ow), out + ow * s.o);
  };
  switch (s.ow - ow) {
    case 6: if constexpr (kTileWidth > 6) rest(std::integral_constant<int, 6>{}); break;
    case 5: rest(std::integral_constant<int, 5>{}); break;
    case 4: rest(std::integral_constant<int, 4>{}); break;
    case 3: rest(std::integral_constant<int, 3>{}); break;
    case 2: rest(std::integral_constant<int, 2>{}); break;
    case 1: rest(std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

// Output row `oh` of image `n`, channels [ob, ob + width).
void OutputRow(const Shape& s, const float* x, const float* zeros, const float* weights,
               const float* bias, const float* residual, float* y, int64_t n, int64_t oh,
               int64_t ob, int64_t width) {
  const float* image = x + n * s.h * s.w * s.c;
  const int64_t offset = ((n * s.oh + oh) * s.ow) * s.o + ob;
  const float* r = residual ? residual + offset : nullptr;
  const float* w = s.blocked ? weights + ob * s.kh * s.kw * s.c : weights + ob;
  const float* b = bias + ob;
  switch (width / kLanes) {
    case 4: if constexpr (kMaxVectors >= 4) RowOfTiles<4>(s, image, zeros, oh, w, b, r, y + offset); break;
    case 3: if constexpr (kMaxVectors >= 3) RowOfTiles<3>(s, image, zeros, oh, w, b, r, y + offset); break;
    case 2: RowOfTiles<2>(s, image, zeros, oh, w, b, r, y + offset); break;
    default: RowOfTiles<1>(s, image, zeros, oh, w, b, r, y + offset); break;
  }
}

// f(std::integral_constant<int, RW>) for RW = min(kTileWidth, width), width >= 1: a tile
// function instantiated for each width a row's or a chunk's last tile can have.
template <typename F>
inline void WithTileWidth(int64_t width, F&& f) {
  switch (std::min<int64_t>(kTileWidth, width)) {
    case 7: if constexpr (kTileWidth >= 7) f(std::integral_constant<int, 7>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// Output row `oh` of image `n`, the last `width` channels when they are not whole vectors (a
// matrix product of N columns, its weights and bias padded with zeros to whole blocks): each
// tile is computed in whole vectors into a buffer, and its `width` columns copied out.
void RaggedOutputRow(const Shape& s, const float* x, const float* zeros, const float* weights,
                     const float* bias, float* y, int64_t n, int64_t oh, int64_t ob,
                     int64_t width) {
  constexpr int64_t kBlock = kMaxVectors * kLanes;
  Shape whole = s;
  whole.o = kBlock;
  whole.stream = false;
  alignas(64) float buffer[kTileWidth * kBlock];
  const float* image = x + n * s.h * s.w * s.c;
  const float* w = weights + ob * s.kh * s.kw * s.c;
  float* out = y + ((n * s.oh + oh) * s.ow) * s.o + ob;
  for (int64_t ow = 0; ow < s.ow; ow += kTileWidth)
    WithTileWidth(s.ow - ow, [&](auto rw) {
      constexpr int RW = decltype(rw)::value;
      Tile<RW, kMaxVectors>(whole, image, zeros, oh, ow, w, bias + ob, nullptr, buffer);
      for (int r = 0; r < RW; ++r)
        std::memcpy(out + (ow + r) * s.o, buffer + r * kBlock, width * sizeof(float));
    });
}

// Output row `oh` of image `n`, channels [first, last) (whole blocks, weights blocked), every
// block of a pixel tile before the next tile: the tile's input is read from memory for the
// first block and from cache for the others.
void OutputRowAllBlocks(const Shape& s, const float* x, const float* zeros,
                        const float* weights, const float* bias, const float* residual,
                        float* y, int64_t n, int64_t oh, int64_t first, int64_t last) {
  constexpr int64_t kBlock = kMaxVectors * kLanes;
  const float* image = x + n * s.h * s.w * s.c;
  const int64_t offset = ((n * s.oh + oh) * s.ow) * s.o;
  for (int64_t ow = 0; ow < s.ow; ow += kTileWidth) {
    for (int64_t ob = first; ob < last; ob += kBlock) {
      const float* w = weights + ob * s.kh * s.kw * s.c;
      const float* r = residual ? residual + offset + ow * s.o + ob : nullptr;
      float* out = y + offset + ow * s.o + ob;
      WithTileWidth(s.ow - ow, [&](auto rw) {
        Tile<decltype(rw)::value, kMaxVectors>(s, image, zeros, oh, ow, w, bias + ob, r, out);
      });
    }
  }
}

// y = relu?(conv(x, w) + b + residual?), x NHWC unpadded: the padding above and left is
// given, below and right it is what the output's size implies.
ffi::Error Conv2dImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> residual,
                      ffi::ResultBuffer<ffi::F32> y, int64_t stride_h, int64_t stride_w,
                      int64_t dilation_h, int64_t dilation_w, int64_t pad_h, int64_t pad_w,
                      bool blocked, bool relu, bool add_residual) {
  constexpr int64_t kBlock = kMaxVectors * kLanes;
  auto xd = x.dimensions(), yd = y->dimensions(), given = w.dimensions();
  if (given.size() != (blocked ? 5 : 4))
    return ffi::Error::InvalidArgument("onnx2jax_conv2d: weights of the wrong rank");
  // Kernel rows, columns, input and output channels.
  const int64_t wd[4] = {given[blocked], given[blocked + 1], given[blocked + 2],
                         blocked ? given[0] * given[4] : given[3]};
  // Fewer output channels than the blocked weights have: their last block is padded (a matrix
  // of any number of columns); the padding's products are computed and not written.
  const bool ragged = blocked && yd.size() == 4 && yd[3] < wd[3] && yd[3] > wd[3] - kBlock;
  if ((blocked && given[4] != kBlock) || xd.size() != 4 || yd.size() != 4 || wd[2] != xd[3] ||
      (yd[3] != wd[3] && !ragged) || (ragged && add_residual) || yd[0] != xd[0] ||
      b.dimensions().size() != 1 ||
      b.dimensions()[0] != wd[3] || wd[3] % kLanes != 0 || stride_h < 1 || stride_w < 1 ||
      dilation_h < 1 || dilation_w < 1 || pad_h < 0 || pad_w < 0 ||
      (add_residual && !std::equal(yd.begin(), yd.end(), residual.dimensions().begin(),
                                   residual.dimensions().end())))
    return ffi::Error::InvalidArgument("onnx2jax_conv2d: inconsistent shapes");
  Shape shape = {xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], wd[0], wd[1],
                 stride_h, stride_w, dilation_h, dilation_w, pad_h, pad_w,
                 blocked, blocked ? kBlock : yd[3], relu,
                 !ragged && yd[0] * yd[1] * yd[2] * yd[3] * int64_t{4} > kStreamBytes &&
                     reinterpret_cast<uintptr_t>(y->typed_data()) % 64 == 0};
  const float *xp = x.typed_data(), *wp = w.typed_data(), *bp = b.typed_data();
  const float* rp = add_residual ? residual.typed_data() : nullptr;
  float* yp = y->typed_data();
  // What a pixel in the padding reads: c floats (shared by the pool tasks, which may outlive
  // this call's frame when they start late and find nothing left).
  auto zeros = std::make_shared<std::vector<float>>(xd[3], 0.0f);
  const int64_t blocks = (yd[3] + kBlock - 1) / kBlock;
  const int64_t rows = xd[0] * yd[1], items = blocks * rows;
  // With blocks enough to share evenly, a thread claims all rows of a block: that block's
  // weights are then read into one CPU's cache only (faster at ResNet-50 b1).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t claim = blocks >= 2 * threads && blocks % threads == 0 ? rows : 1;
  // Tile-major work is shared by rows: with fewer than two a thread, CPUs would idle. A matrix
  // product is one row: MiniLM b1's 128x384x384 products (tile-major under a 2 MB L2) ran on
  // one thread until this condition (benchmarks/LOG.md).
  const int64_t weight_bytes = wd[0] * wd[1] * wd[2] * yd[3] * int64_t{4};
  const int64_t flops = 2 * wd[0] * wd[1] * wd[2] * yd[3] * yd[0] * yd[1] * yd[2];
  if (blocked && yd[3] % kBlock == 0 && blocks >= 2 && rows >= 2 * threads &&
      weight_bytes <= TileMajorWeightBytes()) {
    // Weights of half the tile-major limit or more, with activations of twice the L2 or more,
    // are split between the threads, each computing every row of its share of the blocks:
    // each CPU's L2 then holds only its share. It pays for the larger weights and activations
    // only: smaller weights, or activations that stay in cache (batch 1), were slower split
    // (ResNet-50's 1x1 convolutions: benchmarks/LOG.md).
    const int64_t activation_bytes =
        (xd[0] * xd[1] * xd[2] * xd[3] + yd[0] * yd[1] * yd[2] * yd[3]) * int64_t{4};
    const int64_t groups = weight_bytes >= TileMajorWeightBytes() / 2 &&
                                   activation_bytes >= 4 * TileMajorWeightBytes() &&
                                   blocks % threads == 0
                               ? threads
                               : 1;
    const int64_t group_width = blocks / groups * kBlock;
    auto by_rows = [=](int64_t first, int64_t last) {
      for (int64_t item = first; item < last; ++item) {
        const int64_t group = item / rows, row = item % rows;
        OutputRowAllBlocks(shape, xp, zeros->data(), wp, bp, rp, yp, row / shape.oh,
                           row % shape.oh, group * group_width, (group + 1) * group_width);
      }
      if (shape.stream) _mm_sfence();
    };
    onnx2jax::SharedWork::RunOn(pool,
                                std::make_shared<onnx2jax::SharedWork>(
                                    groups * rows, groups > 1 ? rows : 1, by_rows),
                                flops);
    return ffi::Error::Success();
  }
  auto body = [=](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      // Consecutive items share a channel block: its weights stay in cache.
      const int64_t ob = (item / rows) * kBlock, row = item % rows;
      const int64_t width = std::min(kBlock, shape.o - ob);
      if (width % kLanes != 0)
        RaggedOutputRow(shape, xp, zeros->data(), wp, bp, yp, row / shape.oh, row % shape.oh, ob,
                        width);
      else
        OutputRow(shape, xp, zeros->data(), wp, bp, rp, yp, row / shape.oh, row % shape.oh, ob,
                  width);
    }
    if (shape.stream) _mm_sfence();  // streamed stores visible before they are counted
  };
  onnx2jax::SharedWork::RunOn(pool, std::make_shared<onnx2jax::SharedWork>(items, claim, body),
                              flops);
  return ffi::Error::Success();
}


// Winograd F(2x2, 3x3) for 3x3 convolutions of stride and dilation 1: each 2x2 output tile
// is A^T [(G g G^T) . (B^T d B)] A over its 4x4 input window d, so the products become 16
// matrix products [tiles x C] x [C x O], one per point xi of the 4x4 transform: 16 multiply-adds
// per tile and channel pair where the direct kernel does 36. The weights come transformed,
// U = G g G^T, laid out [O / B][16][C][B] (native/layouts.py, winograd_weights).
//
// A work item is kWinogradTiles tiles (counted over images, tile rows and columns) and one
// channel block: their transformed input V [16][tiles][C] is computed first (again for each
// block: a 16th of the products' work at C = 256), then the 16 products, tile groups of
// kTileWidth in registers, into M [16][tiles][B], then the output transform with the bias,
// residual and ReLU. Against the direct kernel it wins up to 256 channels and loses at 512 (a
// block's U, 2 MB, no longer stays in L2), which native/layouts.py therefore leaves to the
// direct kernel (benchmarks/LOG.md).
constexpr int64_t kWinogradTiles = 4 * kTileWidth;

struct WinogradShape {
  int64_t h, w, c;            // input (per image)
  int64_t oh, ow, o;          // output
  int64_t pad_h, pad_w;       // zero rows above the input, zero columns left of it
  int64_t tiles_h, tiles_w;   // 2x2 output tiles per column and row
  bool relu;
};

// V[xi][i] = (B^T d B)[xi] for tile t0 + i, i < count: rows of C floats.
void WinogradInput(const WinogradShape& s, const float* x, int64_t t0, int64_t count,
                   float* v) {
  const int64_t plane = count * s.c;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t t = t0 + i, per_image = s.tiles_h * s.tiles_w;
    const int64_t ty = t % per_image / s.tiles_w, tx = t % s.tiles_w;
    const float* image = x + t / per_image * s.h * s.w * s.c;
    for (int64_t c = 0; c < s.c; c += kLanes) {
      Vec d[4][4];
      for (int a = 0; a < 4; ++a) {
        const int64_t row = 2 * ty - s.pad_h + a;
        for (int b = 0; b < 4; ++b) {
          const int64_t column = 2 * tx - s.pad_w + b;
          d[a][b] = row >= 0 && row < s.h && column >= 0 && column < s.w
                        ? Load(image + (row * s.w + column) * s.c + c) : Vec{};
        }
      }
      Vec e[4][4];  // B^T d
      for (int b = 0; b < 4; ++b) {
        e[0][b] = d[0][b] - d[2][b];
        e[1][b] = d[1][b] + d[2][b];
        e[2][b] = d[2][b] - d[1][b];
        e[3][b] = d[1][b] - d[3][b];
      }
      float* out = v + i * s.c + c;
      for (int a = 0; a < 4; ++a) {
        Store(out + (4 * a) * plane, e[a][0] - e[a][2]);
        Store(out + (4 * a + 1) * plane, e[a][1] + e[a][2]);
        Store(out + (4 * a + 2) * plane, e[a][2] - e[a][1]);
        Store(out + (4 * a + 3) * plane, e[a][1] - e[a][3]);
      }
    }
  }
}

// M[xi][i0 + r] = V[xi][i0 + r] U[xi] for r < RW: one register tile of a point's product.
template <int RW>
void WinogradProduct(const WinogradShape& s, const float* v, const float* u, int64_t count,
                     int xi, int64_t i0, float* m) {
  Vec acc[RW][kMaxVectors] = {};
  const float* rows[RW];
  for (int r = 0; r < RW; ++r) rows[r] = v + (xi * count + i0 + r) * s.c;
  Accumulate<RW, kMaxVectors>(acc, rows, u + xi * s.c * kMaxVectors * kLanes, s.c,
                              kMaxVectors * kLanes);
  for (int r = 0; r < RW; ++r)
    for (int q = 0; q < kMaxVectors; ++q)
      Store(m + ((xi * count + i0 + r) * kMaxVectors + q) * kLanes, acc[r][q]);
}

// y (+ residual, ReLU) = A^T M A + bias for the tiles, channels [ob, ob + B); the parts of
// tiles past the output's last row or column are not stored.
void WinogradOutput(const WinogradShape& s, const float* m, const float* bias,
                    const float* residual, float* y, int64_t t0, int64_t count, int64_t ob) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t t = t0 + i, per_image = s.tiles_h * s.tiles_w;
    const int64_t n = t / per_image, ty = t % per_image / s.tiles_w, tx = t % s.tiles_w;
    for (int q = 0; q < kMaxVectors; ++q) {
      Vec p[16];
      for (int xi = 0; xi < 16; ++xi) p[xi] = Load(m + ((xi * count + i) * kMaxVectors + q) * kLanes);
      const Vec b = Load(bias + ob + q * kLanes), zero = {};
      for (int r = 0; r < 2 && 2 * ty + r < s.oh; ++r) {
        Vec e[4];  // row r of A^T M
        for (int j = 0; j < 4; ++j)
          e[j] = r == 0 ? p[j] + p[4 + j] + p[8 + j] : p[4 + j] - p[8 + j] - p[12 + j];
        const Vec pair[2] = {e[0] + e[1] + e[2] + b, e[1] - e[2] - e[3] + b};
        for (int j = 0; j < 2 && 2 * tx + j < s.ow; ++j) {
          const int64_t at = ((n * s.oh + 2 * ty + r) * s.ow + 2 * tx + j) * s.o + ob + q * kLanes;
          Vec out = pair[j];
          if (residual) out += Load(residual + at);
          if (s.relu) out = out > zero ? out : zero;
          Store(y + at, out);
        }
      }
    }
  }
}

void WinogradItem(const WinogradShape& s, const float* x, const float* u, const float* bias,
                  const float* residual, float* y, int64_t t0, int64_t count, int64_t ob,
                  float* v, float* m) {
  WinogradInput(s, x, t0, count, v);
  const float* block = u + ob * 16 * s.c;
  for (int xi = 0; xi < 16; ++xi)
    for (int64_t i0 = 0; i0 < count; i0 += kTileWidth) {
      WithTileWidth(count - i0, [&](auto rw) {
        WinogradProduct<decltype(rw)::value>(s, v, block, count, xi, i0, m);
      });
    }
  WinogradOutput(s, m, bias, residual, y, t0, count, ob);
}

// y = relu?(conv3x3(x, w) + b + residual?) with weights U (see above), x NHWC unpadded.
ffi::Error WinogradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                        ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> residual,
                        ffi::ResultBuffer<ffi::F32> y, int64_t pad_h, int64_t pad_w, bool relu,
                        bool add_residual) {
  constexpr int64_t kBlock = kMaxVectors * kLanes;
  auto xd = x.dimensions(), yd = y->dimensions(), ud = u.dimensions();
  if (xd.size() != 4 || yd.size() != 4 || ud.size() != 4 || ud[1] != 16 || ud[3] != kBlock ||
      ud[2] != xd[3] || xd[3] % kLanes != 0 || ud[0] * kBlock != yd[3] || yd[0] != xd[0] ||
      b.dimensions().size() != 1 || b.dimensions()[0] != yd[3] || pad_h < 0 || pad_w < 0 ||
      (add_residual && !std::equal(yd.begin(), yd.end(), residual.dimensions().begin(),
                                   residual.dimensions().end())))
    return ffi::Error::InvalidArgument("onnx2jax_winograd: inconsistent shapes");
  const WinogradShape shape = {xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], pad_h, pad_w,
                               (yd[1] + 1) / 2, (yd[2] + 1) / 2, relu};
  const float *xp = x.typed_data(), *up = u.typed_data(), *bp = b.typed_data();
  const float* rp = add_residual ? residual.typed_data() : nullptr;
  float* yp = y->typed_data();
  const int64_t tiles = xd[0] * shape.tiles_h * shape.tiles_w;
  const int64_t chunks = (tiles + kWinogradTiles - 1) / kWinogradTiles, blocks = ud[0];
  // Consecutive items share a channel block, whose U then stays in cache; a thread claims all
  // of a block's items when the blocks share evenly, as in Conv2dImpl.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t claim = blocks >= 2 * threads && blocks % threads == 0 ? chunks : 1;
  auto body = [=](int64_t first, int64_t last) {
    thread_local std::vector<float> scratch;
    const int64_t v_size = 16 * kWinogradTiles * shape.c;
    scratch.resize(v_size + 16 * kWinogradTiles * kBlock);
    for (int64_t item = first; item < last; ++item) {
      const int64_t t0 = item % chunks * kWinogradTiles;
      WinogradItem(shape, xp, up, bp, rp, yp, t0, std::min(kWinogradTiles, tiles - t0),
                   item / chunks * kBlock, scratch.data(), scratch.data() + v_size);
    }
  };
  // The direct convolution's flops: what the transforms and products cost, within a factor.
  const int64_t flops = 2 * 9 * shape.c * yd[0] * yd[1] * yd[2] * yd[3];
  onnx2jax::SharedWork::RunOn(
      pool, std::make_shared<onnx2jax::SharedWork>(blocks * chunks, claim, body), flops);
  return ffi::Error::Success();
}

}  // namespace

// Both convolutions take (x, weights, bias, residual) and return y.
auto ConvolutionBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Onnx2jaxConv2d, Conv2dImpl,
                              ConvolutionBinding()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("dilation_h")
                                  .Attr<int64_t>("dilation_w")
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w")
                                  .Attr<bool>("blocked")
                                  .Attr<bool>("relu")
                                  .Attr<bool>("add_residual"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Onnx2jaxWinograd, WinogradImpl,
                              ConvolutionBinding()
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w")
                                  .Attr<bool>("relu")
                                  .Attr<bool>("add_residual"));

// The number of float32 lanes the kernel was compiled for: onnx2jax/native/ uses it only
// with output channels a multiple of this, and only at 16 lanes (AVX-512).
extern "C" int onnx2jax_conv2d_lanes() { return kLanes; }

// B, the output channels of a block of blocked weights.
extern "C" int onnx2jax_conv2d_block() { return kMaxVectors * kLanes; }
