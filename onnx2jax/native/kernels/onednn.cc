// Float32 2-D convolutions by oneDNN, for XLA:CPU through JAX's FFI (native/calls.py).
//
// The hand-written kernels (conv2d.cc) are fast only with AVX-512; an AVX2 build of them was
// slower than XLA's kernels. oneDNN picks its kernels at run time for the CPU it runs on
// (AVX2, AVX-512, AMX), so this file is compiled without -march=native and serves every x86
// CPU; native/__init__.py decides per kernel kind which backend model(...) uses (oneDNN's AVX2
// matrix products measured slower than XLA's dots, so there are none here).
//
// A primitive is made once per problem (shapes, strides, pads, post-ops) and kept: making one
// costs far more than running a small one. The weights come in the layout XLA keeps them in
// (HWIO) and oneDNN reorders them to its blocked layout on every call, into a buffer of the
// calling thread. So is each call's scratchpad: XLA may run two convolutions at once.
//
// Layouts: input and output NHWC, bias O (or empty), residual NHWC as the output (or empty);
// weights HWIO with I = input channels / groups.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A problem's primitive, with the layout it wants the weights in and the reorder to it.
struct Prepared {
  dnnl::primitive primitive;
  dnnl::memory::desc given_weights, weights, scratchpad;
  dnnl::reorder reorder;  // from given_weights to weights; unset when they are the same
};

// Problems are keyed by every number their primitive depends on.
using Key = std::vector<int64_t>;
constexpr size_t kCacheSize = 1024;  // oneDNN's own primitive cache's default capacity

// The primitive of `key`, made by `make` the first time; shared by every thread (oneDNN's
// primitives may run concurrently).
template <typename Make>
std::shared_ptr<const Prepared> Cached(const Key& key, Make make) {
  static std::mutex mutex;
  static std::map<Key, std::shared_ptr<const Prepared>> cache;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto found = cache.find(key);
    if (found != cache.end()) return found->second;
  }
  auto made = std::make_shared<const Prepared>(make());
  std::lock_guard<std::mutex> lock(mutex);
  // Bounded, for programs of ever new shapes; calls running hold their primitive still.
  if (cache.size() >= kCacheSize) cache.clear();
  return cache.emplace(key, made).first->second;
}

// `bytes` of `buffer`, from a 64-byte boundary (a cache line, oneDNN's vectors' alignment).
char* Aligned(std::vector<char>& buffer, size_t bytes) {
  buffer.resize(bytes + 64);
  return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) &
                                 ~uintptr_t{63});
}

// Runs `prepared` on `args`, the weights (given in `weights`) reordered first if need be.
void Run(const Prepared& prepared, float* weights,
         std::unordered_map<int, dnnl::memory> args) {
  dnnl::engine& engine = Engine();
  dnnl::stream stream(engine);
  dnnl::memory given(prepared.given_weights, engine, weights);
  if (prepared.reorder) {
    thread_local std::vector<char> buffer;
    dnnl::memory blocked(prepared.weights, engine,
                         Aligned(buffer, prepared.weights.get_size()));
    prepared.reorder.execute(stream, given, blocked);
    args[DNNL_ARG_WEIGHTS] = blocked;
  } else {
    args[DNNL_ARG_WEIGHTS] = given;
  }
  thread_local std::vector<char> scratch;
  args[DNNL_ARG_SCRATCHPAD] = dnnl::memory(prepared.scratchpad, engine,
                                           Aligned(scratch, prepared.scratchpad.get_size()));
  prepared.primitive.execute(stream, args);
  stream.wait();
}

dnnl::primitive_attr Attributes(bool add, const dnnl::memory::desc& addend, bool relu) {
  dnnl::post_ops post_ops;
  if (add) post_ops.append_binary(dnnl::algorithm::binary_add, addend);
  if (relu) post_ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.0f, 0.0f);
  dnnl::primitive_attr attributes;
  attributes.set_post_ops(post_ops);
  attributes.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attributes;
}

template <typename F>
ffi::Error Guarded(const char* name, F f) {
  try {
    return f();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string(name) + ": oneDNN: " + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string(name) + ": " + e.what());
  }
}

// y = relu?(conv(x, w, groups) + b + residual?).
ffi::Error ConvImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                    ffi::Buffer<ffi::F32> residual, ffi::ResultBuffer<ffi::F32> y,
                    int64_t stride_h, int64_t stride_w, int64_t dilation_h, int64_t dilation_w,
                    int64_t pad_top, int64_t pad_left, int64_t pad_bottom, int64_t pad_right,
                    int64_t groups, bool relu, bool add_residual) {
  return Guarded("onnx2jax_onednn_conv", [&]() -> ffi::Error {
    auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
    const bool bias = b.dimensions().size() == 1 && b.dimensions()[0] > 0;
    if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4 || groups < 1 ||
        xd[3] != wd[2] * groups || yd[3] != wd[3] || wd[3] % groups != 0 || yd[0] != xd[0] ||
        (bias && b.dimensions()[0] != wd[3]) || stride_h < 1 || stride_w < 1 ||
        dilation_h < 1 || dilation_w < 1 ||
        (add_residual && residual.element_count() != y->element_count()))
      return ffi::Error::InvalidArgument("onnx2jax_onednn_conv: inconsistent shapes");
    const int64_t n = xd[0], c = xd[3], o = yd[3], kh = wd[0], kw = wd[1], ig = wd[2];
    const int64_t og = o / groups;
    Key key = {0,      n,      xd[1],  xd[2],      c,          o,       yd[1],     yd[2],
               kh,     kw,     groups, stride_h,   stride_w,   dilation_h, dilation_w,
               pad_top, pad_left, pad_bottom, pad_right, bias,  relu,    add_residual};
    auto prepared = Cached(key, [&] {
      dnnl::memory::desc src({n, c, xd[1], xd[2]}, dt::f32, tag::nhwc);
      dnnl::memory::desc dst({n, o, yd[1], yd[2]}, dt::f32, tag::nhwc);
      // HWIO read as OIHW (groups: GOIHW) by strides.
      dnnl::memory::desc given =
          groups == 1
              ? dnnl::memory::desc({o, ig, kh, kw}, dt::f32, {1, o, kw * ig * o, ig * o})
              : dnnl::memory::desc({groups, og, ig, kh, kw}, dt::f32,
                                   {og, 1, o, kw * ig * o, ig * o});
            dnnl::memory::desc any(given.get_dims(), dt::f32, tag::any);
      dnnl::memory::desc bias_desc =
          bias ? dnnl::memory::desc({o}, dt::f32, tag::a) : dnnl::memory::desc();
      auto pd = dnnl::convolution_forward::primitive_desc(
          Engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, src,
          any, bias_desc, dst, {stride_h, stride_w}, {dilation_h - 1, dilation_w - 1},
          {pad_top, pad_left}, {pad_bottom, pad_right}, Attributes(add_residual, dst, relu));
      Prepared made{dnnl::convolution_forward(pd), given, pd.weights_desc(),
                    pd.scratchpad_desc(), {}};
      if (made.weights != given)
        made.reorder = dnnl::reorder(
            dnnl::reorder::primitive_desc(Engine(), given, Engine(), made.weights));
      return made;
    });
    dnnl::engine& engine = Engine();
    dnnl::memory::desc dst({n, o, yd[1], yd[2]}, dt::f32, tag::nhwc);
    std::unordered_map<int, dnnl::memory> args = {
        {DNNL_ARG_SRC,
         dnnl::memory({{n, c, xd[1], xd[2]}, dt::f32, tag::nhwc}, engine, x.typed_data())},
        {DNNL_ARG_DST, dnnl::memory(dst, engine, y->typed_data())}};
    if (bias)
      args[DNNL_ARG_BIAS] = dnnl::memory({{o}, dt::f32, tag::a}, engine, b.typed_data());
    if (add_residual)
      args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] =
          dnnl::memory(dst, engine, residual.typed_data());
    Run(*prepared, w.typed_data(), std::move(args));
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Onnx2jaxOnednnConv, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("dilation_h")
                                  .Attr<int64_t>("dilation_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_right")
                                  .Attr<int64_t>("groups")
                                  .Attr<bool>("relu")
                                  .Attr<bool>("add_residual"));

// The instruction set oneDNN's kernels use on this CPU (after ONEDNN_MAX_CPU_ISA), as
// dnnl::cpu_isa's value: native/__init__.py reports it.
extern "C" int onnx2jax_onednn_isa() { return static_cast<int>(dnnl::get_effective_cpu_isa()); }
