"""The com.microsoft attention ops of decoder models with a key-value cache, as
onnxruntime-genai's model builder writes them: GroupQueryAttention and RotaryEmbedding.

Semantics follow onnxruntime's CPU kernels. Per-row sequence lengths (``seqlens_k``) are
traced values, so a batch of prompts of different lengths, or a cache buffer longer than the
tokens it holds, is one program: rows are placed and masked with indices, never by shape.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from onnx2jax.ops.registry import MS, register


def rotate(x: Any, cos_cache: Any, sin_cache: Any, positions: Any, interleaved: bool) -> jax.Array:
    """Rotary embedding of ``x`` [B, N, S, H] at ``positions`` [B, S]: the first
    ``2 * cos_cache.shape[1]`` values of each head turn, the rest pass through.

    Example:
        >>> import numpy as np
        >>> x = np.ones((1, 1, 1, 4), np.float32)
        >>> cos, sin = np.array([[0.0, 1.0]], np.float32), np.array([[1.0, 0.0]], np.float32)
        >>> rotate(x, cos, sin, np.zeros((1, 1), np.int32), False)[0, 0, 0].tolist()
        [-1.0, 1.0, 1.0, 1.0]
    """
    x = jnp.asarray(x)
    half = cos_cache.shape[-1]
    positions = jnp.asarray(positions).astype(jnp.int32)
    # [B, S, half] -> [B, 1, S, half]: one rotation per position, shared by every head.
    cos = jnp.take(jnp.asarray(cos_cache), positions, axis=0).astype(x.dtype)[:, None]
    sin = jnp.take(jnp.asarray(sin_cache), positions, axis=0).astype(x.dtype)[:, None]
    turned, kept = x[..., : 2 * half], x[..., 2 * half :]
    if interleaved:
        x1, x2 = turned[..., 0::2], turned[..., 1::2]
    else:
        x1, x2 = turned[..., :half], turned[..., half:]
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    if interleaved:
        turned = jnp.stack([real, imag], axis=-1).reshape(turned.shape)
    else:
        turned = jnp.concatenate([real, imag], axis=-1)
    return jnp.concatenate([turned, kept], axis=-1)


@register("RotaryEmbedding", since=1, domain=MS)
def rotary_embedding(ctx, x, position_ids, cos_cache, sin_cache):
    """com.microsoft RotaryEmbedding: ``position_ids`` [B, S], or one offset (shape [1]) that
    the positions 0..S-1 start from; ``x`` [B, S, N*H] or [B, N, S, H]."""
    if ctx.attr("is_packed_batching", 0):
        raise ctx.error("is_packed_batching=1 (ragged batches) is not supported")
    if ctx.attr("scale", 1.0) != 1.0:
        raise ctx.error(f"scale={ctx.attr('scale')} is not supported (onnxruntime ignores it)")
    x = jnp.asarray(x)
    half = cos_cache.shape[-1]
    if x.ndim == 4:
        heads = x
    elif x.ndim == 3:
        batch, length, hidden = x.shape
        num_heads = int(ctx.attr("num_heads", 0)) or hidden // (2 * half)
        if num_heads <= 0 or hidden % num_heads:
            raise ctx.error(f"hidden size {hidden} does not split into num_heads={num_heads}")
        heads = x.reshape(batch, length, num_heads, -1).transpose(0, 2, 1, 3)
    else:
        raise ctx.error(f"input must be 3-D or 4-D, got shape {x.shape}")
    batch, _, length, head_size = heads.shape
    dim = int(ctx.attr("rotary_embedding_dim", 0)) or head_size
    if dim != 2 * half or dim > head_size or cos_cache.shape != sin_cache.shape:
        raise ctx.error(
            f"cos/sin caches {cos_cache.shape}/{sin_cache.shape} do not give rotary_embedding_dim "
            f"{dim} / 2 values (head size {head_size})"
        )
    position_ids = jnp.asarray(position_ids)
    if position_ids.size == 1 and position_ids.ndim <= 1:
        positions = position_ids.reshape(()) + jnp.arange(length)[None, :]
        positions = jnp.broadcast_to(positions, (batch, length))
    elif position_ids.shape == (batch, length):
        positions = position_ids
    else:
        raise ctx.error(
            f"position_ids of shape {position_ids.shape} is neither [1] nor [batch, sequence]"
        )
    out = rotate(heads, cos_cache, sin_cache, positions, bool(ctx.attr("interleaved", 0)))
    if x.ndim == 4:
        return out.astype(x.dtype)
    return out.transpose(0, 2, 1, 3).reshape(x.shape).astype(x.dtype)


def _write_rows(cache, new, start):
    """``cache`` [B, N, L, H] with ``new`` [B, N, S, H] written at row ``start[b]`` of each b."""

    def one(buffer, rows, at):
        return lax.dynamic_update_slice(buffer, rows, (0, at, 0))

    return jax.vmap(one)(cache, new.astype(cache.dtype), start.astype(jnp.int32))


def _present(past, new, start, length):
    """The present cache: ``past`` (zeros if absent) padded to ``length`` rows, with this
    step's rows written at each batch row's position."""
    batch, heads, _, size = new.shape
    if past is None:
        base = jnp.zeros((batch, heads, length, size), new.dtype)
    else:
        base = jnp.asarray(past)
        if base.shape[2] < length:
            base = jnp.pad(base, ((0, 0), (0, 0), (0, length - base.shape[2]), (0, 0)))
    return _write_rows(base, new, start)


def _split_heads(ctx, query, key, value, num_heads, kv_heads):
    """Query [B, num_heads, S, H] and key and value [B, kv_heads, S, H] in the compute type
    (float32 at least), from separate inputs [B, S, heads * H] or one packed QKV input; and H."""
    compute = jnp.promote_types(query.dtype, jnp.float32)
    batch, length, width = query.shape
    if key is None:
        if value is not None:
            raise ctx.error("key and value come together (both absent for packed QKV)")
        head_size = width // (num_heads + 2 * kv_heads)
        split = np.cumsum([num_heads * head_size, kv_heads * head_size])
        query, key, value = jnp.split(query, split, axis=-1)
    elif value is None:
        raise ctx.error("key and value come together (both absent for packed QKV)")
    else:
        head_size = width // num_heads
    key, value = jnp.asarray(key), jnp.asarray(value)
    if (
        query.shape != (batch, length, num_heads * head_size)
        or key.shape != (batch, length, kv_heads * head_size)
        or key.shape != value.shape
    ):
        raise ctx.error(
            f"query {query.shape}, key {key.shape} and value {value.shape} do not fit "
            f"num_heads={num_heads}, kv_num_heads={kv_heads}"
        )

    def heads(t, n):
        return t.reshape(batch, length, n, head_size).transpose(0, 2, 1, 3).astype(compute)

    return heads(query, num_heads), heads(key, kv_heads), heads(value, kv_heads), head_size


def _grouped_scores(q, present_k, scale):
    """Scaled scores [B, N, S, L] of queries [B, N, S, H] against keys [B, K, L, H], query head
    n reading key head n // (N / K)."""
    batch, num_heads, length, head_size = q.shape
    kv_heads, rows = present_k.shape[1], present_k.shape[2]
    return jnp.einsum(
        "bkgsh,bklh->bkgsl",
        q.reshape(batch, kv_heads, num_heads // kv_heads, length, head_size),
        present_k.astype(q.dtype),
        preferred_element_type=q.dtype,
    ).reshape(batch, num_heads, length, rows) * jnp.asarray(scale, q.dtype)


def _grouped_values(probs, present_v, dtype):
    """The attention output [B, S, N * H] in ``dtype``: probabilities [B, N, S, L] times
    values [B, K, L, H], grouped as in ``_grouped_scores``."""
    batch, num_heads, length, rows = probs.shape
    kv_heads, head_size = present_v.shape[1], present_v.shape[3]
    out = jnp.einsum(
        "bkgsl,bklh->bkgsh",
        probs.reshape(batch, kv_heads, num_heads // kv_heads, length, rows),
        present_v.astype(probs.dtype),
        preferred_element_type=probs.dtype,
    )
    out = out.reshape(batch, num_heads, length, head_size).transpose(0, 2, 1, 3)
    return out.reshape(batch, length, num_heads * head_size).astype(dtype)


_UNSUPPORTED_INPUTS = {
    12: "k_scale (a quantized key-value cache)",
    13: "v_scale (a quantized key-value cache)",
    14: "q_norm_weight",
    15: "k_norm_weight",
    16: "query_seqlens (right-padded query chunks)",
}


@register("GroupQueryAttention", since=1, domain=MS, static_inputs=(6,))
def group_query_attention(
    ctx,
    query,
    key,
    value,
    past_key,
    past_value,
    seqlens_k,
    total_sequence_length,
    cos_cache=None,
    sin_cache=None,
    position_ids=None,
    attention_bias=None,
    head_sink=None,
    *rest,
):
    """Grouped-query attention over a key-value cache.

    Row b holds ``seqlens_k[b] + 1`` tokens after this step; the first prompt (sequence length
    equal to ``total_sequence_length``) starts at position 0, a later step right after the
    row's cached tokens. ``present`` is ``past`` (a buffer as long as it likes) with this step's
    keys and values written at each row's position, at least ``total_sequence_length`` long.
    """
    for index, value_in in enumerate(rest, start=12):
        if value_in is not None:
            raise ctx.error(f"{_UNSUPPORTED_INPUTS.get(index, f'input {index}')} is not supported")
    if ctx.attr("sliding_window_cache", 0):
        raise ctx.error("sliding_window_cache=1 (a window-sized cache) is not supported")
    qk_output = int(ctx.attr("qk_output", 0))
    if qk_output not in (0, 1, 2) or ctx.has_output(3) != bool(qk_output):
        raise ctx.error(f"qk_output={qk_output} does not fit the node's {ctx.num_outputs} outputs")
    for what in ("k_quant_type", "v_quant_type"):
        if ctx.attr(what, "NONE") != "NONE":
            raise ctx.error(f"{what}={ctx.attr(what)!r} (a quantized cache) is not supported")
    num_heads, kv_heads = ctx.attr("num_heads"), ctx.attr("kv_num_heads")
    if not num_heads or not kv_heads or num_heads % kv_heads:
        raise ctx.error(
            f"num_heads={num_heads} must be a positive multiple of kv_num_heads={kv_heads}"
        )
    if (past_key is None) != (past_value is None):
        raise ctx.error("past_key and past_value come together")
    if (cos_cache is None) != (sin_cache is None):
        raise ctx.error("cos_cache and sin_cache come together")
    causal = int(ctx.attr("causal", 1))
    window = int(ctx.attr("local_window_size", -1))
    if causal not in (0, 1) or (not causal and window != -1):
        raise ctx.error(f"causal={causal} with local_window_size={window} is not valid")
    query = jnp.asarray(query)
    dtype = query.dtype
    batch, length = query.shape[:2]
    q, k, v, head_size = _split_heads(ctx, query, key, value, num_heads, kv_heads)
    compute = q.dtype

    total = int(np.asarray(ctx.static(total_sequence_length, 6, "total_sequence_length")).item())
    past_rows = 0 if past_key is None else past_key.shape[2]
    if length > 1 and length != total and batch != 1:
        raise ctx.error(
            "a later prompt of several tokens (sequence length != total_sequence_length) "
            "needs batch size 1, as in onnxruntime"
        )
    first_prompt = length == total
    valid = jnp.reshape(jnp.asarray(seqlens_k), (batch,)).astype(jnp.int32) + 1
    start = jnp.zeros_like(valid) if first_prompt else valid - length

    if ctx.attr("do_rotary", 0):
        if cos_cache is None:
            raise ctx.error("do_rotary=1 needs cos_cache and sin_cache")
        if position_ids is not None:
            positions = jnp.asarray(position_ids).reshape(batch, length).astype(jnp.int32)
            if first_prompt:
                # onnxruntime reads a prompt's first position only; the rest follow it.
                positions = positions[:, :1] + jnp.arange(length, dtype=jnp.int32)[None, :]
        else:
            positions = start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
        interleaved = bool(ctx.attr("rotary_interleaved", 0))
        q = rotate(q, cos_cache, sin_cache, positions, interleaved)
        k = rotate(k, cos_cache, sin_cache, positions, interleaved)

    rows = max(total, past_rows)
    present_k = _present(past_key, k.astype(dtype), start, rows)
    present_v = _present(past_value, v.astype(dtype), start, rows)

    scale = ctx.attr("scale", 0.0) or 1.0 / np.sqrt(head_size)
    scores = _grouped_scores(q, present_k, scale)
    softcap = float(ctx.attr("softcap", 0.0))
    if softcap > 0:
        scores = softcap * jnp.tanh(scores / softcap)
    if attention_bias is not None:
        bias = jnp.asarray(attention_bias).astype(compute)
        scores = (
            scores + bias[..., :rows]
            if bias.shape[-1] >= rows
            else scores + jnp.pad(bias, [(0, 0)] * (bias.ndim - 1) + [(0, rows - bias.shape[-1])])
        )
    # onnxruntime's first qk output: the scores with softcap and bias, before the masks.
    raw_scores = scores
    # Query s of row b sits at position start[b] + s; it reads keys up to there (all the row's
    # keys when not causal), and with a window only the last local_window_size of them.
    at = start[:, None, None] + jnp.arange(length)[None, :, None]
    keys = jnp.arange(rows)[None, None, :]
    allowed = keys <= at if causal else keys < valid[:, None, None]
    if window > 0:
        allowed = allowed & (keys > at - window)
    scores = jnp.where(allowed[:, None], scores, -jnp.inf)
    smooth = ctx.attr("smooth_softmax", -1) == 1 or head_sink is not None
    if smooth:
        # One more logit per head (0, or the head's sink) joins the denominator only.
        sink = (
            jnp.zeros((num_heads,), compute)
            if head_sink is None
            else jnp.reshape(jnp.asarray(head_sink), (num_heads,)).astype(compute)
        )[None, :, None, None]
        top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
        top = lax.stop_gradient(top)
        e = jnp.exp(scores - top)
        probs = e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - top))
    else:
        probs = jax.nn.softmax(scores, axis=-1)
    out = _grouped_values(probs, present_v, dtype)
    if not qk_output:
        return out, present_k, present_v
    # [B, N, S, present length]: the scores (1) or the probabilities (2), zero where a query
    # reads no key.
    qk = raw_scores if qk_output == 1 else probs
    qk = jnp.where(allowed[:, None], qk, 0).astype(dtype)
    return out, present_k, present_v, qk


def _block_layouts(row_indices, col_indices, columns):
    """The dense block masks [layouts, rows, columns] (bool) of a CSR block mask: ``row_indices``
    [layouts, rows + 1], ``col_indices`` [layouts, nnz] padded on the right (past each layout's
    last row offset, or with -1)."""
    row_indices = jnp.asarray(row_indices).astype(jnp.int32)
    col_indices = jnp.asarray(col_indices).astype(jnp.int32)
    layouts, rows = row_indices.shape[0], row_indices.shape[1] - 1
    entries = jnp.arange(col_indices.shape[1], dtype=jnp.int32)
    # Entry n belongs to the last row whose offset is at most n.
    row_of = (
        jax.vmap(lambda offsets: jnp.searchsorted(offsets, entries, side="right"))(row_indices) - 1
    )
    used = (entries[None, :] < row_indices[:, -1:]) & (col_indices >= 0)
    used = used & (row_of >= 0) & (row_of < rows) & (col_indices < columns)
    # Padding entries are sent out of range and dropped.
    row_of = jnp.where(used, row_of, rows)
    layout = jnp.broadcast_to(jnp.arange(layouts)[:, None], col_indices.shape)
    dense = jnp.zeros((layouts, rows, columns), jnp.bool_)
    return dense.at[layout, row_of, col_indices].set(True, mode="drop")


@register("SparseAttention", since=1, domain=MS, static_inputs=(7,))
def sparse_attention(
    ctx,
    query,
    key,
    value,
    past_key,
    past_value,
    block_row_indices,
    block_col_indices,
    total_sequence_length,
    key_total_sequence_lengths,
    cos_cache=None,
    sin_cache=None,
):
    """Block-sparse grouped-query attention over a key-value cache (Phi-3-small).

    Row b holds ``key_total_sequence_lengths[b]`` tokens after this step; the first prompt
    (sequence length equal to ``total_sequence_length``) starts at position 0, a later step
    right after the row's cached tokens. A query at position p reads the keys at or before p
    whose block (position // sparse_block_size) is in row p // sparse_block_size of its head's
    layout (head n uses layout n % num_layout). ``present`` is the ``past`` buffer with this
    step's keys and values written at each row's position. onnxruntime's CPU kernel reads a
    row listing row + 1 blocks as all causal blocks; for lower-triangular masks (the builder's)
    that is the same mask.
    """
    num_heads, kv_heads = ctx.attr("num_heads"), ctx.attr("kv_num_heads")
    if not num_heads or not kv_heads or num_heads % kv_heads:
        raise ctx.error(
            f"num_heads={num_heads} must be a positive multiple of kv_num_heads={kv_heads}"
        )
    block = int(ctx.attr("sparse_block_size", 0))
    if block <= 0:
        raise ctx.error(f"sparse_block_size={block} must be positive")
    if past_key is None or past_value is None:
        raise ctx.error("past_key and past_value are required (the cache buffers)")
    query = jnp.asarray(query)
    if query.ndim != 3:
        raise ctx.error(f"query must be 3-D, got shape {query.shape}")
    dtype = query.dtype
    batch, length = query.shape[:2]
    q, k, v, head_size = _split_heads(ctx, query, key, value, num_heads, kv_heads)
    past_key, past_value = jnp.asarray(past_key), jnp.asarray(past_value)
    if past_key.shape != past_value.shape or past_key.shape[:2] != (batch, kv_heads):
        raise ctx.error(
            f"past_key {past_key.shape} and past_value {past_value.shape} must both be "
            f"[batch {batch}, kv_num_heads {kv_heads}, cache length, head size {head_size}]"
        )
    if past_key.ndim != 4 or past_key.shape[3] != head_size:
        raise ctx.error(f"past_key {past_key.shape} does not have head size {head_size}")
    rows_in = tuple(block_row_indices.shape)
    cols_in = tuple(block_col_indices.shape)
    if len(rows_in) != 2 or rows_in[1] < 2 or num_heads % rows_in[0]:
        raise ctx.error(
            f"block_row_indices {rows_in} must be [num_layout, max_blocks + 1] with num_heads "
            f"{num_heads} a multiple of num_layout"
        )
    if len(cols_in) != 2 or cols_in[0] != rows_in[0]:
        raise ctx.error(f"block_col_indices {cols_in} must be [num_layout {rows_in[0]}, nnz]")
    layouts, blocks = rows_in[0], rows_in[1] - 1

    total = int(np.asarray(ctx.static(total_sequence_length, 7, "total_sequence_length")).item())
    cache_rows = past_key.shape[2]
    if total > blocks * block or total > cache_rows:
        raise ctx.error(
            f"total_sequence_length {total} exceeds the block mask's {blocks * block} positions "
            f"or the cache's {cache_rows} rows"
        )
    first_prompt = length == total
    valid = jnp.reshape(jnp.asarray(key_total_sequence_lengths), (batch,)).astype(jnp.int32)
    start = jnp.zeros_like(valid) if first_prompt else valid - length

    if ctx.attr("do_rotary", 0):
        if cos_cache is None or sin_cache is None:
            raise ctx.error("do_rotary=1 needs cos_cache and sin_cache")
        positions = start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
        interleaved = bool(ctx.attr("rotary_interleaved", 0))
        q = rotate(q, cos_cache, sin_cache, positions, interleaved)
        k = rotate(k, cos_cache, sin_cache, positions, interleaved)

    present_k = _present(past_key, k.astype(dtype), start, cache_rows)
    present_v = _present(past_value, v.astype(dtype), start, cache_rows)

    scale = ctx.attr("scale", 0.0) or 1.0 / np.sqrt(head_size)
    scores = _grouped_scores(q, present_k, scale)
    # Query s of row b sits at position start[b] + s and reads the keys up to there whose
    # block its layout row lists.
    at = start[:, None] + jnp.arange(length)[None, :]
    keys = jnp.arange(cache_rows)
    causal = keys[None, None, :] <= at[:, :, None]
    dense = _block_layouts(block_row_indices, block_col_indices, blocks)
    layout_of_head = jnp.arange(num_heads) % layouts
    key_blocks = jnp.minimum(keys // block, blocks - 1)
    query_blocks = jnp.clip(at // block, 0, blocks - 1)
    # [N, B, S, L] -> [B, N, S, L]: the layout row of each query, read at each key's block.
    listed = dense[layout_of_head[:, None, None, None], query_blocks[None, :, :, None], key_blocks]
    listed = listed.transpose(1, 0, 2, 3)
    # A causal key left out by the layout gets the lowest finite score (as onnxruntime), so a
    # row whose layout lists none of its keys still has a defined softmax.
    lowest = jnp.finfo(scores.dtype).min
    scores = jnp.where(listed, scores, lowest)
    scores = jnp.where(causal[:, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return _grouped_values(probs, present_v, dtype), present_k, present_v
