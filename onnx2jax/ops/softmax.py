"""Softmax, LogSoftmax and Hardmax, and the softmax the attention ops share (softmax_over)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from onnx2jax.ops.elementwise import jax_on
from onnx2jax.ops.registry import register


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


def in_float32(function: Callable[..., jax.Array], v: jax.Array, *args: Any) -> jax.Array:
    """``function(v, *args)`` of a 16-bit float ``v`` computed in float32 and rounded once, as
    onnxruntime computes fp16 softmax (XLA would round every intermediate to 16 bits).

    Example:
        >>> v = jnp.array([1.0, 2.0], jnp.float16)
        >>> in_float32(softmax_over, v, (0,)).dtype
        dtype('float16')
    """
    if v.dtype in (jnp.float16, jnp.bfloat16):
        return function(v.astype(jnp.float32), *args).astype(v.dtype)
    return function(v, *args)


def softmax_over(v: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Softmax over ``axes``; over trailing axes on the CPU, in the fewest passes XLA fuses.

    Example:
        >>> softmax_over(jnp.log(jnp.array([[1.0, 3.0]])), (1,)).round(4).tolist()
        [[0.25, 0.75]]
    """
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
