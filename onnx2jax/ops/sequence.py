"""Sequence and optional ops.

An ONNX sequence is a Python ``list`` of arrays. Its length is always known at trace time, so
SequenceLength is static and positions (SequenceAt, SequenceInsert, SequenceErase) fold to
Python indexing when they are static too.

An ONNX optional holding a value is just the value. An *empty* optional is :data:`EMPTY`, the
one instance of :class:`EmptyOptional`, distinct from ``None`` (which means an absent input).
It is a JAX pytree with no leaves, so it passes through ``jax.jit``, ``lax.cond`` and loops. A
model input fed ``None`` for an optional-typed input is treated as empty as well.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from onnx2jax.core.convert import is_concrete
from onnx2jax.ops.registry import register


class EmptyOptional:
    """The value of an ONNX optional that holds nothing (use the singleton :data:`EMPTY`)."""

    _instance: EmptyOptional | None = None

    def __new__(cls) -> EmptyOptional:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "EMPTY"


EMPTY = EmptyOptional()
jax.tree_util.register_pytree_node(EmptyOptional, lambda _: ((), None), lambda _, __: EMPTY)


def is_empty_optional(value) -> bool:
    return value is None or value is EMPTY


def _sequence(ctx, value, what="the input sequence"):
    if not isinstance(value, list):
        raise ctx.error(f"{what} is not a sequence (got {type(value).__name__})")
    return value


def _position(ctx, position, index, length, allow_end):
    pos = ctx.static_ints(position, index, "the position")
    if len(pos) != 1:
        raise ctx.error(f"the position must be a scalar, got {len(pos)} values")
    pos = pos[0]
    upper = length if allow_end else length - 1
    if not -length <= pos <= upper:
        raise ctx.error(f"position {pos} is out of range for a sequence of length {length}")
    return pos + length if pos < 0 else pos


@register("SequenceConstruct", since=11)
def sequence_construct(ctx, *inputs):
    return list(inputs)


@register("SequenceEmpty", since=11)
def sequence_empty(ctx):
    return []


@register("SequenceAt", since=11)
def sequence_at(ctx, seq, position):
    seq = _sequence(ctx, seq)
    if not is_concrete(position) and len({np.shape(v) for v in seq}) == 1:
        # A traced position still works when the elements can be stacked.
        index = jnp.reshape(position, ()) % len(seq)
        return jnp.stack(seq)[index]
    return seq[_position(ctx, position, 1, len(seq), allow_end=False)]


@register("SequenceInsert", since=11)
def sequence_insert(ctx, seq, tensor, position=None):
    seq = list(_sequence(ctx, seq))
    if position is None:
        seq.append(tensor)
    else:
        seq.insert(_position(ctx, position, 2, len(seq), allow_end=True), tensor)
    return seq


@register("SequenceErase", since=11)
def sequence_erase(ctx, seq, position=None):
    seq = list(_sequence(ctx, seq))
    if not seq:
        raise ctx.error("cannot erase from an empty sequence")
    pos = len(seq) - 1 if position is None else _position(ctx, position, 1, len(seq), False)
    del seq[pos]
    return seq


@register("SequenceLength", since=11)
def sequence_length(ctx, seq):
    return np.asarray(len(_sequence(ctx, seq)), dtype=np.int64)


@register("SplitToSequence", since=(11, 24), static_inputs=(1,))
def split_to_sequence(ctx, x, split=None):
    axis = ctx.attr("axis", 0) % max(np.ndim(x), 1)
    length = np.shape(x)[axis]
    lead = (slice(None),) * axis
    if split is None:
        if ctx.attr("keepdims", 1):
            return [x[(*lead, slice(i, i + 1))] for i in range(length)]
        return [x[(*lead, i)] for i in range(length)]
    split = np.asarray(ctx.static(split, 1, "the split sizes"))
    if split.ndim == 0:
        chunk = int(split)
        if chunk <= 0:
            raise ctx.error(f"split must be positive, got {chunk}")
        sizes = [min(chunk, length - start) for start in range(0, length, chunk)]
    else:
        sizes = [int(s) for s in split]
        if sum(sizes) != length or any(s < 0 for s in sizes):
            raise ctx.error(f"split sizes {sizes} do not add up to the axis length {length}")
    bounds = np.cumsum([0, *sizes])
    return [x[(*lead, slice(int(bounds[i]), int(bounds[i + 1])))] for i in range(len(sizes))]


@register("ConcatFromSequence", since=11)
def concat_from_sequence(ctx, seq):
    seq = _sequence(ctx, seq)
    if not seq:
        raise ctx.error("cannot concatenate an empty sequence (its element shape is unknown)")
    axis = ctx.attr("axis")
    if axis is None:
        raise ctx.error("the axis attribute is required")
    xp = ctx.xp(*seq)
    if ctx.attr("new_axis", 0):
        return xp.stack(seq, axis=axis % (np.ndim(seq[0]) + 1))
    return xp.concatenate(seq, axis=axis % np.ndim(seq[0]))


@register("SequenceMap", since=17)
def sequence_map(ctx, seq, *extra):
    seq = _sequence(ctx, seq)
    for i, value in enumerate(extra):
        if isinstance(value, list) and len(value) != len(seq):
            raise ctx.error(
                f"additional sequence input {i + 1} has {len(value)} elements, the "
                f"first has {len(seq)}"
            )
    outputs = [[] for _ in ctx.attr("body").output]
    for i in range(len(seq)):
        args = [seq[i]] + [v[i] if isinstance(v, list) else v for v in extra]
        for out, value in zip(outputs, ctx.run_subgraph("body", args), strict=True):
            out.append(value)
    return tuple(outputs)


@register("Optional", since=(15, 28))
def optional(ctx, value=None):
    if value is None:
        if "type" not in ctx.attrs:
            raise ctx.error("an Optional without input needs the type attribute")
        return EMPTY
    return value


@register("OptionalHasElement", since=(15, 18, 28))
def optional_has_element(ctx, value=None):
    return np.asarray(not is_empty_optional(value))


@register("OptionalGetElement", since=(15, 18, 28))
def optional_get_element(ctx, value):
    if is_empty_optional(value):
        raise ctx.error(f"the optional {ctx.input_name(0)!r} is empty")
    return value
