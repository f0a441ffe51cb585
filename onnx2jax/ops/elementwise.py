"""Element-wise arithmetic, comparison and logic ops (NumPy broadcasting, static or traced)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from onnx2jax.core.convert import is_static
from onnx2jax.ops.registry import OpFunction, register


def _unary(function: str) -> OpFunction:
    """The op applying the NumPy/jax.numpy function named ``function`` to its one input."""

    def op(ctx, x):
        return getattr(ctx.xp(x), function)(x)

    op.__name__ = op.__qualname__ = function
    return op


def _binary(function: str) -> OpFunction:
    """The op applying the NumPy/jax.numpy function named ``function`` to its two inputs."""

    def op(ctx, a, b):
        a, b = _legacy_broadcast(ctx, a, b)
        return getattr(ctx.xp(a, b), function)(a, b)

    op.__name__ = op.__qualname__ = function
    return op


def _legacy_broadcast(ctx, a, b):
    """Opsets before 7 broadcast only with ``broadcast=1``, aligning ``b`` at ``axis``."""
    if ctx.opset >= 7 or not ctx.attr("broadcast", 0) or ctx.attr("axis") is None:
        return a, b
    axis = ctx.attr("axis") % a.ndim
    trailing = a.ndim - axis - b.ndim
    return a, ctx.xp(b).reshape(b, b.shape + (1,) * trailing)


# One function per op; since= lists the opset versions whose semantics or types changed.
register("Abs", since=(1, 6, 13))(_unary("abs"))
register("Neg", since=(1, 6, 13))(_unary("negative"))
register("Floor", since=(1, 6, 13))(_unary("floor"))
register("Ceil", since=(1, 6, 13))(_unary("ceil"))
register("Sqrt", since=(1, 6, 13))(_unary("sqrt"))
register("Exp", since=(1, 6, 13))(_unary("exp"))
register("Log", since=(1, 6, 13))(_unary("log"))
register("Reciprocal", since=(1, 6, 13))(_unary("reciprocal"))
register("Sin", since=(7, 22))(_unary("sin"))
register("Cos", since=(7, 22))(_unary("cos"))
register("Tan", since=(7, 22))(_unary("tan"))
register("Asin", since=(7, 22))(_unary("arcsin"))
register("Acos", since=(7, 22))(_unary("arccos"))
register("Atan", since=(7, 22))(_unary("arctan"))
register("Sinh", since=(9, 22))(_unary("sinh"))
register("Cosh", since=(9, 22))(_unary("cosh"))
register("Asinh", since=(9, 22))(_unary("arcsinh"))
register("Acosh", since=(9, 22))(_unary("arccosh"))
register("Atanh", since=(9, 22))(_unary("arctanh"))
register("Not", since=1)(_unary("logical_not"))
register("BitwiseNot", since=18)(_unary("bitwise_not"))
register("IsNaN", since=(9, 13, 20))(_unary("isnan"))
register("Sign", since=(9, 13))(_unary("sign"))
register("Add", since=(1, 6, 7, 13, 14))(_binary("add"))
register("Sub", since=(1, 6, 7, 13, 14))(_binary("subtract"))
register("Mul", since=(1, 6, 7, 13, 14))(_binary("multiply"))
register("Equal", since=(1, 7, 11, 13, 19))(_binary("equal"))
register("Less", since=(1, 7, 9, 13))(_binary("less"))
register("LessOrEqual", since=(12, 16))(_binary("less_equal"))
register("Greater", since=(1, 7, 9, 13))(_binary("greater"))
register("GreaterOrEqual", since=(12, 16))(_binary("greater_equal"))
register("And", since=(1, 7))(_binary("logical_and"))
register("Or", since=(1, 7))(_binary("logical_or"))
register("Xor", since=(1, 7))(_binary("logical_xor"))
register("BitwiseAnd", since=18)(_binary("bitwise_and"))
register("BitwiseOr", since=18)(_binary("bitwise_or"))
register("BitwiseXor", since=18)(_binary("bitwise_xor"))


@register("Div", since=(1, 6, 7, 13, 14))
def div(ctx, a, b):
    a, b = _legacy_broadcast(ctx, a, b)
    xp = ctx.xp(a, b)
    if np.issubdtype(a.dtype, np.integer):
        # ONNX integer division truncates toward zero (C semantics), unlike floor_divide.
        quotient = xp.abs(a) // xp.abs(b)
        return xp.where((a < 0) != (b < 0), -quotient, quotient).astype(a.dtype)
    return divide_correctly_rounded(a, b)


def divide_correctly_rounded(a, b):
    """Float ``a / b`` correctly rounded, as NumPy and onnxruntime divide (fp16 and bf16 as
    one float32 division rounded once, which is correctly rounded for them too).

    XLA rewrites a division by a constant or by a broadcast value, even one computed at run
    time, into a multiplication by the reciprocal, which lands an ulp off for about a tenth of
    float32 quotients, and ``(a / b) / c`` into ``a / (b * c)``. Both operands behind an
    optimization barrier, the divisor materialized at the output's shape, keep a true
    division; a power-of-two scalar needs none (its reciprocal is exact). Quantization's
    scales divide through here too: one ulp there moves a quantized value a whole step.
    """
    if is_static(a) and is_static(b):
        return np.divide(a, b)
    if is_static(b) and np.size(b) == 1 and _exact_reciprocal(np.asarray(b)):
        return jnp.divide(a, b)
    shape = jnp.broadcast_shapes(np.shape(a), np.shape(b))
    a, divisor = lax.optimization_barrier((jnp.asarray(a), jnp.broadcast_to(jnp.asarray(b), shape)))
    return jnp.divide(a, divisor)


def _exact_reciprocal(value: np.ndarray) -> bool:
    """Whether 1 / ``value`` is exact and normal, so that x * (1 / value) == x / value."""
    if not np.issubdtype(value.dtype, np.floating) or not np.all(np.isfinite(value)):
        return False
    with np.errstate(all="ignore"):
        mantissa, _ = np.frexp(value.astype(np.float64))
        reciprocal = (1 / value).astype(value.dtype)
        tiny = np.finfo(value.dtype).tiny
    return bool(
        np.all(np.abs(mantissa) == 0.5)
        and np.all(np.abs(reciprocal) >= tiny)
        and np.all(np.isfinite(reciprocal))
    )


def _is_float(dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating))


# The exponent is listed static so that a float initializer feeding it (the 2.0 of LayerNorm's
# Pow) stays a constant rather than a trainable param: its gradient is NaN wherever the base is
# negative, and a constant exponent takes the exact integer_pow path below. A computed exponent
# still works: it is never read with ctx.static.
@register("Pow", since=(1, 7, 12, 13, 15), static_inputs=(1,))
def pow_(ctx, x, y):
    x, y = _legacy_broadcast(ctx, x, y)
    xp = ctx.xp(x, y)
    if xp is jnp and is_static(y) and np.size(y) == 1 and _is_float(x.dtype):
        exponent = np.asarray(y).reshape(()).item()
        if float(exponent).is_integer() and abs(exponent) <= 64:
            # lax.integer_pow is exact, cheap (repeated multiplication) and has clean gradients
            # at negative bases, unlike the general pow used for the Pow(x, 2.0) of LayerNorm.
            out = lax.integer_pow(x, int(exponent))
            return jnp.broadcast_to(out, np.broadcast_shapes(x.shape, np.shape(y)))
    if np.issubdtype(x.dtype, np.integer) and np.issubdtype(y.dtype, np.integer):
        return _integer_power(xp, x, y)
    return xp.power(x, y).astype(x.dtype)


def _integer_power(xp, x, y):
    """Integer ``x ** y`` as exact arithmetic truncates it: a negative exponent gives 0, except
    for bases 1 and -1 (NumPy refuses it, and XLA's repeated squaring returns garbage)."""
    negative = y < 0
    positive_power = xp.power(x, xp.where(negative, 0, y).astype(y.dtype))
    unit = xp.where(x == 1, 1, xp.where((x == -1) & (y % 2 != 0), -1, xp.where(x == -1, 1, 0)))
    return xp.where(negative, unit, positive_power).astype(x.dtype)


@register("Mod", since=(10, 13, 28))
def mod(ctx, a, b):
    fmod = ctx.attr("fmod", 0)
    if fmod not in (0, 1):
        raise ctx.error(f"fmod must be 0 or 1, got {fmod}")
    xp = ctx.xp(a, b)
    # fmod=1 truncates the quotient (C fmod, sign of A); fmod=0 floors it (sign of B).
    return (xp.fmod(a, b) if fmod else xp.remainder(a, b)).astype(a.dtype)


def _variadic(op_type: str, function: str, mean: bool = False) -> OpFunction:
    """The op folding its inputs with the NumPy/jax.numpy function ``function`` (Max, Sum, ...)."""

    def op(ctx, *inputs):
        xp = ctx.xp(*inputs)
        dtype = np.result_type(*inputs)
        if xp is jnp and dtype in (jnp.float16, jnp.bfloat16):
            # 16-bit floats summed in float32 and rounded once, as onnxruntime computes them.
            inputs = [jnp.asarray(x).astype(jnp.float32) for x in inputs]
        result = inputs[0]
        for x in inputs[1:]:
            result = getattr(xp, function)(result, x)
        # Mean multiplies by 1/n, as onnxruntime does (and XLA would rewrite the division).
        result = result * (1 / len(inputs)) if mean else result
        return result.astype(dtype) if xp is jnp else result

    op.__name__ = op.__qualname__ = op_type.lower()
    return op


register("Max", since=(1, 6, 8, 12, 13))(_variadic("Max", "maximum"))
register("Min", since=(1, 6, 8, 12, 13))(_variadic("Min", "minimum"))
register("Sum", since=(1, 6, 8, 13))(_variadic("Sum", "add"))
register("Mean", since=(1, 6, 8, 13))(_variadic("Mean", "add", mean=True))


@register("Where", since=(9, 16))
def where(ctx, condition, x, y):
    return ctx.xp(condition, x, y).where(condition, x, y)


@register("Clip", since=(1, 6))
def clip_v1(ctx, x):
    return _clip(ctx, x, ctx.attr("min"), ctx.attr("max"))


@register("Clip", since=(11, 12, 13))
def clip(ctx, x, low=None, high=None):
    return _clip(ctx, x, low, high)


def _clip(ctx, x, low, high):
    # maximum-then-minimum gives ``high`` everywhere when low > high, as ONNX specifies.
    xp = ctx.xp(x, low, high)
    if low is not None:
        x = xp.maximum(x, low)
    if high is not None:
        x = xp.minimum(x, high)
    return x


def jax_on(function, *values):
    """``function`` (written with jax) applied to ``values``; when all are static the result is
    computed the same way but handed back as NumPy of the first value's dtype, so it stays static.
    For ops NumPy lacks (erf, softmax, ...) whose inputs are rarely static."""
    if all(is_static(v) for v in values):
        # Evaluated now, even inside a jit trace (which would otherwise stage it).
        with jax.ensure_compile_time_eval():
            result = function(*(jnp.asarray(v) for v in values))
        return np.asarray(result).astype(values[0].dtype)
    return function(*values)


@register("Erf", since=(9, 13))
def erf(ctx, x):
    if _is_float(x.dtype):
        return jax_on(jax.scipy.special.erf, x)
    # Integer Erf is defined (and tested) as erf computed in float, cast back.
    return jax_on(lambda v: jax.scipy.special.erf(v.astype(jnp.float32)).astype(v.dtype), x)


@register("Round", since=(11, 22))
def round_(ctx, x):
    return ctx.xp(x).round(x)


@register("IsInf", since=(10, 20))
def is_inf(ctx, x):
    xp = ctx.xp(x)
    infinite = xp.isinf(x)
    positive = ctx.attr("detect_positive", 1)
    negative = ctx.attr("detect_negative", 1)
    if positive and negative:
        return infinite
    if positive:
        return infinite & (x > 0)
    if negative:
        return infinite & (x < 0)
    return xp.zeros(np.shape(x), dtype=bool)


@register("BitShift", since=(11, 28))
def bit_shift(ctx, x, y):
    direction = ctx.attr("direction")
    xp = ctx.xp(x, y)
    bits = np.dtype(x.dtype).itemsize * 8
    # Shifts by a negative amount or by the width or more are undefined in C and in XLA; ONNX
    # defines them as the sign fill alone.
    in_range = (y >= 0) & (y < bits)
    amount = xp.where(in_range, y, 0).astype(x.dtype)
    if direction == "LEFT":
        shifted, fill = xp.left_shift(x, amount), xp.zeros_like(x)
    elif direction == "RIGHT":
        shifted = xp.right_shift(x, amount)
        fill = xp.where(x < 0, -1, 0).astype(x.dtype) if x.dtype.kind == "i" else xp.zeros_like(x)
    else:
        raise ctx.error(f"direction must be 'LEFT' or 'RIGHT', got {direction!r}")
    return xp.where(in_range, shifted, fill).astype(x.dtype)


@register("Shrink", since=9)
def shrink(ctx, x):
    lambd = ctx.attr("lambd", 0.5)
    bias = ctx.attr("bias", 0.0)
    xp = ctx.xp(x)
    out = xp.where(x < -lambd, x + bias, xp.where(x > lambd, x - bias, 0))
    return out.astype(x.dtype)
