"""The onnx2jax nodes the native CPU kernels compute: NativeConv, NativeMatMul, NativeAttention,
NativeMatMulNBits.

No model holds them: the program ``model(...)`` compiles rewrites the nodes the kernels will
compute into them (onnx2jax/runtime/fusion.py), with the weights in the layouts the kernels
read (onnx2jax/native/layouts.py) as inputs of their own and attributes that say which. Each
calls its kernel (onnx2jax/native/calls.py); the kernels must be registered first
(``onnx2jax.native.available()``). :meth:`Model.apply` runs the graph as it is, with XLA's
kernels, and computes the same values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnx

from onnx2jax.core.convert import is_static
from onnx2jax.native import BACKENDS, calls, layouts
from onnx2jax.ops.attention import softmax_attention
from onnx2jax.ops.blockwise_quant import matmul_nbits
from onnx2jax.ops.nn import conv_geometry
from onnx2jax.ops.registry import ONNX2JAX, register

# How the kernels compute: float32 products, accumulated in float32 (Model.precision).
PRECISION = "float32"


def _check_precision(ctx) -> None:
    precision = ctx.attr("precision", PRECISION)
    if precision != PRECISION:
        raise ctx.error(
            f"precision={precision!r}: the native kernels compute {PRECISION} products only"
        )


def _check_float32(ctx, what, value) -> None:
    if getattr(value, "dtype", None) != np.float32:
        raise ctx.error(f"the native kernel takes float32 {what}, got {np.asarray(value).dtype}")


@register("NativeConv", since=1, domain=ONNX2JAX)
def native_conv(ctx, x, weights, b=None, residual=None):
    """``Conv(x, w, b)``, then ``+ residual`` and a ReLU if asked (``relu=1``), by the native
    convolution kernel of the ``backend`` attribute ("native": the hand-written kernels, of
    one group; "onednn": oneDNN's, from "hwio" weights). ``weights`` are the Conv's weights in
    the layout of the ``layout`` attribute (onnx2jax.native.layouts.CONV_LAYOUTS); the Conv's
    own attributes (pads, strides, dilations, group) say the rest. A residual that the kernel
    cannot add in its registers (one that does not broadcast to the output) is added after
    it."""
    layout = ctx.attr("layout")
    if layout not in layouts.CONV_LAYOUTS:
        raise ctx.error(f"layout={layout!r} is not one of {', '.join(layouts.CONV_LAYOUTS)}")
    backend = ctx.attr("backend", "native")
    if backend not in BACKENDS or (backend == "onednn" and layout != "hwio"):
        raise ctx.error(f"backend={backend!r} with layout={layout!r}: no such kernel")
    group = int(ctx.attr("group", 1))
    if group != 1 and backend != "onednn":
        raise ctx.error(f"group={group}: the hand-written kernels compute one group only")
    _check_float32(ctx, "inputs", x)
    if np.ndim(x) != 4:
        raise ctx.error(f"the native kernel computes 2-D convolutions, got input {np.shape(x)}")
    w_shape = layouts.conv_shape(np.shape(weights), layout)
    strides, padding, dilations = conv_geometry(ctx, np.shape(x), w_shape)
    relu = bool(ctx.attr("relu", 0))
    shape = calls.conv2d_shape(np.shape(x), w_shape, strides, padding, dilations)
    fused = calls.addend_applies(residual, shape)
    y = calls.conv2d(
        jnp.asarray(x),
        weights,
        layout,
        b,
        strides,
        padding,
        dilations,
        residual=residual if fused else None,
        relu=relu and fused,
        backend=backend,
        groups=group,
    )
    if fused:
        return y
    y = y + residual
    return jax.nn.relu(y) if relu else y


@register("NativeMatMul", since=1, domain=ONNX2JAX)
def native_matmul(ctx, a, weights, c=None):
    """``a @ b`` (MatMul), or ``a @ b + beta * c`` (Gemm without transposes or alpha), by the
    native kernel, for a weight matrix ``b`` [K, N] given as ``weights`` in the layout of the
    ``layout`` attribute (onnx2jax.native.layouts.MATRIX_LAYOUTS) with ``columns`` N. A bias
    of one row is added in the kernel, any other ``c`` after it."""
    _check_precision(ctx)
    layout, columns = ctx.attr("layout"), int(ctx.attr("columns", 0))
    if layout not in layouts.MATRIX_LAYOUTS:
        raise ctx.error(f"layout={layout!r} is not one of {', '.join(layouts.MATRIX_LAYOUTS)}")
    _check_float32(ctx, "inputs", a)
    depth = np.shape(weights)[3] if layout == "blocked_matrix" else np.shape(weights)[0]
    if np.ndim(a) == 0 or np.shape(a)[-1] != depth:
        raise ctx.error(f"cannot multiply {np.shape(a)} by a matrix of {depth} rows")
    vector = np.ndim(a) == 1  # MatMul of a vector: one row
    beta = float(ctx.attr("beta", 1.0))
    row_bias = (
        c is not None
        and beta == 1.0
        and getattr(c, "dtype", None) == np.float32
        and np.shape(c) in ((columns,), (1, columns))
    )
    y = calls.matmul(
        jnp.reshape(a, (1, -1)) if vector else a,
        weights,
        layout,
        columns,
        jnp.reshape(c, (-1,)) if row_bias else None,
    )
    if vector:
        y = jnp.reshape(y, (columns,))
    if c is not None and beta != 0.0 and not row_bias:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@register("NativeAttention", since=1, domain=ONNX2JAX)
def native_attention(ctx, q, kt, v, mask=None, scale=None):
    """SoftmaxAttention (ops/attention.py, the same inputs and attributes) by the native
    attention kernel. The kernel takes float32 operands of 3 or 4 dimensions with no
    broadcasting between them, values a multiple of the vector width wide, and a scalar scale
    (onnx2jax.native.calls.attention_applies); what the rewrite cannot see before the trace
    (the shapes) may not fit, and then the node runs as SoftmaxAttention's ops."""
    _check_precision(ctx)
    divide, to = ctx.attr("divide", 0), ctx.attr("cast_to", 0)
    factor = 1.0 if scale is None else (1.0 / scale if divide else scale)
    if (
        to in (0, onnx.TensorProto.FLOAT)
        and not all(is_static(x) for x in (q, kt, v))
        and calls.attention_applies(q, kt, v, mask, factor)
    ):
        return calls.attention(q, kt, v, mask, factor)
    return softmax_attention(ctx, q, kt, v, mask, scale)


@register("NativeMatMulNBits", since=1, domain=ONNX2JAX, weight_inputs=(1, 2, 3, 4))
def native_matmul_nbits(ctx, a, b, scales, zero_points=None, g_idx=None, bias=None):
    """com.microsoft MatMulNBits (ops/blockwise_quant.py, the same inputs and attributes) by
    the native 4-bit kernel, which reads the packed weight as stored. The kernel takes float32
    A of at most 16 rows and 4-bit weights in blocks of at most 128 with float scales and
    packed uint8 zero points or none; what the rewrite cannot see before the trace (A's shape
    and type) may not fit, and then the node runs as MatMulNBits' XLA path. Its gradients are
    XLA's."""
    if int(ctx.attr("bits", 4)) != 4 or g_idx is not None:
        raise ctx.error("the native kernel computes 4-bit weights without g_idx only")
    return matmul_nbits(ctx, a, b, scales, zero_points, g_idx, bias, native_kernel=True)
