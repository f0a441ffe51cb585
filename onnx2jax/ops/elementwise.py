"""Element-wise arithmetic, comparison and logic ops (NumPy broadcasting, static or traced)."""

from __future__ import annotations

import numpy as np

from onnx2jax.ops.registry import register

# (op_type, numpy/jax.numpy function name, opset versions whose semantics or types changed)
_UNARY = [
    ("Abs", "abs", (1, 6, 13)),
    ("Neg", "negative", (1, 6, 13)),
    ("Floor", "floor", (1, 6, 13)),
    ("Ceil", "ceil", (1, 6, 13)),
    ("Sqrt", "sqrt", (1, 6, 13)),
    ("Exp", "exp", (1, 6, 13)),
    ("Log", "log", (1, 6, 13)),
    ("Reciprocal", "reciprocal", (1, 6, 13)),
    ("Sin", "sin", (7,)),
    ("Cos", "cos", (7,)),
    ("Tan", "tan", (7,)),
    ("Asin", "arcsin", (7,)),
    ("Acos", "arccos", (7,)),
    ("Atan", "arctan", (7,)),
    ("Sinh", "sinh", (9,)),
    ("Cosh", "cosh", (9,)),
    ("Asinh", "arcsinh", (9,)),
    ("Acosh", "arccosh", (9,)),
    ("Atanh", "arctanh", (9,)),
    ("Not", "logical_not", (1,)),
    ("BitwiseNot", "bitwise_not", (18,)),
    ("IsNaN", "isnan", (9, 13, 20)),
    ("Sign", "sign", (9, 13)),
]

_BINARY = [
    ("Add", "add", (1, 6, 7, 13, 14)),
    ("Sub", "subtract", (1, 6, 7, 13, 14)),
    ("Mul", "multiply", (1, 6, 7, 13, 14)),
    ("Equal", "equal", (1, 7, 11, 13, 19)),
    ("Less", "less", (1, 7, 9, 13)),
    ("LessOrEqual", "less_equal", (12, 16)),
    ("Greater", "greater", (1, 7, 9, 13)),
    ("GreaterOrEqual", "greater_equal", (12, 16)),
    ("And", "logical_and", (1, 7)),
    ("Or", "logical_or", (1, 7)),
    ("Xor", "logical_xor", (1, 7)),
    ("BitwiseAnd", "bitwise_and", (18,)),
    ("BitwiseOr", "bitwise_or", (18,)),
    ("BitwiseXor", "bitwise_xor", (18,)),
]


def _register_unary(op_type: str, function: str, versions: tuple[int, ...]) -> None:
    def op(ctx, x):
        return getattr(ctx.xp(x), function)(x)

    op.__name__ = op.__qualname__ = function
    for since in versions:
        register(op_type, since)(op)


def _register_binary(op_type: str, function: str, versions: tuple[int, ...]) -> None:
    def op(ctx, a, b):
        a, b = _legacy_broadcast(ctx, a, b)
        return getattr(ctx.xp(a, b), function)(a, b)

    op.__name__ = op.__qualname__ = function
    for since in versions:
        register(op_type, since)(op)


def _legacy_broadcast(ctx, a, b):
    """Opsets before 7 broadcast only with ``broadcast=1``, aligning ``b`` at ``axis``."""
    if ctx.opset >= 7 or not ctx.attr("broadcast", 0) or ctx.attr("axis") is None:
        return a, b
    axis = ctx.attr("axis") % a.ndim
    trailing = a.ndim - axis - b.ndim
    return a, ctx.xp(b).reshape(b, b.shape + (1,) * trailing)


for _entry in _UNARY:
    _register_unary(*_entry)
for _entry in _BINARY:
    _register_binary(*_entry)


@register("Div", 1)
@register("Div", 6)
@register("Div", 7)
@register("Div", 13)
@register("Div", 14)
def div(ctx, a, b):
    a, b = _legacy_broadcast(ctx, a, b)
    xp = ctx.xp(a, b)
    if np.issubdtype(a.dtype, np.integer):
        # ONNX integer division truncates toward zero (C semantics), unlike floor_divide.
        quotient = xp.abs(a) // xp.abs(b)
        return xp.where((a < 0) != (b < 0), -quotient, quotient).astype(a.dtype)
    return xp.divide(a, b)
