"""The com.microsoft contrib ops that onnxruntime's transformer optimizer and exporters emit.

Semantics follow onnxruntime's CPU kernels (the only specification these ops have).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from onnx2jax.ops.math import softmax_over
from onnx2jax.ops.nn import convolve
from onnx2jax.ops.registry import register

MS = "com.microsoft"


def _gelu(x):
    return 0.5 * x * (1 + jax.lax.erf(x / np.sqrt(2).astype(x.dtype)))


def _tanh_gelu(x):
    inner = np.sqrt(2 / np.pi).astype(x.dtype) * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1 + jnp.tanh(inner))


@register("Gelu", 1, domain=MS)
def gelu(ctx, x):
    return _gelu(jnp.asarray(x))


@register("BiasGelu", 1, domain=MS)
def bias_gelu(ctx, x, bias):
    return _gelu(jnp.asarray(x) + bias)


@register("FastGelu", 1, domain=MS)
def fast_gelu(ctx, x, bias=None):
    x = jnp.asarray(x)
    return _tanh_gelu(x if bias is None else x + bias)


@register("QuickGelu", 1, domain=MS)
def quick_gelu(ctx, x):
    x = jnp.asarray(x)
    return x * jax.nn.sigmoid(ctx.attr("alpha", 1.702) * x)


@register("BiasAdd", 1, domain=MS)
def bias_add(ctx, x, bias, skip):
    return ctx.xp(x, bias, skip).add(x + bias, skip)


@register("FusedMatMul", 1, domain=MS)
def fused_matmul(ctx, a, b):
    if ctx.attr("transBatchA", 0) or ctx.attr("transBatchB", 0):
        raise ctx.error("transBatchA/transBatchB are not supported")
    xp = ctx.xp(a, b)
    if ctx.attr("transA", 0):
        a = xp.swapaxes(a, -1, -2) if a.ndim > 1 else a
    if ctx.attr("transB", 0):
        b = xp.swapaxes(b, -1, -2) if b.ndim > 1 else b
    out = xp.matmul(a, b)
    alpha = ctx.attr("alpha", 1.0)
    return out if alpha == 1.0 else (out * alpha).astype(out.dtype)


# FusedConv's activations, from their activation_params (onnxruntime's fused_activation.cc).
_CONV_ACTIVATIONS = {
    "Tanh": lambda y, params: jnp.tanh(y),
    "Sigmoid": lambda y, params: jax.nn.sigmoid(y),
    "LeakyRelu": lambda y, params: jnp.where(y >= 0, y, y * params[0]),
    "Clip": lambda y, params: jnp.clip(y, params[0], params[1]),
    "HardSigmoid": lambda y, params: jnp.clip(params[0] * y + params[1], 0, 1),
}
_CONV_ACTIVATION_PARAMS = {"LeakyRelu": 1, "Clip": 2, "HardSigmoid": 2}


@register("FusedConv", 1, domain=MS)
def fused_conv(ctx, x, w, b=None, z=None):
    """activation(Conv(x, w, b) + z): onnxruntime's fusion, and onnx2jax's own for the native
    kernels (onnx2jax/fusion.py)."""
    activation = ctx.attr("activation", "")
    params = list(ctx.attr("activation_params", []))
    if activation in ("", "Relu"):
        return convolve(ctx, x, w, b, residual=z, relu=activation == "Relu")
    if activation not in _CONV_ACTIVATIONS:
        raise ctx.error(f"activation {activation!r} is not one of Relu, "
                        f"{', '.join(_CONV_ACTIVATIONS)}")
    if len(params) < _CONV_ACTIVATION_PARAMS.get(activation, 0):
        raise ctx.error(f"activation {activation} needs {_CONV_ACTIVATION_PARAMS[activation]} "
                        f"activation_params, got {params}")
    return _CONV_ACTIVATIONS[activation](convolve(ctx, x, w, b, residual=z), params)


def _layer_norm(x, gamma, beta, epsilon, simplified):
    """Normalize over the last axis in float32 (or wider); returns y, mean, 1/std."""
    compute = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(compute)
    if simplified:
        mean = jnp.zeros(xf.shape[:-1] + (1,), compute)
        centered = xf
    else:
        mean = xf.mean(axis=-1, keepdims=True)
        centered = xf - mean
    inv_std = jax.lax.rsqrt((centered * centered).mean(axis=-1, keepdims=True) + epsilon)
    y = centered * inv_std * gamma.astype(compute)
    if beta is not None:
        y = y + beta.astype(compute)
    return y.astype(x.dtype), mean, inv_std


def _skip_norm(ctx, x, skip, gamma, beta, bias, simplified):
    x = jnp.asarray(x)
    total = x + skip
    if bias is not None:
        total = total + bias
    y, mean, inv_std = _layer_norm(total, gamma, beta, ctx.attr("epsilon", 1e-12), simplified)
    # ORT's optional outputs: mean, inv_std_var, then the pre-normalization sum.
    return y, mean, inv_std, total


@register("SkipLayerNormalization", 1, domain=MS)
def skip_layer_norm(ctx, x, skip, gamma, beta=None, bias=None):
    return _skip_norm(ctx, x, skip, gamma, beta, bias, simplified=False)


@register("SkipSimplifiedLayerNormalization", 1, domain=MS)
def skip_simplified_layer_norm(ctx, x, skip, gamma, bias=None):
    return _skip_norm(ctx, x, skip, gamma, None, bias, simplified=True)


@register("SimplifiedLayerNormalization", 1)
@register("SimplifiedLayerNormalization", 1, domain=MS)
def simplified_layer_norm(ctx, x, scale):
    x = jnp.asarray(x)
    axis = ctx.attr("axis", -1)
    axis = axis + x.ndim if axis < 0 else axis
    # Normalize over every axis from ``axis`` on, like LayerNormalization.
    lead = x.shape[:axis]
    flat = x.reshape(lead + (-1,))
    y, _, inv_std = _layer_norm(flat, jnp.asarray(scale).reshape(-1), None,
                                ctx.attr("epsilon", 1e-5), simplified=True)
    inv_std = inv_std.reshape(lead + (1,) * (x.ndim - axis))
    return y.reshape(x.shape), inv_std


@register("EmbedLayerNormalization", 1, domain=MS)
def embed_layer_norm(ctx, input_ids, segment_ids, word_embedding, position_embedding,
                     segment_embedding=None, gamma=None, beta=None, mask=None,
                     position_ids=None):
    input_ids = jnp.asarray(input_ids)
    batch, length = input_ids.shape
    if position_ids is None:
        position_ids = jnp.broadcast_to(jnp.arange(length), (batch, length))
    else:
        position_ids = jnp.broadcast_to(jnp.asarray(position_ids), (batch, length))
    total = jnp.asarray(word_embedding)[input_ids] + jnp.asarray(position_embedding)[
        position_ids]
    if segment_ids is not None and segment_embedding is not None:
        total = total + jnp.asarray(segment_embedding)[jnp.asarray(segment_ids)]
    y, _, _ = _layer_norm(total, gamma, beta, ctx.attr("epsilon", 1e-12), simplified=False)
    if mask is None:
        mask_index = jnp.full((batch,), length, jnp.int32)
    else:
        mask_index = jnp.sum(jnp.asarray(mask) != 0, axis=1).astype(jnp.int32)
    return y, mask_index, total


def _attend(ctx, q, k, v, num_heads, key_mask, causal, extra_bias=None):
    """Scaled dot-product attention of [B, S, D] q with [B, L, D] k / [B, L, Dv] v."""
    batch, length, _ = q.shape
    total = k.shape[1]

    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], num_heads, -1).transpose(0, 2, 1, 3)

    qh, kh, vh = heads(q), heads(k), heads(v)
    scale = ctx.attr("scale", 0.0) or 1 / np.sqrt(qh.shape[-1])
    scores = jnp.einsum("bhsd,bhld->bhsl", qh, kh).astype(jnp.float32) * scale
    fill = ctx.attr("mask_filter_value", -10000.0)
    if key_mask is not None:
        key_mask = jnp.asarray(key_mask)
        if key_mask.shape != (batch, total):
            raise ctx.error(f"only a [batch, total_length] mask is supported, got "
                            f"{key_mask.shape}")
        scores = scores + jnp.where(key_mask[:, None, None, :] != 0, 0.0, fill)
    if causal:
        allowed = jnp.arange(total)[None, :] <= jnp.arange(length)[:, None] + (total - length)
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    if extra_bias is not None:
        scores = scores + jnp.asarray(extra_bias).astype(jnp.float32)
    weights = softmax_over(scores, (scores.ndim - 1,)).astype(v.dtype)
    out = jnp.einsum("bhsl,bhld->bhsd", weights, vh)
    return out.transpose(0, 2, 1, 3).reshape(batch, length, -1)


@register("Attention", 1, domain=MS)
def attention(ctx, x, weights, bias=None, mask_index=None, past=None, attention_bias=None,
              past_sequence_length=None):
    if past is not None or past_sequence_length is not None:
        raise ctx.error("the past state inputs are not supported")
    num_heads = ctx.attr("num_heads")
    if num_heads is None:
        raise ctx.error("needs the num_heads attribute")
    x = jnp.asarray(x)
    proj = x @ weights
    if bias is not None:
        proj = proj + bias
    sizes = ctx.attr("qkv_hidden_sizes") or [weights.shape[1] // 3] * 3
    q, k, v = jnp.split(proj, np.cumsum(sizes)[:2], axis=-1)
    out = _attend(ctx, q, k, v, num_heads, mask_index, ctx.attr("unidirectional", 0),
                  attention_bias)
    if ctx.has_output(1):
        raise ctx.error("the present output is not supported")
    return out


@register("MultiHeadAttention", 1, domain=MS)
def multi_head_attention(ctx, query, key=None, value=None, bias=None, key_padding_mask=None,
                         attention_bias=None, past_key=None, past_value=None, *rest):
    if past_key is not None or past_value is not None or any(r is not None for r in rest):
        raise ctx.error("past state and cache inputs are not supported")
    if key is None or value is None or query.ndim != 3 or key.ndim != 3:
        raise ctx.error("only 3-D query, key and value ([batch, length, hidden]) are "
                        "supported")
    num_heads = ctx.attr("num_heads")
    if num_heads is None:
        raise ctx.error("needs the num_heads attribute")
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    if bias is not None:
        dq, dk = query.shape[-1], key.shape[-1]
        query = query + bias[:dq]
        key = key + bias[dq:dq + dk]
        value = value + bias[dq + dk:]
    out = _attend(ctx, query, key, value, num_heads, key_padding_mask,
                  ctx.attr("unidirectional", 0), attention_bias)
    if ctx.has_output(1) or ctx.has_output(2):
        present_k = key.reshape(key.shape[0], key.shape[1], num_heads, -1).transpose(0, 2, 1, 3)
        present_v = value.reshape(value.shape[0], value.shape[1], num_heads, -1).transpose(
            0, 2, 1, 3)
        return out, present_k, present_v
    return out
