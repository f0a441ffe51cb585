"""Cast and CastLike between every ONNX type, float8 and 4-bit types included; BitCast.

A static input is cast in NumPy (ml_dtypes supplies bfloat16, float8, float4, int4 and int2),
so the Casts that exported models put in their shape arithmetic fold at trace time. A traced
input is cast with ``astype``, which XLA lowers to a convert with the same rounding (RNE).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from onnx import TensorProto

from onnx2jax.core.convert import is_static
from onnx2jax.core.dtypes import numpy_dtype, onnx_elem_type
from onnx2jax.ops.registry import register

_FLOAT8 = (
    TensorProto.FLOAT8E4M3FN,
    TensorProto.FLOAT8E4M3FNUZ,
    TensorProto.FLOAT8E5M2,
    TensorProto.FLOAT8E5M2FNUZ,
)
# NumPy knows these through ml_dtypes, XLA does not: only static values can take them.
_HOST_ONLY = (TensorProto.FLOAT6E2M3, TensorProto.FLOAT6E3M2)
# Sub-byte integers: (bits, signed). Out-of-range values wrap, as for every fixed-point target.
_SUB_BYTE = {
    TensorProto.INT4: (4, True),
    TensorProto.UINT4: (4, False),
    TensorProto.INT2: (2, True),
    TensorProto.UINT2: (2, False),
}
_ROUND_MODES = ("up", "down", "nearest")
# Bit widths where NumPy's itemsize (one byte per element) is not the ONNX width.
_NARROW_BITS = {
    TensorProto.INT4: 4,
    TensorProto.UINT4: 4,
    TensorProto.FLOAT4E2M1: 4,
    TensorProto.INT2: 2,
    TensorProto.UINT2: 2,
    TensorProto.FLOAT6E2M3: 6,
    TensorProto.FLOAT6E3M2: 6,
}


@register("Cast", since=(1, 6, 9, 13, 19, 21, 23, 24, 25, 28))
def cast(ctx, x):
    to = ctx.attr("to")
    if isinstance(to, str):  # Cast-1 names the type ("FLOAT")
        try:
            to = TensorProto.DataType.Value(to.upper())
        except ValueError:
            raise ctx.error(f"unknown type name {to!r}") from None
    if to is None or to == TensorProto.UNDEFINED:
        raise ctx.error("Cast needs the 'to' attribute")
    return cast_to_type(ctx, x, int(to))


@register("CastLike", since=(15, 19, 21, 23, 24, 25))
def cast_like(ctx, x, target_type):
    dtype = np.dtype(target_type.dtype)
    to = TensorProto.STRING if dtype.kind == "O" else onnx_elem_type(dtype)
    return cast_to_type(ctx, x, to)


@register("BitCast", since=26)
def bit_cast(ctx, x):
    to = ctx.attr("to")
    if to is None or to == TensorProto.UNDEFINED:
        raise ctx.error("BitCast needs the 'to' attribute")
    source = np.dtype(x.dtype)
    if to == TensorProto.STRING or source.kind == "O":
        raise ctx.error("BitCast does not take strings")
    try:
        dtype = numpy_dtype(to)
    except (KeyError, ValueError, TypeError):
        raise ctx.error(f"unsupported target type {to}") from None
    if not is_static(x):
        if to in _HOST_ONLY:
            raise ctx.error(
                f"XLA has no {dtype.name} type; only a constant input can be bit-cast to it"
            )
        # Checked before the widths: with x64 off a 64-bit input already arrives as 32 bits.
        if jax.dtypes.canonicalize_dtype(dtype) != dtype:
            raise ctx.error(
                f"BitCast to {dtype.name} needs 64-bit types: enable jax x64 "
                "(jax.config.update('jax_enable_x64', True))"
            )
    if _bit_width(source) != _bit_width(dtype):
        raise ctx.error(
            f"BitCast needs types of the same width; {source.name} has "
            f"{_bit_width(source)} bits and {dtype.name} {_bit_width(dtype)}"
        )
    if is_static(x):
        # ml_dtypes keeps sub-byte values in the low bits of a byte, so a view is exact there too.
        return np.asarray(x).view(dtype)
    if source == dtype:
        return x
    # XLA bit-casts neither bool nor complex: bool is the byte 0 or 1, complex two floats, real
    # part first (the low bits, little endian).
    if source == np.bool_:
        x, source = x.astype(np.uint8), np.dtype(np.uint8)
    if source.kind == "c":
        parts = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
        return _bit_cast_to(parts, dtype)
    return _bit_cast_to(x, dtype)


def _bit_cast_to(x, dtype):
    """``x``'s bits as ``dtype`` (for complex: the two halves; for bool: byte != 0)."""
    if dtype == np.bool_:
        return lax.bitcast_convert_type(x, np.uint8) != 0
    if dtype.kind == "c":
        half = np.dtype(f"float{dtype.itemsize * 4}")
        parts = lax.bitcast_convert_type(x, half)
        return lax.complex(parts[..., 0], parts[..., 1])
    return lax.bitcast_convert_type(x, dtype)


def _bit_width(dtype):
    to = onnx_elem_type(dtype)
    return _NARROW_BITS.get(to, dtype.itemsize * 8)


def cast_to_type(ctx, x, to):
    """``x`` cast to the ONNX type ``to``, with the node's saturate and round_mode."""
    saturate = bool(ctx.attr("saturate", 1)) if ctx.opset >= 19 else True
    round_mode = ctx.attr("round_mode", "up")
    if round_mode not in _ROUND_MODES:
        raise ctx.error(f"unsupported round_mode {round_mode!r}")
    if to == TensorProto.STRING:
        return _format_strings(np.asarray(ctx.static(x, 0, "the input of a cast to string")))
    try:
        dtype = numpy_dtype(to)
    except (KeyError, ValueError, TypeError):
        raise ctx.error(f"unsupported target type {to}") from None
    if is_static(x) and np.asarray(x).dtype == object:
        x = _parse_strings(np.asarray(x), dtype)
    xp = ctx.xp(x)
    if xp is not np:
        if to in _HOST_ONLY:
            raise ctx.error(
                f"XLA has no {dtype.name} type; only a constant input can be cast to it"
            )
        dtype = jax.dtypes.canonicalize_dtype(dtype)
    if np.dtype(x.dtype) == dtype:
        return x
    if to == TensorProto.FLOAT8E8M0:
        return _to_float8e8m0(xp, x, saturate, round_mode)
    if to in _SUB_BYTE and np.dtype(x.dtype) != np.bool_:
        x = _wrap_bits(xp, x, *_SUB_BYTE[to])
    if to in _FLOAT8 and saturate and np.dtype(x.dtype) != np.bool_:
        limit = float(ml_dtypes.finfo(dtype).max)
        x = xp.clip(x, -limit, limit)
    return x.astype(dtype)


def _wrap_bits(xp, x, bits, signed):
    """Truncate toward zero, then keep the low ``bits`` bits (two's complement if signed).

    XLA's convert saturates sub-byte integers; ONNX (and ml_dtypes) discard the high bits.
    """
    wide = x.astype(np.int64 if xp is np else jax.dtypes.canonicalize_dtype(np.int64))
    mask, half = (1 << bits) - 1, 1 << (bits - 1)
    return ((wide + half) & mask) - half if signed else wide & mask


def _format_strings(values):
    """Numbers as text, the way NumPy writes them (shortest round-trip form for floats)."""
    if values.dtype == object:
        return values
    if values.dtype.kind == "V":  # ml_dtypes types: NumPy formats them through a wide type
        values = values.astype(
            np.int64 if onnx_elem_type(values.dtype) in _SUB_BYTE else np.float32
        )
    return values.astype(np.str_).astype(object)


def _parse_strings(strings, dtype):
    """Numbers written as text, as int64/uint64 for integer targets and float64 otherwise."""
    texts = [s.decode() if isinstance(s, bytes) else str(s) for s in strings.reshape(-1)]
    if np.issubdtype(dtype, np.integer) or onnx_elem_type(dtype) in _SUB_BYTE:
        # Integers keep all 64 bits; "100.5" still reads as 100, as the spec allows.
        wide = np.uint64 if dtype == np.uint64 else np.int64
        values = np.array([parse_int(t) for t in texts], dtype=wide)
    else:
        values = np.array([float(t) for t in texts], dtype=np.float64)
    return values.reshape(strings.shape)


def parse_int(text):
    try:
        return int(text)
    except ValueError:
        return int(float(text))


def _bitcast(xp, x, dtype):
    return x.view(dtype) if xp is np else lax.bitcast_convert_type(x, dtype)


def _to_float8e8m0(xp, x, saturate, round_mode):
    """E8M0 keeps only a float32's exponent, rounded as the onnx reference does it."""
    bits = _bitcast(xp, xp.asarray(x, dtype=np.float32), np.uint32)
    exponent = (bits >> 23) & 0xFF
    if round_mode == "up":
        round_up = (bits & 0x7FFFFF) != 0
    elif round_mode == "nearest":
        guard, rest = (bits & 0x400000) != 0, (bits & 0x3FFFFF) != 0
        round_up = guard & (rest | (exponent > 0))
    else:
        round_up = xp.zeros_like(exponent, dtype=bool)
    if saturate:
        round_up = round_up & (exponent != 0xFE)
    # NaN and infinity keep the all-ones exponent, which E8M0 reads as NaN.
    code = xp.where(exponent == 0xFF, exponent, exponent + round_up.astype(np.uint32))
    return _bitcast(xp, code.astype(np.uint8), ml_dtypes.float8_e8m0fnu)
