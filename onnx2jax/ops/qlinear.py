"""The com.microsoft quantized ops onnxruntime's quantizer writes (QOperator format and
``quantize_dynamic``), with the arithmetic of onnxruntime's CPU kernels.

Each kernel dequantizes ``(q - zero_point) * scale`` (or accumulates exact int32 sums), computes
in float32, and requantizes as QuantizeLinear does: a correctly rounded division by the output
scale, round half to even, add the zero point, saturate. Where onnxruntime departs from exact
arithmetic on purpose (QLinearSoftmax's exponent table, its floored output scale) we follow it;
where it overflows (QLinearSoftmax's int8 output wraps around) we saturate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from onnx2jax.ops import contrib
from onnx2jax.ops.elementwise import divide_correctly_rounded
from onnx2jax.ops.nn import PoolGeometry, pool_input
from onnx2jax.ops.quantization import (
    as_int32,
    dequantize_linear,
    dynamic_quantize_uint8,
    integer_matmul,
    integer_range,
    matmul_integer,
    per_axis,
    qlinear_conv,
    quantize_linear,
    requantize,
)
from onnx2jax.ops.registry import MS, register
from onnx2jax.ops.rnn import cell_activations, lstm_update, masked_step, reverse_by_length

# onnxruntime's com.microsoft QuantizeLinear/DequantizeLinear (written by the quantizer for 16-bit
# types or with use_qdq_contrib_ops) are the ai.onnx ops with only the ``axis`` attribute.
register("QuantizeLinear", since=1, domain=MS)(quantize_linear)
register("DequantizeLinear", since=1, domain=MS, weight_inputs=(0, 2))(dequantize_linear)
# MatMulInteger16: int16 x int16 -> int32 with no zero points.
register("MatMulInteger16", since=1, domain=MS)(matmul_integer)


def _scalar(value):
    """A per-tensor scale or zero point (shape () or (1,)) as a scalar."""
    return value.reshape(()) if value is not None and np.size(value) == 1 else value


def _out_dtype(zero_point, x):
    """The quantized output type: the output zero point's, else the input's."""
    return np.dtype(zero_point.dtype if zero_point is not None else x.dtype)


def _dequantize(x, scale, zero_point):
    """``(x - zero_point) * scale`` in float32, the value onnxruntime's kernels work on."""
    y = jnp.asarray(x).astype(jnp.float32)
    if zero_point is not None:
        y = y - jnp.asarray(_scalar(zero_point)).astype(jnp.float32)
    return y * jnp.asarray(_scalar(scale)).astype(jnp.float32)


def _saturate(y, dtype):
    """Round a float32 ``y`` (the zero point already added) half to even and saturate."""
    low, high = integer_range(dtype)
    return jnp.where(jnp.isnan(y), low, jnp.clip(jnp.round(y), low, high)).astype(dtype)


def _quantize(y, scale, zero_point, dtype):
    """MlasQuantizeLinear: ``saturate(round(y / scale) + zero_point)``, divided exactly."""
    q = jnp.round(divide_correctly_rounded(y, jnp.asarray(_scalar(scale)).astype(jnp.float32)))
    if zero_point is not None:
        q = q + jnp.asarray(_scalar(zero_point)).astype(jnp.float32)
    return _saturate(q, dtype)


def _check_integer(ctx, dtype):
    if dtype.kind not in "iu" or dtype.itemsize != 1:
        raise ctx.error(f"quantized tensors must be uint8 or int8, got {dtype.name}")


# ------------------------------------------------------------------------- elementwise
@register("QLinearAdd", since=1, domain=MS)
def qlinear_add(
    ctx, a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point=None
):
    """MlasQLinearAdd: ``(sa / sc) * (a - za) + (sb / sc) * (b - zb)``, requantized to c."""
    dtype = _out_dtype(c_zero_point, a)
    _check_integer(ctx, dtype)
    c_scale = jnp.asarray(_scalar(c_scale)).astype(jnp.float32)
    ratio_a = divide_correctly_rounded(jnp.asarray(_scalar(a_scale)).astype(jnp.float32), c_scale)
    ratio_b = divide_correctly_rounded(jnp.asarray(_scalar(b_scale)).astype(jnp.float32), c_scale)
    y = _dequantize(a, ratio_a, a_zero_point) + _dequantize(b, ratio_b, b_zero_point)
    y = jnp.round(y)
    if c_zero_point is not None:
        y = y + jnp.asarray(_scalar(c_zero_point)).astype(jnp.float32)
    return _saturate(y, dtype)


@register("QLinearMul", since=1, domain=MS)
def qlinear_mul(
    ctx, a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point=None
):
    """MlasQLinearMul: ``(a - za) * (b - zb) * (sa * sb / sc)``, requantized to c."""
    dtype = _out_dtype(c_zero_point, a)
    _check_integer(ctx, dtype)
    multiplier = divide_correctly_rounded(
        (jnp.asarray(_scalar(a_scale)) * jnp.asarray(_scalar(b_scale))).astype(jnp.float32),
        jnp.asarray(_scalar(c_scale)).astype(jnp.float32),
    )
    y = _dequantize(a, np.float32(1), a_zero_point) * _dequantize(b, np.float32(1), b_zero_point)
    y = y * multiplier
    y = jnp.round(y)
    if c_zero_point is not None:
        y = y + jnp.asarray(_scalar(c_zero_point)).astype(jnp.float32)
    return _saturate(y, dtype)


def _lookup_op(ctx, function, x, x_scale, x_zero_point, y_scale, y_zero_point):
    """onnxruntime's 256-entry table ops: dequantize, ``function`` in float32, quantize."""
    dtype = _out_dtype(y_zero_point, x)
    _check_integer(ctx, dtype)
    return _quantize(function(_dequantize(x, x_scale, x_zero_point)), y_scale, y_zero_point, dtype)


@register("QLinearSigmoid", since=1, domain=MS)
def qlinear_sigmoid(ctx, x, x_scale, x_zero_point, y_scale, y_zero_point=None):
    return _lookup_op(ctx, jax.nn.sigmoid, x, x_scale, x_zero_point, y_scale, y_zero_point)


@register("QLinearLeakyRelu", since=1, domain=MS)
def qlinear_leaky_relu(ctx, x, x_scale, x_zero_point, y_scale, y_zero_point=None):
    alpha = np.float32(ctx.attr("alpha", 0.01))
    return _lookup_op(
        ctx,
        lambda v: jnp.where(v >= 0, v, v * alpha),
        x,
        x_scale,
        x_zero_point,
        y_scale,
        y_zero_point,
    )


@register("QLinearConcat", since=1, domain=MS)
def qlinear_concat(ctx, y_scale, y_zero_point, *inputs):
    """Concatenate ``(X, X_scale, X_zero_point)`` triples, each requantized to Y's scale."""
    if not inputs or len(inputs) % 3:
        raise ctx.error(
            f"needs (tensor, scale, zero point) triples after Y_scale and "
            f"Y_zero_point, got {len(inputs)} inputs"
        )
    dtype = _out_dtype(y_zero_point, inputs[0])
    _check_integer(ctx, dtype)
    axis = ctx.attr("axis")
    if axis is None:
        raise ctx.error("needs the axis attribute")
    # A part already in Y's scale comes back bit for bit: (q - z) * s / s rounds to q - z.
    parts = [
        _quantize(_dequantize(x, s, z), y_scale, y_zero_point, dtype)
        for x, s, z in zip(inputs[0::3], inputs[1::3], inputs[2::3], strict=True)
    ]
    return jnp.concatenate(parts, axis=axis)


@register("QLinearWhere", since=1, domain=MS)
def qlinear_where(
    ctx, condition, x, x_scale, x_zero_point, y, y_scale, y_zero_point, z_scale, z_zero_point
):
    dtype = _out_dtype(z_zero_point, x)
    _check_integer(ctx, dtype)
    x = _quantize(_dequantize(x, x_scale, x_zero_point), z_scale, z_zero_point, dtype)
    y = _quantize(_dequantize(y, y_scale, y_zero_point), z_scale, z_zero_point, dtype)
    return jnp.where(jnp.asarray(condition), x, y)


# ------------------------------------------------------------------------- softmax
# x_scale static: an initializer stays a constant, so the table is built in double precision.
@register("QLinearSoftmax", since=1, domain=MS, static_inputs=(1,))
def qlinear_softmax(ctx, x, x_scale, x_zero_point, y_scale, y_zero_point):
    """onnxruntime's QLinearSoftmax, which is not the exact softmax of the dequantized input.

    Its exponentials come from a table ``exp((x - max + shift) * x_scale)`` (in double,
    stored as float32, ``shift`` keeping the row's sum in range), summed in float32 in order;
    each output is ``round(e * floor(1 / y_scale) / sum) + y_zero_point``. The input zero point
    cancels. ``opset`` < 13 normalizes over all axes from ``axis`` on (default 1), >= 13 over
    ``axis`` (default -1).
    """
    dtype = _out_dtype(y_zero_point, x)
    _check_integer(ctx, dtype)
    opset = ctx.attr("opset")
    if opset is None:
        raise ctx.error("needs the opset attribute")
    x = jnp.asarray(x)
    axis = ctx.attr("axis", 1 if opset < 13 else -1)
    axis = axis + x.ndim if axis < 0 else axis
    # Rows of the normalized elements in onnxruntime's order: the trailing axes flattened
    # (opset < 13) or ``axis`` moved last (>= 13).
    moved = x if opset < 13 else jnp.moveaxis(x, axis, -1)
    size = int(np.prod(moved.shape[axis:] if opset < 13 else moved.shape[-1:]))
    rows = moved.reshape(-1, size).astype(jnp.int32)
    shift = np.maximum(
        0.0,
        np.log(np.float32(np.finfo(np.float32).max) / np.float32(max(size, 1))).astype(np.float64)
        - 5,
    )
    distance = rows - jnp.max(rows, axis=1, keepdims=True)
    if ctx.xp(x_scale) is np:
        # onnxruntime's table, in double as it builds it, indexed by distance + 255.
        scale = np.float64(np.asarray(x_scale, np.float32).reshape(()))
        table = np.exp((np.arange(-255, 1, dtype=np.float64) + shift / scale) * scale)
        exps = jnp.asarray(table.astype(np.float32))[distance + 255]
    else:
        wide = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
        scale = jnp.asarray(_scalar(x_scale)).astype(wide)
        exps = jnp.exp((distance.astype(wide) + shift / scale) * scale).astype(jnp.float32)
    # onnxruntime adds a row's exponentials one after the other; a tree sum rounds otherwise.
    total, _ = lax.scan(
        lambda acc, column: (acc + column, None), jnp.zeros(exps.shape[:1], jnp.float32), exps.T
    )
    out_scale = jnp.floor(
        divide_correctly_rounded(jnp.float32(1), jnp.asarray(_scalar(y_scale)).astype(jnp.float32))
    )
    y = jnp.round(divide_correctly_rounded(exps * out_scale, total[:, None]))
    y = _saturate(y + jnp.asarray(_scalar(y_zero_point)).astype(jnp.float32), dtype)
    y = y.reshape(moved.shape)
    return y if opset < 13 else jnp.moveaxis(y, -1, axis)


# ------------------------------------------------------------------------- pooling
def _channels_first(ctx, x):
    """NHWC -> NCHW when the node says channels_last, and the permutation back."""
    x = jnp.asarray(x)
    if not ctx.attr("channels_last", 0):
        return x, None
    to_first = (0, x.ndim - 1, *range(1, x.ndim - 1))
    return jnp.transpose(x, to_first), tuple(np.argsort(to_first))


def _global_average(x, x_scale, x_zero_point, y_scale, y_zero_point, dtype):
    """MlasQLinearGlobalAveragePool on NCHW ``x``: the exact int32 sum minus
    ``x_zero_point * count``, times ``x_scale / (y_scale * count)``, rounded, plus
    ``y_zero_point``."""
    count = int(np.prod(x.shape[2:]))
    spatial = tuple(range(2, x.ndim))
    acc = jnp.sum(as_int32(jnp, x, _scalar(x_zero_point)), axis=spatial, keepdims=True)
    denominator = jnp.asarray(_scalar(y_scale)).astype(jnp.float32) * jnp.float32(count)
    multiplier = divide_correctly_rounded(
        jnp.asarray(_scalar(x_scale)).astype(jnp.float32), denominator
    )
    return requantize(jnp, acc, multiplier, _scalar(y_zero_point), dtype)


@register("QLinearGlobalAveragePool", since=1, domain=MS)
def qlinear_global_average_pool(ctx, x, x_scale, x_zero_point, y_scale, y_zero_point):
    dtype = _out_dtype(y_zero_point, x)
    _check_integer(ctx, dtype)
    x, back = _channels_first(ctx, x)
    if x.ndim < 3:
        raise ctx.error(f"needs an input of rank 3 or more, got {x.shape}")
    y = _global_average(x, x_scale, x_zero_point, y_scale, y_zero_point, dtype)
    return y if back is None else jnp.transpose(y, back)


@register("QLinearAveragePool", since=1, domain=MS)
def qlinear_average_pool(ctx, x, x_scale, x_zero_point, y_scale, y_zero_point=None):
    """onnxruntime's QLinearAveragePool: the float average of the dequantized window,
    quantized (``count_include_pad`` and ``ceil_mode`` as AveragePool, no dilations).

    onnxruntime rounds each dequantized value before it adds it to the window's sum; XLA:CPU
    fuses the multiply into the sum (fused multiply-adds), so a value within an ulp of a half
    step can land one step apart.
    """
    dtype = _out_dtype(y_zero_point, x)
    _check_integer(ctx, dtype)
    x, back = _channels_first(ctx, x)
    x, kernel = pool_input(ctx, x)
    geometry = PoolGeometry(ctx, x.shape[2:], kernel, dilations=False, ceil_mode=True)
    if list(x.shape[2:]) == kernel and not any(geometry.begin + geometry.end):
        # onnxruntime runs a window as large as the unpadded input as a global average pool.
        y = _global_average(x, x_scale, x_zero_point, y_scale, y_zero_point, dtype)
        return y if back is None else jnp.transpose(y, back)
    sums = geometry.pool(_dequantize(x, x_scale, x_zero_point), 0, 0, lax.add)
    counts = np.maximum(geometry.counts(bool(ctx.attr("count_include_pad", 0))), 1)
    y = divide_correctly_rounded(
        divide_correctly_rounded(sums, counts.astype(np.float32)),
        jnp.asarray(_scalar(y_scale)).astype(jnp.float32),
    )
    # onnxruntime adds the zero point before it rounds (in float32), not after.
    if y_zero_point is not None:
        y = y + jnp.asarray(_scalar(y_zero_point)).astype(jnp.float32)
    y = _saturate(y, dtype)
    return y if back is None else jnp.transpose(y, back)


@register("QLinearReduceMean", since=1, domain=MS)
def qlinear_reduce_mean(
    ctx, data, data_scale, data_zero_point, reduced_scale, reduced_zero_point=None
):
    """The mean of the dequantized input over ``axes``, quantized. onnxruntime's CPU provider
    has no kernel for it; this is exact int32 sums, then float32."""
    dtype = _out_dtype(reduced_zero_point, data)
    _check_integer(ctx, dtype)
    axes, keepdims = ctx.attr("axes"), ctx.attr("keepdims")
    if axes is None or keepdims is None:
        raise ctx.error("needs the axes and keepdims attributes")
    data = jnp.asarray(data)
    axes = tuple(sorted({a + data.ndim if a < 0 else a for a in axes}))
    count = int(np.prod([data.shape[a] for a in axes]))
    acc = jnp.sum(as_int32(jnp, data, _scalar(data_zero_point)), axis=axes, keepdims=bool(keepdims))
    mean = divide_correctly_rounded(acc.astype(jnp.float32), jnp.float32(max(count, 1)))
    return _quantize(
        mean * jnp.asarray(_scalar(data_scale)).astype(jnp.float32),
        reduced_scale,
        reduced_zero_point,
        dtype,
    )


# ------------------------------------------------------------------------- conv, gemm, matmul
@register("QLinearConv", since=1, domain=MS)
def qlinear_conv_ms(
    ctx, x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, bias=None
):
    """QLinearConv with an optional channels_last (NHWC) input and output."""
    x, back = _channels_first(ctx, x)
    y = qlinear_conv(
        ctx, x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, bias
    )
    return y if back is None else jnp.transpose(y, back)


@register("QGemm", since=1, domain=MS)
def qgemm(
    ctx, a, a_scale, a_zero_point, b, b_scale, b_zero_point, c=None, y_scale=None, y_zero_point=None
):
    """``alpha * a_scale * b_scale * ((A - za) @ (B - zb) + C)`` with C an int32 bias; float
    output without y_scale, else requantized to y_zero_point's type (b per column allowed)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if ctx.attr("transA", 0):
        a = a.T
    if ctx.attr("transB", 0):
        b = b.T
    acc = integer_matmul(jnp, a, b, _scalar(a_zero_point), b_zero_point)
    if c is not None:
        acc = acc + jnp.asarray(c).astype(jnp.int32)
    scale = (
        jnp.float32(ctx.attr("alpha", 1.0))
        * jnp.asarray(_scalar(a_scale))
        * jnp.asarray(_scalar(b_scale))
    ).astype(jnp.float32)
    if y_scale is None:
        return acc.astype(jnp.float32) * scale
    if y_zero_point is None:
        raise ctx.error("a quantized output needs y_zero_point with y_scale")
    scale = divide_correctly_rounded(scale, jnp.asarray(_scalar(y_scale)).astype(jnp.float32))
    return requantize(jnp, acc, scale, _scalar(y_zero_point), np.dtype(y_zero_point.dtype))


def _matmul_to_float(a, b, a_scale, b_scale, a_zero_point, b_zero_point, bias):
    """``float((A - za) @ (B - zb)) * (a_scale * b_scale) + bias``, b per column allowed."""
    acc = integer_matmul(jnp, jnp.asarray(a), jnp.asarray(b), _scalar(a_zero_point), b_zero_point)
    scale = per_axis(
        jnp.asarray(_scalar(a_scale)) * jnp.asarray(_scalar(b_scale)), acc.ndim, acc.ndim - 1
    )
    y = acc.astype(jnp.float32) * scale.astype(jnp.float32)
    return y if bias is None else y + jnp.asarray(bias).astype(jnp.float32)


@register("MatMulIntegerToFloat", since=1, domain=MS)
def matmul_integer_to_float(
    ctx, a, b, a_scale, b_scale, a_zero_point=None, b_zero_point=None, bias=None
):
    return _matmul_to_float(a, b, a_scale, b_scale, a_zero_point, b_zero_point, bias)


@register("DynamicQuantizeMatMul", since=1, domain=MS)
def dynamic_quantize_matmul(ctx, a, b, b_scale, b_zero_point=None, bias=None):
    """A quantized to uint8 as DynamicQuantizeLinear does, then MatMulIntegerToFloat."""
    a_q, a_scale, a_zero_point = dynamic_quantize_uint8(jnp, jnp.asarray(a))
    return _matmul_to_float(a_q, b, a_scale, b_scale, a_zero_point, b_zero_point, bias)


# ------------------------------------------------------------------------- transformer blocks
def _dequantize_weight(x, scale, zero_point, axis):
    """Dequantize with a per-tensor or a 1-D per-``axis`` scale and zero point."""
    x = jnp.asarray(x)
    scale = per_axis(jnp.asarray(_scalar(scale)), x.ndim, axis)
    if zero_point is not None:
        zero_point = per_axis(jnp.asarray(_scalar(zero_point)), x.ndim, axis)
    y = x.astype(jnp.float32)
    if zero_point is not None:
        y = y - zero_point.astype(jnp.float32)
    return y * scale.astype(jnp.float32)


@register("QAttention", since=1, domain=MS, weight_inputs=(1, 7))
def qattention(
    ctx,
    x,
    weight,
    bias,
    input_scale,
    weight_scale,
    mask_index=None,
    input_zero_point=None,
    weight_zero_point=None,
    past=None,
):
    """com.microsoft Attention on a quantized input and weight (per-column weight scales and
    zero points allowed): the projection of the dequantized tensors, then Attention."""
    x = _dequantize(x, input_scale, input_zero_point)
    weight = _dequantize_weight(weight, weight_scale, weight_zero_point, 1)
    return contrib.attention(ctx, x, weight, bias, mask_index, past)


@register(
    "QEmbedLayerNormalization",
    since=1,
    domain=MS,
    weight_inputs=(2, 3, 4, 5, 6, 13, 14, 15, 16, 17),
)
def qembed_layer_norm(
    ctx,
    input_ids,
    segment_ids,
    word_embedding,
    position_embedding,
    segment_embedding,
    gamma,
    beta,
    mask,
    word_embedding_scale,
    position_embedding_scale,
    segment_embedding_scale,
    gamma_scale,
    beta_scale,
    word_embedding_zero_point,
    position_embedding_zero_point,
    segment_embedding_zero_point=None,
    gamma_zero_point=None,
    beta_zero_point=None,
):
    """EmbedLayerNormalization of the dequantized embedding tables, gamma and beta."""
    if segment_embedding is not None and segment_embedding_scale is None:
        raise ctx.error("segment_embedding needs segment_embedding_scale")
    word = _dequantize(word_embedding, word_embedding_scale, word_embedding_zero_point)
    position = _dequantize(
        position_embedding, position_embedding_scale, position_embedding_zero_point
    )
    segment = (
        None
        if segment_embedding is None
        else _dequantize(segment_embedding, segment_embedding_scale, segment_embedding_zero_point)
    )
    gamma = _dequantize(gamma, gamma_scale, gamma_zero_point)
    beta = _dequantize(beta, beta_scale, beta_zero_point)
    out, mask_index, _ = contrib.embed_layer_norm(
        ctx, input_ids, segment_ids, word, position, segment, gamma, beta, mask
    )
    return out, mask_index


# ------------------------------------------------------------------------- recurrent
def _dynamic_matmul(a, w, w_scale, w_zero_point):
    """onnxruntime's quantized-weight GEMM in its RNNs: all of ``a`` quantized to uint8 as
    DynamicQuantizeLinear does, an int32 product, then float (per column scales allowed)."""
    a_q, a_scale, a_zero_point = dynamic_quantize_uint8(jnp, a)
    return _matmul_to_float(a_q, w, a_scale, w_scale, a_zero_point, w_zero_point, None)


@register("DynamicQuantizeLSTM", since=1, domain=MS)
def dynamic_quantize_lstm(
    ctx,
    x,
    w,
    r,
    b=None,
    sequence_lens=None,
    initial_h=None,
    initial_c=None,
    p=None,
    w_scale=None,
    w_zero_point=None,
    r_scale=None,
    r_zero_point=None,
):
    """LSTM with quantized W [D, input, 4H] and R [D, H, 4H] (transposed from LSTM's, gates
    i, o, f, c), scales and zero points per direction or per direction and column.

    As onnxruntime's kernel: the whole input sequence is quantized once for X @ W, the hidden
    state at every step for h @ R.
    """
    if w_scale is None or w_zero_point is None or r_scale is None or r_zero_point is None:
        raise ctx.error("needs W_scale, W_zero_point, R_scale and R_zero_point")
    x = jnp.asarray(x).astype(jnp.float32)
    if x.ndim != 3 or np.ndim(w) != 3 or np.ndim(r) != 3:
        raise ctx.error(f"X, W and R must have rank 3, got {x.shape}, {np.shape(w)}, {np.shape(r)}")
    seq, batch = x.shape[:2]
    direction = ctx.attr("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise ctx.error(f"unknown direction {direction!r}")
    num_dir = 2 if direction == "bidirectional" else 1
    hidden = ctx.attr("hidden_size", np.shape(r)[1])
    if (
        np.shape(w)[0] != num_dir
        or np.shape(w)[2] != 4 * hidden
        or np.shape(r)[1:] != (hidden, 4 * hidden)
    ):
        raise ctx.error(
            f"W {np.shape(w)} and R {np.shape(r)} must be [{num_dir}, input, "
            f"{4 * hidden}] and [{num_dir}, {hidden}, {4 * hidden}]"
        )
    clip = ctx.attr("clip")
    input_forget = ctx.attr("input_forget", 0)
    acts = cell_activations(ctx, "LSTM", num_dir)

    def state(value, name):
        if value is None:
            return jnp.zeros((num_dir, batch, hidden), jnp.float32)
        value = jnp.asarray(value).astype(jnp.float32)
        if value.shape != (num_dir, batch, hidden):
            raise ctx.error(
                f"{name} has shape {value.shape}, expected [{num_dir}, {batch}, {hidden}]"
            )
        return value

    init_h, init_c = state(initial_h, "initial_h"), state(initial_c, "initial_c")
    mask = None
    if sequence_lens is not None:
        lens = jnp.asarray(sequence_lens)
        mask = (jnp.arange(seq)[:, None] < lens[None, :])[:, :, None]

    def per_direction(value, d):
        value = jnp.asarray(value)
        return value[d] if value.ndim and value.shape[0] == num_dir else value

    def pre(v):
        return v if clip is None else jnp.clip(v, -clip, clip)

    ys, hs, cs = [], [], []
    for d in range(num_dir):
        reverse = direction == "reverse" or d == 1
        f, g, act_h = acts[d]
        if b is None:
            wb = rb = jnp.zeros((4 * hidden,), jnp.float32)
        else:
            wb, rb = jnp.split(jnp.asarray(b[d]).astype(jnp.float32), 2)
        peep = None if p is None else jnp.split(jnp.asarray(p[d]).astype(jnp.float32), 3)
        r_d, rs, rz = jnp.asarray(r[d]), per_direction(r_scale, d), per_direction(r_zero_point, d)
        xw = (
            _dynamic_matmul(
                x, jnp.asarray(w[d]), per_direction(w_scale, d), per_direction(w_zero_point, d)
            )
            + wb
        )
        if reverse:
            xw = reverse_by_length(xw, sequence_lens)

        def cell(xw_t, h, c, r_d=r_d, rs=rs, rz=rz, rb=rb, peep=peep, acts=(f, g, act_h)):
            gates = xw_t + _dynamic_matmul(h, r_d, rs, rz) + rb
            return lstm_update(gates, c, peep, acts, input_forget, pre)

        (h, c), y = lax.scan(
            lambda carry, inputs, cell=cell: masked_step(cell, carry, inputs),
            (init_h[d], init_c[d]),
            (xw, mask),
        )
        if reverse:
            y = reverse_by_length(y, sequence_lens)
        ys.append(y)
        hs.append(h)
        cs.append(c)
    return jnp.stack(ys, axis=1), jnp.stack(hs), jnp.stack(cs)
