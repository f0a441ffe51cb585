"""Text generation from decoder models with a KV cache, compiled once per shape, never per step.

:func:`generate` runs a decoder-only ONNX model whose graph takes the keys and values of the
tokens before (``past_key_values.{i}.key`` / ``.value``) and returns them with the new tokens'
(``present.{i}.key`` / ``.value``), as torch.onnx, optimum and onnxruntime-genai's model builder
export language models (:func:`cache_layout`). The cache is one preallocated buffer of
``max_length`` tokens per past input. Prefill runs the prompt (padded to a length bucket) after
a near-empty past and writes its keys and values into the buffer; each decode step feeds the whole
buffer as the past, with ``attention_mask`` zero on the slots not filled yet (and explicit
``position_ids``), and writes the new token's keys and values into it
(``jax.lax.dynamic_update_slice`` in a jitted program that donates the buffer). So the shapes
never change: prefill and decode are two programs, each compiled once per (batch, prompt
bucket, ``max_length``).

An encoder-decoder's decoder in optimum's merged layout (Whisper's) also holds a
cross-attention cache: prefill runs the graph's first-step branch, which computes it from the
encoder's output, and decode runs the branch with a past, which reads it, unchanged, every step.

:class:`TextGenerator` is the text pipeline on top: a folder or hub repo with the ONNX model,
``tokenizer.json`` and ``generation_config.json`` / ``genai_config.json``.
"""

from __future__ import annotations

import hashlib
import os
import re
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx2jax.core.errors import GenerationError, InputError, ModelLoadError, Onnx2JaxError
from onnx2jax.core.graph import GraphPlan, outer_names, plan_graph, subgraphs
from onnx2jax.core.loader import ModelSource, external_data_bytes, read_model
from onnx2jax.core.model import Model, check_input, load
from onnx2jax.hub import download_model, folder_fetcher, read_json, repo_fetcher
from onnx2jax.native import backend
from onnx2jax.runtime.fusion import fuse, has_nbits_nodes
from onnx2jax.runtime.options import (
    inference_compiler_options,
    jit_with_options,
    options_outside_traces,
)
from onnx2jax.text import read_tokenizer

# past_key_values.{i}.key (decoder-only) or past_key_values.{i}.decoder.key and .encoder.key
# (optimum's encoder-decoders: the self-attention's cache and the cross-attention's).
_PAST = re.compile(r"^past_key_values\.(\d+)\.(?:(decoder|encoder)\.)?(key|value)$")
# Inputs a decoder graph may take beside the past: the token ids are required, the rest is fed
# when present (optimum's merged decoders take use_cache_branch).
_TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids", "use_cache_branch")
SMALLEST_BUCKET = 16
# com.microsoft attention ops whose present is their past buffer with the new rows written in.
SHARED_CACHE_OPS = ("GroupQueryAttention", "SparseAttention")


@dataclass(frozen=True)
class CacheLayout:
    """Where a decoder graph takes and returns its KV cache, found from its inputs and outputs.

    ``kind`` is ``"concat"`` (present = past + new tokens) or ``"shared"`` (present = the past
    buffer with the new tokens written in it): see :func:`cache_layout`. ``past`` and
    ``present`` are matching input and output names (layer by layer, key then value);
    ``extra`` are the other inputs, which ``extra_inputs`` of :func:`generate` gives (the same
    values every step: an encoder's output, say); ``shapes`` are the past inputs' shapes with
    the batch (axis 0) and the sequence axis (``seq_axis``) as 0; ``dtypes`` their element
    types. ``cross_past`` and ``cross_present`` are an encoder-decoder's cross-attention cache
    (optimum's ``past_key_values.{i}.encoder.*`` and ``present.{i}.encoder.*``), empty for a
    decoder-only model.
    """

    kind: str
    input_ids: str
    attention_mask: str
    position_ids: str | None
    use_cache_branch: str | None
    extra: tuple[str, ...]
    logits: str
    past: tuple[str, ...]
    present: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    seq_axis: int
    cross_past: tuple[str, ...] = ()
    cross_present: tuple[str, ...] = ()

    def buffers(self, batch: int, length: int) -> tuple[tuple[int, ...], ...]:
        """The cache buffers' shapes for ``batch`` rows of ``length`` tokens."""
        shapes = []
        for shape in self.shapes:
            full = list(shape)
            full[0], full[self.seq_axis] = batch, length
            shapes.append(tuple(full))
        return tuple(shapes)


def cache_layout(model: Model) -> CacheLayout:
    """Find a decoder graph's KV-cache inputs and outputs, or say what is missing.

    Two layouts are accepted, both with ``input_ids``, ``attention_mask``,
    ``past_key_values.{i}.key`` / ``.value`` inputs, ``present.{i}.key`` / ``.value`` outputs
    and a ``logits`` output:

    - ``"concat"`` (torch.onnx and optimum exports): ``present`` is the past with the new
      tokens appended; a ``position_ids`` input is required (and optimum's
      ``use_cache_branch`` is fed). The past inputs' shapes must name every axis but the batch
      (axis 0) and the sequence.
    - ``"shared"`` (onnxruntime-genai's model builder): the past feeds com.microsoft
      ``GroupQueryAttention`` (or ``SparseAttention``, Phi-3-small's), whose ``present`` is the
      past buffer with the new tokens written at each row's length (``attention_mask``'s sum);
      the head size is read from the attention's query.

    An encoder-decoder in optimum's merged layout (Whisper's ``decoder_model_merged.onnx``)
    names its self-attention cache ``past_key_values.{i}.decoder.*`` / ``present.{i}.decoder.*``
    (``"concat"``) and its cross-attention cache ``past_key_values.{i}.encoder.*`` /
    ``present.{i}.encoder.*``, and takes ``use_cache_branch``: with ``False`` the graph computes
    the cross-attention's keys and values from the encoder's output, with ``True`` it reads
    them from the past.

    Other inputs (an encoder's output, say) are listed in ``extra`` and fed as given by
    :func:`generate`'s ``extra_inputs``.

    Example:
        >>> import onnx2jax
        >>> cache_layout(onnx2jax.load(onnx2jax.example_path()))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        onnx2jax.core.errors.GenerationError: the model is not a decoder with a KV cache: ...
    """
    inputs = {info.name: info for info in model.inputs}
    outputs = set(model.output_names)
    found = [(m, name) for name in inputs if (m := _PAST.match(name))]
    parts = {m.group(2) for m, _ in found}
    past = sorted(
        (int(m.group(1)), m.group(3) != "key", name) for m, name in found if m.group(2) != "encoder"
    )
    cross_past = tuple(
        name
        for _, _, name in sorted(
            (int(m.group(1)), m.group(3) != "key", name)
            for m, name in found
            if m.group(2) == "encoder"
        )
    )
    if None in parts and len(parts) > 1:
        raise GenerationError(
            f"the past inputs mix past_key_values.{{i}}.key with .decoder. and .encoder. names: "
            f"{sorted(name for _, name in found)}"
        )
    missing = [n for n in ("input_ids", "attention_mask") if n not in inputs]
    if not past:
        missing.append("past_key_values.{i}.key/value inputs")
    if "logits" not in outputs:
        missing.append("a logits output")
    if missing:
        raise GenerationError(
            f"the model is not a decoder with a KV cache: it lacks {', '.join(missing)}; its "
            f"inputs are {model.input_names} and its outputs {model.output_names}"
            + (
                " (the fixed-size cache masks its empty slots with attention_mask: export the "
                "decoder with attention_mask and position_ids inputs)"
                if past and missing == ["attention_mask"]
                else ""
            )
        )
    names = tuple(name for _, _, name in past)
    attention = {
        node.input[3 + k]: node
        for node in model.plan.nodes
        if node.op_type in SHARED_CACHE_OPS and node.domain == "com.microsoft"
        for k in (0, 1)
        if len(node.input) > 3 + k and node.input[3 + k] in names
    }
    kind = "shared" if attention else "concat"
    if kind == "concat" and "position_ids" not in inputs:
        # The buffer is fed whole as the past, so a graph that counts positions from the past's
        # length would put every new token at position max_length and beyond.
        raise GenerationError(
            "the decoder has no position_ids input: it derives positions from the past's length, "
            "which the fixed-size cache cannot give it (export with position_ids as an input)"
        )
    if kind == "shared" and len(attention) != len(names):
        raise GenerationError(
            "only some past inputs feed GroupQueryAttention or SparseAttention: "
            f"{sorted(attention)} of {names}"
        )
    if cross_past and (kind != "concat" or "use_cache_branch" not in inputs):
        raise GenerationError(
            "the decoder takes a cross-attention cache (past_key_values.{i}.encoder.*) but no "
            "use_cache_branch input to compute it from the encoder's output in the first step: "
            "this is optimum's decoder_with_past_model.onnx; give its merged decoder "
            "(decoder_model_merged.onnx), which computes the cache when use_cache_branch is "
            "False, or merge it with decoder_model.onnx (merge_decoders)"
        )
    extra = tuple(n for n in inputs if n not in _TOKEN_INPUTS and not _PAST.match(n))
    layers = {i for i, _, _ in past}
    if len(names) != 2 * len(layers) or layers != set(range(len(layers))):
        raise GenerationError(f"the past inputs are not a key and a value per layer: {names}")
    if cross_past and len(cross_past) != len(names):
        raise GenerationError(
            f"the cross-attention past inputs {cross_past} are not a key and a value for each "
            f"of the {len(layers)} layers"
        )
    present = tuple("present." + n.removeprefix("past_key_values.") for n in names)
    cross_present = tuple("present." + n.removeprefix("past_key_values.") for n in cross_past)
    absent = [n for n in present + cross_present if n not in outputs]
    if absent:
        raise GenerationError(
            f"the decoder lacks the outputs {absent} that return the cache; its outputs are "
            f"{model.output_names}"
        )
    shapes, axes, dtypes = [], set(), []
    if kind == "shared":
        # GroupQueryAttention's cache is [batch, kv heads, sequence, head size].
        found_shapes = _attention_cache_shapes(model, [attention[name] for name in names])
    for index, name in enumerate(names + cross_past):
        info = inputs[name]
        if info.shape is None or info.dtype is None:
            raise GenerationError(f"past input {info.describe()} needs a known dtype and rank")
        if kind == "shared":
            shape, axis = found_shapes[index], 2
        else:
            free = [a for a, d in enumerate(info.shape) if a and not (isinstance(d, int) and d)]
            if len(free) != 1:
                raise GenerationError(
                    f"past input {info.describe()} must have known sizes on every axis but the "
                    f"batch (0) and one sequence axis"
                )
            axis = free[0]
            shape = tuple(d if a and a != axis else 0 for a, d in enumerate(info.shape))
        axes.add(axis)
        if index < len(names):
            shapes.append(shape)
            dtypes.append(info.dtype)
    if len(axes) != 1:
        raise GenerationError(
            f"the past inputs {names + cross_past} do not share one sequence axis"
        )
    return CacheLayout(
        kind=kind,
        input_ids="input_ids",
        attention_mask="attention_mask",
        position_ids="position_ids" if "position_ids" in inputs else None,
        use_cache_branch="use_cache_branch" if "use_cache_branch" in inputs else None,
        extra=extra,
        logits="logits",
        past=names,
        present=present,
        shapes=tuple(shapes),
        dtypes=tuple(dtypes),
        seq_axis=axes.pop(),
        cross_past=cross_past,
        cross_present=cross_present,
    )


def _attention_cache_shapes(model: Model, nodes: Sequence[Any]) -> list[tuple[int, ...]]:
    """[0, kv heads, 0, head size] of each GroupQueryAttention or SparseAttention node's cache:
    the head size from the width of the first node's query (packed with the keys and values
    when its key input is empty), which every node must share."""
    settings = []
    for node in nodes:
        attrs = {a.name: a.i for a in node.attribute}
        packed = len(node.input) < 2 or not node.input[1]
        settings.append((attrs.get("num_heads", 0), attrs.get("kv_num_heads", 0), packed))
    if len(set(settings)) != 1:
        raise GenerationError(
            f"the attention nodes differ in num_heads, kv_num_heads or packing: "
            f"{sorted(set(settings))}; generate() needs one cache shape for every layer"
        )
    heads, kv_heads, packed = settings[0]
    # Any sizes do for the probe: the first layer's query does not depend on the past.
    probe = {
        info.name: jax.ShapeDtypeStruct(
            tuple(d if isinstance(d, int) and d > 0 else 1 for d in info.shape or ()),
            jax.dtypes.canonicalize_dtype(info.dtype or np.float32),
        )
        for info in model.inputs
    }
    query = nodes[0].input[0]
    try:
        width = jax.eval_shape(
            lambda params, feeds: model.apply(params, outputs=[query], **feeds)[query],
            model.params,
            probe,
        ).shape[-1]
    except Onnx2JaxError as exc:
        raise GenerationError(f"cannot find the attention's head size: {exc}") from None
    size = width // (heads + 2 * kv_heads) if packed else width // max(heads, 1)
    if not heads or not kv_heads or size <= 0:
        raise GenerationError(
            f"{nodes[0].op_type} node {nodes[0].name!r} has num_heads={heads}, "
            f"kv_num_heads={kv_heads} and a query of width {width}: no head size fits"
        )
    return [(0, kv_heads, 0, size)] * len(nodes)


def branch_plan(model: Model, name: str, value: bool) -> GraphPlan:
    """The plan of ``model``'s graph with its bool input ``name`` fixed to ``value``: each
    ``If`` on it replaced by the branch it takes, the input dropped where nothing else reads it.

    optimum's merged decoders choose between their first step and the steps with a past by an
    ``If`` on ``use_cache_branch``; fed as a traced value, both branches would be traced
    together (``lax.cond``), though their outputs differ in shape. The plan reuses the model's
    decoded weights; run it with ``model.apply_plan``.

    Example:
        >>> import onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())  # no If: the same graph
        >>> plan = branch_plan(model, "use_cache_branch", True)
        >>> [info.name for info in plan.inputs], len(plan.nodes) == len(model.plan.nodes)
        (['image'], True)
    """
    graph = model.plan.graph
    taken = "then_branch" if value else "else_branch"
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined.update(out for node in graph.node for out in node.output)
    derived = onnx.GraphProto(name=graph.name)
    derived.initializer.extend(graph.initializer)
    derived.sparse_initializer.extend(graph.sparse_initializer)
    derived.output.extend(graph.output)
    derived.value_info.extend(graph.value_info)
    for index, node in enumerate(graph.node):
        if not (node.op_type == "If" and node.domain in ("", "ai.onnx") and node.input[0] == name):
            derived.node.append(node)
            continue
        branch = next(a.g for a in node.attribute if a.name == taken)
        # The branch's own names that the outer graph uses too get a prefix.
        prefix = f"{node.name or f'If_{index}'}/{taken}/"
        rename = {
            n: prefix + n
            for n in [t.name for t in branch.initializer]
            + [out for inner in branch.node for out in inner.output]
            if n in defined
        }
        for inner in branch.node:
            clash = [n for sub in subgraphs(inner) for n in outer_names(sub) if n in rename]
            if clash:
                raise GenerationError(
                    f"cannot inline {taken} of If node {node.name!r}: a subgraph reads "
                    f"{clash[0]!r}, a name the outer graph defines too"
                )
        for tensor in branch.initializer:
            moved = derived.initializer.add()
            moved.CopyFrom(tensor)
            moved.name = rename.get(tensor.name, tensor.name)
        for inner in branch.node:
            copy = derived.node.add()
            copy.CopyFrom(inner)
            copy.input[:] = [rename.get(n, n) for n in inner.input]
            copy.output[:] = [rename.get(n, n) for n in inner.output]
        for out, target in zip(branch.output, node.output, strict=True):
            derived.node.append(
                helper.make_node("Identity", [rename.get(out.name, out.name)], [target])
            )
    read = {v.name for v in graph.output}
    for node in derived.node:
        read.update(node.input)
        for sub in subgraphs(node):
            read |= outer_names(sub)
    if name in read:
        flag = numpy_helper.from_array(np.array([value]))
        derived.node.insert(0, helper.make_node("Constant", [], [name], value=flag))
    derived.input.extend(v for v in graph.input if v.name in read and v.name != name)
    decoded = {**model.plan.constants, **model.params}
    plan = plan_graph(derived, model.opsets, model.base_dir, decoded=decoded)
    frozen = sorted(set(plan.constants) & set(model.params))
    if frozen:
        raise GenerationError(
            f"with {name}={value} the weights {frozen[:3]} feed inputs that must be known at "
            f"trace time: generate() cannot run this graph with params"
        )
    return plan


def merge_decoders(first: ModelSource, with_past: ModelSource) -> onnx.ModelProto:
    """optimum's merged decoder made from its two files, which :func:`generate` runs: one graph
    whose ``If`` on a new bool input ``use_cache_branch`` runs ``with_past`` (True) or
    ``first`` (False).

    ``first`` (optimum's ``decoder_model.onnx``) takes no past and returns every output;
    ``with_past`` (``decoder_with_past_model.onnx``) takes the past and returns the same
    outputs, but for an encoder-decoder the ``present.{i}.encoder.*`` ones (the
    cross-attention's cache, fixed after the first step), which its branch then passes through
    from ``past_key_values.{i}.encoder.*``. The inputs are ``with_past``'s, then ``first``'s
    others, then ``use_cache_branch``. Each branch's own names get a prefix; the initializers
    move to the outer graph, each weight once where both files hold the same tensor.

    Example:
        >>> import onnx2jax
        >>> merged = merge_decoders(onnx2jax.example_path(), onnx2jax.example_path())
        >>> [node.op_type for node in merged.graph.node], merged.graph.input[-1].name
        (['If'], 'use_cache_branch')
    """
    protos = [read_model(source) for source in (first, with_past)]
    outputs = list(protos[0][0].graph.output)
    given = {v.name for v in protos[1][0].graph.output}
    past_inputs = {v.name for v in protos[1][0].graph.input}
    for info in outputs:
        past = info.name.replace("present.", "past_key_values.", 1)
        if info.name not in given and not (".encoder." in info.name and past in past_inputs):
            raise GenerationError(
                f"the first-step decoder returns {info.name!r}, which the decoder with a past "
                f"neither returns nor takes as {past!r}: not optimum's two decoder files"
            )
    absent = sorted(given - {v.name for v in outputs})
    if absent:
        raise GenerationError(f"the decoder with a past returns {absent}, the first one does not")
    initializers: dict[bytes, onnx.TensorProto] = {}
    branches = []
    for (proto, base_dir), prefix in zip(protos, ("first/", "with_past/"), strict=True):
        graph = proto.graph
        inputs = {v.name for v in graph.input}
        own = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
        rename = {n: prefix + n for n in own if n not in inputs}
        for tensor in graph.initializer:
            # The same weight in both files is kept once, under the first name it had.
            inline = type(tensor)()
            inline.CopyFrom(tensor)
            if inline.data_location == onnx.TensorProto.EXTERNAL:
                # The loader's reader: the file's path and the extent checked, as at load.
                inline.raw_data = external_data_bytes(tensor, base_dir)
                inline.data_location = onnx.TensorProto.DEFAULT
                del inline.external_data[:]
            inline.name = ""
            key = hashlib.sha256(inline.SerializeToString()).digest()
            if key not in initializers:
                inline.name = rename[tensor.name]
                initializers[key] = inline
            rename[tensor.name] = initializers[key].name
        nodes = [_renamed_node(node, rename, prefix) for node in graph.node]
        out = []
        for info in outputs:
            if info.name not in {v.name for v in graph.output}:  # a cross-attention present
                past = info.name.replace("present.", "past_key_values.", 1)
                nodes.append(helper.make_node("Identity", [past], [prefix + info.name]))
            renamed = type(info)()
            renamed.CopyFrom(info)
            renamed.name = rename.get(info.name, prefix + info.name)
            out.append(renamed)
        branches.append(helper.make_graph(nodes, prefix.strip("/"), [], out))
    names = [v.name for v in protos[1][0].graph.input]
    inputs = list(protos[1][0].graph.input)
    inputs += [v for v in protos[0][0].graph.input if v.name not in names]
    inputs.append(helper.make_tensor_value_info("use_cache_branch", onnx.TensorProto.BOOL, [1]))
    node = helper.make_node(
        "If",
        ["use_cache_branch"],
        [v.name for v in outputs],
        name="use_cache_branch_if",
        then_branch=branches[1],
        else_branch=branches[0],
    )
    opsets: dict[str, int] = {}
    for proto, _ in protos:
        for opset in proto.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
    graph = helper.make_graph([node], "merged", inputs, outputs, list(initializers.values()))
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
        ir_version=max(proto.ir_version for proto, _ in protos),
    )


def _renamed_node(node: onnx.NodeProto, rename: Mapping[str, str], prefix: str) -> onnx.NodeProto:
    """A copy of ``node`` reading and writing the names in ``rename`` by their new names, in its
    subgraphs too (whose own names ONNX keeps apart from the outer graph's)."""
    copy = type(node)()
    copy.CopyFrom(node)
    copy.input[:] = [rename.get(n, n) for n in node.input]
    copy.output[:] = [rename.get(n, n) for n in node.output]
    copy.name = prefix + node.name if node.name else ""
    for attr in copy.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            renamed = [_renamed_node(inner, rename, "") for inner in sub.node]
            del sub.node[:]
            sub.node.extend(renamed)
            for info in sub.output:
                info.name = rename.get(info.name, info.name)
    return copy


def next_tokens(
    logits: jax.Array,
    key: jax.Array | None = None,
    *,
    temperature: float | jax.Array = 0.0,
    top_k: int | jax.Array | None = None,
    top_p: float | jax.Array | None = None,
    greedy: bool | None = None,
) -> jax.Array:
    """Choose one token per row of ``logits`` [batch, vocab]: int32 [batch].

    Greedy (the first highest logit) when ``temperature`` is 0, else a sample from
    ``softmax(logits / temperature)`` restricted, as transformers' warpers do in this order, to
    the ``top_k`` highest logits (ties kept) and then to the most probable tokens whose
    probabilities reach ``top_p``. ``greedy`` overrides the choice by temperature (under jit,
    where ``temperature`` is traced, it must be given).

    Example:
        >>> import jax, numpy as np
        >>> logits = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]], np.float32)
        >>> next_tokens(logits).tolist()
        [1, 0]
        >>> next_tokens(logits, jax.random.key(0), temperature=1.0, top_k=1).tolist()
        [1, 0]
    """
    logits = jnp.asarray(logits, jnp.float32)
    if greedy is None:
        greedy = float(temperature) == 0.0
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        raise GenerationError("sampling (temperature > 0) needs a jax.random key")
    vocab = logits.shape[-1]
    logits = logits / jnp.asarray(temperature, jnp.float32)
    ordered = -jnp.sort(-logits, axis=-1)
    k = jnp.clip(jnp.asarray(vocab if top_k is None else top_k, jnp.int32), 1, vocab)
    kth = jnp.take(ordered, k - 1, axis=-1)[..., None]
    ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # the mass of the more probable tokens
    keep = (before < jnp.asarray(1.0 if top_p is None else top_p, jnp.float32)).at[..., 0].set(True)
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def prompt_bucket(length: int) -> int:
    """The padded prompt length: the smallest power of two at least ``length`` (and 16).

    Example:
        >>> [prompt_bucket(n) for n in (1, 16, 17, 100)]
        [16, 16, 32, 128]
    """
    return max(SMALLEST_BUCKET, 1 << max(length - 1, 0).bit_length())


class Decoder:
    """The two jitted programs of generation for one model: prefill and decode.

    Get a model's with :func:`decoder` (one per model, kept as long as the model): its programs
    and their compilations are shared by every :func:`generate` call on that model.
    :attr:`compilations` counts the traces of both programs: one each per (batch, prompt
    bucket, ``max_length``, greedy or sampling).

    It holds the model by a weak reference, so caching it per model keeps no model alive.

    Example:
        >>> import onnx2jax
        >>> decoder(onnx2jax.load(onnx2jax.example_path()))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        onnx2jax.core.errors.GenerationError: the model is not a decoder with a KV cache: ...
    """

    def __init__(self, model: Model):
        self.layout = cache_layout(model)
        self._model = weakref.ref(model)
        self.compilations = 0
        # optimum's merged decoders: each program runs one branch of the If on
        # use_cache_branch, the first step's (which computes the cross-attention's cache from
        # the encoder's output) in an encoder-decoder's prefill, else the one with a past.
        self._plans: dict[str, GraphPlan | None] = {"prefill": None, "decode": None}
        if self.layout.use_cache_branch:
            name = self.layout.use_cache_branch
            self._plans["decode"] = branch_plan(model, name, True)
            self._plans["prefill"] = (
                branch_plan(model, name, False) if self.layout.cross_past else self._plans["decode"]
            )
        # 4-bit MatMulNBits decode steps on the CPU run the native kernel, as model(...) does
        # (more rows than it takes, as in a prefill, go XLA's way inside the node). Sharded
        # params stay XLA's: the kernel has no sharding rule.
        if (
            model.mesh is None
            and model.precision == "float32"
            and backend("nbits") is not None
            and has_nbits_nodes(model.plan)
        ):
            self._plans = {
                phase: fuse(plan or model.plan, {"nbits"}) for phase, plan in self._plans.items()
            }
        self._prefill_jits: dict[tuple, Any] = {}
        self._decode_jits: dict[tuple, Any] = {}

    def plan(self, phase: str) -> GraphPlan:
        """The graph the ``phase`` ("prefill" or "decode") program runs: the model's, one
        branch of a merged decoder's If, and with native 4-bit products where they run.

        Example:
            >>> from benchmarks.generate import export_with_cache, tiny_decoder
            >>> import onnx2jax, tempfile, pathlib
            >>> path = pathlib.Path(tempfile.mkdtemp()) / "m.onnx"
            >>> model = onnx2jax.load(export_with_cache(tiny_decoder("gpt2"), path))
            >>> decoder(model).plan("decode") is model.plan
            True
        """
        if phase not in self._plans:
            raise GenerationError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        return self._plans[phase] or self.model.plan

    @property
    def model(self) -> Model:
        """The model whose programs these are (held weakly: it must still exist)."""
        model = self._model()
        if model is None:
            raise GenerationError("the model of this decoder was garbage collected")
        return model

    # ---------------------------------------------------------------- the two programs
    # Both take the prompt right-packed (each row's tokens first), so a row's tokens sit at
    # its positions 0, 1, ... in the prompt and, in a "shared" cache, in the buffer.
    def _run(
        self,
        phase: str,
        params: Mapping[str, Any],
        feeds: Mapping[str, Any],
        outputs: Sequence[str],
    ) -> dict[str, Any]:
        """The graph (or, for a merged decoder, the branch ``phase`` runs) on ``feeds``."""
        model, plan = self.model, self._plans[phase]
        if plan is None:
            return model.apply(params, outputs=outputs, **feeds)
        bound = {info.name: check_input(info, feeds[info.name]) for info in plan.inputs}
        return model.apply_plan(plan, params, bound, tuple(outputs))

    def _step(
        self,
        phase: str,
        params: Mapping[str, Any],
        past: tuple[jax.Array, ...],
        extras: Mapping[str, jax.Array],
        ids: jax.Array,
        mask: jax.Array,
        positions: jax.Array,
        written: jax.Array,
        into: tuple[jax.Array, ...],
        slot: Any,
        cross: tuple[jax.Array, ...] = (),
    ) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        """Run the graph on ``ids`` after ``past``: the logits, the cache ``into`` with the new
        tokens' keys and values written from ``slot`` on (zeros where ``written`` is 0, so that
        a masked slot holds nothing but zeros), and the cross-attention's cache (computed in an
        encoder-decoder's prefill, ``cross`` as fed in decode).

        A "concat" graph's present is the past and the new entries; a "shared" graph's is the
        past buffer with the new entries written in it (which is then the new cache), or, after
        an empty past, the new entries alone.
        """
        layout = self.layout
        feeds = {
            layout.input_ids: ids,
            layout.attention_mask: mask,
            **dict(zip(layout.past, past, strict=True)),
            **dict(zip(layout.cross_past, cross, strict=False)),
            **extras,
        }
        if layout.position_ids:
            feeds[layout.position_ids] = positions
        wanted = [layout.logits, *layout.present]
        if layout.cross_past and not cross:
            wanted += layout.cross_present
        out = self._run(phase, params, feeds, wanted)
        axis, new = layout.seq_axis, ids.shape[1]
        updated = []
        for name, before, buffer in zip(layout.present, past, into, strict=True):
            present = out[name].astype(buffer.dtype)
            length = before.shape[axis]
            expected = list(before.shape)
            if layout.kind == "concat":
                expected[axis] += new
            elif not length:
                expected[axis] = new
            if list(present.shape) != expected:
                grows = "with the new tokens appended" if layout.kind == "concat" else "updated"
                raise GenerationError(
                    f"output {name} has shape {tuple(present.shape)} for a past of shape "
                    f"{tuple(before.shape)} and {new} new token(s): not the past {grows} "
                    f"on axis {axis}"
                )
            if layout.kind == "shared" and length:
                updated.append(present)
                continue
            present = jax.lax.slice_in_dim(present, length, length + new, axis=axis)
            shape = [1] * present.ndim
            shape[0], shape[axis] = written.shape
            zero = jnp.zeros((), present.dtype)
            present = jnp.where(written.reshape(shape) != 0, present, zero)
            updated.append(jax.lax.dynamic_update_slice_in_dim(buffer, present, slot, axis=axis))
        if layout.cross_past and not cross:
            cross = tuple(out[name] for name in layout.cross_present)
            for name, value in zip(layout.cross_present, cross, strict=True):
                if value.ndim != len(layout.shapes[0]) or value.shape[0] != ids.shape[0]:
                    raise GenerationError(
                        f"output {name} has shape {tuple(value.shape)}: not a cross-attention "
                        f"cache of {ids.shape[0]} row(s) like the self-attention's "
                        f"{layout.buffers(ids.shape[0], 0)[0]}"
                    )
        return out[layout.logits], tuple(updated), cross

    def _prefill(
        self,
        params: Mapping[str, Any],
        extras: Mapping[str, jax.Array],
        ids: jax.Array,
        mask: jax.Array,
        sampling: dict[str, jax.Array],
        *,
        length: int,
        greedy: bool,
    ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...], dict[str, jax.Array]]:
        self.compilations += 1  # runs only while tracing, i.e. once per compilation
        batch, prompt = ids.shape
        mask = mask.astype(jnp.int32)
        layout = self.layout
        # The prompt runs after a past of one masked slot (a "concat" graph: no tensor of size
        # 0 meets its shape arithmetic, where a Reshape reads a 0 as "keep this axis") or an
        # empty one (GroupQueryAttention's first prompt, or a merged encoder-decoder's first
        # step, which reads no past); its keys and values then go to the buffer's first slots.
        dummy = 1 if layout.kind == "concat" and not layout.cross_past else 0
        empty, cache = (
            tuple(
                jnp.zeros(shape, dtype)
                for shape, dtype in zip(layout.buffers(batch, size), layout.dtypes, strict=True)
            )
            for size in (dummy, length)
        )
        graph_mask = jnp.concatenate([jnp.zeros((batch, dummy), jnp.int32), mask], axis=1)
        positions = jnp.arange(prompt, dtype=jnp.int32)[None, :] * mask  # padding at 0
        logits, cache, cross = self._step(
            "prefill", params, empty, extras, ids, graph_mask, positions, mask, cache, 0
        )
        counts = mask.sum(axis=1)
        logits = jnp.take_along_axis(logits, (counts - 1)[:, None, None], axis=1)[:, 0]
        key = jax.random.fold_in(jax.random.key(sampling["seed"]), 0)
        token = self._choose(logits, key, sampling, greedy, jnp.zeros((batch,), bool))
        state = {
            "token": token,
            "done": self._stops(token, sampling),
            "valid": jnp.zeros((batch, length), jnp.int32).at[:, :prompt].set(mask),
            "position": counts,
            "slot": jnp.asarray(prompt, jnp.int32),
            "step": jnp.asarray(1, jnp.int32),
        }
        return cache, cross, state

    def _decode(
        self,
        params: Mapping[str, Any],
        extras: Mapping[str, jax.Array],
        cross: tuple[jax.Array, ...],
        cache: tuple[jax.Array, ...],
        state: dict[str, jax.Array],
        sampling: dict[str, jax.Array],
        *,
        greedy: bool,
    ) -> tuple[tuple[jax.Array, ...], dict[str, jax.Array]]:
        self.compilations += 1  # runs only while tracing, i.e. once per compilation
        batch, length = state["valid"].shape
        slot, position = state["slot"], state["position"]
        ones = jnp.ones((batch, 1), jnp.int32)
        if self.layout.kind == "concat":
            # The buffer's filled slots, and the new token.
            graph_mask = jnp.concatenate([state["valid"], ones], axis=1)
        else:
            # The row's tokens so far and the new one, at its position (GroupQueryAttention
            # reads the row's length from the mask's sum).
            graph_mask = (jnp.arange(length)[None, :] <= position[:, None]).astype(jnp.int32)
        logits, cache, _ = self._step(
            "decode",
            params,
            cache,
            extras,
            state["token"][:, None],
            graph_mask,
            position[:, None],
            ones,
            cache,
            slot,
            cross,
        )
        key = jax.random.fold_in(jax.random.key(sampling["seed"]), state["step"])
        token = self._choose(logits[:, -1], key, sampling, greedy, state["done"])
        return cache, {
            "token": token,
            "done": state["done"] | self._stops(token, sampling),
            "valid": jax.lax.dynamic_update_slice_in_dim(state["valid"], ones, slot, axis=1),
            "position": position + 1,
            "slot": slot + 1,
            "step": state["step"] + 1,
        }

    @staticmethod
    def _choose(
        logits: jax.Array,
        key: jax.Array,
        sampling: dict[str, jax.Array],
        greedy: bool,
        done: jax.Array,
    ) -> jax.Array:
        token = next_tokens(
            logits,
            key,
            temperature=sampling["temperature"],
            top_k=sampling["top_k"],
            top_p=sampling["top_p"],
            greedy=greedy,
        )
        return jnp.where(done, sampling["pad"], token)

    @staticmethod
    def _stops(token: jax.Array, sampling: dict[str, jax.Array]) -> jax.Array:
        return (token[:, None] == sampling["eos"][None, :]).any(axis=1)

    # ---------------------------------------------------------------- the loop
    def stream(
        self,
        input_ids: Any,
        max_new_tokens: int = 32,
        *,
        attention_mask: Any = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        max_length: int | None = None,
        params: Mapping[str, Any] | None = None,
        extra_inputs: Mapping[str, Any] | None = None,
    ) -> Iterator[np.ndarray]:
        """An iterator over each step's new tokens, int array [batch], as :func:`generate`
        makes them.

        Arguments as :func:`generate`'s; they are checked, and the prompt is run (prefill),
        before this returns. A row that has stopped yields ``pad_token_id``; the iterator ends
        after ``max_new_tokens`` steps or when every row has stopped.
        """
        ids, mask = _prompt(input_ids, attention_mask)
        batch = ids.shape[0]
        counts = mask.sum(axis=1)
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        bucket = prompt_bucket(int(counts.max()))
        needed = bucket + max_new_tokens - 1
        if max_length is None:
            max_length = prompt_bucket(needed)
        elif max_length < needed:
            raise GenerationError(
                f"max_length={max_length} cache slots cannot hold the prompt's bucket ({bucket} "
                f"for {int(counts.max())} tokens) and {max_new_tokens} new tokens: it needs "
                f"{needed}"
            )
        padded_ids = np.zeros((batch, bucket), np.int32)
        padded_mask = np.zeros((batch, bucket), np.int32)
        for row in range(batch):  # each row's tokens first, whatever side its padding was on
            padded_ids[row, : counts[row]] = ids[row][mask[row] != 0]
            padded_mask[row, : counts[row]] = 1
        sampling, greedy, eos = _sampling(
            temperature, top_k, top_p, seed, eos_token_id, pad_token_id
        )
        extras = dict(extra_inputs or {})
        if set(extras) != set(self.layout.extra):
            raise GenerationError(
                f"the decoder's inputs beside the tokens and the cache are "
                f"{list(self.layout.extra)}: extra_inputs must give exactly those, got "
                f"{sorted(extras)}"
            )
        model = self.model
        params = model.params if params is None else params
        if self.layout.use_cache_branch and set(params) != set(model.params):
            # The branches' plans read the params by name, without apply()'s check.
            raise GenerationError(
                f"params must have the keys of model.params: {len(params)} given, "
                f"{len(model.params)} expected"
            )
        options = options_outside_traces(
            inference_compiler_options(
                {"input_ids": padded_ids}, model.compiler_options, model.precision
            ),
            params,
        )
        prefill = jit_with_options(
            self._prefill_jits, self._prefill, options, static_argnames=("length", "greedy")
        )
        # The cross-attention's cache is computed once here and held fixed: decode reads it
        # and does not donate it, unlike the self-attention's buffer it writes in place.
        cache, cross, state = prefill(
            params, extras, padded_ids, padded_mask, sampling, length=max_length, greedy=greedy
        )
        options = options_outside_traces(
            inference_compiler_options(
                {"input_ids": padded_ids[:, :1]}, model.compiler_options, model.precision
            ),
            params,
        )
        decode = jit_with_options(
            self._decode_jits,
            self._decode,
            options,
            static_argnames=("greedy",),
            donate_argnums=(3, 4),
        )

        def steps() -> Iterator[np.ndarray]:
            nonlocal cache, state
            for step in range(max_new_tokens):
                if step:
                    cache, state = decode(
                        params, extras, cross, cache, state, sampling, greedy=greedy
                    )
                token, done = np.asarray(state["token"]), np.asarray(state["done"])
                yield token
                if eos and done.all():
                    return

        return steps()

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int = 32,
        *,
        stream: Callable[[int, np.ndarray], Any] | None = None,
        **options: Any,
    ) -> np.ndarray:
        """:func:`generate` with this decoder's programs (the arguments are the same)."""
        ids, _ = _prompt(input_ids, options.get("attention_mask"))
        steps = []
        for step, tokens in enumerate(self.stream(input_ids, max_new_tokens, **options)):
            if stream is not None:
                stream(step, tokens)
            steps.append(tokens)
        return np.concatenate([ids, np.stack(steps, axis=1).astype(ids.dtype)], axis=1)


_DECODERS: weakref.WeakKeyDictionary[Model, Decoder] = weakref.WeakKeyDictionary()


def decoder(model: Model) -> Decoder:
    """The :class:`Decoder` of ``model``: made on the first call, the same one afterwards.

    Example:
        >>> import onnx2jax
        >>> decoder(onnx2jax.load(onnx2jax.example_path()))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        onnx2jax.core.errors.GenerationError: the model is not a decoder with a KV cache: ...
    """
    found = _DECODERS.get(model)
    if found is None:
        found = _DECODERS[model] = Decoder(model)
    return found


def generate(
    model: Model,
    input_ids: Any,
    max_new_tokens: int = 32,
    *,
    attention_mask: Any = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    max_length: int | None = None,
    params: Mapping[str, Any] | None = None,
    extra_inputs: Mapping[str, Any] | None = None,
    stream: Callable[[int, np.ndarray], Any] | None = None,
) -> np.ndarray:
    """Generate tokens after ``input_ids`` [batch, prompt] with a decoder that has a KV cache.

    Returns an int array [batch, prompt + n] (``input_ids``' dtype, NumPy): the prompt as given,
    then the ``n`` new tokens, ``n`` being ``max_new_tokens`` or fewer when every row stopped
    earlier. ``attention_mask`` [batch, prompt] (1 on real tokens) lets rows of different
    lengths share a batch, padded on the left or the right: each row gets the tokens it would
    get alone (positions count its real tokens only).

    Greedy by default (``temperature=0``); with ``temperature > 0`` tokens are sampled, after
    ``top_k`` and ``top_p`` filtering, with keys from ``jax.random.key(seed)``: a seed gives the
    same tokens on every call. A row stops after it makes ``eos_token_id`` (an id or a list); its
    later tokens are ``pad_token_id`` (default: the first eos id, else 0).

    The cache holds ``max_length`` tokens per layer (default: the smallest power of two that
    holds the prompt's bucket and the new tokens); the prompts are packed to the left of their
    rows and padded to the bucket of the longest (:func:`prompt_bucket`), so it needs at least
    ``bucket + max_new_tokens - 1``. Prefill and decode compile once per (batch, bucket,
    ``max_length``, greedy or sampling) and are reused by every later call on the model.
    ``stream(step, tokens)`` is called with each step's tokens [batch] as they come;
    :func:`generate_stream` is the iterator form. ``params`` replaces ``model.params``.
    ``extra_inputs`` gives the graph's other inputs (an encoder's output for a decoder with
    cross-attention, say), the same every step, with the batch of ``input_ids``.

    Example:
        >>> import onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> generate(model, [[1, 2, 3]])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        onnx2jax.core.errors.GenerationError: the model is not a decoder with a KV cache: ...
    """
    return decoder(model).generate(
        input_ids,
        max_new_tokens,
        stream=stream,
        attention_mask=attention_mask,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        max_length=max_length,
        params=params,
        extra_inputs=extra_inputs,
    )


def generate_stream(
    model: Model, input_ids: Any, max_new_tokens: int = 32, **options: Any
) -> Iterator[np.ndarray]:
    """Iterate over the new tokens of :func:`generate`, an int array [batch] per step.

    Takes :func:`generate`'s arguments but ``stream``.

    Example:
        >>> import onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> generate_stream(model, [[1, 2, 3]])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        onnx2jax.core.errors.GenerationError: the model is not a decoder with a KV cache: ...
    """
    return decoder(model).stream(input_ids, max_new_tokens, **options)


def _prompt(input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[1] == 0:
        raise GenerationError(
            f"input_ids must be integers [batch, prompt] with a prompt of at least one token, "
            f"got {ids.dtype} {ids.shape}"
        )
    if attention_mask is None:
        return ids, np.ones(ids.shape, np.int32)
    mask = np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise GenerationError(
            f"attention_mask has shape {mask.shape}, input_ids {ids.shape}: they must match"
        )
    mask = (mask != 0).astype(np.int32)
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise GenerationError(f"rows {empty.tolist()} of attention_mask have no token")
    return ids, mask


def _sampling(
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None,
) -> tuple[dict[str, Any], bool, list[int]]:
    """The sampling arguments as the programs take them (traced, so new values never
    recompile), whether decoding is greedy, and the eos ids."""
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= seed < 2**32:
        raise GenerationError(f"seed must be in [0, 2**32), got {seed}")
    if eos_token_id is None:
        eos = []
    elif isinstance(eos_token_id, int | np.integer):
        eos = [int(eos_token_id)]
    else:
        eos = [int(e) for e in eos_token_id]
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    sampling = {
        "temperature": np.float32(temperature),
        # No top_k is every token: next_tokens clips k to the vocabulary.
        "top_k": np.int32(top_k or np.iinfo(np.int32).max),
        "top_p": np.float32(1.0 if top_p is None else top_p),
        "seed": np.uint32(seed),
        "eos": np.asarray(eos or [-1], np.int32),
        "pad": np.int32(pad_token_id),
    }
    return sampling, temperature == 0, eos


# Sampling settings a generation_config.json or genai_config.json ("search") may hold.
_SAMPLING_KEYS = ("temperature", "top_k", "top_p")


def generation_settings(
    generation_config: Mapping[str, Any] | None = None,
    genai_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:class:`TextGenerator`'s settings from a repo's ``generation_config.json`` (transformers)
    and ``genai_config.json`` (onnxruntime-genai); the former wins where both say something.

    Read: the eos and pad ids, ``max_length`` (prompt plus new tokens, at most), and the sampling
    settings, which apply only where ``do_sample`` is true (else generation is greedy).

    Example:
        >>> generation_settings({"eos_token_id": [2, 7], "do_sample": True, "top_p": 0.9})
        {'eos_token_id': [2, 7], 'top_p': 0.9, 'temperature': 1.0}
        >>> generation_settings(genai_config={"model": {"eos_token_id": 2, "context_length": 64},
        ...                                   "search": {"do_sample": False, "top_k": 5}})
        {'eos_token_id': 2, 'max_length': 64, 'temperature': 0.0}
    """
    settings: dict[str, Any] = {}
    sources = []
    if genai_config:
        model = dict(genai_config.get("model") or {})
        search = dict(genai_config.get("search") or {})
        model["max_length"] = search.get("max_length", model.get("context_length"))
        sources.append({**model, **{k: v for k, v in search.items() if k != "max_length"}})
    if generation_config:
        sources.append(dict(generation_config))
    sample = False
    for source in sources:
        for key in ("eos_token_id", "pad_token_id", "max_length"):
            if source.get(key) is not None:
                settings[key] = source[key]
        if "do_sample" in source:
            sample = bool(source["do_sample"])
            if not sample:
                for key in _SAMPLING_KEYS:
                    settings.pop(key, None)
        for key in _SAMPLING_KEYS:
            if sample and source.get(key) is not None:
                settings[key] = source[key]
    if sources:
        settings["temperature"] = settings.get("temperature", 1.0) if sample else 0.0
    return settings


class TextGenerator:
    """Text in, text out, from an ONNX decoder with a KV cache and its ``tokenizer.json``.

    Build it with :meth:`from_hub` or :meth:`from_folder` (which read the repo's tokenizer and
    ``generation_config.json`` / ``genai_config.json``), or from a loaded model and a
    ``tokenizers.Tokenizer``. ``max_length`` caps the prompt plus the new tokens, as in
    transformers; the other settings are :func:`generate`'s defaults, which
    :meth:`generate` may override per call.

    Example (needs the hub, or the files in the cache):
        >>> generator = TextGenerator.from_hub("org/tiny-llama-onnx")  # doctest: +SKIP
        >>> generator.generate(["Once upon a time"], max_new_tokens=16)  # doctest: +SKIP
        [' there was a ...']
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Any,
        *,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        max_length: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
    ):
        self.model = model
        self.decoder = decoder(model)
        self.tokenizer = tokenizer
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.max_length = max_length
        self.defaults: dict[str, Any] = {
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "seed": seed,
        }

    @classmethod
    def from_hub(
        cls,
        repo_id: str,
        filename: str | None = None,
        revision: str | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        precision: str = "float32",
        **options: Any,
    ) -> TextGenerator:
        """Load a repo from the hub (or the cache, offline): its ONNX decoder, ``tokenizer.json``
        and, when present, ``generation_config.json`` and ``genai_config.json``.

        ``filename`` is the decoder's path in the repo: by default the one ``genai_config.json``
        names, else ``model.onnx``. ``options`` (``eos_token_id``, ``max_length``,
        ``temperature``...) override what the repo's files say.

        Example (needs the hub, or the files in the cache):
            >>> generator = TextGenerator.from_hub("org/tiny-llama-onnx")  # doctest: +SKIP
            >>> generator.defaults["eos_token_id"]  # doctest: +SKIP
            2
        """
        fetch = repo_fetcher(repo_id, revision, cache_dir=cache_dir, token=token)

        def model(name: str) -> Model:
            path = download_model(repo_id, name, revision, cache_dir=cache_dir, token=token)
            return load(path, precision=precision)

        return cls._from_files(fetch, model, filename, options)

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        filename: str | None = None,
        *,
        precision: str = "float32",
        **options: Any,
    ) -> TextGenerator:
        """Load a folder laid out as a hub repo; the arguments are :meth:`from_hub`'s.

        Example:
            >>> TextGenerator.from_folder("/no/such/folder")  # doctest: +IGNORE_EXCEPTION_DETAIL
            Traceback (most recent call last):
            ...
            ModelLoadError: /no/such/folder/tokenizer.json is missing
        """
        root = Path(folder)
        return cls._from_files(
            folder_fetcher(root),
            lambda name: load(root / name, precision=precision),
            filename,
            options,
        )

    @classmethod
    def _from_files(
        cls,
        fetch: Callable[[str, bool], Path | None],
        load_model: Callable[[str], Model],
        filename: str | None,
        options: dict[str, Any],
    ) -> TextGenerator:
        tokenizer = read_tokenizer(fetch("tokenizer.json", True))
        configs = {}
        for name in ("generation_config.json", "genai_config.json"):
            path = fetch(name, False)
            configs[name] = read_json(path) if path else None
            if configs[name] is not None and not isinstance(configs[name], dict):
                raise ModelLoadError(f"{path} does not hold a JSON object")
        genai = configs["genai_config.json"]
        if filename is None:
            decoder_config = ((genai or {}).get("model") or {}).get("decoder") or {}
            filename = decoder_config.get("filename", "model.onnx")
        settings = generation_settings(configs["generation_config.json"], genai)
        settings.update(options)
        return cls(load_model(filename), tokenizer, **settings)

    def generate(
        self, texts: str | Sequence[str], max_new_tokens: int = 32, **options: Any
    ) -> list[str]:
        """The text each prompt continues with: one string per text (a single string counts as
        a list of one), decoded without special tokens and cut at the first eos.

        The prompts share one batch, left-padded; ``options`` override :attr:`defaults` (see
        :func:`generate`).

        Example (needs the hub, or the files in the cache):
            >>> generator.generate("Once upon a time", max_new_tokens=8)  # doctest: +SKIP
            [' there was a little']
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise InputError("generate() needs at least one text")
        encodings = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        if not min(len(e.ids) for e in encodings):
            raise InputError("a text tokenizes to no token at all: nothing to continue")
        if self.max_length is not None:
            max_new_tokens = min(max_new_tokens, self.max_length - width)
            if max_new_tokens < 1:
                raise GenerationError(
                    f"the longest prompt has {width} tokens: max_length={self.max_length} "
                    f"leaves no room for new ones"
                )
        ids = np.zeros((len(texts), width), np.int64)
        mask = np.zeros_like(ids)
        for row, encoding in enumerate(encodings):
            ids[row, width - len(encoding.ids) :] = encoding.ids
            mask[row, width - len(encoding.ids) :] = 1
        settings = {**self.defaults, **options}
        tokens = self.decoder.generate(ids, max_new_tokens, attention_mask=mask, **settings)
        eos = settings["eos_token_id"]
        stops = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        texts_out = []
        for row in tokens[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts_out.append(self.tokenizer.decode(row[:end], skip_special_tokens=True))
        return texts_out
