"""Resize, Upsample, GridSample, AffineGrid, RoiAlign, NonMaxSuppression and ImageDecoder.

Resize is separable: the source positions and weights of each resized axis depend only on shapes
and static scales, so they are computed in NumPy (float64, as the ONNX reference does) at trace
time. The traced part is then one slice, repeat or gather per axis for nearest, and one small
matmul per axis for linear and cubic, which XLA fuses and differentiates cheaply.
"""

from __future__ import annotations

import io
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from onnx2jax.ops.registry import register

# Above this many (output x input) elements a resized axis gathers its taps instead of
# multiplying by a dense interpolation matrix, which would be mostly zeros.
_DENSE_RESIZE_LIMIT = 1 << 22

_COORDINATE_MODES = {
    10: ("asymmetric",),
    11: (
        "half_pixel",
        "pytorch_half_pixel",
        "align_corners",
        "asymmetric",
        "tf_half_pixel_for_nn",
        "tf_crop_and_resize",
    ),
    13: ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_crop_and_resize"),
    19: (
        "half_pixel",
        "half_pixel_symmetric",
        "pytorch_half_pixel",
        "align_corners",
        "asymmetric",
        "tf_crop_and_resize",
    ),
}
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _compute_dtype(dtype):
    """The float type interpolation runs in: at least float32, float64 for float64 inputs."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return jax.dtypes.canonicalize_dtype(np.float64)
    return np.dtype(np.float32)


def _cast_back(y, dtype):
    """Cast an interpolated result to the input type; integers round half to even and saturate."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        y = jnp.clip(jnp.round(y), float(info.min), float(info.max))
    elif dtype == np.bool_:
        y = y != 0
    return y.astype(dtype)


# ----------------------------------------------------------------------------------- Resize


def _source_coordinates(coord_mode, out_size, in_size, scale, roi):
    """Where each output index of one axis samples the input (float64), and which are outside."""
    y = np.arange(out_size, dtype=np.float64)
    out_width = scale * in_size
    outside = None
    if coord_mode == "align_corners":
        x = np.zeros(out_size) if out_width == 1 else y * (in_size - 1) / (out_width - 1)
    elif coord_mode == "asymmetric":
        x = y / scale
    elif coord_mode == "tf_half_pixel_for_nn":
        x = (y + 0.5) / scale
    elif coord_mode == "tf_crop_and_resize":
        start, end = roi
        if out_width == 1:
            x = np.full(out_size, (end - start) * (in_size - 1) / 2)
        else:
            x = y * (end - start) * (in_size - 1) / (out_width - 1)
        x = x + start * (in_size - 1)
        outside = (x < 0) | (x > in_size - 1)
    elif coord_mode == "pytorch_half_pixel":
        # One output sample reads the first input one (the spec and onnxruntime: the output's
        # integer length decides, whatever the scale).
        x = np.zeros(out_size) if out_size == 1 else (y + 0.5) / scale - 0.5
    elif coord_mode == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    else:  # half_pixel_symmetric
        offset = in_size / 2 * (1 - out_size / out_width)
        x = offset + (y + 0.5) / scale - 0.5
    return x, outside


def _nearest_indices(x, nearest_mode, scale):
    if nearest_mode == "round_prefer_floor":
        return np.ceil(x - 0.5)
    if nearest_mode == "round_prefer_ceil":
        return np.floor(x + 0.5)
    if nearest_mode == "floor":
        return np.floor(x)
    if nearest_mode == "ceil":
        return np.ceil(x)
    # Resize-10 and Upsample had no nearest_mode: onnxruntime rounds up when downsampling and
    # truncates otherwise.
    return np.ceil(x) if scale < 1 else np.trunc(x)


def _cubic_kernel(t, a):
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def _tap_coefficients(mode, ratio, scale, cubic_a, antialias):
    """Weights of the taps around each sample; ``ratio`` in (0, 1] is the distance to the left."""
    ratio = ratio[:, None]
    if antialias and scale < 1:
        # Stretch the kernel by 1/scale so every input pixel under the output pixel contributes.
        support = 1 if mode == "linear" else 2
        start = int(np.floor(-support / scale) + 1)
        offsets = np.arange(start, 2 - start)
        args = (offsets[None, :] - ratio) * scale
        if mode == "linear":
            coeffs = np.clip(1 - np.abs(args), 0, 1)
        else:
            coeffs = _cubic_kernel(args, cubic_a)
        return coeffs / coeffs.sum(axis=1, keepdims=True)
    if mode == "linear":
        return np.concatenate([1 - ratio, ratio], axis=1)
    return _cubic_kernel(np.arange(-1, 3)[None, :] - ratio, cubic_a)


def _resize_axis_plan(mode, in_size, out_size, scale, roi, attrs):
    """Static plan of one axis: (indices (out, taps), weights or None for nearest, outside)."""
    x, outside = _source_coordinates(attrs["coord_mode"], out_size, in_size, scale, roi)
    if mode == "nearest":
        index = _nearest_indices(x, attrs["nearest_mode"], scale).astype(np.int64)
        return np.clip(index, 0, in_size - 1)[:, None], None, outside
    floor = np.floor(x)
    ratio = np.where(x == floor, 1.0, x - floor)
    coeffs = _tap_coefficients(mode, ratio, scale, attrs["cubic_a"], attrs["antialias"])
    taps = coeffs.shape[1]
    # The reference picks the ``taps`` input indices nearest to x (ties to the smaller index) in
    # an edge-padded copy of the axis; with ratio in (0, 1] that window starts here.
    pad = -(-taps // 2)
    padded = x + pad
    base = np.floor(padded)
    frac = padded - base
    if taps % 2 == 0:
        first = np.where(frac == 0, -(taps // 2), -(taps // 2) + 1)
    else:
        first = np.where(frac <= 0.5, -((taps - 1) // 2), -((taps - 1) // 2) + 1)
    index = (base + first - pad).astype(np.int64)[:, None] + np.arange(taps)[None, :]
    if attrs["exclude_outside"]:
        coeffs = np.where((index < 0) | (index >= in_size), 0.0, coeffs)
        total = coeffs.sum(axis=1, keepdims=True)
        coeffs = coeffs / np.where(total == 0, 1.0, total)
    return np.clip(index, 0, in_size - 1), coeffs, outside


def _take_axis(x, index, axis):
    """``take`` along ``axis`` with static in-bounds indices; a slice or repeat where it is one."""
    size = x.shape[axis]
    count = index.size
    if count == size and np.array_equal(index, np.arange(size)):
        return x
    if size and count % size == 0 and np.array_equal(index, np.arange(count) // (count // size)):
        return jnp.repeat(x, count // size, axis=axis)
    steps = np.diff(index)
    if count == 1 or (steps[0] > 0 and np.all(steps == steps[0])):
        stride = int(steps[0]) if count > 1 else 1
        return lax.slice_in_dim(x, int(index[0]), int(index[-1]) + 1, stride, axis=axis)
    return jnp.take(x, index, axis=axis, mode="clip")


def _apply_axis(x, axis, index, weights):
    """Interpolate ``x`` (a float array) along ``axis`` with static taps and weights."""
    in_size = x.shape[axis]
    out_size, taps = index.shape
    if out_size * in_size <= _DENSE_RESIZE_LIMIT:
        matrix = np.zeros((out_size, in_size))
        np.add.at(
            matrix, (np.repeat(np.arange(out_size), taps), index.reshape(-1)), weights.reshape(-1)
        )
        y = jnp.tensordot(
            x, jnp.asarray(matrix.T, x.dtype), axes=([axis], [0]), precision=lax.Precision.HIGHEST
        )
        return jnp.moveaxis(y, -1, axis)
    gathered = jnp.take(x, index.reshape(-1), axis=axis, mode="clip")
    gathered = gathered.reshape(x.shape[:axis] + (out_size, taps) + x.shape[axis + 1 :])
    w = jnp.asarray(weights, x.dtype).reshape((out_size, taps) + (1,) * (x.ndim - axis - 1))
    return jnp.sum(gathered * w, axis=axis + 1)


def _resize(ctx, x, mode, scales, sizes, roi, axes, attrs):
    """Resize ``x`` along ``axes`` (static ``scales`` or ``sizes``, one per axis)."""
    shape = np.shape(x)
    rank = len(shape)
    if mode not in ("nearest", "linear", "cubic"):
        raise ctx.error(f"mode={mode!r} is not one of nearest, linear, cubic")
    if sizes is not None:
        if len(sizes) != len(axes):
            raise ctx.error(f"sizes has {len(sizes)} values for {len(axes)} axes")
        factors = [s / shape[a] if shape[a] else 1.0 for s, a in zip(sizes, axes, strict=True)]
        policy = attrs["policy"]
        if policy == "stretch":
            out_sizes = list(sizes)
        elif policy in ("not_larger", "not_smaller"):
            scale = min(factors) if policy == "not_larger" else max(factors)
            factors = [scale] * len(axes)
            out_sizes = [int(scale * shape[a] + 0.5) for a in axes]
        else:
            raise ctx.error(
                f"keep_aspect_ratio_policy={policy!r} is not one of stretch, "
                "not_larger, not_smaller"
            )
    else:
        if len(scales) != len(axes):
            raise ctx.error(f"scales has {len(scales)} values for {len(axes)} axes")
        factors = [float(s) for s in scales]
        if any(s <= 0 for s in factors):
            raise ctx.error(f"scales must be positive, got {factors}")
        out_sizes = [int(s * shape[a]) for s, a in zip(factors, axes, strict=True)]
    if attrs["coord_mode"] == "tf_crop_and_resize":
        if roi is None or len(roi) != 2 * len(axes):
            raise ctx.error(f"tf_crop_and_resize needs an roi of {2 * len(axes)} values")
        rois = [(float(roi[i]), float(roi[i + len(axes)])) for i in range(len(axes))]
    else:
        rois = [None] * len(axes)

    dtype = np.dtype(x.dtype)
    y = jnp.asarray(x) if mode == "nearest" else jnp.asarray(x, _compute_dtype(dtype))
    for axis, out_size, scale, axis_roi in zip(axes, out_sizes, factors, rois, strict=True):
        in_size = shape[axis]
        if (
            out_size == in_size
            and math.isclose(scale, 1.0)
            and (
                axis_roi is None
                or (math.isclose(axis_roi[0], 0.0, abs_tol=1e-9) and math.isclose(axis_roi[1], 1.0))
            )
        ):
            continue
        if in_size == 0 or out_size == 0:
            y = jnp.zeros(y.shape[:axis] + (out_size,) + y.shape[axis + 1 :], y.dtype)
            continue
        index, weights, outside = _resize_axis_plan(mode, in_size, out_size, scale, axis_roi, attrs)
        if weights is None:
            y = _take_axis(y, index[:, 0], axis)
        else:
            y = _apply_axis(y, axis, index, weights)
        if outside is not None and outside.any():
            mask = outside.reshape((out_size,) + (1,) * (rank - axis - 1))
            y = jnp.where(mask, jnp.asarray(attrs["extrapolation_value"], y.dtype), y)
    return y if y.dtype == dtype else _cast_back(y, dtype)


def _resize_attrs(ctx, coord_default, coord_modes):
    attrs = {
        "coord_mode": ctx.attr("coordinate_transformation_mode", coord_default),
        "nearest_mode": ctx.attr("nearest_mode", "round_prefer_floor"),
        "cubic_a": float(ctx.attr("cubic_coeff_a", -0.75)),
        "exclude_outside": bool(ctx.attr("exclude_outside", 0)),
        "extrapolation_value": float(ctx.attr("extrapolation_value", 0.0)),
        "antialias": bool(ctx.attr("antialias", 0)),
        "policy": ctx.attr("keep_aspect_ratio_policy", "stretch"),
    }
    if attrs["coord_mode"] not in coord_modes:
        raise ctx.error(
            f"coordinate_transformation_mode={attrs['coord_mode']!r} is not one of "
            f"{', '.join(coord_modes)} at opset {ctx.opset}"
        )
    if coord_default != "asymmetric" and attrs["nearest_mode"] not in _NEAREST_MODES:
        raise ctx.error(
            f"nearest_mode={attrs['nearest_mode']!r} is not one of {', '.join(_NEAREST_MODES)}"
        )
    return attrs


def _optional_static(ctx, value, index, what):
    if value is None:
        return None
    value = np.asarray(ctx.static(value, index, what)).reshape(-1)
    return value if value.size else None


@register("Resize", since=(11, 13, 18, 19), static_inputs=(1, 2, 3))
def resize(ctx, x, roi=None, scales=None, sizes=None):
    version = max(v for v in _COORDINATE_MODES if v <= ctx.opset)
    attrs = _resize_attrs(ctx, "half_pixel", _COORDINATE_MODES[version])
    mode = ctx.attr("mode", "nearest")
    if attrs["antialias"] and mode == "nearest":
        raise ctx.error("antialias applies to linear and cubic modes only")
    rank = np.ndim(x)
    axes = ctx.attr("axes")
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    if len(set(axes)) != len(axes):
        raise ctx.error(f"axes={axes} repeats an axis")
    scales = _optional_static(ctx, scales, 2, "the scales")
    sizes = _optional_static(ctx, sizes, 3, "the output sizes")
    if (scales is None) == (sizes is None):
        raise ctx.error("exactly one of scales and sizes must be given")
    sizes = None if sizes is None else [int(s) for s in sizes]
    roi = (
        _optional_static(ctx, roi, 1, "the roi")
        if attrs["coord_mode"] == "tf_crop_and_resize"
        else None
    )
    return _resize(ctx, x, mode, scales, sizes, roi, axes, attrs)


def _resize_v10(ctx, x, scales):
    attrs = _resize_attrs(ctx, "asymmetric", _COORDINATE_MODES[10])
    attrs["nearest_mode"] = "simple"
    mode = ctx.attr("mode", "nearest")
    if mode == "bilinear":
        mode = "linear"
    if mode not in ("nearest", "linear"):
        raise ctx.error(f"mode={mode!r} is not one of nearest, linear at opset {ctx.opset}")
    scales = [float(s) for s in scales]
    if len(scales) != np.ndim(x):
        raise ctx.error(f"{len(scales)} scales for an input of rank {np.ndim(x)}")
    return _resize(ctx, x, mode, scales, None, None, list(range(np.ndim(x))), attrs)


@register("Resize", since=10, static_inputs=(1,))
@register("Upsample", since=(9, 10), static_inputs=(1,))
def resize_v10(ctx, x, scales):
    return _resize_v10(ctx, x, np.asarray(ctx.static(scales, 1, "the scales")).reshape(-1))


@register("Upsample", since=7)
def upsample_v7(ctx, x):
    return _resize_v10(ctx, x, ctx.attr("scales"))


@register("Upsample", since=1)
def upsample_v1(ctx, x):
    if np.ndim(x) != 4:
        raise ctx.error("Upsample-1 takes a 4-D NCHW input")
    scales = [1.0, 1.0, ctx.attr("height_scale"), ctx.attr("width_scale")]
    if None in scales:
        raise ctx.error("Upsample-1 needs height_scale and width_scale")
    return _resize_v10(ctx, x, scales)


# ------------------------------------------------------------------------------- GridSample


def _reflect(x, low, high):
    """Reflect coordinates into [low, high] by the nearer border, again and again."""
    span = high - low
    safe = np.where(span > 0, span, 1.0)
    below = x < low
    distance = jnp.where(below, low - x, x - high)
    flips = jnp.floor(distance / safe)
    rest = distance - flips * safe
    even = jnp.mod(flips, 2) == 0
    reflected = jnp.where(below == even, low + rest, high - rest)
    inside = (x >= low) & (x <= high)
    return jnp.where(inside, x, jnp.where(span > 0, reflected, low))


def _grid_taps(coords, mode):
    """Per spatial axis: (integer tap positions (..., taps), tap weights (..., taps))."""
    if mode == "nearest":
        return coords[..., None], jnp.ones_like(coords)[..., None]
    base = jnp.floor(coords)
    t = (coords - base)[..., None]
    if mode == "linear":
        offsets = np.arange(2)
        weights = jnp.concatenate([1 - t, t], axis=-1)
    else:
        offsets = np.arange(-1, 3)
        a = -0.75
        d = jnp.abs(t - offsets)
        weights = jnp.where(
            d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        )
    return base[..., None] + offsets, weights


@register("GridSample", since=(16, 20, 22))
def grid_sample(ctx, x, grid):
    names = (
        {"bilinear": "linear", "bicubic": "cubic", "nearest": "nearest"}
        if ctx.opset < 20
        else {"linear": "linear", "cubic": "cubic", "nearest": "nearest"}
    )
    mode = names.get(ctx.attr("mode", "bilinear" if ctx.opset < 20 else "linear"))
    if mode is None:
        raise ctx.error(f"mode={ctx.attr('mode')!r} is not one of {', '.join(names)}")
    padding = ctx.attr("padding_mode", "zeros")
    if padding not in ("zeros", "border", "reflection"):
        raise ctx.error(f"padding_mode={padding!r} is not one of zeros, border, reflection")
    align = bool(ctx.attr("align_corners", 0))
    n, c, *dims = x.shape
    k = len(dims)
    if grid.shape[0] != n or grid.shape[-1] != k or grid.ndim != k + 2:
        raise ctx.error(f"grid of shape {grid.shape} does not match an input of shape {x.shape}")
    if ctx.opset < 20 and k != 2:
        raise ctx.error("GridSample before opset 20 takes 4-D inputs only")
    out_spatial = grid.shape[1:-1]
    compute = jnp.promote_types(grid.dtype, jnp.float32)
    sizes = np.asarray(dims, dtype=compute)
    # The grid's last axis lists (x, y, z...), the reverse of the input's spatial axes.
    g = jnp.asarray(grid, compute).reshape(n, -1, k)[..., ::-1]
    if align:
        coords = (g + 1) / 2 * (sizes - 1)
        low, high = np.zeros(k, compute), sizes - 1
    else:
        coords = ((g + 1) * sizes - 1) / 2
        low, high = np.full(k, -0.5, compute), sizes - 0.5
    if mode == "nearest":
        coords = jnp.round(coords)
    outside = (coords < low) | (coords > high)
    if padding == "border":
        coords = jnp.where(outside, jnp.clip(coords, 0, sizes - 1), coords)
    elif padding == "reflection":
        coords = _reflect(coords, low, high)

    flat = None
    weight = None
    valid = None
    stride = 1
    for axis in reversed(range(k)):
        taps, w = _grid_taps(coords[..., axis], mode)
        size = dims[axis]
        if padding == "zeros":
            ok = (taps >= 0) & (taps <= size - 1)
        elif padding == "reflection":
            taps = jnp.trunc(_reflect(taps, low[axis], high[axis]))
            ok = None
        else:
            ok = None
        index = jnp.clip(taps, 0, size - 1).astype(jnp.int32) * stride
        stride *= size
        if flat is None:
            flat, weight, valid = index, w, ok
            continue
        flat = (index[..., :, None] + flat[..., None, :]).reshape(n, flat.shape[1], -1)
        weight = (w[..., :, None] * weight[..., None, :]).reshape(n, weight.shape[1], -1)
        if ok is not None:
            valid = (ok[..., :, None] & valid[..., None, :]).reshape(n, valid.shape[1], -1)
    if valid is not None:
        weight = jnp.where(valid, weight, 0)
    data_dtype = _compute_dtype(x.dtype) if np.dtype(x.dtype).itemsize < 4 else x.dtype
    # Channels last, so each tap gathers one contiguous row of C values.
    rows = jnp.moveaxis(jnp.asarray(x, data_dtype), 1, -1).reshape(n, -1, c)
    gathered = jax.vmap(lambda r, i: jnp.take(r, i, axis=0, mode="clip"))(rows, flat)
    y = jnp.einsum(
        "nptc,npt->ncp", gathered, weight.astype(data_dtype), precision=lax.Precision.HIGHEST
    )
    return y.reshape((n, c) + tuple(out_spatial)).astype(x.dtype)


@register("AffineGrid", since=20, static_inputs=(1,))
def affine_grid(ctx, theta, size):
    size = ctx.static_ints(size, 1, "the output size")
    spatial = size[2:]
    if len(spatial) not in (2, 3) or np.shape(theta)[1:] != (len(spatial), len(spatial) + 1):
        raise ctx.error(f"theta of shape {np.shape(theta)} does not match size {size}")
    align = bool(ctx.attr("align_corners", 0))
    axes = []
    for s in spatial:
        i = np.arange(s, dtype=np.float64)
        if align:
            axes.append(np.full(s, -1.0) if s == 1 else i * 2 / (s - 1) - 1)
        else:
            axes.append((2 * i + 1) / s - 1)
    # Homogeneous base grid (..., [x, y, (z,) 1]): the last spatial axis is x.
    mesh = list(np.meshgrid(*axes, indexing="ij"))[::-1]
    base = np.stack(mesh + [np.ones(spatial)], axis=-1)
    xp = ctx.xp(theta)
    if xp is np:
        return np.einsum("nij,...j->n...i", theta.astype(np.float64), base).astype(theta.dtype)
    return jnp.einsum(
        "nij,...j->n...i", theta, base.astype(theta.dtype), precision=lax.Precision.HIGHEST
    )


# --------------------------------------------------------------------------------- RoiAlign


def _roi_axis_samples(xp, start, bin_size, grid, pooled, max_grid, limit):
    """Bilinear taps along one axis: (low, high, w_low, w_high, valid), each (R, pooled, max_grid).

    ``grid`` is each roi's number of samples per bin (R,); samples past it are marked invalid.
    """
    dtype = start.dtype
    p = xp.arange(pooled, dtype=dtype)[None, :, None]
    i = xp.arange(max_grid, dtype=dtype)[None, None, :]
    count = grid[:, None, None]
    pos = (
        start[:, None, None]
        + p * bin_size[:, None, None]
        + (i + 0.5) * bin_size[:, None, None] / xp.maximum(count, 1).astype(dtype)
    )
    valid = (pos >= -1.0) & (pos <= limit) & (i < count)
    pos = xp.maximum(pos, 0)
    low = xp.floor(pos)
    at_edge = low >= limit - 1
    low = xp.where(at_edge, limit - 1, low).astype(dtype)
    pos = xp.where(at_edge, low, pos)
    high = xp.where(at_edge, low, low + 1)
    frac = pos - low
    return low.astype(np.int32), high.astype(np.int32), 1 - frac, frac, valid


def _roi_align(ctx, x, rois, batch_indices, half_pixel):
    mode = ctx.attr("mode", "avg")
    if mode not in ("avg", "max"):
        raise ctx.error(f"mode={mode!r} is not one of avg, max")
    pooled_h = int(ctx.attr("output_height", 1))
    pooled_w = int(ctx.attr("output_width", 1))
    sampling_ratio = int(ctx.attr("sampling_ratio", 0))
    spatial_scale = float(ctx.attr("spatial_scale", 1.0))
    n, c, height, width = x.shape
    num_rois = rois.shape[0]
    if num_rois == 0:
        return jnp.zeros((0, c, pooled_h, pooled_w), x.dtype)
    if sampling_ratio <= 0:
        # Adaptive sampling: the number of samples per bin depends on each roi's size.
        rois = np.asarray(
            ctx.static(rois, 1, "the rois (sampling_ratio=0 sizes the sampling grid from them)")
        )
    # With known rois (constants, or eager runs) all the geometry folds to NumPy.
    xp = ctx.xp(rois)
    compute = np.promote_types(rois.dtype, np.float32)
    boxes = (
        rois.astype(compute)
        if xp is np
        else jnp.asarray(rois, jax.dtypes.canonicalize_dtype(compute))
    )
    offset = 0.5 if half_pixel else 0.0
    start_w = boxes[:, 0] * spatial_scale - offset
    start_h = boxes[:, 1] * spatial_scale - offset
    roi_w = boxes[:, 2] * spatial_scale - offset - start_w
    roi_h = boxes[:, 3] * spatial_scale - offset - start_h
    if not half_pixel:
        roi_w = xp.maximum(roi_w, 1.0)
        roi_h = xp.maximum(roi_h, 1.0)
    bin_h = roi_h / pooled_h
    bin_w = roi_w / pooled_w
    if sampling_ratio > 0:
        grid_h = grid_w = xp.full((num_rois,), sampling_ratio, np.int32)
        max_h = max_w = sampling_ratio
    else:
        grid_h = np.ceil(bin_h).astype(np.int32)
        grid_w = np.ceil(bin_w).astype(np.int32)
        max_h, max_w = max(int(grid_h.max()), 1), max(int(grid_w.max()), 1)
    y_low, y_high, hy, ly, valid_y = _roi_axis_samples(
        xp, start_h, bin_h, grid_h, pooled_h, max_h, height
    )
    x_low, x_high, hx, lx, valid_x = _roi_axis_samples(
        xp, start_w, bin_w, grid_w, pooled_w, max_w, width
    )
    # Corner order (low/low, low/high, high/low, high/high), shapes (R, PH, GH, PW, GW, 4).
    ys = xp.stack([y_low, y_low, y_high, y_high], -1)[:, :, :, None, None, :]
    xs = xp.stack([x_low, x_high, x_low, x_high], -1)[:, None, None, :, :, :]
    wy = xp.stack([hy, hy, ly, ly], -1)[:, :, :, None, None, :]
    wx = xp.stack([hx, lx, hx, lx], -1)[:, None, None, :, :, :]
    valid = (valid_y[:, :, :, None, None] & valid_x[:, None, None, :, :])[..., None]
    weights = xp.where(valid, wy * wx, 0)
    batch = ctx.xp(batch_indices).asarray(batch_indices).astype(np.int32)
    flat = (batch.reshape(num_rois, 1, 1, 1, 1, 1) * height + ys) * width + xs
    data_dtype = _compute_dtype(x.dtype) if np.dtype(x.dtype).itemsize < 4 else x.dtype
    rows = jnp.moveaxis(jnp.asarray(x, data_dtype), 1, -1).reshape(n * height * width, c)
    values = jnp.take(rows, flat.reshape(-1), axis=0, mode="clip").reshape(flat.shape + (c,))
    weights = jnp.asarray(weights, data_dtype)
    if mode == "avg":
        count = xp.maximum(grid_h * grid_w, 1).astype(data_dtype)
        y = jnp.einsum("rpiqjkc,rpiqjk->rcpq", values, weights, precision=lax.Precision.HIGHEST)
        y = y / count[:, None, None, None]
    else:
        weighted = jnp.max(values * weights[..., None], axis=5)
        sampled = (xp.arange(max_h)[None, :] < grid_h[:, None])[:, None, :, None, None] & (
            xp.arange(max_w)[None, :] < grid_w[:, None]
        )[:, None, None, None, :]
        weighted = jnp.where(sampled[..., None], weighted, -jnp.inf)
        y = jnp.moveaxis(jnp.max(weighted, axis=(2, 4)), -1, 1)
        # A reversed roi under adaptive sampling has no samples; its bins read 0.
        empty = (grid_h <= 0) | (grid_w <= 0)
        y = jnp.where(empty[:, None, None, None], 0, y)
    return y.astype(x.dtype)


@register("RoiAlign", since=10)
def roi_align_v10(ctx, x, rois, batch_indices):
    return _roi_align(ctx, x, rois, batch_indices, half_pixel=False)


@register("RoiAlign", since=(16, 22))
def roi_align(ctx, x, rois, batch_indices):
    mode = ctx.attr("coordinate_transformation_mode", "half_pixel")
    if mode not in ("half_pixel", "output_half_pixel"):
        raise ctx.error(
            f"coordinate_transformation_mode={mode!r} is not one of half_pixel, output_half_pixel"
        )
    return _roi_align(ctx, x, rois, batch_indices, half_pixel=mode == "half_pixel")


# ------------------------------------------------------------------------ NonMaxSuppression


def _box_corners(boxes, center_point_box):
    """(y_min, x_min, y_max, x_max) of each box, whatever the corner order or format."""
    if center_point_box:
        x_c, y_c, w, h = (boxes[..., i] for i in range(4))
        return y_c - h / 2, x_c - w / 2, y_c + h / 2, x_c + w / 2
    y1, x1, y2, x2 = (boxes[..., i] for i in range(4))
    return np.minimum(y1, y2), np.minimum(x1, x2), np.maximum(y1, y2), np.maximum(x1, x2)


def _suppressed_by(corners, i, threshold):
    """Which boxes overlap box ``i`` with an IoU above ``threshold``."""
    y0, x0, y1, x1 = corners
    inter_h = np.minimum(y1, y1[i]) - np.maximum(y0, y0[i])
    inter_w = np.minimum(x1, x1[i]) - np.maximum(x0, x0[i])
    inter = inter_h * inter_w
    area = (y1 - y0) * (x1 - x0)
    union = area + area[i] - inter
    overlapping = (
        (inter_h > 0) & (inter_w > 0) & (inter > 0) & (area > 0) & (area[i] > 0) & (union > 0)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        return overlapping & (inter / np.where(union > 0, union, 1) > threshold)


@register("NonMaxSuppression", since=(10, 11), static_inputs=(2, 3, 4))
def non_max_suppression(
    ctx, boxes, scores, max_output=None, iou_threshold=None, score_threshold=None
):
    # The number of selected boxes depends on the values, so everything is read on the host.
    what = "the boxes and scores (the number of selected boxes depends on them)"
    boxes = np.asarray(ctx.static(boxes, 0, what))
    scores = np.asarray(ctx.static(scores, 1, what))
    max_output = _optional_static(ctx, max_output, 2, "max_output_boxes_per_class")
    iou_threshold = _optional_static(ctx, iou_threshold, 3, "iou_threshold")
    score_threshold = _optional_static(ctx, score_threshold, 4, "score_threshold")
    limit = 0 if max_output is None else max(int(max_output[0]), 0)
    threshold = boxes.dtype.type(0) if iou_threshold is None else iou_threshold[0]
    center_point_box = int(ctx.attr("center_point_box", 0))
    if (
        boxes.ndim != 3
        or boxes.shape[2] != 4
        or scores.ndim != 3
        or scores.shape[0] != boxes.shape[0]
        or scores.shape[2] != boxes.shape[1]
    ):
        raise ctx.error(
            f"boxes {boxes.shape} and scores {scores.shape} do not match "
            "[batch, boxes, 4] and [batch, classes, boxes]"
        )
    selected = []
    for b in range(boxes.shape[0]):
        corners = _box_corners(boxes[b], center_point_box)
        for cls in range(scores.shape[1]):
            class_scores = scores[b, cls]
            order = np.argsort(-class_scores, kind="stable")
            if score_threshold is not None:
                order = order[class_scores[order] > score_threshold[0]]
            suppressed = np.zeros(len(class_scores), dtype=bool)
            kept = 0
            for i in order:
                if kept >= limit:
                    break
                if suppressed[i]:
                    continue
                selected.append((b, cls, i))
                kept += 1
                suppressed |= _suppressed_by(corners, i, threshold)
    return np.asarray(selected, dtype=np.int64).reshape(-1, 3)


# ------------------------------------------------------------------------------ ImageDecoder


@register("ImageDecoder", since=20, static_inputs=(0,))
def image_decoder(ctx, encoded):
    try:
        from PIL import Image
    except ImportError as exc:
        raise ctx.error("ImageDecoder needs Pillow (pip install pillow)") from exc
    pixel_format = ctx.attr("pixel_format", "RGB")
    if pixel_format not in ("RGB", "BGR", "Grayscale"):
        raise ctx.error(f"pixel_format={pixel_format!r} is not one of RGB, BGR, Grayscale")
    data = np.asarray(
        ctx.static(encoded, 0, "the encoded image (its size sets the output shape)"), dtype=np.uint8
    ).tobytes()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:
        raise ctx.error(f"cannot decode the image ({len(data)} bytes): {exc}") from exc
    if pixel_format == "Grayscale":
        return np.asarray(image.convert("L"), dtype=np.uint8)[:, :, None]
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(pixels[:, :, ::-1]) if pixel_format == "BGR" else pixels
