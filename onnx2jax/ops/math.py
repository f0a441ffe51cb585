"""Matrix products, Einsum, CumSum and other math ops (the Softmax family: softmax.py)."""

from __future__ import annotations

import jax.numpy as jnp

from onnx2jax.core.convert import is_static
from onnx2jax.ops.elementwise import jax_on
from onnx2jax.ops.registry import register


@register("MatMul", since=(1, 9, 13))
def matmul(ctx, a, b):
    # jnp.matmul contracts without materialising broadcast batch dimensions (a 3-D activation
    # times a 2-D weight is one dot_general), so XLA sees a single fused GEMM.
    (a, b), accumulate = product_operands(ctx, a, b)
    if accumulate is None:
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


@register("Det", since=(11, 22))
def det(ctx, x):
    return jax_on(jnp.linalg.det, x)
