"""The com.microsoft contrib ops that onnxruntime's transformer optimizer and exporters emit.

Semantics follow onnxruntime's CPU kernels (the only specification these ops have).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from onnx2jax.ops.nn import convolve
from onnx2jax.ops.registry import MS, register
from onnx2jax.ops.softmax import in_float32, softmax_over


def _gelu(x):
    return 0.5 * x * (1 + jax.lax.erf(x / np.sqrt(2).astype(x.dtype)))


def _tanh_gelu(x):
    inner = np.sqrt(2 / np.pi).astype(x.dtype) * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1 + jnp.tanh(inner))


@register("Gelu", since=1, domain=MS)
def gelu(ctx, x):
    # fp16 in float32, rounded once, as onnxruntime runs these (its CPU kernels are float32).
    return in_float32(_gelu, jnp.asarray(x))


@register("BiasGelu", since=1, domain=MS)
def bias_gelu(ctx, x, bias):
    x = jnp.asarray(x)
    return in_float32(lambda v: _gelu(v + jnp.asarray(bias).astype(v.dtype)), x)


@register("FastGelu", since=1, domain=MS)
def fast_gelu(ctx, x, bias=None):
    x = jnp.asarray(x)
    if bias is None:
        return in_float32(_tanh_gelu, x)
    return in_float32(lambda v: _tanh_gelu(v + jnp.asarray(bias).astype(v.dtype)), x)


@register("QuickGelu", since=1, domain=MS)
def quick_gelu(ctx, x):
    alpha = ctx.attr("alpha", 1.702)
    return in_float32(lambda v: v * jax.nn.sigmoid(alpha * v), jnp.asarray(x))


@register("BiasAdd", since=1, domain=MS)
def bias_add(ctx, x, bias, skip):
    return ctx.xp(x, bias, skip).add(x + bias, skip)


@register("FusedMatMul", since=1, domain=MS)
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


@register("FusedConv", since=1, domain=MS)
def fused_conv(ctx, x, w, b=None, z=None):
    """activation(Conv(x, w, b) + z): onnxruntime's fusion, and onnx2jax's own for the native
    kernels (onnx2jax/runtime/fusion.py; NativeConv in ops/native_calls.py)."""
    activation = ctx.attr("activation", "")
    params = list(ctx.attr("activation_params", []))
    if activation in ("", "Relu"):
        return convolve(ctx, x, w, b, residual=z, relu=activation == "Relu")
    if activation not in _CONV_ACTIVATIONS:
        raise ctx.error(
            f"activation {activation!r} is not one of Relu, {', '.join(_CONV_ACTIVATIONS)}"
        )
    if len(params) < _CONV_ACTIVATION_PARAMS.get(activation, 0):
        raise ctx.error(
            f"activation {activation} needs {_CONV_ACTIVATION_PARAMS[activation]} "
            f"activation_params, got {params}"
        )
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
    # The sum of 16-bit inputs stays float32 into the normalization, as in onnxruntime.
    compute = jnp.promote_types(x.dtype, jnp.float32)
    total = x.astype(compute) + jnp.asarray(skip).astype(compute)
    if bias is not None:
        total = total + jnp.asarray(bias).astype(compute)
    y, mean, inv_std = _layer_norm(total, gamma, beta, ctx.attr("epsilon", 1e-12), simplified)
    # ORT's optional outputs: mean, inv_std_var, then the pre-normalization sum.
    return y.astype(x.dtype), mean, inv_std, total.astype(x.dtype)


@register("SkipLayerNormalization", since=1, domain=MS)
def skip_layer_norm(ctx, x, skip, gamma, beta=None, bias=None):
    return _skip_norm(ctx, x, skip, gamma, beta, bias, simplified=False)


@register("SkipSimplifiedLayerNormalization", since=1, domain=MS)
def skip_simplified_layer_norm(ctx, x, skip, gamma, bias=None):
    return _skip_norm(ctx, x, skip, gamma, None, bias, simplified=True)


@register("SimplifiedLayerNormalization", since=1)
@register("SimplifiedLayerNormalization", since=1, domain=MS)
def simplified_layer_norm(ctx, x, scale):
    x = jnp.asarray(x)
    axis = ctx.attr("axis", -1)
    axis = axis + x.ndim if axis < 0 else axis
    # Normalize over every axis from ``axis`` on, like LayerNormalization.
    lead = x.shape[:axis]
    flat = x.reshape(lead + (-1,))
    y, _, inv_std = _layer_norm(
        flat, jnp.asarray(scale).reshape(-1), None, ctx.attr("epsilon", 1e-5), simplified=True
    )
    inv_std = inv_std.reshape(lead + (1,) * (x.ndim - axis))
    return y.reshape(x.shape), inv_std


@register("EmbedLayerNormalization", since=1, domain=MS)
def embed_layer_norm(
    ctx,
    input_ids,
    segment_ids,
    word_embedding,
    position_embedding,
    segment_embedding=None,
    gamma=None,
    beta=None,
    mask=None,
    position_ids=None,
):
    input_ids = jnp.asarray(input_ids)
    batch, length = input_ids.shape
    if position_ids is None:
        position_ids = jnp.broadcast_to(jnp.arange(length), (batch, length))
    else:
        position_ids = jnp.broadcast_to(jnp.asarray(position_ids), (batch, length))
    dtype = jnp.asarray(word_embedding).dtype
    # 16-bit embeddings are summed in float32 into the normalization, as in onnxruntime.
    compute = jnp.promote_types(dtype, jnp.float32)
    total = jnp.asarray(word_embedding)[input_ids].astype(compute) + jnp.asarray(
        position_embedding
    )[position_ids].astype(compute)
    if segment_ids is not None and segment_embedding is not None:
        total = total + jnp.asarray(segment_embedding)[jnp.asarray(segment_ids)].astype(compute)
    y, _, _ = _layer_norm(total, gamma, beta, ctx.attr("epsilon", 1e-12), simplified=False)
    y, total = y.astype(dtype), total.astype(dtype)
    if mask is None:
        # onnxruntime gives zeros here: Attention then masks every key alike, which leaves
        # the softmax as if unmasked.
        mask_index = jnp.zeros((batch,), jnp.int32)
    else:
        mask_index = jnp.sum(jnp.asarray(mask) != 0, axis=1).astype(jnp.int32)
    return y, mask_index, total


def _heads(t, num_heads):
    """[B, L, N*H] -> [B, N, L, H]."""
    return t.reshape(t.shape[0], t.shape[1], num_heads, -1).transpose(0, 2, 1, 3)


def _key_mask(ctx, mask, batch, length, total, past_length, fill):
    """onnxruntime's mask_index / key_padding_mask forms as an additive float32 mask that
    broadcasts to [B, S, T] for S = ``length`` queries and T = ``total`` keys (past ones
    included), or None.

    1-D [B]: keys at or after the row's end position are masked; 1-D [2B]: also those before
    its start position (the second half); 2-D [B, T] and 3-D [B, S, T]: raw 0/1 masks; 4-D
    [B, 1, M, M] (Megatron): query s reads row past_length + s of the row's M x M mask.
    """
    if mask is None:
        return None
    if ctx.xp(mask) is np:
        mask = np.asarray(mask)
    shape = tuple(mask.shape)
    keys = jnp.arange(total)
    if len(shape) == 1 and shape[0] in (batch, 2 * batch):
        masked = keys[None, :] >= jnp.asarray(mask[:batch])[:, None]
        if shape[0] == 2 * batch:
            start = jnp.minimum(jnp.asarray(mask[batch:]), total)
            masked = masked | (keys[None, :] < start[:, None])
        keep = ~masked[:, None, :]
    elif len(shape) == 2 and shape == (batch, total):
        keep = jnp.asarray(mask)[:, None, :] > 0
    elif len(shape) == 2 and shape[1] == 1 and shape[0] in (1, batch):
        # The same value for every key: no effect on the softmax (onnxruntime drops it).
        return None
    elif len(shape) == 3 and shape == (batch, length, total):
        keep = jnp.asarray(mask) > 0
    elif (
        len(shape) == 4
        and shape[0] == batch
        and shape[1] == 1
        and shape[2] == shape[3]
        and shape[2] >= total
    ):
        rows = past_length + jnp.arange(length)
        keep = jnp.asarray(mask)[:, 0][:, rows, :total] > 0
    else:
        raise ctx.error(
            f"mask of shape {shape} is none of onnxruntime's forms for batch "
            f"{batch}, sequence {length}, total {total}: [batch], [2*batch], "
            "[batch, total], [batch, sequence, total], [batch, 1, max, max]"
        )
    return jnp.where(keep, jnp.float32(0), jnp.float32(fill))


def _attend_heads(ctx, q, k, v, key_mask=None, causal=False, extra_bias=None, past_length=0):
    """onnxruntime's CPU attention of [B, N, S, H] q with [B, N, T, H] k and [B, N, T, Hv] v.

    Scores are scale * q.k + mask (+ attention_bias) in float32 (fp16 inputs included), the
    softmax in float32; returns [B, S, N*Hv] in v's dtype. ``key_mask`` is an additive
    [B, S or 1, T] float32 mask from :func:`_key_mask`; ``causal`` hides keys after
    past_length + s from query s.
    """
    batch, heads, length, head_size = q.shape
    total = k.shape[2]
    scale = ctx.attr("scale", 0.0) or np.float32(1) / np.sqrt(np.float32(head_size))
    scores = jnp.einsum("bhsd,bhld->bhsl", q, k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(scale)
    additive = None if key_mask is None else key_mask[:, None]
    if extra_bias is not None:
        bias = jnp.asarray(extra_bias).astype(jnp.float32)
        additive = bias if additive is None else bias + additive
    if additive is not None:
        scores = scores + additive
    if causal and length > 1:
        # onnxruntime sets future keys to the lowest float (not mask_filter_value): a row
        # whose keys are all padding still attends to its past, never to its future.
        # Query s sees the past and the new keys up to s.
        future = jnp.arange(total)[None, :] > jnp.arange(length)[:, None] + past_length
        scores = jnp.where(future, jnp.finfo(jnp.float32).min, scores)
    weights = softmax_over(scores, (scores.ndim - 1,)).astype(v.dtype)
    out = jnp.einsum(
        "bhsl,bhld->bhsd",
        weights,
        v,
        preferred_element_type=jnp.promote_types(v.dtype, jnp.float32),
    )
    return out.astype(v.dtype).transpose(0, 2, 1, 3).reshape(batch, length, -1)


def _attend(ctx, q, k, v, num_heads, mask=None, causal=False, extra_bias=None):
    """Attention of [B, S, D] q with [B, L, D] k / [B, L, Dv] v (no past), ``mask`` in any
    of :func:`_key_mask`'s forms; returns [B, S, Dv]. For ops that project q, k, v themselves
    (quantized attention)."""
    q, k, v = (_heads(jnp.asarray(t), num_heads) for t in (q, k, v))
    key_mask = _key_mask(
        ctx, mask, q.shape[0], q.shape[2], k.shape[2], 0, ctx.attr("mask_filter_value", -10000.0)
    )
    return _attend_heads(ctx, q, k, v, key_mask, causal, extra_bias)


def _write_after(buffer, new, start):
    """``buffer`` [B, N, M, H] with ``new`` [B, N, S, H] written from row ``start`` on."""
    return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), (0, 0, start, 0))


def _shared_buffer_mask(key_mask, rows, end):
    """``key_mask`` with the rows of a shared key-value buffer from ``end`` on (no token
    there yet) excluded from every query."""
    unused = jnp.arange(rows) >= end
    unused = jnp.where(unused, jnp.finfo(jnp.float32).min, jnp.float32(0))[None, None, :]
    return unused if key_mask is None else key_mask + unused


@register("Attention", since=1, domain=MS)
def attention(
    ctx,
    x,
    weights,
    bias=None,
    mask_index=None,
    past=None,
    attention_bias=None,
    past_sequence_length=None,
):
    """Self-attention with the q/k/v projection packed in ``weights``; optional ``present``
    output is [2, B, N, past + S, H], the past keys and values with this step's appended.

    With ``past_present_share_buffer`` the past is a [2, B, N, max, H] buffer holding
    ``past_sequence_length`` tokens: this step's keys and values are written after them and
    present keeps the buffer's shape (onnxruntime's CPU kernel refuses this form)."""
    num_heads = ctx.attr("num_heads")
    if num_heads is None:
        raise ctx.error("needs the num_heads attribute")
    if ctx.attr("do_rotary", 0):
        raise ctx.error(
            "do_rotary=1 is not supported (onnxruntime's CPU kernel lacks it too); "
            "export the rotary embedding as separate nodes"
        )
    shared = bool(ctx.attr("past_present_share_buffer", 0))
    if shared != (past_sequence_length is not None) or (shared and past is None):
        raise ctx.error(
            "past_present_share_buffer=1 needs past (the buffer) and past_sequence_length, "
            "and past_sequence_length needs past_present_share_buffer=1"
        )
    x = jnp.asarray(x)
    dtype = x.dtype
    if x.ndim != 3 or np.ndim(weights) != 2 or weights.shape[0] != x.shape[2]:
        raise ctx.error(
            f"input must be [batch, sequence, hidden] and weights [hidden, "
            f"q+k+v], got {x.shape} and {np.shape(weights)}"
        )
    sizes = [int(s) for s in ctx.attr("qkv_hidden_sizes", [])] or [weights.shape[1] // 3] * 3
    if (
        len(sizes) != 3
        or sum(sizes) != weights.shape[1]
        or sizes[0] != sizes[1]
        or any(s % num_heads for s in sizes)
    ):
        raise ctx.error(
            f"qkv_hidden_sizes {sizes} must be three sizes (q equal to k, each "
            f"divisible by num_heads={num_heads}) summing to the weights' "
            f"{weights.shape[1]} columns"
        )
    # 16-bit models run in float32 from the projection to the output, rounded once at the
    # end, as onnxruntime runs this op (its CPU kernel is float32 only).
    compute = jnp.promote_types(dtype, jnp.float32)
    proj = jnp.matmul(x.astype(compute), jnp.asarray(weights).astype(compute))
    if bias is not None:
        proj = proj + jnp.asarray(bias).astype(compute)
    q, k, v = (_heads(t, num_heads) for t in jnp.split(proj, np.cumsum(sizes)[:2], axis=-1))
    past_length = 0
    if past is not None:
        past = jnp.asarray(past)
        if (
            past.ndim != 5
            or past.shape[:3] != (2, x.shape[0], num_heads)
            or past.shape[4] != k.shape[3]
            or k.shape[3] != v.shape[3]
        ):
            raise ctx.error(
                f"past must be [2, batch, num_heads, past_length, head_size] "
                f"with equal k and v head sizes, got {past.shape}"
            )
        if shared:
            past_length = jnp.reshape(jnp.asarray(past_sequence_length), ()).astype(jnp.int32)
            k = _write_after(past[0].astype(compute), k, past_length)
            v = _write_after(past[1].astype(compute), v, past_length)
        else:
            past_length = past.shape[3]
            k = jnp.concatenate([past[0].astype(compute), k], axis=2)
            v = jnp.concatenate([past[1].astype(compute), v], axis=2)
    unidirectional = bool(ctx.attr("unidirectional", 0))
    if mask_index is not None and np.ndim(mask_index) == 4 and unidirectional:
        raise ctx.error("a 4-D mask_index needs unidirectional=0")
    key_mask = _key_mask(
        ctx,
        mask_index,
        x.shape[0],
        x.shape[1],
        k.shape[2],
        past_length,
        ctx.attr("mask_filter_value", -10000.0),
    )
    if shared:
        key_mask = _shared_buffer_mask(key_mask, k.shape[2], past_length + x.shape[1])
    out = _attend_heads(ctx, q, k, v, key_mask, unidirectional, attention_bias, past_length).astype(
        dtype
    )
    if ctx.has_output(1):
        if k.shape[3] != v.shape[3]:
            raise ctx.error("the present output needs equal k and v head sizes")
        return out, jnp.stack([k, v]).astype(dtype)
    return out


@register("MultiHeadAttention", since=1, domain=MS)
def multi_head_attention(
    ctx,
    query,
    key=None,
    value=None,
    bias=None,
    key_padding_mask=None,
    attention_bias=None,
    past_key=None,
    past_value=None,
    past_sequence_length=None,
    cache_indirection=None,
):
    """Attention of separate query, key and value [B, L, D] (optional past_key/past_value
    [B, N, P, H] are prepended; present_key/present_value return the concatenation).

    With ``past_sequence_length`` the past is a buffer shared with present: its first
    past_sequence_length rows are the cache, this step's keys and values are written after
    them, and present keeps the buffer's length."""
    if cache_indirection is not None:
        raise ctx.error("cache_indirection (beam search's input) is not supported")
    if past_sequence_length is not None and past_key is None:
        raise ctx.error("past_sequence_length needs past_key and past_value (the shared buffer)")
    if key is None or value is None or query.ndim != 3 or key.ndim != 3 or value.ndim != 3:
        raise ctx.error("only 3-D query, key and value ([batch, length, hidden]) are supported")
    if (past_key is None) != (past_value is None):
        raise ctx.error("past_key and past_value come together")
    if ctx.has_output(3):
        raise ctx.error("the qk output is not supported")
    num_heads = ctx.attr("num_heads")
    if num_heads is None:
        raise ctx.error("needs the num_heads attribute")
    dtype = jnp.asarray(query).dtype
    # 16-bit inputs in float32 throughout, rounded once, as for Attention.
    compute = jnp.promote_types(dtype, jnp.float32)
    query, key, value = (jnp.asarray(t).astype(compute) for t in (query, key, value))
    if bias is not None:
        bias = jnp.asarray(bias).astype(compute)
        dq, dk = query.shape[-1], key.shape[-1]
        query = query + bias[:dq]
        key = key + bias[dq : dq + dk]
        value = value + bias[dq + dk :]
    q, k, v = _heads(query, num_heads), _heads(key, num_heads), _heads(value, num_heads)
    past_length = 0
    if past_sequence_length is not None:
        past_length = jnp.reshape(jnp.asarray(past_sequence_length), ()).astype(jnp.int32)
        k = _write_after(jnp.asarray(past_key).astype(compute), k, past_length)
        v = _write_after(jnp.asarray(past_value).astype(compute), v, past_length)
    elif past_key is not None:
        past_length = past_key.shape[2]
        k = jnp.concatenate([jnp.asarray(past_key).astype(compute), k], axis=2)
        v = jnp.concatenate([jnp.asarray(past_value).astype(compute), v], axis=2)
    # The key padding mask covers the past and the new keys.
    key_mask = _key_mask(
        ctx,
        key_padding_mask,
        query.shape[0],
        query.shape[1],
        k.shape[2],
        past_length,
        ctx.attr("mask_filter_value", -10000.0),
    )
    if past_sequence_length is not None:
        key_mask = _shared_buffer_mask(key_mask, k.shape[2], past_length + key.shape[1])
    unidirectional = bool(ctx.attr("unidirectional", 0))
    if unidirectional and key.shape[1] != query.shape[1]:
        # onnxruntime's CPU kernel gives no consistent causal alignment for this case.
        raise ctx.error(
            f"unidirectional=1 needs as many new keys as queries, got "
            f"{key.shape[1]} keys for {query.shape[1]} queries"
        )
    out = _attend_heads(ctx, q, k, v, key_mask, unidirectional, attention_bias, past_length).astype(
        dtype
    )
    if ctx.has_output(1) or ctx.has_output(2):
        return out, k.astype(dtype), v.astype(dtype)
    return out
