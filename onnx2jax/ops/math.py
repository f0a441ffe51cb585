"""Matrix products, Einsum, Softmax family, CumSum and other math ops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from onnx2jax import native
from onnx2jax.convert import is_static
from onnx2jax.ops.elementwise import jax_on
from onnx2jax.ops.registry import register


@register("MatMul", since=(1, 9, 13))
def matmul(ctx, a, b):
    # jnp.matmul contracts without materialising broadcast batch dimensions (a 3-D activation
    # times a 2-D weight is one dot_general), so XLA sees a single fused GEMM.
    (a, b), accumulate = product_operands(ctx, a, b)
    if accumulate is None:
        if native.active("matrix") and not is_static(a) and native.matmul_applies(a, b):
            return native.matmul(a, b)
        return ctx.xp(a, b).matmul(a, b)
    return jnp.matmul(a, b, preferred_element_type=accumulate)


def product_operands(ctx, *values):
    """The operands of a matrix product under the model's precision, and the result's dtype.

    With ``precision="bfloat16"`` traced float32 operands are rounded to bfloat16 and the
    product accumulates and returns float32 (None: the plain product). Static values (shape
    arithmetic) always stay exact.
    """
    if ctx.interpreter.precision == "bfloat16" and all(
        not is_static(v) and v.dtype == jnp.float32 for v in values
    ):
        return [v.astype(jnp.bfloat16) for v in values], jnp.float32
    return list(values), None


@register("Gemm", since=(1, 6, 7, 9, 11, 13))
def gemm(ctx, a, b, c=None):
    xp = ctx.xp(a, b, c)
    dtype = a.dtype
    (a, b), accumulate = product_operands(ctx, a, b)
    alpha = ctx.attr("alpha", 1.0)
    beta = ctx.attr("beta", 1.0)
    transposed = ctx.attr("transA", 0) or ctx.attr("transB", 0)
    if (
        accumulate is None
        and native.active("matrix")
        and not transposed
        and alpha == 1.0
        and not is_static(a)
        and native.matmul_applies(a, b)
    ):
        columns = np.shape(b)[1]
        row_bias = c is not None and beta == 1.0 and np.shape(c) in ((columns,), (1, columns))
        y = native.matmul(a, b, jnp.reshape(c, (-1,)) if row_bias else None)
        if c is not None and beta != 0.0 and not row_bias:
            y = y + (c * beta if beta != 1.0 else c)
        return y.astype(dtype)
    if accumulate is None and xp is jnp and dtype in (jnp.float16, jnp.bfloat16):
        # alpha * A.B + beta * C of 16-bit floats in float32, rounded once, as onnxruntime
        # computes it (not the product rounded, then the sum rounded again).
        accumulate = jnp.float32
    axes = (0 if ctx.attr("transA", 0) else 1, 1 if ctx.attr("transB", 0) else 0)
    # tensordot contracts the right axes directly (a dot_general with no transpose copies).
    y = (
        xp.tensordot(a, b, axes=axes)
        if accumulate is None
        else jnp.tensordot(a, b, axes=axes, preferred_element_type=accumulate)
    )
    if alpha != 1.0:
        y = y * alpha
    # Before opset 7, C broadcasts only with broadcast=1, where NumPy rules give the same result.
    if c is not None and beta != 0.0:
        y = y + (c * beta if beta != 1.0 else c)
    return y.astype(dtype)


@register("Einsum", since=(12, 28))
def einsum(ctx, *inputs):
    equation = "".join(ctx.attr("equation", "").split())
    operands, accumulate = product_operands(ctx, *inputs)
    if accumulate is None:
        return ctx.xp(*inputs).einsum(equation, *inputs)
    return jnp.einsum(equation, *operands, preferred_element_type=accumulate)


@register("CumSum", since=(11, 14), static_inputs=(1,))
def cumsum(ctx, x, axis):
    return _cumulative(ctx, x, axis, "cumsum", 0)


@register("CumProd", since=26, static_inputs=(1,))
def cumprod(ctx, x, axis):
    return _cumulative(ctx, x, axis, "cumprod", 1)


def _cumulative(ctx, x, axis, function, identity):
    values = ctx.static_ints(axis, 1, "the axis")
    if len(values) != 1:
        raise ctx.error(f"axis must hold one value, got {values}")
    if not -x.ndim <= values[0] < x.ndim:
        raise ctx.error(f"axis {values[0]} is out of range for rank {x.ndim}")
    axis = values[0] % x.ndim
    xp = ctx.xp(x)
    reverse = ctx.attr("reverse", 0)
    if reverse:
        x = xp.flip(x, axis)
    out = getattr(xp, function)(x, axis=axis, dtype=x.dtype)
    if ctx.attr("exclusive", 0) and x.shape[axis]:
        head = [slice(None)] * x.ndim
        head[axis] = slice(0, -1)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (1, 0)
        out = xp.pad(out[tuple(head)], pad, constant_values=identity)
    return xp.flip(out, axis) if reverse else out


def _softmax_axes(ctx, x):
    """Opsets before 13 flatten to 2-D at ``axis`` (default 1): normalise over every axis from
    ``axis`` on. From 13, normalise over ``axis`` (default -1) alone."""
    legacy = ctx.opset < 13
    rank = np.ndim(x)
    axis = ctx.attr("axis", 1 if legacy else -1)
    if not -rank <= axis < max(rank, 1):
        raise ctx.error(f"axis {axis} is out of range for rank {rank}")
    axis %= max(rank, 1)
    return tuple(range(axis, rank)) if legacy else (axis,)


@register("Softmax", since=(1, 11, 13))
def softmax(ctx, x):
    axes = _softmax_axes(ctx, x)
    return jax_on(lambda v: in_float32(softmax_over, v, axes), x)


def in_float32(function, v, *args):
    """``function(v, *args)`` of a 16-bit float ``v`` computed in float32 and rounded once, as
    onnxruntime computes fp16 softmax (XLA would round every intermediate to 16 bits)."""
    if v.dtype in (jnp.float16, jnp.bfloat16):
        return function(v.astype(jnp.float32), *args).astype(v.dtype)
    return function(v, *args)


def softmax_over(v, axes: tuple[int, ...]):
    """Softmax over ``axes``; over trailing axes on the CPU, in the fewest passes XLA fuses."""
    lead = v.ndim - len(axes)
    size = int(np.prod(v.shape[lead:]))
    groups = _row_groups(size) if axes == tuple(range(lead, v.ndim)) else None
    if (
        groups is None
        or v.dtype not in (jnp.float32, jnp.float64)
        or jax.default_backend() != "cpu"
    ):
        return jax.nn.softmax(v, axis=axes)
    rows = v.reshape(*v.shape[:lead], size)
    peak = lax.stop_gradient(_reduce_in_two_steps(rows, jnp.max, groups))
    total = _reduce_in_two_steps(jnp.exp(rows - peak), jnp.sum, groups)
    # -(peak - rows) is rows - peak bit for bit; spelled apart, XLA recomputes exp here
    # rather than writing the exponentials out and reading them back.
    return (jnp.exp(-(peak - rows)) / total).reshape(v.shape)


# XLA:CPU splits a reduction over more than 32 elements into a reduce-window and a reduce and
# fuses neither with the ops producing their input, so a softmax over 128 attention scores
# wrote the scaled and masked scores and their exponentials out and read them back: 8 passes
# over the scores. Reduced in two steps of at most 32, the max and the sum each fuse the
# producers and read the input once, and the output pass recomputes exp: 4 passes
# (timings in benchmarks/LOG.md, "softmax in two steps").
_STEP = 32


def _row_groups(size: int) -> int | None:
    """Groups to reduce a row of ``size`` in two steps of at most 32, or None."""
    if size <= _STEP:
        return None
    # The most groups measured fastest (benchmarks/LOG.md, "softmax in two steps").
    groups = [g for g in range(2, _STEP + 1) if size % g == 0 and size // g <= _STEP]
    return max(groups) if groups else None


def _reduce_in_two_steps(rows, reduce, groups):
    partial = reduce(rows.reshape(*rows.shape[:-1], groups, -1), axis=-1)
    # The barrier keeps XLA from merging the two steps back into one reduction.
    return reduce(lax.optimization_barrier(partial), axis=-1, keepdims=True)


@register("LogSoftmax", since=(1, 11, 13))
def log_softmax(ctx, x):
    axes = _softmax_axes(ctx, x)
    return jax_on(lambda v: in_float32(jax.nn.log_softmax, v, axes), x)


@register("Hardmax", since=(1, 11, 13))
def hardmax(ctx, x):
    axes = _softmax_axes(ctx, x)
    if np.size(x) == 0 or not axes:
        return x
    xp = ctx.xp(x)
    shape = np.shape(x)
    # Before opset 13 the axes from ``axis`` on act as one flattened axis.
    flat = xp.reshape(x, shape[: axes[0]] + (-1,) + shape[axes[-1] + 1 :])
    axis = axes[0]
    # The first maximum wins ties, as in argmax.
    index = xp.argmax(flat, axis=axis, keepdims=True)
    iota = xp.arange(flat.shape[axis]).reshape((-1,) + (1,) * (flat.ndim - axis - 1))
    return xp.reshape((iota == index).astype(x.dtype), shape)


@register("Det", since=(11, 22))
def det(ctx, x):
    return jax_on(jnp.linalg.det, x)
