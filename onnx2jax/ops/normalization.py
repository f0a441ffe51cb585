"""BatchNormalization, LayerNormalization, GroupNormalization, RMSNormalization and relatives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from onnx2jax.core.dtypes import numpy_dtype
from onnx2jax.ops.registry import register


def _per_channel(value, rank):
    """A (C,) parameter shaped to broadcast along axis 1 of a rank-``rank`` input."""
    return jnp.reshape(value, (1, -1) + (1,) * (rank - 2))


def _stash_dtype(ctx, x):
    stash_type = int(ctx.attr("stash_type", 1))
    try:
        dtype = numpy_dtype(stash_type)
    except (KeyError, ValueError, TypeError) as exc:
        raise ctx.error(f"stash_type={stash_type} is not a tensor type") from exc
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ctx.error(f"stash_type={stash_type} is not a floating-point type")
    # Under x64 off a float64 stash computes in float32 like every other float64 value.
    return jax.dtypes.canonicalize_dtype(dtype)


def _moments(x, axes):
    mean = jnp.mean(x, axis=axes, keepdims=True)
    centered = x - mean
    return mean, centered, jnp.mean(centered * centered, axis=axes, keepdims=True)


@register("BatchNormalization", since=(1, 6, 7, 9))
def batch_normalization_legacy(ctx, x, scale, bias, mean, var):
    if ctx.num_outputs > 1 and any(ctx.has_output(i) for i in range(1, ctx.num_outputs)):
        raise ctx.error(
            "the training outputs of BatchNormalization before opset 14 (running "
            "and saved statistics) are not supported; only Y is"
        )
    return _batch_norm_inference(ctx, x, scale, bias, mean, var)


def _batch_norm_inference(ctx, x, scale, bias, mean, var):
    x = jnp.asarray(x)
    epsilon = float(ctx.attr("epsilon", 1e-5))
    rank = x.ndim

    def shaped(value):
        value = jnp.asarray(value).astype(x.dtype)
        # spatial=0 (opsets 1-7) gives per-element statistics of shape (C, D1, ...).
        if value.ndim > 1:
            return value[None]
        return _per_channel(value, rank)

    inv = lax.rsqrt(shaped(var) + jnp.asarray(epsilon, x.dtype)) * shaped(scale)
    return (x - shaped(mean)) * inv + shaped(bias)


@register("BatchNormalization", since=(14, 15))
def batch_normalization(ctx, x, scale, bias, mean, var):
    if not ctx.attr("training_mode", 0):
        if ctx.has_output(1) or ctx.has_output(2):
            raise ctx.error("running_mean/running_var are outputs only with training_mode=1")
        return _batch_norm_inference(ctx, x, scale, bias, mean, var)
    x = jnp.asarray(x)
    epsilon = float(ctx.attr("epsilon", 1e-5))
    momentum = float(ctx.attr("momentum", 0.9))
    axes = (0,) + tuple(range(2, x.ndim))
    batch_mean, centered, batch_var = _moments(x, axes)
    inv = lax.rsqrt(batch_var + jnp.asarray(epsilon, x.dtype))
    y = centered * inv * _per_channel(scale, x.ndim).astype(x.dtype) + _per_channel(
        bias, x.ndim
    ).astype(x.dtype)
    mean = jnp.asarray(mean)
    var = jnp.asarray(var)
    running_mean = mean * momentum + jnp.reshape(batch_mean, -1).astype(mean.dtype) * (1 - momentum)
    running_var = var * momentum + jnp.reshape(batch_var, -1).astype(var.dtype) * (1 - momentum)
    return y, running_mean, running_var


@register("InstanceNormalization", since=(1, 6, 22))
def instance_normalization(ctx, x, scale, bias):
    x = jnp.asarray(x)
    epsilon = float(ctx.attr("epsilon", 1e-5))
    _, centered, var = _moments(x, tuple(range(2, x.ndim)))
    normalized = centered * lax.rsqrt(var + jnp.asarray(epsilon, x.dtype))
    return normalized * _per_channel(scale, x.ndim).astype(x.dtype) + _per_channel(
        bias, x.ndim
    ).astype(x.dtype)


def _trailing_axes_setup(ctx, x):
    """Axes from ``axis`` to the last, epsilon and the stash dtype of Layer/RMS normalization."""
    axis = int(ctx.attr("axis", -1))
    if not -x.ndim <= axis < x.ndim:
        raise ctx.error(f"axis={axis} is out of range for rank {x.ndim}")
    return (
        tuple(range(axis % x.ndim, x.ndim)),
        float(ctx.attr("epsilon", 1e-5)),
        _stash_dtype(ctx, x),
    )


# onnxruntime registers LayerNormalization in the ONNX domain from opset 1 (its contrib kernel,
# the same semantics), and its transformer optimizer emits it into models of opset < 17.
@register("LayerNormalization", since=(1, 17))
def layer_normalization(ctx, x, scale, bias=None):
    x = jnp.asarray(x)
    axes, epsilon, stash = _trailing_axes_setup(ctx, x)
    mean, centered, var = _moments(x.astype(stash), axes)
    inv_std = lax.rsqrt(var + jnp.asarray(epsilon, stash))
    # A 16-bit input is scaled and shifted in the float32 stash and rounded once, as
    # onnxruntime computes it; a float64 input still scales in float64.
    compute = jnp.promote_types(x.dtype, stash)
    y = (centered * inv_std).astype(compute) * jnp.asarray(scale).astype(compute)
    if bias is not None:
        y = y + jnp.asarray(bias).astype(compute)
    y = y.astype(x.dtype)
    if ctx.num_outputs == 1:
        return y
    return y, mean, inv_std


@register("RMSNormalization", since=23)
def rms_normalization(ctx, x, scale):
    x = jnp.asarray(x)
    axes, epsilon, stash = _trailing_axes_setup(ctx, x)
    xs = x.astype(stash)
    mean_square = jnp.mean(xs * xs, axis=axes, keepdims=True)
    normalized = xs * lax.rsqrt(mean_square + jnp.asarray(epsilon, stash))
    return normalized.astype(x.dtype) * jnp.asarray(scale).astype(x.dtype)


@register("GroupNormalization", since=(18, 21))
def group_normalization(ctx, x, scale, bias):
    x = jnp.asarray(x)
    groups = ctx.attr("num_groups")
    if groups is None:
        raise ctx.error("GroupNormalization needs the num_groups attribute")
    groups = int(groups)
    n, channels = x.shape[:2]
    if groups <= 0 or channels % groups:
        raise ctx.error(f"{channels} channels do not split into num_groups={groups}")
    epsilon = float(ctx.attr("epsilon", 1e-5))
    # Opset 18 computes in the input type with per-group scale/bias; opset 21 adds
    # stash_type and makes scale/bias per channel.
    stash = _stash_dtype(ctx, x) if ctx.opset >= 21 else x.dtype
    grouped = jnp.reshape(x.astype(stash), (n, groups, -1))
    _, centered, var = _moments(grouped, (2,))
    normalized = jnp.reshape(
        centered * lax.rsqrt(var + jnp.asarray(epsilon, stash)), x.shape
    ).astype(x.dtype)
    scale = jnp.asarray(scale).astype(x.dtype)
    bias = jnp.asarray(bias).astype(x.dtype)
    if ctx.opset < 21:
        if scale.shape[0] != groups:
            raise ctx.error(
                f"opset-18 scale/bias hold one value per group ({groups}), got {scale.shape[0]}"
            )
        scale = jnp.repeat(scale, channels // groups)
        bias = jnp.repeat(bias, channels // groups)
    return normalized * _per_channel(scale, x.ndim) + _per_channel(bias, x.ndim)


@register("LpNormalization", since=(1, 22))
def lp_normalization(ctx, x):
    x = jnp.asarray(x)
    axis = int(ctx.attr("axis", -1))
    p = int(ctx.attr("p", 2))
    if p == 1:
        norm = jnp.sum(jnp.abs(x), axis=axis, keepdims=True)
    elif p == 2:
        squares = jnp.sum(x * x, axis=axis, keepdims=True)
        # A zero vector normalizes to zeros; keep sqrt's gradient finite there. NaN stays NaN.
        norm = jnp.sqrt(jnp.where(squares == 0, jnp.ones((), x.dtype), squares))
        norm = jnp.where(squares == 0, jnp.zeros((), x.dtype), norm)
    else:
        raise ctx.error(f"p={p} is not supported; LpNormalization takes p=1 or p=2")
    safe = jnp.where(norm == 0, jnp.ones((), x.dtype), norm)
    return jnp.where(norm == 0, jnp.zeros((), x.dtype), x / safe)


@register("MeanVarianceNormalization", since=(9, 13))
def mean_variance_normalization(ctx, x):
    x = jnp.asarray(x)
    axes = tuple(int(a) % x.ndim for a in ctx.attr("axes", [0, 2, 3]))
    _, centered, var = _moments(x, axes)
    return centered / (jnp.sqrt(var) + jnp.asarray(1e-9, x.dtype))
