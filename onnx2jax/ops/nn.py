"""Convolutions, pooling, Dropout, LRN, Col2Im and other neural-network layers (NCHW layout)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from onnx2jax.ops.registry import register

_AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def _spatial_ints(ctx, name, rank, default):
    values = ctx.attr(name)
    if values is None or len(values) == 0:
        return [default] * rank
    values = [int(v) for v in values]
    if len(values) != rank:
        raise ctx.error(f"attribute {name}={values} needs {rank} values")
    return values


def _auto_pad(ctx):
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad not in _AUTO_PADS:
        raise ctx.error(f"auto_pad={auto_pad!r} is not one of {', '.join(_AUTO_PADS)}")
    return auto_pad


def _same_split(total, auto_pad):
    """Split ``total`` padding between begin and end; SAME_UPPER puts the odd one at the end."""
    small = total // 2
    return (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)


def conv_pads(ctx, in_shape, kernel, strides, dilations):
    """(begin, end) padding per spatial axis of the node's convolution of an input of spatial
    shape ``in_shape`` (its ``auto_pad`` or ``pads``); NativeConv reads it too."""
    auto_pad = _auto_pad(ctx)
    rank = len(kernel)
    if auto_pad == "NOTSET":
        pads = _spatial_ints(ctx, "pads", 2 * rank, 0)
        return [(pads[i], pads[i + rank]) for i in range(rank)]
    if auto_pad == "VALID":
        return [(0, 0)] * rank
    pairs = []
    for size, k, s, d in zip(in_shape, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        pairs.append(_same_split(max(0, (out - 1) * s + (k - 1) * d + 1 - size), auto_pad))
    return pairs


def _conv_layout(rank):
    """NCHW-style dimension numbers for any number of spatial axes."""
    axes = tuple(range(rank + 2))
    return lax.ConvDimensionNumbers(axes, axes, axes)


def _kernel_shape(ctx, w_shape):
    kernel = ctx.attr("kernel_shape")
    shape = [int(d) for d in w_shape[2:]]
    if kernel is not None and len(kernel) and [int(k) for k in kernel] != shape:
        raise ctx.error(f"kernel_shape={list(kernel)} does not match the weight shape {shape}")
    return shape


def _bias_shape(b, rank):
    return jnp.reshape(b, (1, -1) + (1,) * rank)


@register("Conv", since=(1, 11, 22))
def conv(ctx, x, w, b=None):
    return convolve(ctx, x, w, b)


def conv_geometry(ctx, x_shape, w_shape):
    """The node's strides, (begin, end) pads and dilations for a Conv of an input of
    ``x_shape`` by weights of OIHW... ``w_shape`` (NativeConv reads them too); raises for
    shapes the node's attributes do not fit."""
    rank = len(x_shape) - 2
    if rank < 1:
        raise ctx.error(f"Conv needs an input of rank 3 or more, got shape {tuple(x_shape)}")
    kernel = _kernel_shape(ctx, w_shape)
    strides = _spatial_ints(ctx, "strides", rank, 1)
    dilations = _spatial_ints(ctx, "dilations", rank, 1)
    padding = conv_pads(ctx, x_shape[2:], kernel, strides, dilations)
    group = int(ctx.attr("group", 1))
    if x_shape[1] != w_shape[1] * group:
        raise ctx.error(
            f"input channels {x_shape[1]} != weight channels {w_shape[1]} x group {group}"
        )
    return strides, padding, dilations


def convolve(ctx, x, w, b=None, residual=None, relu=False):
    """The node's Conv of ``x`` by ``w`` (+ ``b``), then ``+ residual`` and a ReLU if asked
    (com.microsoft FusedConv), by XLA."""
    strides, padding, dilations = conv_geometry(ctx, np.shape(x), np.shape(w))
    rank = len(strides)
    group = int(ctx.attr("group", 1))
    y = lax.conv_general_dilated(
        jnp.asarray(x),
        jnp.asarray(w).astype(x.dtype),
        window_strides=strides,
        padding=padding,
        rhs_dilation=dilations,
        dimension_numbers=_conv_layout(rank),
        feature_group_count=group,
    )
    if b is not None:
        y = y + _bias_shape(b, rank).astype(y.dtype)
    if residual is not None:
        y = y + residual
    return jax.nn.relu(y) if relu else y


@register("ConvTranspose", since=(1, 11, 22))
def conv_transpose(ctx, x, w, b=None):
    rank = np.ndim(x) - 2
    if rank < 1:
        raise ctx.error(f"ConvTranspose needs an input of rank 3 or more, got {np.shape(x)}")
    in_shape = np.shape(x)[2:]
    kernel = _kernel_shape(ctx, np.shape(w))
    strides = _spatial_ints(ctx, "strides", rank, 1)
    dilations = _spatial_ints(ctx, "dilations", rank, 1)
    output_padding = _spatial_ints(ctx, "output_padding", rank, 0)
    group = int(ctx.attr("group", 1))
    auto_pad = _auto_pad(ctx)
    output_shape = ctx.attr("output_shape")
    full = [
        s * (n - 1) + op + (k - 1) * d + 1
        for n, k, s, d, op in zip(in_shape, kernel, strides, dilations, output_padding, strict=True)
    ]
    if output_shape is not None and len(output_shape):
        output_shape = [int(v) for v in output_shape][-rank:]
        padding = [
            _same_split(f - o, "SAME_UPPER" if auto_pad == "SAME_UPPER" else "")
            for f, o in zip(full, output_shape, strict=True)
        ]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        padding = [
            _same_split(f - n * s, auto_pad)
            for f, n, s in zip(full, in_shape, strides, strict=True)
        ]
    elif auto_pad == "VALID":
        padding = [(0, 0)] * rank
    else:
        pads = _spatial_ints(ctx, "pads", 2 * rank, 0)
        padding = [(pads[i], pads[i + rank]) for i in range(rank)]
    channels = np.shape(x)[1]
    if channels != np.shape(w)[0]:
        raise ctx.error(f"input channels {channels} != weight dimension 0 {np.shape(w)[0]}")
    # A transposed convolution is the gradient of a convolution: dilate the input by the
    # stride, pad by the dilated kernel extent minus the ONNX pads, and convolve with the
    # spatially flipped kernel whose in/out channels are swapped within each group.
    out_per_group = np.shape(w)[1]
    w = jnp.asarray(w).astype(x.dtype)
    w = jnp.reshape(w, (group, channels // group, out_per_group) + tuple(kernel))
    w = jnp.swapaxes(w, 1, 2)
    w = jnp.reshape(w, (group * out_per_group, channels // group) + tuple(kernel))
    w = jnp.flip(w, axis=tuple(range(2, rank + 2)))
    conv_padding = [
        ((k - 1) * d - lo, (k - 1) * d - hi + op)
        for k, d, (lo, hi), op in zip(kernel, dilations, padding, output_padding, strict=True)
    ]
    y = lax.conv_general_dilated(
        jnp.asarray(x),
        w,
        window_strides=[1] * rank,
        padding=conv_padding,
        lhs_dilation=strides,
        rhs_dilation=dilations,
        dimension_numbers=_conv_layout(rank),
        feature_group_count=group,
    )
    if b is not None:
        y = y + _bias_shape(b, rank).astype(y.dtype)
    return y


@register("CausalConvWithState", since=27)
def causal_conv_with_state(ctx, x, w, b=None, past_state=None):
    activation = ctx.attr("activation", "none")
    if activation not in ("none", "silu", "swish"):
        raise ctx.error(f"activation={activation!r} is not one of 'none', 'silu', 'swish'")
    x = jnp.asarray(x)
    if x.ndim != 3 or np.ndim(w) != 3:
        raise ctx.error(f"input and weight must be rank 3, got {x.shape} and {np.shape(w)}")
    batch, channels, _ = x.shape
    k = np.shape(w)[2]
    if past_state is None:
        past_state = jnp.zeros((batch, channels, k - 1), x.dtype)
    padded = jnp.concatenate([jnp.asarray(past_state).astype(x.dtype), x], axis=2)
    y = lax.conv_general_dilated(
        padded,
        jnp.asarray(w).astype(x.dtype),
        [1],
        [(0, 0)],
        dimension_numbers=_conv_layout(1),
        feature_group_count=channels,
    )
    if b is not None:
        y = y + _bias_shape(b, 1).astype(x.dtype)
    if activation != "none":
        wide = y.astype(jnp.float32)
        y = (wide * jax.nn.sigmoid(wide)).astype(x.dtype)
    return y, padded[:, :, padded.shape[2] - (k - 1) :]


@register("DeformConv", since=(19, 22))
def deform_conv(ctx, x, w, offset, b=None, mask=None):
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ctx.error(f"DeformConv supports 2-D images (rank-4 input), got shape {x.shape}")
    n, channels, height, width = x.shape
    kh, kw = _kernel_shape(ctx, np.shape(w))
    sh, sw = _spatial_ints(ctx, "strides", 2, 1)
    dh, dw = _spatial_ints(ctx, "dilations", 2, 1)
    top, left = _spatial_ints(ctx, "pads", 4, 0)[:2]
    group = int(ctx.attr("group", 1))
    offset_groups = int(ctx.attr("offset_group", 1))
    out_channels = np.shape(w)[0]
    oh, ow = np.shape(offset)[2:]
    if channels != np.shape(w)[1] * group or out_channels % group or channels % offset_groups:
        raise ctx.error(
            f"input {x.shape}, weight {np.shape(w)}, group={group} and "
            f"offset_group={offset_groups} do not fit together"
        )
    if np.shape(offset)[1] != offset_groups * kh * kw * 2:
        raise ctx.error(
            f"offset has {np.shape(offset)[1]} channels, expected "
            f"offset_group * kh * kw * 2 = {offset_groups * kh * kw * 2}"
        )
    offset = jnp.reshape(jnp.asarray(offset).astype(x.dtype), (n, offset_groups, kh, kw, 2, oh, ow))
    base_y = (np.arange(oh) * sh - top)[None, :, None] + (np.arange(kh) * dh)[:, None, None]
    base_x = (np.arange(ow) * sw - left)[None, None, :] + (np.arange(kw) * dw)[:, None, None]
    # Sampling points, shape (n, offset_groups, kh, kw, oh, ow).
    py = offset[:, :, :, :, 0] + base_y[:, None, :, :].astype(x.dtype)
    px = offset[:, :, :, :, 1] + base_x[None, :, :, :].astype(x.dtype)
    y0, x0 = jnp.floor(py), jnp.floor(px)
    images = jnp.reshape(x, (n, offset_groups, channels // offset_groups, height * width))
    taps = kh * kw * oh * ow
    sampled = jnp.zeros((n, offset_groups, channels // offset_groups, taps), x.dtype)
    # Bilinear interpolation; corners outside the image read zero.
    for cy, cx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        yy, xx = y0 + cy, x0 + cx
        weight = (1 - jnp.abs(py - yy)) * (1 - jnp.abs(px - xx))
        inside = (yy >= 0) & (yy <= height - 1) & (xx >= 0) & (xx <= width - 1)
        index = (jnp.clip(yy, 0, height - 1) * width + jnp.clip(xx, 0, width - 1)).astype(jnp.int32)
        values = jnp.take_along_axis(
            images, jnp.reshape(index, (n, offset_groups, 1, taps)), axis=-1
        )
        weight = jnp.where(inside, weight, jnp.zeros((), x.dtype))
        sampled = sampled + values * jnp.reshape(weight, (n, offset_groups, 1, taps))
    if mask is not None:
        sampled = sampled * jnp.reshape(
            jnp.asarray(mask).astype(x.dtype), (n, offset_groups, 1, taps)
        )
    sampled = jnp.reshape(sampled, (n, group, channels // group, kh * kw, oh * ow))
    kernel = jnp.reshape(
        jnp.asarray(w).astype(x.dtype), (group, out_channels // group, channels // group, kh * kw)
    )
    y = jnp.reshape(jnp.einsum("ngckp,gock->ngop", sampled, kernel), (n, out_channels, oh, ow))
    if b is not None:
        y = y + _bias_shape(b, 2).astype(x.dtype)
    return y


# Windows of at most this many positions are reduced as strided slices (PoolGeometry._sliced).
SLICED_WINDOW = 27


class PoolGeometry:
    """Output size and explicit padding of a pooling window over the spatial axes."""

    def __init__(self, ctx, in_shape, kernel, *, dilations=True, ceil_mode=True):
        rank = len(kernel)
        self.kernel = [int(k) for k in kernel]
        self.strides = _spatial_ints(ctx, "strides", rank, 1)
        self.dilations = _spatial_ints(ctx, "dilations", rank, 1) if dilations else [1] * rank
        ceil = bool(ctx.attr("ceil_mode", 0)) if ceil_mode else False
        auto_pad = _auto_pad(ctx)
        self.in_shape = list(in_shape)
        self.begin, self.end, self.out = [], [], []
        pads = _spatial_ints(ctx, "pads", 2 * rank, 0) if auto_pad == "NOTSET" else None
        for i, (n, k, s, d) in enumerate(
            zip(in_shape, self.kernel, self.strides, self.dilations, strict=True)
        ):
            extent = (k - 1) * d + 1
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                # onnxruntime sizes SAME padding with the undilated kernel.
                lo, hi = _same_split(max(0, (-(-n // s) - 1) * s + k - n), auto_pad)
            elif auto_pad == "VALID":
                lo, hi = 0, 0
            else:
                lo, hi = pads[i], pads[i + rank]
            span = n + lo + hi - extent
            out = (-(-span // s) if ceil else span // s) + 1
            if ceil and (out - 1) * s >= n + lo:
                # The last window must start inside the input or its begin padding.
                out -= 1
            self.begin.append(lo)
            self.end.append(hi)
            self.out.append(max(out, 0))

    def window_positions(self, axis):
        """Input positions (out, k) each window reads along one axis (may be out of range)."""
        o = np.arange(self.out[axis])[:, None] * self.strides[axis] - self.begin[axis]
        return o + np.arange(self.kernel[axis])[None, :] * self.dilations[axis]

    def pool(self, x, pad_value, init, computation):
        """Reduce every window, reading ``pad_value`` outside the input, channels-last inside.

        XLA's CPU convolutions run channels-last; a window reduction in NCHW between two of them
        made XLA transpose the activations out and back (ResNet-50's stem MaxPool). Pooling in
        NHWC lets those transposes cancel. The values are the same.
        """
        rank = x.ndim
        to_last = (0, *range(2, rank), 1)
        y = jnp.transpose(x, to_last)
        pad_value = jnp.asarray(pad_value, x.dtype)
        if 0 < np.prod(self.kernel) <= SLICED_WINDOW and all(self.out):
            y = self._sliced(y, pad_value, computation)
        else:
            config = [(0, 0, 0)]
            for i, n in enumerate(self.in_shape):
                extent = (self.kernel[i] - 1) * self.dilations[i] + 1
                needed = (self.out[i] - 1) * self.strides[i] + extent if self.out[i] else 0
                config.append((self.begin[i], needed - n - self.begin[i], 0))
            config.append((0, 0, 0))
            # A NumPy init value stays concrete under jit, so JAX picks its differentiable
            # max/add window reducers rather than the generic, non-differentiable one.
            y = lax.reduce_window(
                lax.pad(y, pad_value, config),
                np.asarray(init, x.dtype),
                computation,
                (1, *self.kernel, 1),
                (1, *self.strides, 1),
                "VALID",
                window_dilation=(1, *self.dilations, 1),
            )
        return jnp.transpose(y, np.argsort(to_last))

    def _sliced(self, y, pad_value, computation):
        """The windows of channels-last ``y`` reduced as one strided slice per window position,
        each padded to the output's size where its windows run off the input: XLA:CPU fuses
        them into one loop, 4-5x faster than its reduce-window (ResNet-50's 3x3/2 MaxPool at
        b8: 11.5-12.2 ms -> 2.4-3.4). Padding the input once instead was a copy XLA would not
        fuse: 9.3 ms more in ResNet-50 b8."""
        result = None
        for offsets in itertools.product(*(range(k) for k in self.kernel)):
            piece = self._tap(y, offsets, pad_value)
            result = piece if result is None else computation(result, piece)
        return result

    def _tap(self, y, offsets, pad_value):
        """What one window position reads in every window: a strided slice of ``y``, padded
        with ``pad_value`` for the windows where it lies outside."""
        start, limit, config = [0], [y.shape[0]], [(0, 0, 0)]
        for axis, offset in enumerate(offsets):
            # Window o reads position o * stride + shift; keep the o for which it is inside.
            shift = offset * self.dilations[axis] - self.begin[axis]
            stride, n = self.strides[axis], self.in_shape[axis]
            first = max(0, -(shift // stride))
            last = min(self.out[axis] - 1, (n - 1 - shift) // stride)
            if first > last:
                return jnp.full((y.shape[0], *self.out, y.shape[-1]), pad_value)
            start.append(first * stride + shift)
            limit.append(last * stride + shift + 1)
            config.append((first, self.out[axis] - 1 - last, 0))
        piece = lax.slice(y, (*start, 0), (*limit, y.shape[-1]), (1, *self.strides, 1))
        return lax.pad(piece, pad_value, [*config, (0, 0, 0)])

    def counts(self, include_pad):
        """How many positions of each window count as elements (static, shape (1, 1, *out))."""
        total = np.ones((1, 1), dtype=np.int64)
        for axis, n in enumerate(self.in_shape):
            pos = self.window_positions(axis)
            lo, hi = (-self.begin[axis], n + self.end[axis]) if include_pad else (0, n)
            per_axis = ((pos >= lo) & (pos < hi)).sum(axis=1)
            total = total[..., None] * per_axis
        return total


def _lowest(dtype):
    if jnp.issubdtype(dtype, jnp.floating):
        return -np.inf
    if jnp.issubdtype(dtype, jnp.bool_):
        return False
    return np.iinfo(dtype).min


def pool_input(ctx, x):
    if np.ndim(x) < 3:
        raise ctx.error(f"{ctx.node.op_type} needs an input of rank 3 or more, got {np.shape(x)}")
    kernel = ctx.attr("kernel_shape")
    if kernel is None or len(kernel) != np.ndim(x) - 2:
        raise ctx.error(f"kernel_shape={kernel} must give one size per spatial axis")
    return jnp.asarray(x), [int(k) for k in kernel]


@register("AveragePool", since=(1, 7, 10, 11, 19, 22))
def average_pool(ctx, x):
    x, kernel = pool_input(ctx, x)
    geometry = PoolGeometry(
        ctx, x.shape[2:], kernel, dilations=ctx.opset >= 19, ceil_mode=ctx.opset >= 10
    )
    include_pad = bool(ctx.attr("count_include_pad", 0)) if ctx.opset >= 7 else False
    sums = geometry.pool(x, 0, 0, lax.add)
    counts = geometry.counts(include_pad)
    return (sums / np.maximum(counts, 1).astype(x.dtype)).astype(x.dtype)


@register("LpPool", since=(1, 2, 11, 18, 22))
def lp_pool(ctx, x):
    x, kernel = pool_input(ctx, x)
    p = float(ctx.attr("p", 2.0))
    geometry = PoolGeometry(
        ctx, x.shape[2:], kernel, dilations=ctx.opset >= 18, ceil_mode=ctx.opset >= 18
    )
    powered = jnp.abs(x) ** jnp.asarray(p, x.dtype)
    sums = geometry.pool(powered, 0, 0, lax.add)
    return sums ** jnp.asarray(1.0 / p, x.dtype)


@register("MaxPool", since=(1, 8, 10, 11, 12, 22))
def max_pool(ctx, x):
    x, kernel = pool_input(ctx, x)
    geometry = PoolGeometry(
        ctx, x.shape[2:], kernel, dilations=ctx.opset >= 10, ceil_mode=ctx.opset >= 10
    )
    lowest = _lowest(x.dtype)
    if not ctx.has_output(1):
        return geometry.pool(x, lowest, lowest, lax.max)
    storage_order = int(ctx.attr("storage_order", 0))
    return _max_pool_with_indices(x, geometry, lowest, storage_order)


def _window_table(geometry, strides):
    """Flat input offset (with ``strides`` per spatial axis) of every (window, tap) pair.

    Returns the offsets, shape (windows, taps), and whether each tap lies inside the input.
    """
    rank = len(geometry.kernel)
    flat = np.zeros([1] * (2 * rank), dtype=np.int64)
    inside = np.ones([1] * (2 * rank), dtype=bool)
    for axis in range(rank):
        pos = geometry.window_positions(axis)
        shape = [1] * (2 * rank)
        shape[axis], shape[rank + axis] = pos.shape
        pos = pos.reshape(shape)
        inside = inside & (pos >= 0) & (pos < geometry.in_shape[axis])
        flat = flat + pos * int(strides[axis])
    windows, taps = int(np.prod(geometry.out)), int(np.prod(geometry.kernel))
    inside = np.broadcast_to(inside, flat.shape).reshape(windows, taps)
    return flat.reshape(windows, taps), inside


def _max_pool_with_indices(x, geometry, lowest, storage_order):
    """Max and flat argmax index (onnxruntime's layout) through gathered windows."""
    in_shape = geometry.in_shape
    row_major = np.cumprod([1] + in_shape[::-1][:-1])[::-1]
    gather, inside = _window_table(geometry, row_major)
    if storage_order:
        column_major = np.cumprod([1] + in_shape[:-1])
        index_table, _ = _window_table(geometry, column_major)
    else:
        index_table = gather
    n, c = x.shape[:2]
    plane = int(np.prod(in_shape))
    patches = jnp.take(x.reshape(n, c, plane), np.where(inside, gather, 0), axis=2)
    patches = jnp.where(inside, patches, jnp.asarray(lowest, x.dtype))
    best = jnp.argmax(patches, axis=-1)
    y = jnp.max(patches, axis=-1).reshape((n, c, *geometry.out))
    index = jnp.take_along_axis(jnp.asarray(index_table)[None, None], best[..., None], axis=-1)[
        ..., 0
    ]
    base = (np.arange(n)[:, None] * c + np.arange(c)[None, :]) * plane
    index = index + jnp.asarray(base)[:, :, None].astype(index.dtype)
    return y, index.reshape((n, c, *geometry.out))


@register("MaxUnpool", since=(9, 11, 22), static_inputs=(2,))
def max_unpool(ctx, x, indices, output_shape=None):
    rank = np.ndim(x) - 2
    kernel = _spatial_ints(ctx, "kernel_shape", rank, 1)
    strides = _spatial_ints(ctx, "strides", rank, 1)
    pads = _spatial_ints(ctx, "pads", 2 * rank, 0)
    inferred = list(np.shape(x)[:2]) + [
        (n - 1) * s - (pads[i] + pads[i + rank]) + k
        for i, (n, k, s) in enumerate(zip(np.shape(x)[2:], kernel, strides, strict=True))
    ]
    x = jnp.asarray(x)
    out = jnp.zeros(int(np.prod(inferred)), x.dtype)
    out = out.at[jnp.reshape(indices, -1)].set(x.reshape(-1), mode="drop").reshape(inferred)
    if output_shape is None:
        return out
    # The indices address the inferred shape; a larger output_shape pads at the end, as
    # onnxruntime and the reference do.
    shape = ctx.static_ints(output_shape, 2, "the output shape")
    if len(shape) != len(inferred):
        raise ctx.error(f"output_shape {shape} must have rank {len(inferred)}")
    return lax.pad(
        out, jnp.zeros((), x.dtype), [(0, o - i, 0) for o, i in zip(shape, inferred, strict=True)]
    )


@register("GlobalAveragePool", since=(1, 22))
def global_average_pool(ctx, x):
    return jnp.mean(x, axis=tuple(range(2, np.ndim(x))), keepdims=True)


@register("GlobalMaxPool", since=(1, 22))
def global_max_pool(ctx, x):
    return jnp.max(x, axis=tuple(range(2, np.ndim(x))), keepdims=True)


@register("GlobalLpPool", since=(1, 2, 22))
def global_lp_pool(ctx, x):
    p = float(ctx.attr("p", 2.0))
    x = jnp.asarray(x)
    sums = jnp.sum(
        jnp.abs(x) ** jnp.asarray(p, x.dtype), axis=tuple(range(2, x.ndim)), keepdims=True
    )
    return sums ** jnp.asarray(1.0 / p, x.dtype)


@register("MaxRoiPool", since=(1, 22))
def max_roi_pool(ctx, x, rois):
    pooled = ctx.attr("pooled_shape")
    if pooled is None or len(pooled) != 2:
        raise ctx.error("MaxRoiPool needs pooled_shape with two values")
    ph, pw = (int(v) for v in pooled)
    scale = float(ctx.attr("spatial_scale", 1.0))
    x = jnp.asarray(x)
    rois = jnp.asarray(rois)
    height, width = x.shape[2:]

    def round_half_away(v):
        return jnp.sign(v) * jnp.floor(jnp.abs(v) + 0.5)

    batch = rois[:, 0].astype(jnp.int32)
    x1, y1, x2, y2 = (round_half_away(rois[:, i] * scale) for i in range(1, 5))

    def bins(start, end, pooled_size, size):
        # Caffe's MaxRoiPool: bin i covers [floor(i * b), ceil((i + 1) * b)) of the RoI.
        length = jnp.maximum(end - start + 1, 1)
        step = length / pooled_size
        i = jnp.arange(pooled_size, dtype=step.dtype)
        lo = jnp.clip(jnp.floor(i[None] * step[:, None]) + start[:, None], 0, size)
        hi = jnp.clip(jnp.ceil((i[None] + 1) * step[:, None]) + start[:, None], 0, size)
        pos = jnp.arange(size, dtype=step.dtype)
        return (pos >= lo[..., None]) & (pos < hi[..., None]), hi <= lo

    rows, rows_empty = bins(y1, y2, ph, height)
    cols, cols_empty = bins(x1, x2, pw, width)
    lowest = _lowest(x.dtype)
    feats = x[batch]
    # (R, C, H, pw): max over the columns of each horizontal bin, then over the rows.
    by_cols = jnp.max(jnp.where(cols[:, None, None], feats[..., None, :], lowest), axis=-1)
    by_cols = jnp.moveaxis(by_cols, -1, -2)
    pooled_max = jnp.max(jnp.where(rows[:, None, :, None], by_cols[:, :, None], lowest), axis=-1)
    empty = rows_empty[:, :, None] | cols_empty[:, None, :]
    return jnp.where(empty[:, None], jnp.zeros((), x.dtype), pooled_max)


@register("LRN", since=(1, 13))
def lrn(ctx, x):
    size = ctx.attr("size")
    if size is None:
        raise ctx.error("LRN needs the size attribute")
    size = int(size)
    alpha = float(ctx.attr("alpha", 1e-4))
    beta = float(ctx.attr("beta", 0.75))
    bias = float(ctx.attr("bias", 1.0))
    x = jnp.asarray(x)
    before = (size - 1) // 2
    after = size - 1 - before
    window = (1, size) + (1,) * (x.ndim - 2)
    padding = ((0, 0), (before, after)) + ((0, 0),) * (x.ndim - 2)
    square_sum = lax.reduce_window(
        x * x, np.asarray(0, x.dtype), lax.add, window, (1,) * x.ndim, padding
    )
    scale = jnp.asarray(bias, x.dtype) + jnp.asarray(alpha / size, x.dtype) * square_sum
    return x / scale ** jnp.asarray(beta, x.dtype)


@register("Col2Im", since=18, static_inputs=(1, 2))
def col2im(ctx, data, image_shape, block_shape):
    image = ctx.static_ints(image_shape, 1, "the image shape")
    block = ctx.static_ints(block_shape, 2, "the block shape")
    rank = len(image)
    if len(block) != rank:
        raise ctx.error(f"image_shape {image} and block_shape {block} differ in rank")
    strides = _spatial_ints(ctx, "strides", rank, 1)
    dilations = _spatial_ints(ctx, "dilations", rank, 1)
    pads = _spatial_ints(ctx, "pads", 2 * rank, 0)
    blocks = [
        (image[i] + pads[i] + pads[i + rank] - (block[i] - 1) * dilations[i] - 1) // strides[i] + 1
        for i in range(rank)
    ]
    n, rows, length = np.shape(data)
    taps = int(np.prod(block))
    if rows % taps or length != int(np.prod(blocks)):
        raise ctx.error(
            f"input shape {np.shape(data)} does not fit block_shape {block} "
            f"sliding over image_shape {image} ({blocks} blocks)"
        )
    # Image position of every (tap, block) pair, summed over with a scatter-add; taps that
    # land in the padding go to one extra slot that is dropped afterwards.
    flat = np.zeros([1] * (2 * rank), dtype=np.int64)
    inside = np.ones([1] * (2 * rank), dtype=bool)
    plane_strides = np.cumprod([1] + image[::-1][:-1])[::-1]
    for axis in range(rank):
        pos = (
            np.arange(block[axis])[:, None] * dilations[axis]
            + np.arange(blocks[axis])[None, :] * strides[axis]
            - pads[axis]
        )
        shape = [1] * (2 * rank)
        shape[axis], shape[rank + axis] = pos.shape
        pos = pos.reshape(shape)
        inside = inside & (pos >= 0) & (pos < image[axis])
        flat = flat + pos * int(plane_strides[axis])
    plane = int(np.prod(image))
    target = np.where(inside, flat, plane).reshape(-1)
    data = jnp.reshape(data, (n, rows // taps, taps * length))
    out = jnp.zeros((n, rows // taps, plane + 1), data.dtype).at[..., target].add(data)
    return out[..., :plane].reshape((n, rows // taps, *image))


@register("Dropout", since=(1, 6, 7, 10))
def dropout_inference(ctx, x):
    # Before opset 12 Dropout is a training-time op that runtimes run as the identity.
    if not ctx.has_output(1):
        return x
    mask_dtype = np.bool_ if ctx.opset >= 10 else x.dtype
    return x, _ones_like(x, mask_dtype)


def _ones_like(x, dtype):
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.ones(np.shape(x), dtype)


@register("Dropout", since=(12, 13, 22))
def dropout(ctx, x, ratio=None, training_mode=None):
    if training_mode is None or (isinstance(training_mode, np.ndarray) and not training_mode.any()):
        return (x, _ones_like(x, np.bool_)) if ctx.has_output(1) else x
    x = jnp.asarray(x)
    ratio = jnp.asarray(0.5 if ratio is None else ratio, x.dtype)
    # Reproducible: the seed attribute picks the key (key 0 without it), and float32 draws
    # give the same mask with x64 on or off.
    key = jax.random.key(int(ctx.attr("seed", 0)))
    keep = jax.random.uniform(key, x.shape, jnp.float32) >= ratio.astype(jnp.float32)
    scale = jnp.where(ratio < 1, 1 / (1 - ratio), jnp.zeros((), x.dtype))
    y = jnp.where(keep, x * scale, jnp.zeros((), x.dtype))
    if not isinstance(training_mode, np.ndarray):
        # training_mode known only at run time: select between the two modes.
        training = jnp.reshape(training_mode, ())
        y = jnp.where(training, y, x)
        keep = keep | ~training
    return (y, keep) if ctx.has_output(1) else y
