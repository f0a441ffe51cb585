// A direct 2-D float32 convolution for XLA:CPU, called through JAX's FFI (onnx2jax/native.py).
//
// XLA:CPU runs convolutions through Eigen at about 60% of onnxruntime's MLAS speed on ResNet's
// shapes (benchmarks/README.md). This kernel keeps a tile of RW output pixels by NV vectors of
// output channels in registers and, for every (kh, kw, input channel), broadcasts one input
// value per pixel against NV weight vectors: NV fused multiply-adds per input value loaded.
//
// Layouts: input NHWC (padded), output NHWC, bias O; weights HWIO, or blocked: [O / B][KH][KW]
// [I][B] for B = kMaxVectors * kLanes output channels, so that a tile reads its weights as one
// stream (HWIO strides them O floats apart: 1.2-1.3x slower at O = 512 with weights not in
// cache). Compiled on the machine that runs it (-march=native), so the vector width is the
// machine's own.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
// 7 x 4 accumulators, 4 weight vectors and the broadcast input: one more than the 32
// registers, and GCC keeps one accumulator on the stack. A 6-wide tile, which fits, measured
// no faster on ResNet-50 (its widths 56, 28, 14 and 7 then leave remainders).
constexpr int kMaxVectors = 4;
constexpr int kTileWidth = 7;
#else
// Builds without AVX-512 report 8 (or 4) lanes, and onnx2jax/native.py leaves them unused: an
// AVX2 build of this kernel (6 x 2 tiles) took 1.6-2.2x onnxruntime's time on MiniLM b1 and
// ResNet-50 b1, against 1.1-1.3x for XLA's kernels limited to AVX2.
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

struct Shape {
  int64_t n, h, w, c;       // input
  int64_t oh, ow, o;        // output
  int64_t kh, kw;           // kernel
  int64_t sh, sw, dh, dw;   // strides, dilations
  bool blocked;  // weights [O / B][KH][KW][I][B] rather than HWIO
  int64_t wo;    // weights per (kh, kw, input channel): O in HWIO, B when blocked
};

// One tile: RW output pixels of one row from column ow0, NV * kLanes output channels.
// `rows` points at the first input row that the output row reads.
template <int RW, int NV>
inline void Tile(const Shape& s, const float* rows, int64_t row_stride, int64_t ow0,
                 const float* weights, const float* bias, float* out) {
  Vec acc[RW][NV];
  for (int v = 0; v < NV; ++v) {
    Vec b = Load(bias + v * kLanes);
    for (int r = 0; r < RW; ++r) acc[r][v] = b;
  }
  const int64_t pixel_step = s.sw * s.c;
  for (int64_t i = 0; i < s.kh; ++i) {
    for (int64_t j = 0; j < s.kw; ++j) {
      const float* in = rows + i * s.dh * row_stride + (ow0 * s.sw + j * s.dw) * s.c;
      const float* w = weights + (i * s.kw + j) * s.c * s.wo;
      for (int64_t c = 0; c < s.c; ++c) {
        Vec wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = Load(w + c * s.wo + v * kLanes);
        for (int r = 0; r < RW; ++r) {
          const float x = in[r * pixel_step + c];
          for (int v = 0; v < NV; ++v) acc[r][v] += x * wv[v];
        }
      }
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int v = 0; v < NV; ++v) Store(out + r * s.o + v * kLanes, acc[r][v]);
}

template <int NV>
void RowOfTiles(const Shape& s, const float* rows, int64_t row_stride, const float* weights,
                const float* bias, float* out) {
  int64_t ow = 0;
  for (; ow + kTileWidth <= s.ow; ow += kTileWidth)
    Tile<kTileWidth, NV>(s, rows, row_stride, ow, weights, bias, out + ow * s.o);
  float* rest = out + ow * s.o;
  switch (s.ow - ow) {
    case 6: if constexpr (kTileWidth > 6) Tile<6, NV>(s, rows, row_stride, ow, weights, bias, rest); break;
    case 5: Tile<5, NV>(s, rows, row_stride, ow, weights, bias, rest); break;
    case 4: Tile<4, NV>(s, rows, row_stride, ow, weights, bias, rest); break;
    case 3: Tile<3, NV>(s, rows, row_stride, ow, weights, bias, rest); break;
    case 2: Tile<2, NV>(s, rows, row_stride, ow, weights, bias, rest); break;
    case 1: Tile<1, NV>(s, rows, row_stride, ow, weights, bias, rest); break;
    default: break;
  }
}

// Output row `oh` of image `n`, channels [ob, ob + width). The input is padded already (by
// XLA, which fuses the padding into the op that produces it): every read is inside it.
void OutputRow(const Shape& s, const float* x, const float* weights, const float* bias, float* y,
               int64_t n, int64_t oh, int64_t ob, int64_t width) {
  const int64_t row_stride = s.w * s.c;
  const float* rows = x + (n * s.h + oh * s.sh) * row_stride;
  float* out = y + ((n * s.oh + oh) * s.ow) * s.o + ob;
  const float* w = s.blocked ? weights + ob * s.kh * s.kw * s.c : weights + ob;
  const float* b = bias + ob;
  switch (width / kLanes) {
    case 4: if constexpr (kMaxVectors >= 4) RowOfTiles<4>(s, rows, row_stride, w, b, out); break;
    case 3: if constexpr (kMaxVectors >= 3) RowOfTiles<3>(s, rows, row_stride, w, b, out); break;
    case 2: RowOfTiles<2>(s, rows, row_stride, w, b, out); break;
    default: RowOfTiles<1>(s, rows, row_stride, w, b, out); break;
  }
}

// Work shared between the calling thread and XLA's intra-op pool. Items are claimed from a
// counter, so a pool task that starts late finds nothing left and returns: the caller never
// waits for a task to start, only for claimed items to finish (no deadlock when every pool
// thread is itself busy in such a call).
struct Work {
  Shape shape;
  const float *x, *w, *b;
  float* y;
  int64_t items, claim;  // items claimed at a time
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    const int64_t block = kMaxVectors * kLanes;
    const int64_t rows = shape.n * shape.oh;
    for (int64_t first; (first = next.fetch_add(claim)) < items;) {
      const int64_t last = std::min(items, first + claim);
      for (int64_t item = first; item < last; ++item) {
        // Consecutive items share a channel block: its weights stay in cache.
        const int64_t ob = (item / rows) * block, row = item % rows;
        OutputRow(shape, x, w, b, y, row / shape.oh, row % shape.oh, ob,
                  std::min(block, shape.o - ob));
      }
      done.fetch_add(last - first);
    }
  }
};

ffi::Error Conv2dImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y,
                      int64_t stride_h, int64_t stride_w, int64_t dilation_h,
                      int64_t dilation_w, bool blocked) {
  constexpr int64_t kBlock = kMaxVectors * kLanes;
  auto xd = x.dimensions(), yd = y->dimensions(), given = w.dimensions();
  if (given.size() != (blocked ? 5 : 4))
    return ffi::Error::InvalidArgument("onnx2jax_conv2d: weights of the wrong rank");
  // Kernel rows, columns, input and output channels.
  const int64_t wd[4] = {given[blocked], given[blocked + 1], given[blocked + 2],
                         blocked ? given[0] * given[4] : given[3]};
  if ((blocked && given[4] != kBlock) || xd.size() != 4 || yd.size() != 4 || wd[2] != xd[3] ||
      yd[3] != wd[3] || yd[0] != xd[0] || b.dimensions().size() != 1 ||
      b.dimensions()[0] != wd[3] || wd[3] % kLanes != 0 || stride_h < 1 || stride_w < 1 ||
      dilation_h < 1 || dilation_w < 1)
    return ffi::Error::InvalidArgument("onnx2jax_conv2d: inconsistent shapes");
  if (yd[1] > 0 && yd[2] > 0 &&
      ((yd[1] - 1) * stride_h + (wd[0] - 1) * dilation_h >= xd[1] ||
       (yd[2] - 1) * stride_w + (wd[1] - 1) * dilation_w >= xd[2]))
    return ffi::Error::InvalidArgument("onnx2jax_conv2d: the output reads past the input");
  auto work = std::make_shared<Work>();
  work->shape = {xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], wd[0], wd[1],
                 stride_h, stride_w, dilation_h, dilation_w, blocked, blocked ? kBlock : yd[3]};
  work->x = x.typed_data();
  work->w = w.typed_data();
  work->b = b.typed_data();
  work->y = y->typed_data();
  const int64_t blocks = (yd[3] + kBlock - 1) / kBlock;
  work->items = blocks * xd[0] * yd[1];
  // With blocks enough to share evenly, a thread claims all rows of a block: that block's
  // weights are then read into one CPU's cache only (ResNet-50 b1: 1-7% faster).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  work->claim = blocks >= 2 * threads && blocks % threads == 0 ? xd[0] * yd[1] : 1;
  const int64_t helpers = std::min(threads, work->items) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->items) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Onnx2jaxConv2d, Conv2dImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("dilation_h")
                                  .Attr<int64_t>("dilation_w")
                                  .Attr<bool>("blocked"));

// The number of float32 lanes the kernel was compiled for: onnx2jax/native.py uses it only
// with output channels a multiple of this, and only at 16 lanes (AVX-512).
extern "C" int onnx2jax_conv2d_lanes() { return kLanes; }

// B, the output channels of a block of blocked weights.
extern "C" int onnx2jax_conv2d_block() { return kMaxVectors * kLanes; }
