"""Reductions (Reduce*, ArgMax, ArgMin).

``axes`` is an attribute up to opset 12 for ReduceSum and up to opset 17 for the others, then an
optional input (which must be static). Reducing an empty set gives the operation's identity
(0 for sums, 1 for products, -inf/+inf or the integer limits for Max/Min, -inf for LogSum).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from onnx2jax.ops.elementwise import jax_on
from onnx2jax.ops.registry import OpFunction, register


def _lowest(dtype):
    if dtype == np.bool_:
        return False
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).min
    return -np.inf


def _highest(dtype):
    if dtype == np.bool_:
        return True
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).max
    return np.inf


def _extreme(function, identity):
    def reduce(xp, x, axes, keepdims):
        # Only an empty reduction needs the identity; NumPy and JAX refuse to reduce one without.
        extra = {"initial": identity(x.dtype)} if np.size(x) == 0 else {}
        return getattr(xp, function)(x, axis=axes, keepdims=keepdims, **extra)

    return reduce


def _mean(xp, x, axes, keepdims):
    dtype = np.dtype(x.dtype)
    if dtype.kind not in "iu":
        return xp.mean(x, axis=axes, keepdims=keepdims).astype(dtype)
    # Integers as exact arithmetic gives them (and onnxruntime): a 64-bit sum divided with
    # truncation toward zero; a float mean rounds int32 values above 2**24.
    wide = np.dtype(np.uint64 if dtype.kind == "u" else np.int64)
    if xp is not np:
        wide = jax.dtypes.canonicalize_dtype(wide)
    total = xp.sum(x, axis=axes, keepdims=keepdims, dtype=wide)
    count = max(
        int(np.prod([np.shape(x)[a] for a in (range(np.ndim(x)) if axes is None else axes)])), 1
    )
    if dtype.kind == "u":
        return (total // count).astype(dtype)
    return xp.where(total < 0, -((-total) // count), total // count).astype(dtype)


def _sum_square(xp, x, axes, keepdims):
    return xp.sum(x * x, axis=axes, keepdims=keepdims, dtype=x.dtype)


def _l2(xp, x, axes, keepdims):
    return xp.sqrt(_sum_square(xp, x, axes, keepdims)).astype(x.dtype)


def _log_sum_exp(xp, x, axes, keepdims):
    def logsumexp(v):
        floating = v if jnp.issubdtype(v.dtype, jnp.floating) else v.astype(float)
        return jax.nn.logsumexp(floating, axis=axes, keepdims=keepdims).astype(v.dtype)

    if xp is np:
        # A static input stays static under the caller's jit (jax ops would be staged out).
        with jax.ensure_compile_time_eval():
            return jax_on(logsumexp, x)
    return logsumexp(x)


_REDUCTIONS = {
    "ReduceSum": lambda xp, x, axes, k: xp.sum(x, axis=axes, keepdims=k, dtype=x.dtype),
    "ReduceMean": _mean,
    "ReduceMax": _extreme("max", _lowest),
    "ReduceMin": _extreme("min", _highest),
    "ReduceProd": lambda xp, x, axes, k: xp.prod(x, axis=axes, keepdims=k, dtype=x.dtype),
    "ReduceL1": lambda xp, x, axes, k: xp.sum(xp.abs(x), axis=axes, keepdims=k, dtype=x.dtype),
    "ReduceL2": _l2,
    "ReduceLogSum": lambda xp, x, axes, k: xp.log(
        xp.sum(x, axis=axes, keepdims=k, dtype=x.dtype)
    ).astype(x.dtype),
    "ReduceLogSumExp": _log_sum_exp,
    "ReduceSumSquare": _sum_square,
}


def _reduce(ctx, reduction, x, axes):
    rank = np.ndim(x)
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            # Reducing over no axis still applies the elementwise part (abs, square, log, exp),
            # as onnxruntime and the reference implementation do.
            return reduction(ctx.xp(x), x, (), True)
        axes = range(rank)
    for axis in axes:
        if not -rank <= axis < max(rank, 1):
            raise ctx.error(f"axis {axis} is out of range for rank {rank}")
    axes = tuple(sorted({axis % max(rank, 1) for axis in axes})) if rank else None
    return reduction(ctx.xp(x), x, axes, bool(ctx.attr("keepdims", 1)))


def _axes_attribute(op_type: str) -> OpFunction:
    """``op_type`` in the versions where ``axes`` is an attribute."""
    reduction = _REDUCTIONS[op_type]

    def reduce_v1(ctx, x):
        # noop_with_empty_axes does not exist yet: no axes means every axis.
        axes = ctx.attr("axes")
        return _reduce(ctx, reduction, x, axes or list(range(np.ndim(x))))

    name = op_type[len("Reduce") :].lower()
    reduce_v1.__name__ = reduce_v1.__qualname__ = f"reduce_{name}_v1"
    return reduce_v1


def _axes_input(op_type: str) -> OpFunction:
    """``op_type`` in the versions where ``axes`` is an optional (static) input."""
    reduction = _REDUCTIONS[op_type]

    def reduce(ctx, x, axes=None):
        axes = None if axes is None else ctx.static_ints(axes, 1, "the axes")
        return _reduce(ctx, reduction, x, axes)

    name = op_type[len("Reduce") :].lower()
    reduce.__name__ = reduce.__qualname__ = f"reduce_{name}"
    return reduce


# Each op twice: the versions with an ``axes`` attribute, then those with an ``axes`` input.
register("ReduceSum", since=(1, 11))(_axes_attribute("ReduceSum"))
register("ReduceSum", since=13, static_inputs=(1,))(_axes_input("ReduceSum"))
register("ReduceMean", since=(1, 11, 13))(_axes_attribute("ReduceMean"))
register("ReduceMean", since=18, static_inputs=(1,))(_axes_input("ReduceMean"))
register("ReduceMax", since=(1, 11, 12, 13))(_axes_attribute("ReduceMax"))
register("ReduceMax", since=(18, 20), static_inputs=(1,))(_axes_input("ReduceMax"))
register("ReduceMin", since=(1, 11, 12, 13))(_axes_attribute("ReduceMin"))
register("ReduceMin", since=(18, 20), static_inputs=(1,))(_axes_input("ReduceMin"))
register("ReduceProd", since=(1, 11, 13))(_axes_attribute("ReduceProd"))
register("ReduceProd", since=18, static_inputs=(1,))(_axes_input("ReduceProd"))
register("ReduceL1", since=(1, 11, 13))(_axes_attribute("ReduceL1"))
register("ReduceL1", since=18, static_inputs=(1,))(_axes_input("ReduceL1"))
register("ReduceL2", since=(1, 11, 13))(_axes_attribute("ReduceL2"))
register("ReduceL2", since=18, static_inputs=(1,))(_axes_input("ReduceL2"))
register("ReduceLogSum", since=(1, 11, 13))(_axes_attribute("ReduceLogSum"))
register("ReduceLogSum", since=(18, 28), static_inputs=(1,))(_axes_input("ReduceLogSum"))
register("ReduceLogSumExp", since=(1, 11, 13))(_axes_attribute("ReduceLogSumExp"))
register("ReduceLogSumExp", since=(18, 28), static_inputs=(1,))(_axes_input("ReduceLogSumExp"))
register("ReduceSumSquare", since=(1, 11, 13))(_axes_attribute("ReduceSumSquare"))
register("ReduceSumSquare", since=18, static_inputs=(1,))(_axes_input("ReduceSumSquare"))


def _arg_extreme(ctx, x, function):
    rank = np.ndim(x)
    axis = ctx.attr("axis", 0)
    if not -rank <= axis < max(rank, 1):
        raise ctx.error(f"axis {axis} is out of range for rank {rank}")
    axis %= max(rank, 1)
    keepdims = bool(ctx.attr("keepdims", 1))
    xp = ctx.xp(x)
    if np.shape(x)[axis] == 0:
        raise ctx.error(f"cannot take {function} over the empty axis {axis}")
    if ctx.attr("select_last_index", 0):
        last = np.shape(x)[axis] - 1
        return last - getattr(xp, function)(xp.flip(x, axis), axis=axis, keepdims=keepdims)
    return getattr(xp, function)(x, axis=axis, keepdims=keepdims)


@register("ArgMax", since=(1, 11, 12, 13))
def arg_max(ctx, x):
    return _arg_extreme(ctx, x, "argmax")


@register("ArgMin", since=(1, 11, 12, 13))
def arg_min(ctx, x):
    return _arg_extreme(ctx, x, "argmin")
