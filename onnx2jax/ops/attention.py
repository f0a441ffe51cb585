"""Attention, RotaryEmbedding, and the SoftmaxAttention of onnx2jax's graph rewrite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from onnx2jax.core.dtypes import numpy_dtype
from onnx2jax.ops.cast import cast_to_type
from onnx2jax.ops.elementwise import jax_on
from onnx2jax.ops.math import matmul
from onnx2jax.ops.registry import ONNX2JAX, PREVIEW, register
from onnx2jax.ops.softmax import softmax_over


def _split_heads(ctx, x, heads, what):
    """(batch, seq, heads * size) -> (batch, heads, seq, size)."""
    if heads is None:
        raise ctx.error(f"3-D inputs need the {what} attribute")
    batch, seq, hidden = x.shape
    if heads <= 0 or hidden % heads:
        raise ctx.error(f"hidden size {hidden} does not split into {what}={heads}")
    return jnp.transpose(jnp.reshape(x, (batch, seq, heads, hidden // heads)), (0, 2, 1, 3))


def _masked_softmax(x):
    """Softmax over the last axis where a row of only -inf gives zeros instead of NaN."""
    row_max = jnp.max(x, axis=-1, keepdims=True)
    row_max = lax.stop_gradient(jnp.where(jnp.isneginf(row_max), jnp.zeros((), x.dtype), row_max))
    e = jnp.exp(x - row_max)
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(total == 0, jnp.ones((), x.dtype), total)


def _position_bias(is_causal, left, right, q_len, kv_len, offset, dtype):
    """Additive 0/-inf bias of causal and sliding-window limits, or None without any.

    Query ``i`` sits at absolute position ``i + offset`` (``offset`` is the cache length: a
    Python int, or a per-batch array shaped (batch, 1, 1, 1)). Built from iotas rather than
    NumPy so that long sequences do not bake a (q_len, kv_len) constant into the program.
    """
    if not is_causal and left < 0 and right < 0:
        return None
    i = lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 0)
    j = lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 1)
    distance = (i + jnp.asarray(offset).astype(jnp.int32)) - j
    allowed = jnp.ones(distance.shape, dtype=bool)
    if is_causal:
        allowed = allowed & (distance >= 0)
    if left >= 0:
        allowed = allowed & (distance <= left)
    if right >= 0:
        allowed = allowed & (-distance <= right)
    return jnp.where(allowed, jnp.zeros((), dtype), jnp.asarray(-np.inf, dtype))


@register("Attention", since=(23, 24, 25))
def attention(ctx, q, k, v, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None):
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if not q.ndim == k.ndim == v.ndim or q.ndim not in (3, 4):
        raise ctx.error(
            f"Q, K and V must all be 3-D or all 4-D, got ranks {q.ndim}, {k.ndim}, {v.ndim}"
        )
    if (past_key is None) != (past_value is None):
        raise ctx.error("past_key and past_value must be given together")
    if nonpad_kv_seqlen is not None and past_key is not None:
        raise ctx.error("nonpad_kv_seqlen cannot be combined with past_key/past_value")
    three_d = q.ndim == 3
    if three_d:
        q = _split_heads(ctx, q, ctx.attr("q_num_heads"), "q_num_heads")
        k = _split_heads(ctx, k, ctx.attr("kv_num_heads"), "kv_num_heads")
        v = _split_heads(ctx, v, ctx.attr("kv_num_heads"), "kv_num_heads")
    dtype = q.dtype
    if past_key is not None:
        k = jnp.concatenate([jnp.asarray(past_key).astype(dtype), k], axis=2)
        v = jnp.concatenate([jnp.asarray(past_value).astype(dtype), v], axis=2)
    batch, q_heads, q_len, head_size = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads or v.shape[1] != kv_heads:
        raise ctx.error(
            f"{q_heads} query heads cannot share {kv_heads} key and {v.shape[1]} value heads"
        )
    groups = q_heads // kv_heads

    scale = ctx.attr("scale")
    scale = 1.0 / np.sqrt(head_size) if scale is None else float(scale)
    # Q and K are each scaled by sqrt(scale), as the spec's function body does, which keeps
    # float16 products in range.
    root = jnp.asarray(np.sqrt(scale), dtype)
    q_grouped = jnp.reshape(q * root, (batch, kv_heads, groups, q_len, head_size))
    logits = jnp.einsum("bhgqd,bhkd->bhgqk", q_grouped, k * root)
    logits = jnp.reshape(logits, (batch, q_heads, q_len, kv_len))

    bias = None
    if attn_mask is not None:
        mask = jnp.asarray(attn_mask)
        short = kv_len - mask.shape[-1]
        is_bool = mask.dtype == jnp.bool_
        if short > 0:
            # A mask covering only the first keys leaves the rest masked out.
            fill = jnp.asarray(False if is_bool else -np.inf, mask.dtype)
            mask = lax.pad(mask, fill, [(0, 0, 0)] * (mask.ndim - 1) + [(0, short, 0)])
        bias = (
            jnp.where(mask, jnp.zeros((), dtype), jnp.asarray(-np.inf, dtype))
            if is_bool
            else mask.astype(dtype)
        )
    if nonpad_kv_seqlen is not None:
        valid = jnp.reshape(jnp.asarray(nonpad_kv_seqlen), (-1, 1, 1, 1))
        offset = valid - q_len
    else:
        valid = None
        offset = 0 if past_key is None else int(np.shape(past_key)[2])
    positional = _position_bias(
        bool(ctx.attr("is_causal", 0)),
        int(ctx.attr("left_window_size", -1)),
        int(ctx.attr("right_window_size", -1)),
        q_len,
        kv_len,
        offset,
        dtype,
    )
    if positional is not None:
        bias = positional if bias is None else bias + positional
    if valid is not None:
        keys = lax.broadcasted_iota(valid.dtype, (kv_len,), 0)
        padding = jnp.where(keys < valid, jnp.zeros((), dtype), jnp.asarray(-np.inf, dtype))
        bias = padding if bias is None else bias + padding

    mode = int(ctx.attr("qk_matmul_output_mode", 0))
    if mode not in (0, 1, 2, 3):
        raise ctx.error(f"qk_matmul_output_mode={mode} is not 0, 1, 2 or 3")
    raw = logits
    softcap = float(ctx.attr("softcap", 0.0))
    if softcap > 0:
        cap = jnp.asarray(softcap, dtype)
        logits = cap * jnp.tanh(logits / cap)
    capped = logits
    if bias is not None:
        logits = logits + bias
    scores = logits
    precision = ctx.attr("softmax_precision")
    if precision is not None:
        precision_dtype = jax.dtypes.canonicalize_dtype(numpy_dtype(int(precision)))
        if not jnp.issubdtype(precision_dtype, jnp.floating):
            raise ctx.error(f"softmax_precision={precision} is not a floating-point type")
        scores = scores.astype(precision_dtype)
    probs = _masked_softmax(scores)
    if bias is not None:
        # A query row that may attend no key at all yields zeros (not a uniform average).
        blocked = jnp.all(jnp.isneginf(bias), axis=-1, keepdims=True)
        probs = jnp.where(blocked, jnp.zeros((), probs.dtype), probs)
    probs = probs.astype(dtype)

    probs_grouped = jnp.reshape(probs, (batch, kv_heads, groups, q_len, kv_len))
    y = jnp.einsum("bhgqk,bhkd->bhgqd", probs_grouped, v)
    y = jnp.reshape(y, (batch, q_heads, q_len, v.shape[-1]))
    if three_d:
        y = jnp.reshape(jnp.transpose(y, (0, 2, 1, 3)), (batch, q_len, -1))
    if ctx.num_outputs <= 1:
        return y
    outputs = [y, k, v]
    if ctx.num_outputs > 3:
        outputs.append((raw, capped, logits, probs)[mode].astype(dtype))
    return tuple(outputs)


@register("RotaryEmbedding", since=23)
def rotary_embedding(ctx, x, cos_cache, sin_cache, position_ids=None):
    x = jnp.asarray(x)
    if x.ndim == 4:
        heads_last = jnp.transpose(x, (0, 2, 1, 3))
    elif x.ndim == 3:
        heads = ctx.attr("num_heads")
        if not heads:
            raise ctx.error("3-D inputs need the num_heads attribute")
        batch, seq, hidden = x.shape
        if hidden % int(heads):
            raise ctx.error(f"hidden size {hidden} does not split into num_heads={heads}")
        heads_last = jnp.reshape(x, (batch, seq, int(heads), hidden // int(heads)))
    else:
        raise ctx.error(f"RotaryEmbedding takes a 3-D or 4-D input, got shape {x.shape}")
    head_size = heads_last.shape[-1]
    dim = int(ctx.attr("rotary_embedding_dim", 0)) or head_size
    if dim % 2 or dim > head_size:
        raise ctx.error(
            f"rotary_embedding_dim={dim} must be even and at most the head size {head_size}"
        )
    cos = jnp.asarray(cos_cache).astype(x.dtype)
    sin = jnp.asarray(sin_cache).astype(x.dtype)
    if position_ids is not None:
        cos = jnp.take(cos, jnp.asarray(position_ids), axis=0)
        sin = jnp.take(sin, jnp.asarray(position_ids), axis=0)
    if cos.shape[-1] != dim // 2 or sin.shape[-1] != dim // 2:
        raise ctx.error(
            f"cos/sin caches end in {cos.shape[-1]}/{sin.shape[-1]} values, "
            f"rotary_embedding_dim / 2 is {dim // 2}"
        )
    # (batch, seq, dim / 2) -> (batch, seq, 1, dim / 2), one rotation shared by all heads.
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    rotate, keep = heads_last[..., :dim], heads_last[..., dim:]
    interleaved = bool(ctx.attr("interleaved", 0))
    if interleaved:
        x1, x2 = rotate[..., 0::2], rotate[..., 1::2]
    else:
        x1, x2 = rotate[..., : dim // 2], rotate[..., dim // 2 :]
    real = cos * x1 - sin * x2
    imag = sin * x1 + cos * x2
    if interleaved:
        rotated = jnp.reshape(jnp.stack([real, imag], axis=-1), rotate.shape)
    else:
        rotated = jnp.concatenate([real, imag], axis=-1)
    out = jnp.concatenate([rotated, keep], axis=-1)
    if x.ndim == 4:
        return jnp.transpose(out, (0, 2, 1, 3))
    return jnp.reshape(out, x.shape)


_UPDATE_RULES = ("linear", "gated", "delta", "gated_delta")


@register("LinearAttention", since=27)
def linear_attention(ctx, query, key, value, past_state=None, decay=None, beta=None):
    rule = ctx.attr("update_rule", "gated_delta")
    if rule not in _UPDATE_RULES:
        raise ctx.error(f"update_rule={rule!r} is not one of {', '.join(_UPDATE_RULES)}")
    gating = rule in ("gated", "gated_delta")
    delta = rule in ("delta", "gated_delta")
    if gating != (decay is not None):
        raise ctx.error(f"update_rule={rule!r} {'needs' if gating else 'forbids'} decay")
    if delta != (beta is not None):
        raise ctx.error(f"update_rule={rule!r} {'needs' if delta else 'forbids'} beta")
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    if not query.ndim == key.ndim == value.ndim == 3:
        raise ctx.error("query, key and value must be rank 3 (batch, time, heads * size)")
    q_heads, kv_heads = ctx.attr("q_num_heads"), ctx.attr("kv_num_heads")
    if q_heads is None or kv_heads is None or kv_heads <= 0 or q_heads % kv_heads:
        raise ctx.error(
            f"q_num_heads={q_heads} must be a positive multiple of kv_num_heads={kv_heads}"
        )
    out_dtype = query.dtype
    batch, steps, _ = query.shape
    # The recurrence accumulates in float32 whatever the activation type.
    q = _split_heads(ctx, query, q_heads, "q_num_heads").astype(jnp.float32)
    k = _split_heads(ctx, key, kv_heads, "kv_num_heads").astype(jnp.float32)
    v = _split_heads(ctx, value, kv_heads, "kv_num_heads").astype(jnp.float32)
    d_k, d_v = q.shape[-1], v.shape[-1]
    groups = q_heads // kv_heads

    def per_step(x, last, what):
        """(batch, time, heads * size or heads) -> (time, batch, heads, size or 1)."""
        x = jnp.asarray(x).astype(jnp.float32)
        if x.ndim != 3:
            raise ctx.error(f"{what} must be rank 3, got shape {x.shape}")
        if x.shape[-1] not in last:
            raise ctx.error(f"{what} ends in {x.shape[-1]}, expected one of {last}")
        width = x.shape[-1] // (kv_heads if x.shape[-1] % kv_heads == 0 else 1)
        heads = x.shape[-1] // width
        return jnp.moveaxis(jnp.reshape(x, (batch, steps, heads, width)), 1, 0)

    xs = {"q": jnp.moveaxis(q, 2, 0), "k": jnp.moveaxis(k, 2, 0), "v": jnp.moveaxis(v, 2, 0)}
    if gating:
        xs["g"] = per_step(decay, (kv_heads, kv_heads * d_k), "decay")
    if delta:
        xs["b"] = per_step(beta, (kv_heads, 1), "beta")
    if past_state is None:
        state_dtype = out_dtype
        state = jnp.zeros((batch, kv_heads, d_k, d_v), jnp.float32)
    else:
        state = jnp.asarray(past_state)
        if state.shape != (batch, kv_heads, d_k, d_v):
            raise ctx.error(f"past_state shape {state.shape} is not {(batch, kv_heads, d_k, d_v)}")
        state_dtype = state.dtype
        state = state.astype(jnp.float32)
    scale = float(ctx.attr("scale", 0.0)) or 1.0 / np.sqrt(d_k)

    def step(state, x):
        k_t, v_t = x["k"], x["v"]
        if gating:
            state = state * jnp.exp(x["g"])[..., None]
        if delta:
            v_t = x["b"] * (v_t - jnp.einsum("bhdm,bhd->bhm", state, k_t))
        state = state + k_t[..., :, None] * v_t[..., None, :]
        q_t = jnp.reshape(x["q"], (batch, kv_heads, groups, d_k))
        out = scale * jnp.einsum("bhgd,bhdm->bhgm", q_t, state)
        return state, jnp.reshape(out, (batch, q_heads * d_v))

    state, outputs = lax.scan(step, state, xs)
    output = jnp.moveaxis(outputs, 0, 1).astype(out_dtype)
    return output, state.astype(state_dtype)


@register("FlexAttention", since=1, domain=PREVIEW)
def flex_attention(ctx, q, k, v):
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if not q.ndim == k.ndim == v.ndim == 4:
        raise ctx.error(f"Q, K and V must be rank 4, got {q.shape}, {k.shape}, {v.shape}")
    batch, q_heads, q_len, head_size = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads or v.shape[1] != kv_heads or v.shape[2] != kv_len:
        raise ctx.error(f"Q {q.shape}, K {k.shape} and V {v.shape} do not fit together")
    groups = q_heads // kv_heads
    precision = ctx.attr("softmax_precision")
    if precision is not None:
        compute = jax.dtypes.canonicalize_dtype(numpy_dtype(int(precision)))
        if not jnp.issubdtype(compute, jnp.floating):
            raise ctx.error(f"softmax_precision={precision} is not a floating-point type")
    else:
        # Half-precision inputs get a float32 softmax; float32/float64 keep their own.
        compute = jnp.promote_types(q.dtype, jnp.float32)
    scale = ctx.attr("scale")
    scale = 1.0 / np.sqrt(head_size) if scale is None else float(scale)
    root = jnp.asarray(np.sqrt(np.float32(scale)), q.dtype)
    q_grouped = jnp.reshape(q * root, (batch, kv_heads, groups, q_len, head_size))
    scores = jnp.einsum("bhgqd,bhkd->bhgqk", q_grouped, k * root)
    scores = jnp.reshape(scores, (batch, q_heads, q_len, kv_len)).astype(compute)
    if "score_mod" in ctx.attrs:
        scores = jnp.asarray(ctx.run_subgraph("score_mod", [scores])[0]).astype(compute)
    probs = softmax_over(scores, (scores.ndim - 1,))
    if "prob_mod" in ctx.attrs:
        probs = jnp.asarray(ctx.run_subgraph("prob_mod", [probs])[0]).astype(compute)
    probs = jnp.reshape(probs, (batch, kv_heads, groups, q_len, kv_len))
    y = jnp.einsum("bhgqk,bhkd->bhgqd", probs, v.astype(compute))
    return jnp.reshape(y, (batch, q_heads, q_len, v.shape[-1])).astype(v.dtype)


@register("SoftmaxAttention", since=1, domain=ONNX2JAX)
def softmax_attention(ctx, q, kt, v, mask=None, scale=None):
    """``MatMul(Cast(Softmax(MatMul(q, kt) * scale + mask, axis=-1)), v)``, the chain
    onnx2jax.runtime.fusion.fuse_attention replaces (``divide``: the scores are divided by
    ``scale``; ``cast_to``: the probabilities are cast to that type, 0 for no Cast), as the
    chain's own ops. NativeAttention (ops/native_calls.py) is the same node computed by the
    native kernel."""
    divide, to = ctx.attr("divide", 0), ctx.attr("cast_to", 0)
    scores = matmul(ctx, q, kt)
    if scale is not None:
        scores = scores / scale if divide else scores * scale
    if mask is not None:
        scores = scores + mask
    p = jax_on(lambda x: softmax_over(x, (x.ndim - 1,)), scores)
    return matmul(ctx, p if not to else cast_to_type(ctx, p, to), v)
