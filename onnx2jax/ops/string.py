"""String ops. Strings only exist as static NumPy object arrays (JAX has no string type), so
these run at trace time; TfIdfVectorizer also traces on integer inputs.
"""

from __future__ import annotations

import operator
import re

import numpy as np

from onnx2jax.ops.registry import register


def _strings(ctx, value, index=0):
    value = ctx.static(value, index, "a string tensor")
    if value.dtype.kind not in "OU":
        raise ctx.error(f"expects a string tensor, got {value.dtype}")
    return value.astype(object)


@register("StringNormalizer", 10)
def string_normalizer(ctx, x):
    x = _strings(ctx, x)
    if x.ndim not in (1, 2) or x.ndim == 2 and x.shape[0] != 1:
        raise ctx.error(f"input must have shape [C] or [1, C], got {x.shape}")
    action = ctx.attr("case_change_action", "NONE")
    if action not in ("NONE", "LOWER", "UPPER"):
        raise ctx.error(f"unknown case_change_action {action!r}")
    sensitive = ctx.attr("is_case_sensitive", 0)
    stopwords = ctx.attr("stopwords", [])
    stops = set(stopwords) if sensitive else {w.lower() for w in stopwords}
    kept = [s for s in x.reshape(-1)
            if (s if sensitive else s.lower()) not in stops]
    if action == "LOWER":
        kept = [s.lower() for s in kept]
    elif action == "UPPER":
        kept = [s.upper() for s in kept]
    # An all-stopwords input gives one empty string rather than an empty tensor.
    out = np.asarray(kept or [""], dtype=object)
    return out.reshape(1, -1) if x.ndim == 2 else out


_concat = np.frompyfunc(operator.add, 2, 1)


@register("StringConcat", 20)
def string_concat(ctx, x, y):
    x, y = _strings(ctx, x, 0), _strings(ctx, y, 1)
    return np.asarray(_concat(x, y), dtype=object).reshape(np.broadcast_shapes(x.shape, y.shape))


@register("StringSplit", 20)
def string_split(ctx, x):
    x = _strings(ctx, x)
    delimiter = ctx.attr("delimiter") or None
    maxsplit = ctx.attr("maxsplit", -1)
    parts = [s.split(delimiter, maxsplit) for s in x.reshape(-1)]
    counts = np.asarray([len(p) for p in parts], dtype=np.int64).reshape(x.shape)
    width = max((len(p) for p in parts), default=0)
    out = np.full((len(parts), width), "", dtype=object)
    for row, pieces in enumerate(parts):
        out[row, :len(pieces)] = pieces
    return out.reshape(*x.shape, width), counts


@register("RegexFullMatch", 20)
def regex_full_match(ctx, x):
    x = _strings(ctx, x)
    try:
        pattern = re.compile(ctx.attr("pattern", ""))
    except re.error as exc:
        raise ctx.error(f"invalid pattern {ctx.attr('pattern')!r}: {exc}") from None
    flat = [pattern.fullmatch(s) is not None for s in x.reshape(-1)]
    return np.asarray(flat, dtype=bool).reshape(x.shape)


def _pool_grams(ctx, pool_size):
    """[(n, first pool offset, count)] for every n-gram size listed in ngram_counts."""
    starts = list(ctx.attr("ngram_counts", []))
    spans = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else pool_size
        n = i + 1
        if (end - start) % n:
            raise ctx.error(f"{end - start} pool items are not a whole number of {n}-grams")
        spans.append((n, start, (end - start) // n))
    return spans


@register("TfIdfVectorizer", 9)
def tfidf_vectorizer(ctx, x):
    mode = ctx.attr("mode")
    if mode not in ("TF", "IDF", "TFIDF"):
        raise ctx.error(f"unknown mode {mode!r}")
    indexes = np.asarray(ctx.attr("ngram_indexes"), np.int64)
    size = int(indexes.max()) + 1 if indexes.size else 0
    min_n, max_n = ctx.attr("min_gram_length"), ctx.attr("max_gram_length")
    max_skip = ctx.attr("max_skip_count", 0)
    if ctx.attr("pool_strings"):
        # Strings become their position in the pool (-1 when absent) and run the integer path.
        pool_strings = list(ctx.attr("pool_strings"))
        position = {s: i for i, s in enumerate(pool_strings)}
        x = _strings(ctx, x)
        x = np.asarray([position.get(s, -1) for s in x.reshape(-1)], np.int64).reshape(x.shape)
        pool = np.arange(len(pool_strings), dtype=np.int64)
    else:
        pool = np.asarray(ctx.attr("pool_int64s", []), np.int64)
        if x.dtype.kind not in "iu":
            raise ctx.error(f"integer pool but input of type {x.dtype}")
    xp = ctx.xp(x)
    if x.ndim > 2:
        raise ctx.error(f"input must be [C] or [B, C], got {x.shape}")
    rows = x.reshape(1, -1) if x.ndim < 2 else x
    length = rows.shape[1]
    counts = xp.zeros((rows.shape[0], size), np.float32)
    gram_id = 0
    for n, start, number in _pool_grams(ctx, len(pool)):
        grams = pool[start:start + n * number].reshape(number, n).astype(rows.dtype)
        targets = indexes[gram_id:gram_id + number]
        gram_id += number
        if not number or n < min_n or n > max_n:
            continue
        one_hot = (targets[:, None] == np.arange(size)).astype(np.float32)
        # Unigrams are counted once; longer grams once per skip distance 1..max_skip+1.
        for distance in range(1, max_skip + 2 if n > 1 else 2):
            span = (n - 1) * distance
            if span >= length:
                break
            windows = xp.stack([rows[:, k * distance:length - span + k * distance]
                                for k in range(n)], axis=-1)
            matches = (windows[:, :, None, :] == grams).all(axis=-1).sum(axis=1)
            counts = counts + matches.astype(np.float32) @ one_hot
    weights = ctx.attr("weights")
    weights = np.asarray(weights, np.float32) if weights else None
    if mode == "IDF":
        counts = xp.where(counts > 0, 1.0 if weights is None else weights, 0.0)
    elif mode == "TFIDF" and weights is not None:
        counts = counts * weights
    counts = counts.astype(np.float32)
    return counts.reshape(size) if x.ndim < 2 else counts
