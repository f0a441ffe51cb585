"""Shape and layout ops. Shapes are static under jit, so these mostly run in NumPy at trace time.

Every op here is written against ``ctx.xp(...)``: on static inputs it computes in NumPy (shape
arithmetic folds away before XLA sees it), on traced inputs it emits plain slices, reshapes,
transposes and pads, which XLA turns into copies or nothing at all.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import onnx

from onnx2jax.core.convert import is_static
from onnx2jax.core.dtypes import numpy_dtype
from onnx2jax.core.settings import max_static_bytes
from onnx2jax.ops.registry import register


def _axis(ctx, axis, rank, what="axis"):
    axis = int(axis)
    if not -rank <= axis < rank:
        raise ctx.error(f"{what} {axis} is out of range for a tensor of rank {rank}")
    return axis % rank


def _axes(ctx, axes, rank, what="axes"):
    axes = [_axis(ctx, a, rank, what) for a in axes]
    if len(set(axes)) != len(axes):
        raise ctx.error(f"{what} {axes} repeat an axis")
    return axes


def _along(axis, index, rank):
    """An index tuple that applies ``index`` on ``axis`` and keeps every other axis whole."""
    return (slice(None),) * axis + (index,) + (slice(None),) * (rank - axis - 1)


@register("Shape", since=(1, 13, 15, 19, 21, 23, 24, 25))
def shape(ctx, x):
    dims = np.asarray(np.shape(x), dtype=np.int64)
    # Python slicing clamps start and end to [0, rank] exactly as the spec asks.
    return dims[slice(ctx.attr("start", 0), ctx.attr("end", len(dims)))]


@register("Size", since=(1, 13, 19, 21, 23, 24, 25))
def size(ctx, x):
    return np.asarray(np.prod(np.shape(x), dtype=np.int64), dtype=np.int64)


@register("Identity", since=(1, 13, 14, 16, 19, 21, 23, 24, 25))
def identity(ctx, x):
    return x


@register("Constant", since=(1, 9, 11, 12, 13, 19, 21, 23, 24, 25))
def constant(ctx):
    for key, dtype in (
        ("value_float", np.float32),
        ("value_floats", np.float32),
        ("value_int", np.int64),
        ("value_ints", np.int64),
    ):
        if key in ctx.attrs:
            return np.asarray(ctx.attrs[key], dtype=dtype)
    if "value_string" in ctx.attrs:
        return np.asarray(ctx.attrs["value_string"], dtype=object)
    if "value_strings" in ctx.attrs:
        return np.asarray(ctx.attrs["value_strings"], dtype=object)
    if "sparse_value" in ctx.attrs:
        from onnx2jax.core.graph import sparse_to_dense

        return sparse_to_dense(ctx.attrs["sparse_value"], ctx.interpreter.base_dir)
    if "value" not in ctx.attrs:
        raise ctx.error("Constant has none of the value attributes")
    return ctx.attrs["value"]


def _reshape_target(ctx, data_shape, target, allowzero):
    target = [int(d) for d in target]
    if not allowzero:
        if any(d == 0 for d in target[len(data_shape) :]):
            raise ctx.error(
                f"target shape {target} copies a dimension (0) that the input "
                f"of shape {list(data_shape)} does not have"
            )
        target = [data_shape[i] if d == 0 else d for i, d in enumerate(target)]
    size = int(np.prod(data_shape, dtype=np.int64))
    if target.count(-1) > 1 or any(d < -1 for d in target):
        raise ctx.error(f"invalid target shape {target}")
    if -1 in target:
        known = int(np.prod([d for d in target if d != -1], dtype=np.int64))
        # NumPy refuses to infer -1 for empty tensors; ONNX infers 0 there.
        target[target.index(-1)] = size // known if known else 0
    if int(np.prod(target, dtype=np.int64)) != size:
        raise ctx.error(f"cannot reshape a tensor of shape {list(data_shape)} to {target}")
    return target


@register("Reshape", since=(5, 13, 14, 19, 21, 23, 24, 25), static_inputs=(1,))
def reshape(ctx, data, target_shape):
    target = ctx.static_ints(target_shape, 1, "the target shape")
    target = _reshape_target(ctx, np.shape(data), target, ctx.attr("allowzero", 0))
    return ctx.xp(data).reshape(data, target)


@register("Reshape", since=1)
def reshape_v1(ctx, data):
    target = _reshape_target(ctx, np.shape(data), ctx.attr("shape"), 0)
    return ctx.xp(data).reshape(data, target)


@register("Transpose", since=(1, 13, 21, 23, 24, 25))
def transpose(ctx, x):
    perm = ctx.attr("perm")
    if perm is not None:
        perm = _axes(ctx, perm, np.ndim(x), "perm")
        if len(perm) != np.ndim(x):
            raise ctx.error(f"perm {perm} does not match the input's rank {np.ndim(x)}")
    return ctx.xp(x).transpose(x, perm)


@register("Unsqueeze", since=(1, 11))
def unsqueeze_v1(ctx, x):
    return _unsqueeze(ctx, x, ctx.attr("axes"))


@register("Unsqueeze", since=(13, 21, 23, 24, 25), static_inputs=(1,))
def unsqueeze(ctx, x, axes):
    return _unsqueeze(ctx, x, ctx.static_ints(axes, 1, "the axes"))


def _unsqueeze(ctx, x, axes):
    axes = _axes(ctx, axes, np.ndim(x) + len(axes))
    return ctx.xp(x).expand_dims(x, tuple(sorted(axes)))


@register("Squeeze", since=(1, 11))
def squeeze_v1(ctx, x):
    return _squeeze(ctx, x, ctx.attr("axes"))


@register("Squeeze", since=(13, 21, 23, 24, 25), static_inputs=(1,))
def squeeze(ctx, x, axes=None):
    return _squeeze(ctx, x, None if axes is None else ctx.static_ints(axes, 1, "the axes"))


def _squeeze(ctx, x, axes):
    dims = np.shape(x)
    if axes is None:
        axes = [i for i, d in enumerate(dims) if d == 1]
    axes = _axes(ctx, axes, len(dims))
    wide = [a for a in axes if dims[a] != 1]
    if wide:
        raise ctx.error(
            f"cannot squeeze axis {wide[0]} of size {dims[wide[0]]} (input shape {list(dims)})"
        )
    return ctx.xp(x).squeeze(x, tuple(axes))


@register("Concat", since=(1, 4, 11, 13))
def concat(ctx, *inputs):
    if not inputs:
        raise ctx.error("Concat needs at least one input")
    axis = _axis(ctx, ctx.attr("axis", 1), np.ndim(inputs[0]))
    return ctx.xp(*inputs).concatenate(inputs, axis=axis)


@register("Flatten", since=(1, 9, 11, 13, 21, 23, 24, 25))
def flatten(ctx, x):
    dims = np.shape(x)
    axis = ctx.attr("axis", 1)
    if not -len(dims) <= axis <= len(dims):
        raise ctx.error(f"axis {axis} is out of range for a tensor of rank {len(dims)}")
    axis = axis + len(dims) if axis < 0 else axis
    outer = int(np.prod(dims[:axis], dtype=np.int64))
    return ctx.xp(x).reshape(x, (outer, int(np.prod(dims[axis:], dtype=np.int64))))


@register("Expand", since=(8, 13), static_inputs=(1,))
def expand(ctx, x, shape):
    dims = ctx.static_ints(shape, 1, "the shape")
    try:
        target = np.broadcast_shapes(np.shape(x), tuple(dims))
    except ValueError:
        raise ctx.error(f"cannot expand a tensor of shape {list(np.shape(x))} to {dims}") from None
    return ctx.xp(x).broadcast_to(x, target)


@register("Tile", since=1, static_inputs=(1, 2))
def tile_v1(ctx, x, tiles, axis):
    reps = [1] * np.ndim(x)
    reps[_axis(ctx, ctx.static_ints(axis, 2, "the axis")[0], np.ndim(x))] = ctx.static_ints(
        tiles, 1, "the tiles"
    )[0]
    return ctx.xp(x).tile(x, reps)


@register("Tile", since=(6, 13), static_inputs=(1,))
def tile(ctx, x, repeats):
    reps = ctx.static_ints(repeats, 1, "the repeats")
    if len(reps) != np.ndim(x) or min(reps, default=0) < 0:
        raise ctx.error(f"repeats {reps} do not fit an input of rank {np.ndim(x)}")
    return ctx.xp(x).tile(x, reps)


@register("ConstantOfShape", since=(9, 20, 21, 23, 24, 25), static_inputs=(0,))
def constant_of_shape(ctx, shape):
    dims = ctx.static_ints(shape, 0, "the shape")
    if min(dims, default=0) < 0:
        raise ctx.error(f"negative dimension in shape {dims}")
    value = ctx.attr("value")
    value = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    if value.size != 1:
        raise ctx.error(f"value must hold one element, got {value.size}")
    if math.prod(dims) * value.itemsize > max_static_bytes():
        # A read-only view: the interpreter hands it to XLA without materializing it.
        return np.broadcast_to(value[0], dims)
    return np.full(dims, value[0], dtype=value.dtype)


@register("Range", since=(11, 27), static_inputs=(0, 1, 2))
def range_(ctx, start, limit, delta):
    start, limit, delta = (
        np.asarray(ctx.static(v, i, what)).reshape(())
        for i, (v, what) in enumerate(((start, "start"), (limit, "limit"), (delta, "delta")))
    )
    dtype = start.dtype
    if delta == 0:
        raise ctx.error("delta must not be zero")
    if dtype in (np.dtype(np.float16), numpy_dtype(onnx.TensorProto.BFLOAT16)):
        stash = ctx.attr("stash_type", onnx.TensorProto.FLOAT)
        if stash not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            raise ctx.error(f"stash_type {stash} is neither FLOAT (1) nor DOUBLE (11)")
        wide = numpy_dtype(stash)
        return np.arange(start.astype(wide).item(), float(limit), float(delta), dtype=wide).astype(
            dtype
        )
    return np.arange(start.item(), limit.item(), delta.item()).astype(dtype)


@register("EyeLike", since=(9, 22))
def eye_like(ctx, x):
    if np.ndim(x) != 2:
        raise ctx.error(f"EyeLike takes a 2-D input, got rank {np.ndim(x)}")
    elem_type = ctx.attr("dtype")
    dtype = numpy_dtype(elem_type) if elem_type else np.dtype(x.dtype)
    rows, cols = np.shape(x)
    return np.eye(rows, cols, k=ctx.attr("k", 0), dtype=dtype)


@register("Trilu", since=14, static_inputs=(1,))
def trilu(ctx, x, k=None):
    k = 0 if k is None else ctx.static_ints(k, 1, "k")[0]
    if np.ndim(x) < 2:
        raise ctx.error(f"Trilu takes a tensor of rank >= 2, got rank {np.ndim(x)}")
    xp = ctx.xp(x)
    return xp.triu(x, k) if ctx.attr("upper", 1) else xp.tril(x, k)


@register("OneHot", since=(9, 11, 28), static_inputs=(1,))
def one_hot(ctx, indices, depth, values):
    depth = np.asarray(ctx.static(depth, 1, "the depth")).reshape(-1)
    if depth.size != 1 or depth[0] < 1:
        raise ctx.error(f"depth must be one positive number, got {depth.tolist()}")
    depth = int(depth[0])
    if np.size(values) != 2:
        raise ctx.error(f"values must hold [off_value, on_value], got {np.size(values)} values")
    rank = np.ndim(indices)
    axis = ctx.attr("axis", -1)
    if not -rank - 1 <= axis <= rank:
        raise ctx.error(f"axis {axis} is out of range for an output of rank {rank + 1}")
    axis %= rank + 1
    xp = ctx.xp(indices, values)
    if np.dtype(indices.dtype).kind == "f":
        indices = xp.trunc(indices)
    if ctx.opset >= 11:
        indices = xp.where(indices < 0, indices + depth, indices)
    positions = np.arange(depth).reshape((depth,) + (1,) * (rank - axis))
    hot = xp.expand_dims(indices, axis) == positions
    values = xp.reshape(values, (2,))
    return xp.where(hot, values[1], values[0])


_PAD_MODES = ("constant", "reflect", "edge", "wrap")


@register("Pad", since=1)
def pad_v1(ctx, data):
    return _pad(ctx, data, ctx.attr("paddings"), ctx.attr("value", 0.0), None)


@register("Pad", since=2)
def pad_v2(ctx, data):
    return _pad(ctx, data, ctx.attr("pads"), ctx.attr("value", 0.0), None)


@register("Pad", since=(11, 13, 18, 19, 21, 23, 24, 25), static_inputs=(1, 2, 3))
def pad(ctx, data, pads, constant_value=None, axes=None):
    pads = ctx.static_ints(pads, 1, "the pads")
    axes = None if axes is None else ctx.static_ints(axes, 3, "the axes")
    return _pad(ctx, data, pads, constant_value, axes)


def _pad(ctx, data, pads, value, axes):
    mode = ctx.attr("mode", "constant")
    if mode not in _PAD_MODES or (mode == "wrap" and ctx.opset < 19):
        raise ctx.error(f"unsupported pad mode {mode!r}")
    dims = np.shape(data)
    axes = list(range(len(dims))) if axes is None else _axes(ctx, axes, len(dims))
    if pads is None or len(pads) != 2 * len(axes):
        raise ctx.error(f"pads {pads} must hold two numbers for each of the {len(axes)} axes")
    widths = [(0, 0)] * len(dims)
    for i, axis in enumerate(axes):
        widths[axis] = (int(pads[i]), int(pads[i + len(axes)]))
    xp = ctx.xp(data)
    # Negative pads crop; the crop comes first, then every mode pads what is left.
    if any(b < 0 or e < 0 for b, e in widths):
        data = data[
            tuple(slice(max(-b, 0), d - max(-e, 0)) for (b, e), d in zip(widths, dims, strict=True))
        ]
        widths = [(max(b, 0), max(e, 0)) for b, e in widths]
    if not any(b or e for b, e in widths):
        return data
    if mode != "constant":
        if any(n == 0 and (b or e) for n, (b, e) in zip(np.shape(data), widths, strict=True)):
            raise ctx.error(f"{mode} padding needs a non-empty axis to copy from")
        return xp.pad(data, widths, mode=mode)
    if value is None:
        value = 0
    if is_static(value):
        value = np.asarray(value).reshape(())
        return xp.pad(data, widths, mode="constant", constant_values=value)
    # A traced pad value goes in through a select: JAX cannot differentiate jnp.pad with
    # respect to constant_values alone (lax.pad's transpose needs the operand's cotangent).
    inside = np.zeros([n + b + e for n, (b, e) in zip(np.shape(data), widths, strict=True)], bool)
    inside[tuple(slice(b, b + n) for n, (b, _) in zip(np.shape(data), widths, strict=True))] = True
    return jnp.where(inside, jnp.pad(data, widths), jnp.reshape(value, ()).astype(data.dtype))


def _blocks(ctx, x):
    if np.ndim(x) != 4:
        raise ctx.error(f"expects a 4-D NCHW input, got rank {np.ndim(x)}")
    block = ctx.attr("blocksize")
    if not block or block < 1:
        raise ctx.error("blocksize must be a positive integer")
    mode = ctx.attr("mode", "DCR")
    if mode not in ("DCR", "CRD"):
        raise ctx.error(f"unsupported mode {mode!r}")
    return block, mode, np.shape(x)


@register("DepthToSpace", since=(1, 11, 13, 28))
def depth_to_space(ctx, x):
    block, mode, (n, c, h, w) = _blocks(ctx, x)
    if c % (block * block):
        raise ctx.error(f"{c} channels do not divide into blocks of {block}x{block}")
    depth = c // (block * block)
    xp = ctx.xp(x)
    if mode == "DCR":
        x = xp.transpose(xp.reshape(x, (n, block, block, depth, h, w)), (0, 3, 4, 1, 5, 2))
    else:
        x = xp.transpose(xp.reshape(x, (n, depth, block, block, h, w)), (0, 1, 4, 2, 5, 3))
    return xp.reshape(x, (n, depth, h * block, w * block))


@register("SpaceToDepth", since=(1, 13, 28))
def space_to_depth(ctx, x):
    block, mode, (n, c, h, w) = _blocks(ctx, x)
    if h % block or w % block:
        raise ctx.error(f"spatial size {h}x{w} does not divide into blocks of {block}")
    xp = ctx.xp(x)
    x = xp.reshape(x, (n, c, h // block, block, w // block, block))
    x = xp.transpose(x, (0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4))
    return xp.reshape(x, (n, c * block * block, h // block, w // block))


@register("CenterCropPad", since=18, static_inputs=(1,))
def center_crop_pad(ctx, x, shape):
    sizes = ctx.static_ints(shape, 1, "the shape")
    dims = np.shape(x)
    axes = ctx.attr("axes")
    axes = list(range(len(dims))) if axes is None else _axes(ctx, axes, len(dims))
    if len(sizes) != len(axes):
        raise ctx.error(f"shape {sizes} must have one size for each of the axes {axes}")
    crop = [slice(None)] * len(dims)
    widths = [(0, 0)] * len(dims)
    for axis, size in zip(axes, sizes, strict=True):
        if size < dims[axis]:
            start = (dims[axis] - size) // 2
            crop[axis] = slice(start, start + size)
        else:
            extra = size - dims[axis]
            widths[axis] = (extra // 2, extra - extra // 2)
    x = x[tuple(crop)]
    return ctx.xp(x).pad(x, widths) if any(b or e for b, e in widths) else x


@register("ReverseSequence", since=(10, 28))
def reverse_sequence(ctx, x, sequence_lens):
    rank = np.ndim(x)
    batch_axis = _axis(ctx, ctx.attr("batch_axis", 1), rank, "batch_axis")
    time_axis = _axis(ctx, ctx.attr("time_axis", 0), rank, "time_axis")
    if batch_axis == time_axis or rank < 2:
        raise ctx.error("batch_axis and time_axis must be two different axes")
    dims = np.shape(x)
    xp = ctx.xp(x, sequence_lens)
    steps = np.arange(dims[time_axis]).reshape(
        [dims[time_axis] if a == time_axis else 1 for a in range(rank)]
    )
    lens = xp.reshape(
        sequence_lens, [dims[batch_axis] if a == batch_axis else 1 for a in range(rank)]
    )
    source = xp.broadcast_to(xp.where(steps < lens, lens - 1 - steps, steps), dims)
    if xp is np:
        return np.take_along_axis(x, source, axis=time_axis)
    return xp.take_along_axis(x, source, axis=time_axis, mode="clip")


@register("Split", since=1, static_inputs=(1,))
def split_v1(ctx, x, split=None):
    sizes = ctx.attr("split") if split is None else ctx.static_ints(split, 1, "the split")
    return _split(ctx, x, sizes, None)


@register("Split", since=(2, 11))
def split_v2(ctx, x):
    return _split(ctx, x, ctx.attr("split"), None)


@register("Split", since=(13, 18), static_inputs=(1,))
def split(ctx, x, split=None):
    sizes = None if split is None else ctx.static_ints(split, 1, "the split")
    if sizes is not None and ctx.attr("num_outputs") is not None:
        raise ctx.error("give either the split input or num_outputs, not both")
    return _split(ctx, x, sizes, ctx.attr("num_outputs"))


def _split(ctx, x, sizes, num_outputs):
    rank = np.ndim(x)
    axis = _axis(ctx, ctx.attr("axis", 0), rank)
    dim = np.shape(x)[axis]
    if not sizes:
        parts = num_outputs or ctx.num_outputs
        chunk = -(-dim // parts)
        # The last chunk is smaller when the axis does not divide evenly (opset 18 wording).
        sizes = [chunk] * (parts - 1) + [dim - chunk * (parts - 1)]
    sizes = [int(s) for s in sizes]
    if sum(sizes) != dim or min(sizes) < 0:
        raise ctx.error(f"split sizes {sizes} do not add up to the axis size {dim}")
    if len(sizes) != ctx.num_outputs:
        raise ctx.error(
            f"split into {len(sizes)} parts, but the node has {ctx.num_outputs} outputs"
        )
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return tuple(
        x[_along(axis, slice(int(a), int(b)), rank)]
        for a, b in zip(offsets[:-1], offsets[1:], strict=True)
    )


@register("Slice", since=1)
def slice_v1(ctx, x):
    starts, ends = ctx.attr("starts"), ctx.attr("ends")
    if starts is None or ends is None:
        raise ctx.error("Slice-1 needs the starts and ends attributes")
    return _slice(ctx, x, starts, ends, ctx.attr("axes"), None)


@register("Slice", since=(10, 11, 13), static_inputs=(1, 2, 3, 4))
def slice_(ctx, x, starts, ends, axes=None, steps=None):
    return _slice(
        ctx,
        x,
        ctx.static_ints(starts, 1, "the starts"),
        ctx.static_ints(ends, 2, "the ends"),
        None if axes is None else ctx.static_ints(axes, 3, "the axes"),
        None if steps is None else ctx.static_ints(steps, 4, "the steps"),
    )


def _slice(ctx, x, starts, ends, axes, steps):
    dims = np.shape(x)
    if axes is None:
        axes = range(len(starts))
    axes = _axes(ctx, axes, len(dims))
    steps = [1] * len(axes) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ctx.error("starts, ends, axes and steps must have the same length")
    index = [slice(None)] * len(dims)
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        dim = dims[axis]
        if step == 0:
            raise ctx.error("slice step must not be zero")
        start, end = int(start), int(end)
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        # Clamp as the spec does; ends can be INT64_MAX or INT64_MIN ("to the end").
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            index[axis] = slice(start, end, step)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            index[axis] = slice(start, None if end < 0 else end, step)
    return x[tuple(index)]
