"""FakeQuantizeLinear: a QuantizeLinear -> DequantizeLinear pair with a straight-through gradient.

No model holds it: planning (``fuse_quantize_pairs`` in onnx2jax/core/graph.py) puts one in
place of each QuantizeLinear whose output only a DequantizeLinear reads, with the two original
nodes as its ``quantize`` and ``dequantize`` graphs. The forward runs those nodes, so its
numbers are the pair's own, bit for bit. The gradient is the straight-through estimator of
quantization-aware training: the integer between the two nodes would give every value behind
the pair a zero gradient, so the input's gradient is the output's, kept where the input lies in
the range the quantized type represents (``[dequantize(qmin), dequantize(qmax)]``) and zero
outside it, where the quantizer clips. The dequantize's scale and zero point get the gradient
the DequantizeLinear gives them (the integer held fixed); the quantize's, zero, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from onnx2jax.core.convert import is_static
from onnx2jax.ops.quantization import integer_range
from onnx2jax.ops.registry import ONNX2JAX, register

# FakeQuantizeLinear's inputs: the quantize's three, then the dequantize's scale and zero point.
_QUANTIZE, _DEQUANTIZE = (0, 1, 2), (3, 4)


def quantized_range(dtype: Any) -> tuple[float, float]:
    """The smallest and largest value of a quantized type (integer, float8 or float4).

    Example:
        >>> quantized_range(np.dtype(np.uint8)), quantized_range(np.dtype(ml_dtypes.int4))
        ((0, 255), (-8, 7))
        >>> quantized_range(np.dtype(ml_dtypes.float8_e4m3fn))
        (-448.0, 448.0)
    """
    dtype = np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer):  # ml_dtypes' int4 and int2 included
        return integer_range(dtype)
    largest = float(ml_dtypes.finfo(dtype).max)
    return -largest, largest


@register("FakeQuantizeLinear", since=1, domain=ONNX2JAX)
def fake_quantize_linear(
    ctx, x, q_scale, q_zero_point=None, dq_scale=None, dq_zero_point=None
) -> tuple[Any, Any]:
    """``(q, y)``: the pair's quantized integer and dequantized value, y's gradient passed to x."""
    values = [x, q_scale, q_zero_point, dq_scale, dq_zero_point]

    def present(indices: Sequence[int], given: Sequence[Any]) -> list[Any]:
        return [given[i] for i in indices if ctx.input_name(i)]

    def dequantize(q: Any, given: Sequence[Any]) -> Any:
        return ctx.run_subgraph("dequantize", [q, *present(_DEQUANTIZE, given)])[0]

    def forward(given: Sequence[Any]) -> tuple[Any, Any]:
        q = ctx.run_subgraph("quantize", present(_QUANTIZE, given))[0]
        return q, dequantize(q, given)

    traced = [i for i, v in enumerate(values) if v is not None and not is_static(v)]
    if not traced:
        return forward(values)

    @jax.custom_vjp
    def pair(*args: Any) -> tuple[Any, Any]:
        return forward(_replaced(values, traced, args))

    def pair_forward(*args: Any) -> tuple[tuple[Any, Any], tuple[Any, ...]]:
        q, y = forward(_replaced(values, traced, args))
        return (q, y), (args, q)

    def pair_backward(saved: tuple[Any, ...], cotangents: tuple[Any, Any]) -> tuple[Any, ...]:
        args, q = saved
        given = _replaced(values, traced, args)
        grad_y = cotangents[1]
        grads: dict[int, Any] = {}
        if 0 in traced:
            low, high = quantized_range(q.dtype)
            ends = [dequantize(jnp.full(q.shape, end, q.dtype), given) for end in (low, high)]
            inside = (given[0] >= jnp.minimum(*ends)) & (given[0] <= jnp.maximum(*ends))
            grads[0] = jnp.where(inside, grad_y, 0).astype(given[0].dtype)
        wrt = [i for i in traced if i in _DEQUANTIZE and _is_float(given[i])]
        if wrt:
            _, pullback = jax.vjp(
                lambda *params: dequantize(q, _replaced(given, wrt, params)),
                *[given[i] for i in wrt],
            )
            grads.update(zip(wrt, pullback(grad_y), strict=True))
        return tuple(
            grads.get(i, jnp.zeros_like(given[i]) if _is_float(given[i]) else None) for i in traced
        )

    pair.defvjp(pair_forward, pair_backward)
    return pair(*[values[i] for i in traced])


def _replaced(values: Sequence[Any], indices: Sequence[int], new: Sequence[Any]) -> list[Any]:
    """``values`` with ``values[indices[k]]`` replaced by ``new[k]``."""
    given = list(values)
    for index, value in zip(indices, new, strict=True):
        given[index] = value
    return given


def _is_float(value: Any) -> bool:
    return jnp.issubdtype(value.dtype, jnp.floating)
