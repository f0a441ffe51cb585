"""The com.microsoft block-quantized weight ops of onnxruntime-genai's model builder and
onnxruntime's weight-only quantizers: MatMulNBits and GatherBlockQuantized.

The packed weights are read as they are stored (uint8 bytes holding 2, 4 or 8 bit values, low
bits first) and dequantized inside the traced program, ``(q - zero_point) * scale`` per block,
so a model holds its weights at the size its file gives them, never as float constants.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from onnx2jax.native import calls
from onnx2jax.ops.registry import MS, register

_PACKED_BITS = (2, 4, 8)


def unpack_low_first(packed: Any, bits: int) -> jax.Array:
    """uint8 ``packed`` [..., n] as [..., n * 8 // bits] unsigned ``bits``-bit values, each byte's
    lowest bits first (onnxruntime's packing of MatMulNBits and GatherBlockQuantized), in int32.

    Example:
        >>> import numpy as np
        >>> unpack_low_first(np.array([[0x21, 0x43]], np.uint8), 4).tolist()
        [[1, 2, 3, 4]]
    """
    values = jnp.asarray(packed).astype(jnp.int32)
    if bits == 8:
        return values
    per_byte = 8 // bits
    shifts = jnp.arange(per_byte, dtype=jnp.int32) * bits
    parts = (values[..., None] >> shifts) & ((1 << bits) - 1)
    return parts.reshape(values.shape[:-1] + (values.shape[-1] * per_byte,))


def pack_low_first(values: np.ndarray, bits: int) -> np.ndarray:
    """``bits``-bit unsigned ``values`` [..., m] packed into uint8 [..., m * bits / 8], each
    byte's lowest bits first (the inverse of :func:`unpack_low_first`), in NumPy: how weights are
    written back in this format.

    Example:
        >>> pack_low_first(np.array([[1, 2, 3, 4]]), 4).tolist()
        [[33, 67]]
    """
    per_byte = 8 // bits
    parts = np.asarray(values, np.uint32).reshape(*values.shape[:-1], -1, per_byte)
    shifts = np.arange(per_byte, dtype=np.uint32) * bits
    return (parts << shifts).sum(-1).astype(np.uint8)


def _barrier(packed):
    """The packed bytes behind an optimization barrier: a static weight is an XLA constant, and
    XLA would otherwise fold its unpacking into a float constant several times its size."""
    return lax.optimization_barrier(jnp.asarray(packed))


def _block_zero_points(ctx, zero_points, n, blocks, bits, dtype):
    """MatMulNBits' zero points as [N, blocks] in ``dtype``: packed uint8 (``bits`` per value,
    rows padded to whole bytes), unpacked floats, or the default 2^(bits - 1)."""
    if zero_points is None:
        return jnp.full((n, blocks), 2 ** (bits - 1), dtype)
    if np.dtype(zero_points.dtype) == np.uint8:
        per_row = -(-blocks * bits // 8)
        if zero_points.size != n * per_row:
            raise ctx.error(
                f"packed uint8 zero_points of shape {tuple(zero_points.shape)} do not hold "
                f"[N={n}, ceil({blocks} blocks * {bits} bits / 8) = {per_row}] bytes"
            )
        unpacked = unpack_low_first(jnp.reshape(jnp.asarray(zero_points), (n, per_row)), bits)
        return unpacked[:, :blocks].astype(dtype)
    if zero_points.size != n * blocks:
        raise ctx.error(
            f"float zero_points of shape {tuple(zero_points.shape)} are not [N={n}, "
            f"blocks={blocks}]"
        )
    return jnp.reshape(jnp.asarray(zero_points), (n, blocks)).astype(dtype)


def dequantize_nbits(
    ctx: Any,
    packed: Any,
    scales: Any,
    zero_points: Any,
    g_idx: Any,
    n: int,
    k: int,
    bits: int,
    block: int,
) -> jax.Array:
    """The [N, K] float weight of MatMulNBits' packed ``B`` [N, blocks, block * bits / 8].

    Example:
        >>> import numpy as np
        >>> from types import SimpleNamespace
        >>> ctx = SimpleNamespace(error=ValueError)
        >>> packed = np.full((1, 1, 8), 0x98, np.uint8)  # 16 4-bit values, 8 then 9
        >>> scales = np.array([[0.5]], np.float32)
        >>> w = dequantize_nbits(ctx, packed, scales, None, None, 1, 16, 4, 16)
        >>> w[0, :4].tolist()  # (q - 8) * 0.5
        [0.0, 0.5, 0.0, 0.5]
    """
    blocks = -(-k // block)
    blob = block * bits // 8
    if packed.size != n * blocks * blob:
        raise ctx.error(
            f"B of shape {tuple(packed.shape)} is not [N={n}, blocks={blocks}, "
            f"blob={blob}] for K={k}, block_size={block}, bits={bits}"
        )
    if scales.size != n * blocks:
        raise ctx.error(f"scales of shape {tuple(scales.shape)} are not [N={n}, blocks={blocks}]")
    compute = jnp.promote_types(jnp.asarray(scales).dtype, jnp.float32)
    q = unpack_low_first(jnp.reshape(_barrier(packed), (n, blocks, blob)), bits)
    scale = jnp.reshape(jnp.asarray(scales), (n, blocks)).astype(compute)
    zero = _block_zero_points(ctx, zero_points, n, blocks, bits, compute)
    if g_idx is not None:
        # Each of the K rows names its block (act-order quantization): per-row scales.
        if np.size(g_idx) != k:
            raise ctx.error(f"g_idx has {np.size(g_idx)} entries, K is {k}")
        group = jnp.reshape(jnp.asarray(g_idx), (k,)).astype(jnp.int32)
        values = jnp.reshape(q, (n, blocks * block))[:, :k].astype(compute)
        return (values - jnp.take(zero, group, axis=1)) * jnp.take(scale, group, axis=1)
    weight = (q.astype(compute) - zero[:, :, None]) * scale[:, :, None]
    return jnp.reshape(weight, (n, blocks * block))[:, :k]


# The most weight values dequantized at once: larger weights are multiplied a slice of rows at
# a time, so the float copy in flight stays small whatever the layer's size.
_CHUNK_VALUES = 1 << 20


def _chunked_product(ctx, a, packed, scales, zero_points, g_idx, n, k, bits, block):
    """``a @ dequantize(packed).T`` with at most about _CHUNK_VALUES weights in float at once.

    A weight larger than that is a ``lax.scan`` over slices of its N rows. The scan reads
    ``a``, so XLA cannot dequantize every layer's weight before the first layer runs (it
    would, the weights depending on constants and params only, holding them all at once).
    XLA:CPU's dots read materialized operands, so every call widens the weight to float; the
    multiply-and-reduce forms that would read the packed bytes in one fused loop measured
    slower still on XLA:CPU's reductions at one and eight rows (issue 24), so the dot stays.
    """
    blocks = -(-k // block)
    rows = max(1, _CHUNK_VALUES // (blocks * block))
    if n <= rows:
        weight = dequantize_nbits(ctx, packed, scales, zero_points, g_idx, n, k, bits, block)
        return jnp.einsum("...k,nk->...n", a, weight, preferred_element_type=a.dtype)
    chunks = -(-n // rows)
    rows = -(-n // chunks)
    padded = chunks * rows

    def sliced(value, per_row):
        """``value``'s N rows, zero-padded to ``padded``, as [chunks, rows, per_row]."""
        value = jnp.reshape(jnp.asarray(value), (n, per_row))
        value = jnp.pad(value, ((0, padded - n), (0, 0)))
        return jnp.reshape(value, (chunks, rows, per_row))

    blob = block * bits // 8
    if packed.size != n * blocks * blob or scales.size != n * blocks:
        raise ctx.error(
            f"B {tuple(packed.shape)} / scales {tuple(scales.shape)} do not fit N={n}, K={k}, "
            f"block_size={block}, bits={bits}"
        )
    xs = {"b": sliced(_barrier(packed), blocks * blob), "scales": sliced(scales, blocks)}
    if zero_points is not None:
        xs["zp"] = sliced(zero_points, zero_points.size // n)

    def step(carry, chunk):
        weight = dequantize_nbits(
            ctx, chunk["b"], chunk["scales"], chunk.get("zp"), g_idx, rows, k, bits, block
        )
        return carry, jnp.einsum("...k,nk->...n", a, weight, preferred_element_type=a.dtype)

    _, out = lax.scan(step, None, xs)
    # [chunks, ..., rows] -> [..., chunks * rows], the padding rows dropped.
    out = jnp.moveaxis(out, 0, -2)
    return jnp.reshape(out, out.shape[:-2] + (padded,))[..., :n]


# The most rows of A the native kernel (kernels/nbits.cc) computes: decode steps; more rows
# make the product compute-bound, where XLA's dot of the widened weight does well.
_NATIVE_ROWS = 16


def _native_applies(a, scales, zero_points, g_idx, bits, block) -> bool:
    """Whether the native 4-bit kernel can compute this MatMulNBits: float32 A of at most
    _NATIVE_ROWS rows, 4 bits, blocks of 16 to 128, float scales, packed uint8 zero points or
    none, no g_idx."""
    rows = int(np.prod(a.shape[:-1]))
    return (
        bits == 4
        and g_idx is None
        and block <= 128
        and a.dtype == jnp.float32
        and 1 <= rows <= _NATIVE_ROWS
        and jnp.issubdtype(np.dtype(scales.dtype), jnp.floating)
        and (zero_points is None or np.dtype(zero_points.dtype) == np.uint8)
    )


def _native_product(ctx, a, packed, scales, zero_points, n, k, block):
    """``a @ dequantize(packed).T`` by the native kernel, ``a`` flattened to [rows, K]; its
    gradients (with respect to ``a`` and ``scales``) are XLA's, of :func:`_chunked_product`."""
    blocks = -(-k // block)
    blob = block // 2
    if packed.size != n * blocks * blob or scales.size != n * blocks:
        raise ctx.error(
            f"B {tuple(packed.shape)} / scales {tuple(scales.shape)} do not fit N={n}, K={k}, "
            f"block_size={block}, bits=4"
        )
    zero_row = -(-blocks // 2)
    if zero_points is not None and zero_points.size != n * zero_row:
        raise ctx.error(
            f"packed uint8 zero_points of shape {tuple(zero_points.shape)} do not hold "
            f"[N={n}, ceil({blocks} blocks * 4 bits / 8) = {zero_row}] bytes"
        )
    packed = jnp.reshape(jnp.asarray(packed), (n, blocks * blob))
    if zero_points is not None:
        zero_points = jnp.reshape(jnp.asarray(zero_points), (n, zero_row))

    def xla(rows, weight, scale, zeros):
        return _chunked_product(ctx, rows, weight, scale, zeros, None, n, k, 4, block)

    @jax.custom_vjp
    def product(rows, weight, scale, zeros):
        return calls.matmul_nbits(rows, weight, scale, zeros, n, block)

    def forward(rows, weight, scale, zeros):
        return product(rows, weight, scale, zeros), (rows, weight, scale, zeros)

    def backward(saved, grad):
        rows, weight, scale, zeros = saved
        _, pullback = jax.vjp(lambda r, s: xla(r, weight, s, zeros), rows, scale)
        grad_rows, grad_scale = pullback(grad)
        return grad_rows, None, grad_scale, None

    product.defvjp(forward, backward)
    scale = jnp.reshape(jnp.asarray(scales), (n, blocks)).astype(jnp.float32)
    out = product(jnp.reshape(a, (-1, k)), packed, scale, zero_points)
    return jnp.reshape(out, a.shape[:-1] + (n,))


@register("MatMulNBits", since=1, domain=MS, weight_inputs=(1, 2, 3, 4))
def matmul_nbits(
    ctx, a, b, scales, zero_points=None, g_idx=None, bias=None, *, native_kernel: bool = False
):
    """``A @ dequantize(B).T + bias``, computed in float32 whatever ``accuracy_level`` asks.

    With ``native_kernel`` (the NativeMatMulNBits node that ``model(...)``'s program holds,
    ops/native_calls.py), float32 A of at most 16 rows (decode) by 4-bit weights is computed by
    the native kernel (native/kernels/nbits.cc), which reads the packed weight as stored; other
    cases, and gradients, by XLA from the dequantized weight.

    ``accuracy_level`` is the *lowest* accuracy the op allows: at 4 onnxruntime's CPU kernel
    rounds A to int8 per block for speed; computing in float32 is within that allowance and does
    not depend on the machine, so results differ from onnxruntime's level-4 path by its own
    activation rounding, and match its level-0 path.
    """
    n, k = ctx.attr("N"), ctx.attr("K")
    bits, block = int(ctx.attr("bits", 4)), ctx.attr("block_size")
    if n is None or k is None or block is None:
        raise ctx.error("needs the K, N and block_size attributes")
    n, k, block = int(n), int(k), int(block)
    if bits not in _PACKED_BITS:
        raise ctx.error(f"bits={bits} is not supported (2, 4 or 8)")
    if block < 16 or block & (block - 1):
        raise ctx.error(f"block_size={block} is not a power of two of at least 16")
    if ctx.attr("weight_prepacked", 0):
        raise ctx.error(
            f"weight_prepacked={ctx.attr('weight_prepacked')} (a CUDA layout) is not supported"
        )
    a = jnp.asarray(a)
    if a.shape[-1] != k:
        raise ctx.error(f"A ends in {a.shape[-1]} features, K is {k}")
    dtype = a.dtype
    compute = jnp.promote_types(dtype, jnp.float32)
    if b.size == 0:
        # An omitted projection: zeros, or the broadcast bias.
        out = jnp.zeros(a.shape[:-1] + (n,), compute)
    elif native_kernel and _native_applies(a, scales, zero_points, g_idx, bits, block):
        out = _native_product(ctx, a, b, scales, zero_points, n, k, block)
    else:
        out = _chunked_product(
            ctx, a.astype(compute), b, scales, zero_points, g_idx, n, k, bits, block
        )
    if bias is not None:
        out = out + jnp.reshape(jnp.asarray(bias), (n,)).astype(compute)
    return out.astype(dtype)


_FLOAT_CODES = {
    np.dtype(ml_dtypes.float8_e4m3fn),
    np.dtype(ml_dtypes.float8_e4m3fnuz),
    np.dtype(ml_dtypes.float8_e5m2),
    np.dtype(ml_dtypes.float8_e5m2fnuz),
    np.dtype(ml_dtypes.float4_e2m1fn),
}


@register("GatherBlockQuantized", since=1, domain=MS, weight_inputs=(0, 2, 3))
def gather_block_quantized(ctx, data, indices, scales, zero_points=None):
    """Gather of block-quantized ``data``, dequantized after the gather (only the rows read are
    ever widened); an out-of-range index gives zeros, as in onnxruntime."""
    data_dtype = np.dtype(data.dtype)
    is_float = data_dtype in _FLOAT_CODES
    bits = int(ctx.attr("bits", 4))
    block = int(ctx.attr("block_size", 128))
    rank = data.ndim
    gather_axis = int(ctx.attr("gather_axis", 0))
    quantize_axis = int(ctx.attr("quantize_axis", 1))
    if not -rank <= gather_axis < rank or not -rank <= quantize_axis < rank:
        raise ctx.error(f"gather_axis/quantize_axis out of range for rank {rank}")
    gather_axis %= rank
    quantize_axis %= rank
    packed = data_dtype == np.uint8 and bits < 8
    if data_dtype == np.uint8:
        if bits not in _PACKED_BITS:
            raise ctx.error(f"bits={bits} is not 2, 4 or 8")
        if gather_axis != 0 or (packed and quantize_axis == gather_axis):
            raise ctx.error(
                "uint8 data needs gather_axis=0 (and, packed below 8 bits, another quantize_axis)"
            )
    elif data_dtype not in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4)) and not is_float:
        raise ctx.error(f"data of type {data_dtype.name} is not int4, uint4, uint8, float8 or fp4")
    if is_float and zero_points is not None:
        raise ctx.error("float8/fp4 data takes no zero_points")
    if (block == 0 and not is_float) or (block and (block < 16 or block & (block - 1))):
        raise ctx.error(f"block_size={block} is not a power of two of at least 16")

    table = _barrier(data) if not is_float else jnp.asarray(data)
    logical = list(data.shape)
    if packed:
        logical[-1] *= 8 // bits
    size = logical[gather_axis]
    index = jnp.asarray(indices).astype(jnp.int32)
    inside = (index >= -size) & (index < size)
    index = jnp.where(index < 0, index + size, index)
    index = jnp.where(inside, index, 0)

    def gathered(value, by):
        return jnp.take(value, by, axis=gather_axis)

    rows = gathered(table, index)
    values = unpack_low_first(rows, bits) if packed else rows.astype(jnp.float32)
    values = values.astype(jnp.float32)
    out_axis = quantize_axis if quantize_axis < gather_axis else quantize_axis + index.ndim - 1
    length = logical[quantize_axis]
    span = block or length
    block_of = index // span if quantize_axis == gather_axis else index

    def per_element(param):
        """A per-block ``param`` gathered like the data and widened to one value per element."""
        param = jnp.asarray(param)
        if param.ndim != rank:
            raise ctx.error(f"scales/zero_points must have rank {rank}, got {param.shape}")
        if param.shape[gather_axis] == 1 and logical[gather_axis] != 1:
            picked = jnp.take(param, jnp.zeros_like(block_of), axis=gather_axis)
        else:
            picked = gathered(param, block_of)
        if quantize_axis != gather_axis:
            picked = jnp.repeat(picked, span, axis=out_axis)
            picked = lax.slice_in_dim(picked, 0, length, axis=out_axis)
        return picked

    expected = list(logical)
    expected[quantize_axis] = -(-length // span)
    scales_shape = list(scales.shape)
    if len(scales_shape) != rank or any(
        s != e and not (is_float and s == 1 and axis != quantize_axis)
        for axis, (s, e) in enumerate(zip(scales_shape, expected, strict=True))
    ):
        raise ctx.error(
            f"scales of shape {tuple(scales_shape)} do not match data {tuple(logical)} "
            f"with block_size {block} on axis {quantize_axis}"
        )
    scale = per_element(scales).astype(jnp.float32)
    if not is_float:
        if zero_points is None:
            zero = np.float32(2 ** (bits - 1) if data_dtype == np.uint8 else 0)
        else:
            zp = _barrier(zero_points)
            if packed:
                zp = unpack_low_first(zp, bits)
                zp = lax.slice_in_dim(zp, 0, expected[-1], axis=rank - 1)
            zero = per_element(zp).astype(jnp.float32)
        values = values - zero
    out = values * scale
    keep = jnp.reshape(inside, (1,) * gather_axis + inside.shape + (1,) * (rank - gather_axis - 1))
    return jnp.where(keep, out, 0).astype(jnp.asarray(scales).dtype)
