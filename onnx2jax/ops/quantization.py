"""QuantizeLinear, DequantizeLinear and the integer and QLinear ops.

Narrow types (int4, int2, float8, float4e2m1) are the ml_dtypes dtypes JAX understands, so
quantized tensors keep their ONNX type. Rounding is half-to-even everywhere, as ONNX says.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from onnx import TensorProto

from onnx2jax.core.convert import is_static
from onnx2jax.core.dtypes import numpy_dtype, onnx_elem_type
from onnx2jax.ops.elementwise import divide_correctly_rounded
from onnx2jax.ops.registry import register

_INTEGER_TYPES = {
    TensorProto.UINT8,
    TensorProto.INT8,
    TensorProto.UINT16,
    TensorProto.INT16,
    TensorProto.UINT4,
    TensorProto.INT4,
    TensorProto.UINT2,
    TensorProto.INT2,
}
_FLOAT8_TYPES = {
    TensorProto.FLOAT8E4M3FN,
    TensorProto.FLOAT8E4M3FNUZ,
    TensorProto.FLOAT8E5M2,
    TensorProto.FLOAT8E5M2FNUZ,
}
# No infinity encoding: a cast to these saturates whatever ``saturate`` says.
_SMALL_FLOAT_TYPES = {TensorProto.FLOAT4E2M1, TensorProto.FLOAT6E2M3, TensorProto.FLOAT6E3M2}
# ml_dtypes knows these but XLA does not, so they only work on static values.
_HOST_ONLY_TYPES = {TensorProto.FLOAT6E2M3, TensorProto.FLOAT6E3M2}


def integer_range(dtype: np.dtype) -> tuple[int, int]:
    """The smallest and largest value of integer ``dtype`` (narrow ml_dtypes types included).

    Example:
        >>> integer_range(np.dtype(np.int8))
        (-128, 127)
    """
    info = ml_dtypes.iinfo(dtype)
    return int(info.min), int(info.max)


def _quant_param(ctx, xp, value, x_shape, axis, block_size):
    """Reshape a scale or zero point so it broadcasts against ``x`` (per tensor/axis/block)."""
    if value.ndim == 0:
        return value
    if value.size == 1 and not block_size:
        return value.reshape(())
    if not block_size:
        if value.ndim != 1:
            raise ctx.error(
                f"a per-axis scale or zero point must be 1-D, got shape "
                f"{value.shape} (blocked quantization needs block_size)"
            )
        if value.shape[0] != x_shape[axis]:
            raise ctx.error(
                f"per-axis scale has {value.shape[0]} values but the input has "
                f"{x_shape[axis]} along axis {axis}"
            )
        dims = [1] * len(x_shape)
        dims[axis] = value.shape[0]
        return value.reshape(dims)
    if block_size < 0:
        raise ctx.error(f"block_size must be positive, got {block_size}")
    if value.ndim != len(x_shape):
        raise ctx.error(
            f"blocked scale must have the input's rank {len(x_shape)}, got shape {value.shape}"
        )
    expected = list(x_shape)
    expected[axis] = math.ceil(x_shape[axis] / block_size)
    if list(value.shape) != expected:
        raise ctx.error(
            f"blocked scale of shape {value.shape} does not match input "
            f"{tuple(x_shape)} with block_size {block_size} on axis {axis}"
        )
    value = xp.repeat(value, block_size, axis=axis)
    return xp.take(value, xp.arange(x_shape[axis]), axis=axis)


def _check_host_only(ctx, xp, elem_type):
    if elem_type in _HOST_ONLY_TYPES and xp is not np:
        raise ctx.error(
            f"{numpy_dtype(elem_type).name} tensors are not supported by XLA; "
            "only constant (static) values of this type can be (de)quantized"
        )


def _saturate_to(xp, y, elem_type, saturate):
    """Round/clip float ``y`` into ONNX type ``elem_type`` the way QuantizeLinear does."""
    dtype = numpy_dtype(elem_type)
    if elem_type in _INTEGER_TYPES:
        low, high = integer_range(dtype)
        # NaN becomes the type's minimum, as in onnxruntime (its clamp keeps the bound).
        y = xp.where(xp.isnan(y), low, xp.clip(xp.round(y), low, high))
        return y.astype(dtype)
    if elem_type in _FLOAT8_TYPES and saturate or elem_type in _SMALL_FLOAT_TYPES:
        # Clip finite overflow to the largest value; NaN stays NaN.
        largest = float(ml_dtypes.finfo(dtype).max)
        return xp.clip(y, -largest, largest).astype(dtype)
    return y.astype(dtype)


@register("QuantizeLinear", since=(10, 13, 19, 21, 23, 24, 25, 28))
def quantize_linear(ctx, x, scale, zero_point=None):
    xp = ctx.xp(x, scale, zero_point)
    axis = ctx.attr("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    block_size = ctx.attr("block_size", 0)
    output_dtype = ctx.attr("output_dtype", 0)
    if zero_point is not None:
        elem_type = onnx_elem_type(zero_point.dtype)
        if output_dtype and output_dtype != elem_type:
            raise ctx.error(
                f"output_dtype {output_dtype} differs from the zero point's type {elem_type}"
            )
    else:
        elem_type = output_dtype or TensorProto.UINT8
    if elem_type not in _INTEGER_TYPES | _FLOAT8_TYPES | _SMALL_FLOAT_TYPES:
        raise ctx.error(f"cannot quantize to {numpy_dtype(elem_type).name}")
    _check_host_only(ctx, xp, elem_type)
    precision = ctx.attr("precision", 0)
    # ``precision`` sets the division's type; without it onnxruntime divides 16-bit floats in
    # float32 (the spec would use the scale's type, whose rounding moves values a step).
    if precision:
        compute = numpy_dtype(precision)
    elif np.issubdtype(x.dtype, np.integer):
        compute = jnp.promote_types(scale.dtype, np.float32)
    else:
        compute = jnp.promote_types(jnp.promote_types(x.dtype, scale.dtype), np.float32)
    scale = _quant_param(ctx, xp, scale, x.shape, axis, block_size)
    y = divide_correctly_rounded(x.astype(compute), scale.astype(compute))
    if zero_point is not None and elem_type not in _FLOAT8_TYPES:
        zero_point = _quant_param(ctx, xp, zero_point, x.shape, axis, block_size)
        if elem_type in _INTEGER_TYPES:
            y = xp.round(y)
        y = y + zero_point.astype(compute)
    return _saturate_to(xp, y, elem_type, ctx.attr("saturate", 1))


@register("DequantizeLinear", since=(10, 13, 19, 21, 23, 24, 25, 28), weight_inputs=(0, 2))
def dequantize_linear(ctx, x, scale, zero_point=None):
    xp = ctx.xp(x, scale, zero_point)
    _check_host_only(ctx, xp, onnx_elem_type(x.dtype))
    axis = ctx.attr("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    block_size = ctx.attr("block_size", 0)
    output_dtype = ctx.attr("output_dtype", 0)
    out_dtype = numpy_dtype(output_dtype) if output_dtype else scale.dtype
    compute = (
        np.promote_types(np.float32, out_dtype) if out_dtype.itemsize > 4 else np.dtype(np.float32)
    )
    y = x.astype(compute)
    if zero_point is not None:
        zero_point = _quant_param(ctx, xp, zero_point, x.shape, axis, block_size)
        y = y - zero_point.astype(compute)
    scale = _quant_param(ctx, xp, scale, x.shape, axis, block_size)
    return (y * scale.astype(compute)).astype(out_dtype)


@register("DynamicQuantizeLinear", since=11)
def dynamic_quantize_linear(ctx, x):
    xp = ctx.xp(x)
    y, scale, zero_point = dynamic_quantize_uint8(xp, x)
    return y, scale.astype(x.dtype), zero_point


def dynamic_quantize_uint8(xp, x):
    """uint8 ``(y, scale, zero_point)`` of ``x`` as onnxruntime's DynamicQuantizeLinear.

    NaN is left out of the range; an all-zero (or empty) input gets scale 1, not the spec's 0
    or the reference evaluator's 1/255, because onnxruntime's kernel says so.
    """
    low, high = 0.0, 255.0
    x = x.astype(np.float32)
    if x.size:
        x_max = xp.maximum(xp.nanmax(x), np.float32(0))
        x_min = xp.minimum(xp.nanmin(x), np.float32(0))
    else:
        x_max = x_min = np.float32(0)
    span = x_max - x_min
    scale = xp.where(
        span == 0, np.float32(1), divide_correctly_rounded(span, np.float32(high - low))
    ).astype(np.float32)
    zero_point = xp.round(xp.clip(low - divide_correctly_rounded(x_min, scale), low, high))
    y = xp.round(divide_correctly_rounded(x, scale)) + zero_point
    y = xp.where(xp.isnan(y), low, xp.clip(y, low, high))
    return y.astype(np.uint8), scale, zero_point.astype(np.uint8)


def as_int32(
    xp: ModuleType, value: Any, zero_point: Any, zero_point_shape: tuple[int, ...] | None = None
) -> Any:
    """``value - zero_point`` in int32; ``zero_point_shape`` reshapes a per-row/channel zp.

    Example:
        >>> as_int32(np, np.array([0, 255], np.uint8), np.uint8(128)).tolist()
        [-128, 127]
    """
    out = value.astype(np.int32)
    if zero_point is None:
        return out
    zero_point = zero_point.astype(np.int32)
    if zero_point_shape is not None and zero_point.ndim == 1 and zero_point.size > 1:
        zero_point = zero_point.reshape(zero_point_shape)
    return out - zero_point


def int_matmul(xp: ModuleType, a: Any, b: Any) -> Any:
    """The exact int32 matrix product of int32 ``a`` and ``b``.

    Example:
        >>> int_matmul(np, np.array([[2, 3]], np.int32), np.array([[4], [5]], np.int32)).tolist()
        [[23]]
    """
    if xp is np:
        return np.matmul(a, b).astype(np.int32)
    return jnp.matmul(a, b, preferred_element_type=jnp.int32)


# Every integer of magnitude up to 2**24 is a float32 value.
_FLOAT32_EXACT = 1 << 24


def _centered(dtype: np.dtype) -> tuple[int, int]:
    """A static offset that centers integer ``dtype``'s range, and the largest |value - offset|."""
    low, high = integer_range(dtype)
    offset = (low + high + 1) // 2 if low >= 0 else 0
    return offset, max(offset - low, high - offset)


def _float_exact_chunk(a_dtype: np.dtype, b_dtype: np.dtype) -> int:
    """How many products of centered ``a`` and ``b`` values float32 sums exactly (0: none)."""
    if np.dtype(a_dtype).kind not in "iu" or np.dtype(b_dtype).kind not in "iu":
        return 0
    return _FLOAT32_EXACT // (_centered(a_dtype)[1] * _centered(b_dtype)[1])


def _shifted_zero_point(zero_point: Any, offset: int, shape: tuple[int, ...] | None) -> Any:
    """``zero_point - offset`` in int32 (a 1-D one reshaped to ``shape``); None when it is 0."""
    if zero_point is None:
        return None if offset == 0 else np.int32(-offset)
    if is_static(zero_point) and np.all(np.asarray(zero_point).astype(np.int64) == offset):
        return None
    value = jnp.asarray(zero_point).astype(jnp.int32) - offset
    if shape is not None and value.ndim == 1 and value.size > 1:
        value = value.reshape(shape)
    return value


def integer_matmul(
    xp: ModuleType, a: Any, b: Any, a_zero_point: Any = None, b_zero_point: Any = None
) -> Any:
    """``(a - a_zero_point) @ (b - b_zero_point)`` in int32, exact, as float32 matrix products.

    ``a_zero_point`` may be per row of ``a`` (1-D), ``b_zero_point`` per column of ``b``.
    XLA:CPU runs integer dots several times slower than float32 ones (benchmarks/LOG.md).

    Why it is exact: each operand is centered by a static offset (128 for uint8, 0 for int8),
    so each product is an integer of magnitude at most p (128 * 128 = 2**14 for 8-bit types).
    The contraction is split into chunks of at most 2**24 // p products (1024). Any partial sum
    a float32 dot forms, in whatever order or blocking, adds a subset of one chunk's products:
    an integer of magnitude at most 2**24, which float32 holds exactly, so no addition rounds
    and each chunk's result is the exact integer (``Precision.HIGHEST`` keeps backends from
    rounding the operands, which are small integers and exact too). The chunks are summed and
    the zero points applied in int32, wrapping as an int32 accumulator does:
    ``(A' - za')(B' - zb') = A'B' - zb' * rowsum(A') - za' * colsum(B') + K * za' * zb'``.
    Types too wide for that (int16: p = 2**30) take XLA's int32 dot.

    Example:
        >>> a = np.array([[0, 255]], np.uint8)
        >>> b = np.array([[-128], [127]], np.int8)
        >>> integer_matmul(jnp, a, b, np.uint8(128)).tolist()
        [[32513]]
    """
    chunk = _float_exact_chunk(a.dtype, b.dtype)
    if xp is np or not chunk:
        a32 = as_int32(xp, a, a_zero_point, (-1, 1))
        b32 = as_int32(xp, b, b_zero_point)
        return int_matmul(xp, a32, b32)
    a = jnp.asarray(a)
    vector_a, vector_b = a.ndim == 1, b.ndim == 1
    if vector_a:
        a = a[None, :]
    if vector_b:
        b = b[:, None]
    (a_offset, _), (b_offset, _) = _centered(a.dtype), _centered(b.dtype)
    a_centered = a.astype(jnp.float32) - np.float32(a_offset)
    # A constant weight (the usual case) is centered here once, not by XLA's constant folding.
    b_xp = np if is_static(b) else jnp
    b_centered = b.astype(np.float32) - np.float32(b_offset)
    depth = a.shape[-1]
    acc = None
    pieces = max(1, -(-depth // chunk))
    step = max(1, -(-depth // pieces))
    # One product at least, so that an empty contraction gives zeros of the right shape.
    for start in range(0, max(depth, 1), step):
        part = jnp.matmul(
            a_centered[..., start : start + step],
            b_centered[..., start : start + step, :],
            precision=lax.Precision.HIGHEST,
        ).astype(jnp.int32)
        acc = part if acc is None else acc + part
    za = _shifted_zero_point(a_zero_point, a_offset, (-1, 1))
    zb = _shifted_zero_point(b_zero_point, b_offset, None)
    if zb is not None:
        row_sums = jnp.sum(a.astype(jnp.int32) - a_offset, axis=-1, keepdims=True, dtype=jnp.int32)
        acc = acc - zb * row_sums
    if za is not None:
        column_sums = b_xp.sum(
            b.astype(np.int32) - np.int32(b_offset), axis=-2, keepdims=True, dtype=np.int32
        )
        acc = acc - za * column_sums
    if za is not None and zb is not None:
        acc = acc + np.int32(depth) * za * zb
    if vector_b:
        acc = acc[..., 0]
    if vector_a:
        acc = acc[..., 0, :] if not vector_b else acc[..., 0]
    return acc


@register("MatMulInteger", since=10)
def matmul_integer(ctx, a, b, a_zero_point=None, b_zero_point=None):
    xp = ctx.xp(a, b, a_zero_point, b_zero_point)
    # A 1-D a_zero_point is per row of A; a 1-D b_zero_point per column of B.
    return integer_matmul(xp, a, b, a_zero_point, b_zero_point)


def requantize(
    xp: ModuleType, acc: Any, multiplier: Any, zero_point: Any, out_dtype: np.dtype
) -> Any:
    """Scale an int32 accumulator into ``out_dtype`` (round half to even, saturate).

    Example:
        >>> acc = np.array([5, 1000], np.int32)
        >>> requantize(np, acc, np.float32(0.5), np.uint8(10), np.dtype(np.uint8)).tolist()
        [12, 255]
    """
    compute = np.promote_types(np.float32, multiplier.dtype)
    y = xp.round(acc.astype(compute) * multiplier.astype(compute))
    if zero_point is not None:
        y = y + zero_point.astype(compute)
    low, high = integer_range(out_dtype)
    return xp.clip(y, low, high).astype(out_dtype)


def per_axis(value: Any, ndim: int, axis: int) -> Any:
    """A 1-D per-row/column/channel scale reshaped to broadcast along ``axis`` of the result.

    Example:
        >>> per_axis(np.ones(3, np.float32), 4, 1).shape
        (1, 3, 1, 1)
    """
    if value.ndim != 1 or value.size == 1:
        return value
    dims = [1] * ndim
    dims[axis] = value.shape[0]
    return value.reshape(dims)


@register("QLinearMatMul", since=(10, 21))
def qlinear_matmul(ctx, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
    xp = ctx.xp(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point)
    out_dtype = y_zero_point.dtype if y_zero_point is not None else a.dtype
    if out_dtype.kind not in "iu":
        raise ctx.error(
            f"QLinearMatMul to {out_dtype.name} is not supported (integer outputs only)"
        )
    acc = integer_matmul(xp, a, b, a_zero_point, b_zero_point)
    nd = acc.ndim
    a_scale = per_axis(a_scale, nd, nd - 2)
    b_scale = per_axis(b_scale, nd, nd - 1)
    multiplier = divide_correctly_rounded(a_scale * b_scale, y_scale)
    return requantize(xp, acc, multiplier, y_zero_point, out_dtype)


def _conv_padding(ctx, x_shape, kernel, strides, dilations):
    spatial = len(kernel)
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        pads = list(ctx.attr("pads", [0] * 2 * spatial))
        return list(zip(pads[:spatial], pads[spatial:], strict=True))
    if auto_pad == "VALID":
        return [(0, 0)] * spatial
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ctx.error(f"unknown auto_pad {auto_pad!r}")
    padding = []
    for size, k, s, d in zip(x_shape[2:], kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small = total // 2
        padding.append(
            (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
        )
    return padding


def _int_conv(ctx, x32, w32):
    """The convolution of ConvInteger/QLinearConv on zero-point-shifted int32 tensors."""
    if x32.ndim < 3:
        raise ctx.error(f"the input must have at least 3 dims (N, C, ...), got {x32.shape}")
    spatial = x32.ndim - 2
    kernel = list(w32.shape[2:])
    declared = ctx.attr("kernel_shape")
    if declared is not None and list(declared) != kernel:
        raise ctx.error(f"kernel_shape {list(declared)} does not match the weights' {kernel}")
    strides = list(ctx.attr("strides", [1] * spatial))
    dilations = list(ctx.attr("dilations", [1] * spatial))
    padding = _conv_padding(ctx, x32.shape, kernel, strides, dilations)
    return lax.conv_general_dilated(
        jnp.asarray(x32),
        jnp.asarray(w32),
        strides,
        padding,
        rhs_dilation=dilations,
        feature_group_count=ctx.attr("group", 1),
        preferred_element_type=jnp.int32,
    )


@register("ConvInteger", since=10)
def conv_integer(ctx, x, w, x_zero_point=None, w_zero_point=None):
    xp = ctx.xp(x, w, x_zero_point, w_zero_point)
    x32 = as_int32(xp, x, x_zero_point)
    w32 = as_int32(xp, w, w_zero_point, (-1,) + (1,) * (w.ndim - 1))
    return _int_conv(ctx, x32, w32)


@register("QLinearConv", since=10)
def qlinear_conv(
    ctx, x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, bias=None
):
    xp = ctx.xp(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, bias)
    out_dtype = y_zero_point.dtype if y_zero_point is not None else x.dtype
    x32 = as_int32(xp, x, x_zero_point)
    w32 = as_int32(xp, w, w_zero_point, (-1,) + (1,) * (w.ndim - 1))
    acc = _int_conv(ctx, x32, w32)
    if bias is not None:
        acc = acc + jnp.asarray(bias, jnp.int32).reshape((-1,) + (1,) * (acc.ndim - 2))
    w_scale = per_axis(w_scale, acc.ndim, 1)
    multiplier = divide_correctly_rounded(x_scale * w_scale, y_scale)
    return requantize(jnp, acc, multiplier, y_zero_point, out_dtype)
