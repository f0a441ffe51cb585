"""Gather and Scatter families, TopK, NonZero, Unique, Compress, TensorScatter.

Static indices are wrapped and bounds-checked at trace time, so a gather with constant indices
becomes a slice (or one cheap gather) in XLA. Ops whose output size depends on values
(NonZero, Unique, Compress) read those values with ``ctx.static``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from onnx2jax.core.convert import is_static
from onnx2jax.ops.registry import register


def _index_dtype(xp):
    """int64 for NumPy; for JAX the int64 that x64 mode allows (int32 when it is off)."""
    return np.dtype(np.int64) if xp is np else jax.dtypes.canonicalize_dtype(np.int64)


def _axis(ctx, axis, rank, what="axis"):
    axis = int(axis)
    if not -rank <= axis < rank:
        raise ctx.error(f"{what} {axis} is out of range for a tensor of rank {rank}")
    return axis % rank


def _wrap(ctx, indices, dims):
    """``indices`` with negative entries wrapped by ``dims`` (broadcast against them).

    Static indices are checked and stay NumPy; traced ones are wrapped in the graph.
    """
    if is_static(indices):
        indices = np.asarray(indices).astype(np.int64)
        dims = np.asarray(dims, dtype=np.int64)
        if np.any((indices < -dims) | (indices >= dims)):
            raise ctx.error(f"indices out of range for an axis of size {dims.tolist()}")
        return np.where(indices < 0, indices + dims, indices)
    if jnp.issubdtype(indices.dtype, jnp.unsignedinteger):
        return indices
    return jnp.where(indices < 0, indices + jnp.asarray(dims, indices.dtype), indices)


def _take(x, indices, axis):
    """``take`` along ``axis`` with wrapped indices; contiguous static indices become a slice."""
    if is_static(x) and is_static(indices):
        return np.take(x, indices, axis=axis)
    if is_static(indices):
        before = (slice(None),) * axis
        if indices.ndim == 0:
            return x[before + (int(indices),)]
        flat = indices.reshape(-1)
        if flat.size and np.all(np.diff(flat) == 1):
            part = x[before + (slice(int(flat[0]), int(flat[-1]) + 1),)]
            dims = np.shape(x)
            return jnp.reshape(part, dims[:axis] + indices.shape + dims[axis + 1 :])
    dims = np.shape(x)
    if dims[axis] == 0:
        # jnp.take returns an empty axis' input unchanged, whatever the indices' shape.
        return jnp.zeros(dims[:axis] + np.shape(indices) + dims[axis + 1 :], x.dtype)
    return jnp.take(x, indices, axis=axis, mode="clip")


@register("Gather", since=(1, 11, 13))
def gather(ctx, data, indices):
    axis = _axis(ctx, ctx.attr("axis", 0), np.ndim(data))
    if is_static(data) and np.asarray(data).dtype == object:
        indices = ctx.static(indices, 1, "the indices into a string tensor")
    return _take(data, _wrap(ctx, indices, np.shape(data)[axis]), axis)


@register("GatherElements", since=(11, 13))
def gather_elements(ctx, data, indices):
    rank = np.ndim(data)
    axis = _axis(ctx, ctx.attr("axis", 0), rank)
    if np.ndim(indices) != rank:
        raise ctx.error(f"indices of rank {np.ndim(indices)} for data of rank {rank}")
    dims, index_dims = np.shape(data), np.shape(indices)
    if any(i > d for a, (i, d) in enumerate(zip(index_dims, dims, strict=True)) if a != axis):
        raise ctx.error(f"indices of shape {list(index_dims)} exceed data of shape {list(dims)}")
    # Indices may be smaller than the data on the other axes; only that corner is read.
    data = data[tuple(slice(None) if a == axis else slice(0, i) for a, i in enumerate(index_dims))]
    indices = _wrap(ctx, indices, dims[axis])
    if is_static(data) and is_static(indices):
        return np.take_along_axis(data, indices, axis=axis)
    mode = "promise_in_bounds" if is_static(indices) else "clip"
    return jnp.take_along_axis(data, indices, axis=axis, mode=mode)


@register("GatherND", since=(11, 12, 13))
def gather_nd(ctx, data, indices):
    batch_dims = ctx.attr("batch_dims", 0)
    dims, index_dims = np.shape(data), np.shape(indices)
    depth = index_dims[-1] if index_dims else 0
    if (
        not index_dims
        or batch_dims + depth > len(dims)
        or batch_dims >= len(index_dims)
        or index_dims[:batch_dims] != dims[:batch_dims]
    ):
        raise ctx.error(
            f"indices of shape {list(index_dims)} with batch_dims={batch_dims} do "
            f"not fit data of shape {list(dims)}"
        )
    xp = ctx.xp(data, indices)
    indices = _wrap(ctx, indices, dims[batch_dims : batch_dims + depth])
    batch = int(np.prod(dims[:batch_dims], dtype=np.int64))
    count = int(np.prod(index_dims[batch_dims:-1], dtype=np.int64))
    # asarray: static data with traced indices must become a jax array before the indexing.
    data = xp.reshape(xp.asarray(data), (batch,) + dims[batch_dims:])
    indices = ctx.xp(indices).reshape(indices, (batch, count, depth))
    picked = data[
        (np.arange(batch).reshape(batch, 1),) + tuple(indices[..., i] for i in range(depth))
    ]
    return xp.reshape(picked, index_dims[:-1] + dims[batch_dims + depth :])


_SCATTER_UFUNCS = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


def _reduction(ctx):
    reduction = ctx.attr("reduction", "none")
    allowed = (
        ["none"]
        + (["add", "mul"] if ctx.opset >= 16 else [])
        + (["max", "min"] if ctx.opset >= 18 else [])
    )
    if reduction not in allowed:
        raise ctx.error(f"unsupported reduction {reduction!r} at opset {ctx.opset}")
    return reduction


def _scatter(ctx, data, index, updates, reduction):
    """``data`` with ``updates`` written (or reduced) at the NumPy-style ``index`` tuple."""
    if ctx.xp(data, updates, *index) is np:
        out = np.array(data, copy=True)
        if reduction == "none":
            out[index] = updates
        else:
            _SCATTER_UFUNCS[reduction].at(out, index, updates)
        return out
    data = jnp.asarray(data)
    if data.dtype == jnp.bool_ and reduction != "none":
        # Bool add/max are a logical or and mul/min a logical and (as in onnxruntime); JAX
        # scatters numbers only, so through uint8.
        reduction = {"add": "max", "mul": "min"}.get(reduction, reduction)
        return _scatter(
            ctx, data.astype(jnp.uint8), index, jnp.asarray(updates).astype(jnp.uint8), reduction
        ).astype(jnp.bool_)
    ref = data.at[index]
    if reduction == "none":
        return ref.set(updates)
    return {"add": ref.add, "mul": ref.multiply, "max": ref.max, "min": ref.min}[reduction](updates)


def _scatter_elements(ctx, data, indices, updates, reduction):
    rank = np.ndim(data)
    axis = _axis(ctx, ctx.attr("axis", 0), rank)
    index_dims = np.shape(indices)
    if len(index_dims) != rank or np.shape(updates) != index_dims:
        raise ctx.error(
            f"indices {list(index_dims)} and updates {list(np.shape(updates))} "
            f"must have the same shape and the data's rank {rank}"
        )
    indices = _wrap(ctx, indices, np.shape(data)[axis])
    index = tuple(
        indices if a == axis else np.arange(n).reshape([n if b == a else 1 for b in range(rank)])
        for a, n in enumerate(index_dims)
    )
    return _scatter(ctx, data, index, updates, reduction)


@register("Scatter", since=(9, 11))
def scatter(ctx, data, indices, updates):
    return _scatter_elements(ctx, data, indices, updates, "none")


@register("ScatterElements", since=(11, 13, 16, 18))
def scatter_elements(ctx, data, indices, updates):
    return _scatter_elements(ctx, data, indices, updates, _reduction(ctx))


@register("ScatterND", since=(11, 13, 16, 18))
def scatter_nd(ctx, data, indices, updates):
    dims, index_dims = np.shape(data), np.shape(indices)
    depth = index_dims[-1] if index_dims else 0
    if not index_dims or depth > len(dims) or np.shape(updates) != index_dims[:-1] + dims[depth:]:
        raise ctx.error(
            f"indices {list(index_dims)} and updates {list(np.shape(updates))} do "
            f"not fit data of shape {list(dims)}"
        )
    indices = _wrap(ctx, indices, dims[:depth])
    index = tuple(indices[..., i] for i in range(depth))
    return _scatter(ctx, data, index, updates, _reduction(ctx))


@register("TensorScatter", since=24)
def tensor_scatter(ctx, past_cache, update, write_indices=None):
    mode = ctx.attr("mode", "linear")
    if mode not in ("linear", "circular"):
        raise ctx.error(f"unsupported mode {mode!r}")
    dims, update_dims = np.shape(past_cache), np.shape(update)
    rank = len(dims)
    axis = _axis(ctx, ctx.attr("axis", -2), rank)
    if (
        axis == 0
        or len(update_dims) != rank
        or update_dims[axis] > dims[axis]
        or any(u != d for a, (u, d) in enumerate(zip(update_dims, dims, strict=True)) if a != axis)
    ):
        raise ctx.error(
            f"update of shape {list(update_dims)} does not fit a cache of shape "
            f"{list(dims)} along axis {axis}"
        )
    batch, length, capacity = dims[0], update_dims[axis], dims[axis]
    if write_indices is None:
        write_indices = np.zeros(batch, np.int64)
    xp = ctx.xp(write_indices)
    positions = xp.reshape(write_indices, (batch, 1)) + np.arange(length)
    if mode == "circular":
        positions = positions % capacity
    # Two index arrays (batch, sequence) and slices elsewhere: XLA sees one scatter of
    # contiguous windows, and NumPy indexing puts the (batch, sequence) dims first.
    index = tuple(
        np.arange(batch).reshape(batch, 1) if a == 0 else positions if a == axis else slice(None)
        for a in range(rank)
    )
    moved = ctx.xp(update).moveaxis(update, axis, 1)
    return _scatter(ctx, past_cache, index, moved, "none")


@register("TopK", since=1)
def top_k_v1(ctx, x):
    return _top_k(ctx, x, ctx.attr("k"), largest=True)


@register("TopK", since=(10, 11, 24), static_inputs=(1,))
def top_k(ctx, x, k):
    return _top_k(ctx, x, ctx.static_ints(k, 1, "k")[0], bool(ctx.attr("largest", 1)))


def _top_k(ctx, x, k, largest):
    rank = np.ndim(x)
    axis = _axis(ctx, ctx.attr("axis", -1), rank)
    dim = np.shape(x)[axis]
    if k is None or not 0 <= k <= dim:
        raise ctx.error(f"k={k} is out of range for an axis of size {dim}")
    xp = ctx.xp(x)
    keys = xp.moveaxis(x, axis, -1)
    # Order-reversing keys without overflow: ~v for integers (unsigned too), -v for floats.
    flipped = xp.invert(keys) if np.dtype(keys.dtype).kind in "iu" else -keys
    # Equal values keep the lower index first (stable sort, and lax.top_k guarantees it).
    if xp is np:
        order = np.argsort(flipped if largest else keys, axis=-1, kind="stable")[..., :k]
    else:
        order = lax.top_k(keys if largest else flipped, k)[1]
    values = xp.take_along_axis(keys, order, axis=-1)
    order = order.astype(_index_dtype(xp))
    return xp.moveaxis(values, -1, axis), xp.moveaxis(order, -1, axis)


@register("NonZero", since=(9, 13))
def non_zero(ctx, x):
    values = np.asarray(ctx.static(x, 0, "the input (its count of non-zeros sizes the output)"))
    return np.argwhere(values).T.astype(np.int64)


@register("Unique", since=(11, 28))
def unique(ctx, x):
    values = np.asarray(ctx.static(x, 0, "the input (its distinct values size the output)"))
    axis = ctx.attr("axis")
    if axis is None:
        values, axis = values.reshape(-1), 0
    else:
        axis = _axis(ctx, axis, values.ndim)
    y, first, inverse, counts = np.unique(
        values, return_index=True, return_inverse=True, return_counts=True, axis=axis
    )
    if not ctx.attr("sorted", 1):
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        y, first, inverse, counts = (
            np.take(y, order, axis=axis),
            first[order],
            rank[inverse],
            counts[order],
        )
    return (
        y,
        first.astype(np.int64),
        inverse.reshape(-1).astype(np.int64),
        counts.astype(np.int64),
    )


@register("Compress", since=(9, 11, 28), static_inputs=(1,))
def compress(ctx, x, condition):
    keep = np.asarray(ctx.static(condition, 1, "the condition")).reshape(-1).astype(bool)
    axis = ctx.attr("axis")
    if axis is None:
        x, axis = ctx.xp(x).reshape(x, (-1,)), 0
    else:
        axis = _axis(ctx, axis, np.ndim(x))
    dim = np.shape(x)[axis]
    if keep[dim:].any():
        raise ctx.error(
            f"condition selects index {dim + int(np.argmax(keep[dim:]))} of an axis of size {dim}"
        )
    return _take(x, np.nonzero(keep[:dim])[0].astype(np.int64), axis)
