"""Shape and layout ops. Shapes are static under jit, so these mostly run in NumPy at trace time."""

from __future__ import annotations

import numpy as np

from onnx2jax.ops.registry import register


@register("Shape", 1)
@register("Shape", 13)
@register("Shape", 15)
@register("Shape", 19)
@register("Shape", 21)
@register("Shape", 23)
@register("Shape", 24)
def shape(ctx, x):
    dims = np.asarray(np.shape(x), dtype=np.int64)
    rank = len(dims)
    start = ctx.attr("start", 0)
    end = ctx.attr("end", rank)
    return dims[slice(start, end)]


@register("Size", 1)
@register("Size", 13)
@register("Size", 19)
@register("Size", 21)
@register("Size", 23)
@register("Size", 24)
def size(ctx, x):
    return np.asarray(np.prod(np.shape(x), dtype=np.int64), dtype=np.int64)


@register("Identity", 1)
@register("Identity", 13)
@register("Identity", 14)
@register("Identity", 16)
@register("Identity", 19)
@register("Identity", 21)
@register("Identity", 23)
@register("Identity", 24)
def identity(ctx, x):
    return x


@register("Constant", 1)
@register("Constant", 9)
@register("Constant", 11)
@register("Constant", 12)
@register("Constant", 13)
@register("Constant", 19)
@register("Constant", 21)
@register("Constant", 23)
@register("Constant", 24)
def constant(ctx):
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in ctx.attrs:
            return np.asarray(ctx.attrs[key], dtype=dtype)
    if "value_string" in ctx.attrs:
        return np.asarray(ctx.attrs["value_string"], dtype=object)
    if "value_strings" in ctx.attrs:
        return np.asarray(ctx.attrs["value_strings"], dtype=object)
    if "sparse_value" in ctx.attrs:
        from onnx2jax.graph import _sparse_to_dense

        return _sparse_to_dense(ctx.attrs["sparse_value"], ctx.interpreter.base_dir)
    return ctx.attrs["value"]


def _reshape_target(data_shape, target, allowzero):
    target = [int(d) for d in target]
    if not allowzero:
        target = [data_shape[i] if d == 0 else d for i, d in enumerate(target)]
    return target


@register("Reshape", 5, static_inputs=(1,))
@register("Reshape", 13, static_inputs=(1,))
@register("Reshape", 14, static_inputs=(1,))
@register("Reshape", 19, static_inputs=(1,))
@register("Reshape", 21, static_inputs=(1,))
@register("Reshape", 23, static_inputs=(1,))
@register("Reshape", 24, static_inputs=(1,))
def reshape(ctx, data, target_shape):
    target = ctx.static_ints(target_shape, 1, "the target shape")
    target = _reshape_target(np.shape(data), target, ctx.attr("allowzero", 0))
    return ctx.xp(data).reshape(data, target)


@register("Reshape", 1)
def reshape_v1(ctx, data):
    target = _reshape_target(np.shape(data), ctx.attr("shape"), 0)
    return ctx.xp(data).reshape(data, target)


@register("Transpose", 1)
@register("Transpose", 13)
@register("Transpose", 21)
@register("Transpose", 23)
@register("Transpose", 24)
def transpose(ctx, x):
    perm = ctx.attr("perm")
    return ctx.xp(x).transpose(x, perm)


@register("Unsqueeze", 1)
@register("Unsqueeze", 11)
def unsqueeze_v1(ctx, x):
    return _unsqueeze(ctx, x, ctx.attr("axes"))


@register("Unsqueeze", 13, static_inputs=(1,))
@register("Unsqueeze", 21, static_inputs=(1,))
@register("Unsqueeze", 23, static_inputs=(1,))
@register("Unsqueeze", 24, static_inputs=(1,))
def unsqueeze(ctx, x, axes):
    return _unsqueeze(ctx, x, ctx.static_ints(axes, 1, "the axes"))


def _unsqueeze(ctx, x, axes):
    rank = np.ndim(x) + len(axes)
    return ctx.xp(x).expand_dims(x, tuple(sorted(a % rank for a in axes)))


@register("Squeeze", 1)
@register("Squeeze", 11)
def squeeze_v1(ctx, x):
    return _squeeze(ctx, x, ctx.attr("axes"))


@register("Squeeze", 13, static_inputs=(1,))
@register("Squeeze", 21, static_inputs=(1,))
@register("Squeeze", 23, static_inputs=(1,))
@register("Squeeze", 24, static_inputs=(1,))
def squeeze(ctx, x, axes=None):
    return _squeeze(ctx, x, None if axes is None else ctx.static_ints(axes, 1, "the axes"))


def _squeeze(ctx, x, axes):
    if axes is None:
        axes = [i for i, d in enumerate(np.shape(x)) if d == 1]
    return ctx.xp(x).squeeze(x, tuple(a % np.ndim(x) for a in axes))


@register("Concat", 1)
@register("Concat", 4)
@register("Concat", 11)
@register("Concat", 13)
def concat(ctx, *inputs):
    axis = ctx.attr("axis", 1)
    return ctx.xp(*inputs).concatenate(inputs, axis=axis)
