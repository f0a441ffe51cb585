"""String ops. Strings only exist as static NumPy object arrays (JAX has no string type), so
these run at trace time; TfIdfVectorizer also traces on integer inputs.
"""

from __future__ import annotations

import operator
import re

import numpy as np

from onnx2jax.ops.registry import MS, register


def _strings(ctx, value, index=0):
    value = ctx.static(value, index, "a string tensor")
    if value.dtype.kind not in "OU":
        raise ctx.error(f"expects a string tensor, got {value.dtype}")
    return value.astype(object)


@register("StringNormalizer", since=10)
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
    kept = [s for s in x.reshape(-1) if (s if sensitive else s.lower()) not in stops]
    if action == "LOWER":
        kept = [s.lower() for s in kept]
    elif action == "UPPER":
        kept = [s.upper() for s in kept]
    # An all-stopwords input gives one empty string rather than an empty tensor.
    out = np.asarray(kept or [""], dtype=object)
    return out.reshape(1, -1) if x.ndim == 2 else out


_concat = np.frompyfunc(operator.add, 2, 1)


@register("StringConcat", since=20)
def string_concat(ctx, x, y):
    x, y = _strings(ctx, x, 0), _strings(ctx, y, 1)
    return np.asarray(_concat(x, y), dtype=object).reshape(np.broadcast_shapes(x.shape, y.shape))


@register("StringSplit", since=20)
def string_split(ctx, x):
    x = _strings(ctx, x)
    delimiter = ctx.attr("delimiter") or None
    maxsplit = ctx.attr("maxsplit", -1)
    parts = [s.split(delimiter, maxsplit) for s in x.reshape(-1)]
    counts = np.asarray([len(p) for p in parts], dtype=np.int64).reshape(x.shape)
    width = max((len(p) for p in parts), default=0)
    out = np.full((len(parts), width), "", dtype=object)
    for row, pieces in enumerate(parts):
        out[row, : len(pieces)] = pieces
    return out.reshape(*x.shape, width), counts


@register("RegexFullMatch", since=20)
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


@register("TfIdfVectorizer", since=9)
def tfidf_vectorizer(ctx, x):
    mode = ctx.attr("mode")
    if mode not in ("TF", "IDF", "TFIDF"):
        raise ctx.error(f"unknown mode {mode!r}")
    indexes = np.asarray(ctx.attr("ngram_indexes"), np.int64)
    size = int(indexes.max()) + 1 if indexes.size else 0
    min_n, max_n = ctx.attr("min_gram_length"), ctx.attr("max_gram_length")
    max_skip = ctx.attr("max_skip_count", 0)
    if ctx.attr("pool_strings"):
        # Strings become ids (-1 when absent from the pool) and run the integer path. A word
        # of several n-grams appears in the pool once per n-gram: one id per distinct string.
        pool_strings = list(ctx.attr("pool_strings"))
        ids: dict[str, int] = {}
        for word in pool_strings:
            ids.setdefault(word, len(ids))
        x = _strings(ctx, x)
        x = np.asarray([ids.get(s, -1) for s in x.reshape(-1)], np.int64).reshape(x.shape)
        pool = np.asarray([ids[word] for word in pool_strings], dtype=np.int64)
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
        grams = pool[start : start + n * number].reshape(number, n).astype(rows.dtype)
        targets = indexes[gram_id : gram_id + number]
        gram_id += number
        if not number or n < min_n or n > max_n:
            continue
        one_hot = (targets[:, None] == np.arange(size)).astype(np.float32)
        # Unigrams are counted once; longer grams once per skip distance 1..max_skip+1.
        for distance in range(1, max_skip + 2 if n > 1 else 2):
            span = (n - 1) * distance
            if span >= length:
                break
            windows = xp.stack(
                [rows[:, k * distance : length - span + k * distance] for k in range(n)], axis=-1
            )
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


# ------------------------------------------------------------------- com.microsoft Tokenizer
# onnxruntime's kernel matches with RE2 in leftmost-longest mode, where \w, \d, \s and \b are
# ASCII. The `regex` package's POSIX mode matches leftmost-longest; Python's `re` matches
# leftmost-first, which gives the same tokens only for patterns without alternatives or lazy
# quantifiers (skl2onnx's default "[a-zA-Z0-9_]+" among them).
try:
    import regex as _posix_re
except ImportError:  # pragma: no cover - regex comes with transformers and tokenizers
    _posix_re = None

_START_TEXT, _END_TEXT = "\x02", "\x03"


def _compile_longest(ctx, pattern, what):
    """``pattern`` compiled to match leftmost-longest, as RE2 does in onnxruntime."""
    try:
        if _posix_re is not None:
            return _posix_re.compile(pattern, _posix_re.POSIX | _posix_re.ASCII)
        if "|" in pattern or "?" in pattern:
            raise ctx.error(
                f"{what} {pattern!r} needs leftmost-longest matching, which needs "
                "the `regex` package (pip install regex)"
            )
        return re.compile(pattern, re.ASCII)
    except (re.error, getattr(_posix_re, "error", re.error)) as exc:
        raise ctx.error(f"invalid {what} {pattern!r}: {exc}") from None


def _split_by(pattern, text, mincharnum):
    """``text`` split around the matches of ``pattern``; pieces shorter than ``mincharnum``
    characters are dropped. An empty match also drops the character it stands on."""
    pieces, start, end = [], 0, len(text)
    while start <= end:
        found = pattern.search(text, start)
        if found is None:
            if end - start >= mincharnum:
                pieces.append(text[start:])
            break
        if found.start() - start >= mincharnum:
            pieces.append(text[start : found.start()])
        start = found.end() if found.end() > found.start() else found.start() + 1
    return pieces


def _matches_of(pattern, text, mincharnum):
    """The matches of ``pattern`` in ``text`` of at least ``mincharnum`` characters; after a
    shorter one the search resumes one character after where it began."""
    tokens, start = [], 0
    while start <= len(text):
        found = pattern.search(text, start)
        if found is None:
            break
        if found.end() - found.start() >= mincharnum:
            tokens.append(found.group())
            start = found.end()
        else:
            start = found.start() + 1
    return tokens


@register("Tokenizer", since=1, domain=MS)
def tokenizer(ctx, x):
    """Split each string into tokens: by the ``separators`` expressions, applied one after the
    other, or as the matches of ``tokenexp`` (its split points with ``tokenexpsplit``, an
    attribute of mlprodict's runtime that onnxruntime lacks), or into characters (separators
    ``[""]`` or tokenexp ``"."``). Rows are padded with ``pad_value`` to the longest; ``mark``
    frames each row's tokens with STX/ETX."""
    x = _strings(ctx, x)
    if x.ndim not in (1, 2):
        raise ctx.error(f"input must have shape [C] or [N, C], got {x.shape}")
    for name in ("mark", "pad_value", "mincharnum"):
        if ctx.attr(name) is None:
            raise ctx.error(f"attribute {name!r} is required")
    mark, pad, mincharnum = bool(ctx.attr("mark")), ctx.attr("pad_value"), ctx.attr("mincharnum")
    if mincharnum < 1:
        raise ctx.error(f"mincharnum must be positive, got {mincharnum}")
    separators, tokenexp = ctx.attr("separators"), ctx.attr("tokenexp")
    if separators is None and not tokenexp:
        raise ctx.error("either separators or a non-empty tokenexp is required")
    if separators is not None and not separators:
        raise ctx.error("separators must not be empty")
    by_char = separators == [""] if separators is not None else tokenexp == "."
    if by_char and mincharnum > 1:
        raise ctx.error(f"mincharnum {mincharnum} is too big for character tokenization")

    if by_char:

        def split(text):
            return list(text)
    elif separators is not None:
        patterns = [_compile_longest(ctx, s, "separator") for s in separators]

        def split(text):
            pieces = [text]
            for pattern in patterns:
                pieces = [p for piece in pieces for p in _split_by(pattern, piece, mincharnum)]
            return pieces
    else:
        pattern = _compile_longest(ctx, tokenexp, "tokenexp")
        if ctx.attr("tokenexpsplit", 0):

            def split(text):
                return _split_by(pattern, text, mincharnum)
        else:

            def split(text):
                return _matches_of(pattern, text, mincharnum)

    rows = [split(str(s)) for s in x.reshape(-1)]
    width = max((len(r) for r in rows), default=0)
    if width == 0:
        return np.empty((*x.shape, 0), dtype=object)
    width += 2 * mark
    out = np.full((len(rows), width), pad, dtype=object)
    for i, row in enumerate(rows):
        framed = [_START_TEXT, *row, _END_TEXT] if mark else row
        out[i, : len(framed)] = framed
    return out.reshape(*x.shape, width)
