"""A fuzzer for the loader: seeded mutations of real model files, each loaded and run in a child.

``python -m onnx2jax.fuzz.loader --seed S --count N --out DIR [--time-limit SEC] [-v]``
builds a few small but real seed models (the packaged CNN, a transformer-like block with its
weights in an external-data file, If/Loop subgraphs, integer/string/sparse initializers, a
skl2onnx pipeline),
mutates them at byte level (bit flips, truncation, inserted, deleted, duplicated and
overwritten ranges) and at protobuf-field level (dims, data types, opsets, op types and
domains, node inputs and outputs, initializers, external-data entries, attributes, graph
input types, non-UTF-8 names, deep If nesting, the external-data file itself), and gives each
mutant to a worker process that runs ``onnx2jax.load`` and, when it loads, one
``model(**inputs)`` with inputs made from the declared input types.

Workers run under an address-space limit and a per-mutant timeout. Every outcome must be an
:class:`~onnx2jax.core.errors.Onnx2JaxError` or a result; a finding is any other exception, an
abort or other crash, a timeout, a memory blow-up, or (with ``compare``) a result that differs
from onnxruntime's on a mutant onnxruntime accepts. Findings are deduplicated by (exception
type, innermost onnx2jax function) and written to DIR, one folder each with the mutant and a
``finding.txt``. See docs/fuzzing-loader.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

MODEL_FILE = "model.onnx"
DATA_FILE = "weights.data"
# Address-space limit of a worker: JAX and XLA fit in well under it, so a mutant that needs
# more is a memory blow-up.
MEMORY_LIMIT = 3 << 30
TIMEOUT = 20.0
# Seconds a worker may take to import JAX and onnx2jax on a busy machine.
STARTUP_TIMEOUT = 180.0
# Mutants a worker checks before it is replaced, so memory that XLA keeps per compiled
# program never adds up to the limit.
WORKER_LIFETIME = 300
# Inputs larger than this many elements are not made (the mutant's declared shape is absurd,
# not onnx2jax's doing); such a mutant counts as loaded, not run.
MAX_INPUT_ELEMENTS = 1 << 20


# --------------------------------------------------------------------------- seed models


@dataclass
class Seed:
    """A real model file (``files[MODEL_FILE]``) and the files beside it (external data)."""

    name: str
    files: dict[str, bytes]

    def proto(self) -> onnx.ModelProto:
        """The parsed model file (external data left as references)."""
        return onnx.load_model_from_string(self.files[MODEL_FILE])


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto],
    name: str,
    opsets: dict[str, int] | None = None,
    sparse: list[onnx.SparseTensorProto] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, name, inputs, outputs, initializer=initializers, sparse_initializer=sparse or []
    )
    opset_imports = [helper.make_opsetid(d, v) for d, v in (opsets or {"": 17}).items()]
    model = helper.make_model(graph, opset_imports=opset_imports, producer_name="onnx2jax-fuzz")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _transformer() -> onnx.ModelProto:
    """Token embedding, one attention head, residual and LayerNorm: shape arithmetic included."""
    rng = np.random.default_rng(0)
    d, vocab = 8, 16

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    inits = [
        w("embed", vocab, d),
        w("wq", d, d),
        w("wk", d, d),
        w("wv", d, d),
        numpy_helper.from_array(np.ones(d, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(d, np.float32), "beta"),
        numpy_helper.from_array(np.array([0, 2, 1], np.int64), "perm_unused"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        numpy_helper.from_array(np.array(d**-0.5, np.float32), "scale"),
    ]
    n = helper.make_node
    nodes = [
        n("Gather", ["embed", "ids"], ["h"]),
        n("MatMul", ["h", "wq"], ["q"]),
        n("MatMul", ["h", "wk"], ["k"]),
        n("MatMul", ["h", "wv"], ["v"]),
        n("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        n("MatMul", ["q", "kt"], ["s0"]),
        n("Mul", ["s0", "scale"], ["s"]),
        n("Softmax", ["s"], ["p"], axis=-1),
        n("MatMul", ["p", "v"], ["a"]),
        n("Add", ["h", "a"], ["r"]),
        n("LayerNormalization", ["r", "gamma", "beta"], ["ln"], axis=-1, epsilon=1e-5),
        n("Shape", ["ln"], ["shape"]),
        n("Gather", ["shape", "zero"], ["batch"], axis=0),
        n("Concat", ["batch", "minus_one"], ["flat_shape"], axis=0),
        n("Reshape", ["ln", "flat_shape"], ["hidden"]),
    ]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "zero"))
    return _model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", None])],
        inits,
        "transformer",
    )


def _control_flow() -> onnx.ModelProto:
    """An If on a traced condition and a Loop with a constant trip count."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    then_g = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)],
    )
    body = helper.make_graph(
        [
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
            helper.make_node("Identity", ["c_in"], ["c_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None),
        ],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trips", "true", "x"], ["z"], body=body),
    ]
    inits = [
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(3, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "true"),
    ]
    return _model(
        nodes,
        [x],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 3]),
        ],
        inits,
        "control",
    )


def _typed_initializers() -> onnx.ModelProto:
    """Integer, boolean, string and sparse initializers and a Constant node."""
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "sp"),
        numpy_helper.from_array(np.array([1, 4], np.int64), "sp_idx"),
        [6],
    )
    nodes = [
        helper.make_node("Add", ["x", "offset"], ["x1"]),
        helper.make_node("Cast", ["x1"], ["x2"], to=TensorProto.INT32),
        helper.make_node("Mul", ["x2", "factor"], ["ints"]),
        helper.make_node("Cast", ["bytes"], ["bytes_f"], to=TensorProto.FLOAT),
        helper.make_node("Where", ["mask", "bytes_f", "sp"], ["mixed"]),
        helper.make_node(
            "Constant",
            [],
            ["c"],
            value=numpy_helper.from_array(np.array([7, 8], np.int16), "c_value"),
        ),
        helper.make_node("Cast", ["c"], ["c64"], to=TensorProto.INT64),
        helper.make_node("Identity", ["labels"], ["names"]),
        helper.make_node("Gather", ["x", "c64"], ["picked"], axis=0),
    ]
    inits = [
        numpy_helper.from_array(np.array([3], np.int64), "offset"),
        numpy_helper.from_array(np.array([-2], np.int32), "factor"),
        numpy_helper.from_array(np.array([0, 1, 2, 250, 255, 9], np.uint8), "bytes"),
        numpy_helper.from_array(np.array([True, False, True, False, True, False]), "mask"),
        numpy_helper.from_array(np.array(["cat", "dog", "émeu"], object), "labels"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.INT64, [10])],
        [
            helper.make_tensor_value_info("ints", TensorProto.INT32, [10]),
            helper.make_tensor_value_info("mixed", TensorProto.FLOAT, [6]),
            helper.make_tensor_value_info("names", TensorProto.STRING, [3]),
            helper.make_tensor_value_info("picked", TensorProto.INT64, [2]),
        ],
        inits,
        "typed",
        sparse=[sparse],
    )


@functools.cache
def _sklearn_pipeline() -> bytes | None:
    """StandardScaler -> LogisticRegression through skl2onnx (ai.onnx.ml ops), or None
    without scikit-learn and skl2onnx (then the runs use the other seeds only)."""
    try:
        from skl2onnx import to_onnx
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        return None
    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, x[:, 0] > 0)
    model = to_onnx(
        pipeline, x[:1], options={"zipmap": False}, target_opset={"": 17, "ai.onnx.ml": 3}
    )
    return model.SerializeToString()


def seed_models(folder: Path) -> list[Seed]:
    """The seed models, built here (``folder`` is scratch space for the external-data save)."""
    from onnx2jax import example_path

    seeds = [Seed("cnn", {MODEL_FILE: Path(example_path()).read_bytes()})]
    external = folder / "transformer"
    external.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        _transformer(),
        str(external / MODEL_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=0,
    )
    seeds.append(
        Seed(
            "transformer",
            {
                MODEL_FILE: (external / MODEL_FILE).read_bytes(),
                DATA_FILE: (external / DATA_FILE).read_bytes(),
            },
        )
    )
    seeds.append(Seed("control", {MODEL_FILE: _control_flow().SerializeToString()}))
    seeds.append(Seed("typed", {MODEL_FILE: _typed_initializers().SerializeToString()}))
    sklearn = _sklearn_pipeline()
    if sklearn is not None:
        seeds.append(Seed("sklearn", {MODEL_FILE: sklearn}))
    return seeds


# --------------------------------------------------------------------------- mutations


class Skip(Exception):
    """This mutation does not apply to this model."""


@dataclass
class Mutant:
    """A mutated copy of a seed: its files (``None`` marks a removed file, ``str`` a symlink
    target) and what was done to it."""

    seed: str
    files: dict[str, bytes | str | None]
    steps: list[str] = field(default_factory=list)

    def write(self, folder: Path) -> Path:
        """Write the mutant's files into the (new) ``folder``; returns the model's path."""
        folder.mkdir(parents=True)
        for name, content in self.files.items():
            if content is None:
                continue
            if isinstance(content, str):
                os.symlink(content, folder / name)
            else:
                (folder / name).write_bytes(content)
        return folder / MODEL_FILE


HUGE = [2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1]
ODD_INTS = [-1, -2, -(2**31), -(2**63), 0, 1, 2, 3, 7, 255, *HUGE]


def _pick(rng: np.random.Generator, items: list):
    if not items:
        raise Skip("nothing to mutate")
    return items[int(rng.integers(len(items)))]


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and every subgraph inside it."""
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH or attr.HasField("g"):
                found.extend(_graphs(attr.g))
            for sub in attr.graphs:
                found.extend(_graphs(sub))
    return found


def _nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for g in _graphs(model.graph) for n in g.node]


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers, sparse initializers' parts and Constant values, in every graph."""
    found = []
    for g in _graphs(model.graph):
        found.extend(g.initializer)
        for sparse in g.sparse_initializer:
            found.extend([sparse.values, sparse.indices])
        for node in g.node:
            found.extend(a.t for a in node.attribute if a.HasField("t"))
    return found


def _value_infos(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    return [v for g in _graphs(model.graph) for v in (*g.input, *g.output, *g.value_info)]


def _names(model: onnx.ModelProto) -> list[str]:
    names = {model.graph.name}
    for g in _graphs(model.graph):
        names.update(v.name for v in (*g.input, *g.output, *g.value_info, *g.initializer))
        for node in g.node:
            names.update([node.name, node.op_type, *node.input, *node.output])
            names.update(a.name for a in node.attribute)
    return sorted(n for n in names if n and isinstance(n, str))  # bytes: not UTF-8


def _texts(model: onnx.ModelProto) -> list[str]:
    """Names, opset domains, external-data entries and string attribute values."""
    texts = set(_names(model))
    texts.update(o.domain for o in model.opset_import)
    for tensor in _tensors(model):
        texts.update(t for e in tensor.external_data for t in (e.key, e.value))
    for node in _nodes(model):
        texts.update(a.s.decode("utf-8", "replace") for a in node.attribute if a.s)
    return sorted(t for t in texts if t and isinstance(t, str))


def _other_op_types() -> list[str]:
    return sorted({s.name for s in onnx.defs.get_all_schemas()})


OP_TYPES = _other_op_types()
# AttributeProto.type is a closed enum: protobuf refuses other values (bytes mutations reach them).
ATTRIBUTE_TYPES = sorted(onnx.AttributeProto.AttributeType.values())
DOMAINS = ["", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.example.unknown", "ai.onnx.preview"]


def m_dims(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    tensor = _pick(rng, _tensors(model))
    choice = int(rng.integers(4))
    if choice == 0 and tensor.dims:
        i = int(rng.integers(len(tensor.dims)))
        tensor.dims[i] = _pick(rng, ODD_INTS)
    elif choice == 1:
        tensor.dims.append(_pick(rng, [0, 1, 2, 2**40, -1]))
    elif choice == 2 and tensor.dims:
        del tensor.dims[int(rng.integers(len(tensor.dims)))]
    else:
        tensor.dims[:] = [_pick(rng, [1, 2**20, 2**31]) for _ in range(int(rng.integers(4)))]
    return f"dims of tensor {tensor.name!r} -> {list(tensor.dims)}"


def m_data_type(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    tensor = _pick(rng, _tensors(model))
    tensor.data_type = _pick(rng, [*range(-1, 26), 40, 2**31 - 1, -(2**31)])
    return f"data_type of tensor {tensor.name!r} -> {tensor.data_type}"


def m_tensor_data(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    tensor = _pick(rng, _tensors(model))
    choice = int(rng.integers(6))
    if choice == 0 and tensor.raw_data:
        tensor.raw_data = tensor.raw_data[: int(rng.integers(len(tensor.raw_data)))]
        return f"raw_data of {tensor.name!r} truncated"
    if choice == 1:
        tensor.ClearField("raw_data")
        tensor.float_data[:] = rng.standard_normal(int(rng.integers(0, 5))).tolist()
        return f"raw_data of {tensor.name!r} -> float_data"
    if choice == 2:
        tensor.int64_data[:] = [_pick(rng, ODD_INTS) for _ in range(int(rng.integers(1, 4)))]
        return f"int64_data of {tensor.name!r} added"
    if choice == 3:
        tensor.string_data[:] = [b"\xff\xfe", b"ok"]
        return f"string_data of {tensor.name!r} added"
    if choice == 4:
        tensor.raw_data = bytes(rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8))
        return f"raw_data of {tensor.name!r} replaced"
    tensor.data_location = _pick(rng, [TensorProto.EXTERNAL, TensorProto.DEFAULT])
    return f"data_location of {tensor.name!r} -> {tensor.data_location}"


EXTERNAL_LOCATIONS = [
    "",
    "../outside.data",
    "/etc/passwd",
    "/dev/zero",
    "/proc/self/mem",
    "missing.data",
    MODEL_FILE,
    ".",
    "sub/../" + DATA_FILE,
    DATA_FILE,
    "\x00",
    DATA_FILE + "\x00x",
    "a" * 300,
]
EXTERNAL_NUMBERS = [
    "-1",
    "0",
    "4",
    "1e3",
    "0x10",
    " 8",
    "99999999999999999999",
    "",
    "abc",
    str(2**63),
    "٣",
]


def m_external(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    tensor = _pick(rng, _tensors(model))
    if not tensor.external_data:
        tensor.data_location = TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", _pick(rng, EXTERNAL_LOCATIONS)
        return f"tensor {tensor.name!r} made external at {entry.value!r}"
    key = _pick(rng, ["location", "offset", "length", "checksum", "bogus", "location"])
    value = _pick(rng, EXTERNAL_LOCATIONS if key == "location" else EXTERNAL_NUMBERS)
    entries = {e.key: e for e in tensor.external_data}
    if int(rng.integers(6)) == 0 and key in entries:
        tensor.external_data.remove(entries[key])
        return f"external {key} of {tensor.name!r} removed"
    entry = entries.get(key) or tensor.external_data.add()
    entry.key, entry.value = key, value
    return f"external {key} of {tensor.name!r} -> {value!r}"


def m_opset(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    choice = int(rng.integers(4))
    if choice == 0 or not model.opset_import:
        model.ClearField("opset_import")
        return "opset_import removed"
    entry = _pick(rng, list(model.opset_import))
    if choice == 1:
        entry.domain = _pick(rng, DOMAINS)
        return f"opset domain -> {entry.domain!r}"
    if choice == 2:
        extra = model.opset_import.add()
        extra.domain, extra.version = entry.domain, _pick(rng, [1, 7, 13, 99])
        return f"opset {entry.domain!r} imported twice"
    entry.version = _pick(rng, [*ODD_INTS, 6, 9, 11, 13, 15, 18, 21, 22, 23, 30])
    return f"opset version -> {entry.version}"


def m_ir_version(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    model.ir_version = _pick(rng, [*ODD_INTS, 3, 4, 10, 11, 12])
    return f"ir_version -> {model.ir_version}"


def m_op_type(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    node = _pick(rng, _nodes(model))
    old = node.op_type
    if int(rng.integers(4)) == 0:
        node.domain = _pick(rng, DOMAINS)
        return f"domain of {old} -> {node.domain!r}"
    node.op_type = _pick(rng, [*OP_TYPES, "NoSuchOp", "", "If", "Loop", "Scan", "Constant"])
    return f"op_type {old} -> {node.op_type}"


def m_node_io(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    node = _pick(rng, _nodes(model))
    names = [n for n in _names(model) if n]
    field_name = _pick(rng, ["input", "output"])
    values = getattr(node, field_name)
    choice = int(rng.integers(6))
    if choice == 0 and values:
        del values[int(rng.integers(len(values)))]
        what = "dropped"
    elif choice == 1 and values:
        values.append(_pick(rng, list(values)))
        what = "duplicated"
    elif choice == 2 and len(values) > 1:
        i, j = rng.choice(len(values), 2, replace=False)
        values[int(i)], values[int(j)] = values[int(j)], values[int(i)]
        what = "swapped"
    elif choice == 3 and values:
        values[int(rng.integers(len(values)))] = _pick(rng, ["", "undefined_tensor"])
        what = "blanked or renamed"
    elif choice == 4:
        values.append(_pick(rng, names))
        what = "extra name added"
    else:
        values[:] = [_pick(rng, names) for _ in range(int(rng.integers(0, 4)))]
        what = "replaced"
    return f"{field_name}s of {node.op_type} node {what}: {list(values)}"


def m_initializers(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    graph = _pick(rng, [g for g in _graphs(model.graph) if g.initializer])
    choice = int(rng.integers(4))
    i = int(rng.integers(len(graph.initializer)))
    name = graph.initializer[i].name
    if choice == 0:
        del graph.initializer[i]
        return f"initializer {name!r} removed"
    if choice == 1:
        graph.initializer.add().CopyFrom(graph.initializer[i])
        return f"initializer {name!r} duplicated"
    if choice == 2:
        graph.initializer[i].name = _pick(
            rng, [*(v.name for v in graph.input), "", *(o for n in graph.node for o in n.output)]
        )
        return f"initializer {name!r} renamed to {graph.initializer[i].name!r}"
    graph.input.add().CopyFrom(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return f"initializer {name!r} also declared as an input"


def m_attribute(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    node = _pick(rng, _nodes(model))
    choice = int(rng.integers(7))
    if choice == 0 or not node.attribute:
        attr = node.attribute.add()
        attr.name = _pick(
            rng,
            [
                "axis",
                "perm",
                "to",
                "epsilon",
                "kernel_shape",
                "pads",
                "strides",
                "keepdims",
                "bogus",
                "then_branch",
                "body",
                "value",
            ],
        )
        attr.type = _pick(rng, ATTRIBUTE_TYPES)
        attr.i = _pick(rng, ODD_INTS)
        attr.ints[:] = [_pick(rng, ODD_INTS) for _ in range(int(rng.integers(0, 5)))]
        return f"attribute {attr.name} (type {attr.type}) added to {node.op_type}"
    attr = _pick(rng, list(node.attribute))
    if choice == 1:
        node.attribute.remove(attr)
        return f"attribute {attr.name} of {node.op_type} removed"
    if choice == 2:
        attr.type = _pick(rng, ATTRIBUTE_TYPES)
        return f"type of attribute {attr.name} of {node.op_type} -> {attr.type}"
    if choice == 3:
        attr.i = _pick(rng, ODD_INTS)
        attr.ints[:] = [_pick(rng, ODD_INTS) for _ in range(len(attr.ints))]
        return f"ints of attribute {attr.name} of {node.op_type} -> {attr.i}, {list(attr.ints)}"
    if choice == 4:
        attr.f = _pick(rng, [float("nan"), float("inf"), -1.0, 0.0, 1e30])
        attr.floats[:] = [attr.f] * len(attr.floats)
        return f"floats of attribute {attr.name} of {node.op_type} -> {attr.f}"
    if choice == 5:
        attr.ints[:] = [_pick(rng, ODD_INTS) for _ in range(int(rng.integers(0, 9)))]
        return f"ints of attribute {attr.name} of {node.op_type} -> {list(attr.ints)}"
    attr.g.CopyFrom(helper.make_graph([], "empty", [], []))
    return f"attribute {attr.name} of {node.op_type} given an empty graph"


def m_graph_io(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    values = _value_infos(model)
    value = _pick(rng, values)
    choice = int(rng.integers(7))
    tensor_type = value.type.tensor_type
    if choice == 0:
        tensor_type.elem_type = _pick(rng, [*range(-1, 26), 99])
        return f"elem_type of {value.name!r} -> {tensor_type.elem_type}"
    if choice == 1 and tensor_type.shape.dim:
        dim = _pick(rng, list(tensor_type.shape.dim))
        if int(rng.integers(2)):
            dim.dim_value = _pick(rng, ODD_INTS)
        else:
            dim.dim_param = _pick(rng, ["", "batch", "\u00e9", "n"])
        return f"a dim of {value.name!r} changed"
    if choice == 2:
        value.type.ClearField("tensor_type")
        kind = _pick(
            rng, ["sequence_type", "map_type", "optional_type", "sparse_tensor_type", "none"]
        )
        if kind == "sequence_type":
            value.type.sequence_type.elem_type.tensor_type.elem_type = TensorProto.FLOAT
        elif kind == "map_type":
            value.type.map_type.key_type = TensorProto.INT64
            value.type.map_type.value_type.tensor_type.elem_type = TensorProto.FLOAT
        elif kind == "optional_type":
            value.type.optional_type.elem_type.tensor_type.elem_type = TensorProto.FLOAT
        elif kind == "sparse_tensor_type":
            value.type.sparse_tensor_type.elem_type = TensorProto.FLOAT
        return f"type of {value.name!r} -> {kind}"
    if choice == 3:
        tensor_type.ClearField("shape")
        return f"shape of {value.name!r} removed"
    graph = _pick(rng, _graphs(model.graph))
    which = _pick(rng, ["input", "output"])
    items = getattr(graph, which)
    if choice == 4 and len(items):
        del items[int(rng.integers(len(items)))]
        return f"a graph {which} removed"
    if choice == 5 and len(items):
        items.add().CopyFrom(items[int(rng.integers(len(items)))])
        return f"a graph {which} duplicated"
    if len(items):
        items[int(rng.integers(len(items)))].name = _pick(rng, [*_names(model), "", "nowhere"])
        return f"a graph {which} renamed"
    raise Skip("no graph inputs or outputs")


def m_nesting(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    """Wrap the graph in ``depth`` nested If nodes whose condition is a constant true."""
    graph = model.graph
    if not graph.input:
        raise Skip("no graph input for the else branches")
    # protobuf refuses messages nested deeper than about 100 (3 per level here).
    depth = _pick(rng, [2, 8, 20, 30])
    outer_inputs = list(graph.input)
    outputs = [o.name for o in graph.output]
    body = onnx.GraphProto()
    body.CopyFrom(graph)
    body.ClearField("input")
    body.name = "level0"
    escape = outer_inputs[0].name
    for level in range(1, depth + 1):
        renamed = [f"{o}__nest{level}" for o in outputs]
        else_g = helper.make_graph(
            [helper.make_node("Identity", [escape], [f"{o}__else{level}"]) for o in outputs],
            f"else{level}",
            [],
            [
                helper.make_tensor_value_info(f"{o}__else{level}", TensorProto.UNDEFINED, None)
                for o in outputs
            ],
        )
        node = helper.make_node("If", ["nest_cond"], renamed, then_branch=body, else_branch=else_g)
        wrapper = helper.make_graph(
            [node],
            f"level{level}",
            [],
            [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in renamed],
        )
        body = wrapper
    final = body.node[0]
    final.output[:] = outputs
    graph.ClearField("node")
    graph.ClearField("initializer")
    graph.ClearField("sparse_initializer")
    graph.node.extend(
        [
            helper.make_node(
                "Constant", [], ["nest_cond"], value=numpy_helper.from_array(np.array(True))
            ),
            final,
        ]
    )
    return f"graph nested {depth} If nodes deep"


def m_function(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    """A node calls a model-local function, possibly one that calls itself."""
    node = _pick(rng, _nodes(model))
    domain = "local.fn"
    recursive = bool(rng.integers(2))
    inner = helper.make_node(
        "Self" if recursive else "Relu", ["a"], ["b"], domain=domain if recursive else ""
    )
    function = helper.make_function(
        domain,
        "Self" if recursive else "Wrap",
        ["a"],
        ["b"],
        [inner],
        [helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)],
    )
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid(domain, 1))
    node.domain, node.op_type = domain, function.name
    return f"{node.name or node.output[:1]} calls local function {function.name}"


PROTO_MUTATIONS: dict[str, Callable[[onnx.ModelProto, np.random.Generator], str]] = {
    "dims": m_dims,
    "data_type": m_data_type,
    "tensor_data": m_tensor_data,
    "external": m_external,
    "opset": m_opset,
    "ir_version": m_ir_version,
    "op_type": m_op_type,
    "node_io": m_node_io,
    "initializers": m_initializers,
    "attribute": m_attribute,
    "graph_io": m_graph_io,
    "nesting": m_nesting,
    "function": m_function,
}


def byte_mutation(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One byte-level change of ``data``."""
    if not data:
        return bytes(rng.integers(0, 256, 16, dtype=np.uint8)), "empty file filled"
    n = len(data)
    start = int(rng.integers(n))
    length = int(min(n - start, 1 + rng.integers(64) if rng.integers(4) else rng.integers(n)))
    choice = int(rng.integers(7))
    buf = bytearray(data)
    if choice == 0:
        for _ in range(int(rng.integers(1, 9))):
            buf[int(rng.integers(n))] ^= 1 << int(rng.integers(8))
        return bytes(buf), "bits flipped"
    if choice == 1:
        return data[:start], f"truncated to {start} bytes"
    if choice == 2:
        extra = bytes(rng.integers(0, 256, int(rng.integers(1, 32)), dtype=np.uint8))
        return data[:start] + extra + data[start:], f"{len(extra)} bytes inserted at {start}"
    if choice == 3:
        return data[:start] + data[start + length :], f"{length} bytes deleted at {start}"
    if choice == 4:
        return (
            data[: start + length] + data[start : start + length] + data[start + length :],
            f"{length} bytes duplicated at {start}",
        )
    fill = 0xFF if choice == 5 else 0x00
    buf[start : start + length] = bytes([fill]) * length
    return bytes(buf), f"{length} bytes at {start} set to {fill:#04x}"


def non_utf8_name(data: bytes, names: list[str], rng: np.random.Generator) -> tuple[bytes, str]:
    """One name's bytes in the serialized model overwritten in place with invalid UTF-8
    (the protobuf framing stays valid, so the file still parses)."""
    candidates = [n.encode() for n in names if n]
    name = _pick(rng, candidates)
    at = data.find(name)
    if at < 0:
        raise Skip("name not found")
    i = at + int(rng.integers(len(name)))
    return (
        data[:i] + _pick(rng, [b"\xff", b"\xc3", b"\x80", b"\xed"]) + data[i + 1 :],
        f"name {name!r} made invalid UTF-8",
    )


def data_file_mutation(files: dict, rng: np.random.Generator) -> str:
    """A change to the external-data file: truncated, extended, removed, a link out, a folder."""
    data = files[DATA_FILE]
    if not isinstance(data, bytes):
        raise Skip("the data file was replaced already")
    choice = int(rng.integers(6))
    if choice == 0:
        cut = int(rng.integers(len(data) + 1))
        files[DATA_FILE] = data[:cut]
        return f"{DATA_FILE} truncated to {cut} bytes"
    if choice == 1:
        files[DATA_FILE] = data + bytes(int(rng.integers(1, 64)))
        return f"{DATA_FILE} extended"
    if choice == 2:
        files[DATA_FILE] = None
        return f"{DATA_FILE} removed"
    if choice == 3:
        files[DATA_FILE] = _pick(rng, ["/etc/passwd", "/dev/zero", "../outside.data", "/"])
        return f"{DATA_FILE} is a symlink to {files[DATA_FILE]}"
    mutated, what = byte_mutation(data, rng)
    files[DATA_FILE] = mutated
    return f"{DATA_FILE}: {what}"


def mutate(seed: Seed, rng: np.random.Generator) -> Mutant:
    """A mutant of ``seed``: one to three field-level or byte-level changes."""
    files: dict[str, bytes | str | None] = dict(seed.files)
    steps: list[str] = []
    proto = seed.proto()
    data = files[MODEL_FILE]
    changed = False
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(10))
        try:
            if kind < 6:
                name = _pick(rng, sorted(PROTO_MUTATIONS))
                steps.append(f"{name}: {PROTO_MUTATIONS[name](proto, rng)}")
                changed = True
            elif kind < 8:
                if changed:
                    data, changed = proto.SerializeToString(), False
                data, what = byte_mutation(data, rng)
                steps.append(f"bytes: {what}")
                proto = _reparse(data) or proto
            elif kind == 8:
                if changed:
                    data, changed = proto.SerializeToString(), False
                data, what = non_utf8_name(data, _texts(proto), rng)
                steps.append(f"utf8: {what}")
            elif DATA_FILE in files:
                steps.append(f"data file: {data_file_mutation(files, rng)}")
        except (Skip, DecodeError):  # DecodeError: nested deeper than protobuf allows
            continue
    if changed:
        data = proto.SerializeToString()
    files[MODEL_FILE] = data
    # A change may set a value it already had (or be skipped): then a byte change instead.
    while files == seed.files:
        data, what = byte_mutation(data, rng)
        steps.append(f"bytes: {what}")
        files[MODEL_FILE] = data
    return Mutant(seed.name, files, steps)


def _reparse(data: bytes) -> onnx.ModelProto | None:
    """The proto of bytes a byte mutation left parseable (so later field changes stack)."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
        model.SerializeToString()
    except Exception:  # any decode failure: later steps work on bytes only
        return None
    return model


# --------------------------------------------------------------------------- the worker


def _innermost_frame(tb: traceback.StackSummary | list) -> str:
    """``module.function`` of the innermost frame inside onnx2jax (not the fuzzer itself)."""
    here = Path(__file__).resolve().parent
    package = here.parent
    for frame in reversed(tb):
        path = Path(frame.filename).resolve()
        if package in path.parents and here not in path.parents:
            module = path.relative_to(package.parent).with_suffix("").as_posix()
            return f"{module.replace('/', '.')}.{frame.name}"
    return tb[-1].name if tb else "?"


def _inputs(model, rng: np.random.Generator) -> dict[str, np.ndarray] | str:
    """Inputs from the model's declared input types (free dims 1 or 2), or why none are made."""
    feeds = {}
    for info in model.inputs:
        if info.kind != "tensor":
            return f"input {info.name!r} is a {info.kind}"
        if info.dtype is None or info.shape is None:
            return f"input {info.name!r} has no declared type or shape"
        shape = []
        for dim in info.shape:
            if isinstance(dim, int) and dim >= 0:
                shape.append(dim)
            elif isinstance(dim, int):
                return f"input {info.name!r} has a negative dim"
            else:
                shape.append(int(rng.integers(1, 3)))
        if int(np.prod(shape, dtype=np.float64)) > MAX_INPUT_ELEMENTS:
            return f"input {info.name!r} declares {shape}"
        dtype = info.dtype
        if dtype.kind == "f" or dtype.name == "bfloat16":
            value = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            value = rng.integers(0, 3, shape).astype(dtype)
        elif dtype.kind == "b":
            value = rng.integers(0, 2, shape).astype(bool)
        elif dtype.kind == "c":
            value = (rng.standard_normal(shape) + 1j).astype(dtype)
        elif dtype.kind in "OSU":
            value = np.array(["a", "bb"] * (int(np.prod(shape)) // 2 + 1), object)[
                : int(np.prod(shape))
            ].reshape(shape)
        else:
            return f"input {info.name!r} has dtype {dtype}"
        feeds[info.name] = value
    return feeds


def _compare(path: str, feeds: dict[str, np.ndarray], ours: dict[str, np.ndarray]) -> str | None:
    """How our outputs differ from onnxruntime's on this mutant; None when they agree or
    onnxruntime refuses the mutant."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        theirs = dict(zip(names, session.run(None, feeds), strict=True))
    except Exception:  # onnxruntime refuses many mutants; only its results are compared
        return None
    for name, expected in theirs.items():
        if name not in ours:
            continue
        got, expected = np.asarray(ours[name]), np.asarray(expected)
        if got.shape != expected.shape:
            return f"output {name!r}: shape {got.shape}, onnxruntime {expected.shape}"
        if expected.dtype.kind in "fc":
            ok = np.allclose(
                got.astype(expected.dtype), expected, rtol=1e-3, atol=1e-4, equal_nan=True
            )
        else:
            ok = np.array_equal(got.astype(expected.dtype), expected)
        if not ok:
            return f"output {name!r} differs from onnxruntime's"
    return None


def run_mutant(path: str, index: int, compare: bool, send: Callable[[dict], None]) -> dict:
    """Load ``path`` and run it once; the outcome as a dict (``send`` reports stages)."""
    import jax

    import onnx2jax
    from onnx2jax.core.errors import Onnx2JaxError

    def finding(stage: str, exc: BaseException) -> dict:
        tb = traceback.extract_tb(exc.__traceback__)
        return {
            "status": "finding",
            "stage": stage,
            "error": type(exc).__name__,
            "key": f"{type(exc).__name__} in {_innermost_frame(tb)}",
            "message": str(exc)[:500],
            "traceback": "".join(traceback.format_exception(exc))[-8000:],
        }

    send({"stage": "load"})
    try:
        model = onnx2jax.load(path)
    except Onnx2JaxError as exc:
        return {"status": "rejected", "stage": "load", "error": type(exc).__name__}
    except Exception as exc:
        return finding("load", exc)
    feeds = _inputs(model, np.random.default_rng(index))
    if isinstance(feeds, str):
        return {"status": "loaded", "note": feeds}
    send({"stage": "run"})
    try:
        out = model(**feeds)
        out = {k: np.asarray(jax.device_get(v)) for k, v in out.items()}
    except Onnx2JaxError as exc:
        return {"status": "rejected", "stage": "run", "error": type(exc).__name__}
    except Exception as exc:
        return finding("run", exc)
    if compare:
        send({"stage": "onnxruntime"})
        difference = _compare(path, feeds, out)
        if difference:
            return {
                "status": "finding",
                "stage": "compare",
                "error": "Mismatch",
                "key": None,
                "message": difference,
                "traceback": "",
            }
    return {"status": "ran"}


def worker_main() -> int:
    """The worker loop: one JSON request per line on stdin, JSON replies on the original
    stdout (anything JAX or onnx2jax prints goes to stderr)."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")

    import onnx2jax  # noqa: F401  (imported before "ready", so startup is not timed per mutant)

    send({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        result = run_mutant(request["path"], request["index"], request["compare"], send)
        result["done"] = True
        send(result)
    return 0


# The worker limits its own address space before it imports anything heavy (a preexec_fn
# would run Python in a forked copy of this multithreaded process).
WORKER_CODE = (
    "import os, resource, sys\n"
    "limit = int(os.environ['ONNX2JAX_FUZZ_MEMORY_LIMIT'])\n"
    "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
    "from onnx2jax.fuzz.loader import worker_main\n"
    "sys.exit(worker_main())\n"
)


class Worker:
    """A worker process reused across mutants, replaced after a crash, a timeout or
    ``WORKER_LIFETIME`` mutants."""

    def __init__(self, log: Path, memory_limit: int):
        env = dict(os.environ)
        env.update(
            {
                "JAX_PLATFORMS": "cpu",
                "ONNX2JAX_NATIVE": "0",
                "XLA_FLAGS": (
                    env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                ).strip(),
                "OMP_NUM_THREADS": "1",
                "PYTHONFAULTHANDLER": "1",
            }
        )
        env.pop("ONNX2JAX_CACHE_DIR", None)
        self.log = log
        self.stderr = open(log, "wb")  # noqa: SIM115  (closed in stop)
        env["ONNX2JAX_FUZZ_MEMORY_LIMIT"] = str(memory_limit)
        # A session of its own: a stray child dies with its process group.
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env,
            start_new_session=True,
        )
        self.buffer = b""
        self.used = 0
        self.started = False

    def _read(self, deadline: float) -> dict | None:
        """The next message, or None on a timeout or when the process died."""
        out = self.process.stdout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([out], [], [], left)
            if not ready:
                return None
            chunk = os.read(out.fileno(), 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def check(self, path: Path, index: int, compare: bool, timeout: float) -> dict:
        """The outcome of one mutant: the worker's reply, or a crash or timeout finding."""
        if not self.started:
            ready = self._read(time.monotonic() + STARTUP_TIMEOUT)
            if not ready:
                raise RuntimeError(f"a fuzz worker did not start; see {self.log}")
            self.started = True
        self.used += 1
        request = json.dumps({"path": str(path), "index": index, "compare": compare})
        self.process.stdin.write(request.encode() + b"\n")
        self.process.stdin.flush()
        stage = "load"
        deadline = time.monotonic() + timeout
        while True:
            message = self._read(deadline)
            if message is None:
                break
            if message.get("done"):
                return message
            stage = message["stage"]
        alive = self.process.poll() is None
        self.stop()
        tail = self.log.read_bytes()[-4000:].decode(errors="replace")
        if alive:
            return {
                "status": "finding",
                "stage": stage,
                "error": "Timeout",
                "key": f"Timeout in {stage}",
                "message": f"no outcome after {timeout:.0f}s",
                "traceback": tail,
            }
        code = self.process.returncode
        try:
            what = signal.Signals(-code).name if code < 0 else f"exit status {code}"
        except ValueError:
            what = f"signal {-code}"
        if stage == "onnxruntime":  # onnxruntime's own crash on a mutant, not onnx2jax's
            return {"status": "ort_crash", "stage": stage, "error": what}
        return {
            "status": "finding",
            "stage": stage,
            "error": "Crash",
            "key": f"Crash ({what}) in {stage}",
            "message": f"the worker died ({what})",
            "traceback": tail,
        }

    def stop(self) -> None:
        """End the worker (and its process group) if it still runs."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.stderr.close()


# --------------------------------------------------------------------------- the run


@dataclass
class LoaderFinding:
    """One distinct problem: the first mutant that showed it and how many did."""

    key: str
    index: int
    seed: str
    steps: list[str]
    message: str
    path: Path | None = None
    count: int = 1


@dataclass
class LoaderReport:
    """What a loader fuzzing run did."""

    seed: int
    mutants: int = 0
    outcomes: Counter = field(default_factory=Counter)
    findings: dict[str, LoaderFinding] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """The one line the command line ends with."""
        o = self.outcomes
        rejected = sum(v for k, v in o.items() if k.startswith("rejected"))
        return (
            f"loader fuzz seed {self.seed}: {self.mutants} mutants in {self.seconds:.0f}s: "
            f"{rejected} rejected with an onnx2jax error, {o['loaded']} loaded (not run), "
            f"{o['ran']} loaded and ran, {o['ort_crash']} onnxruntime crashes ignored, "
            f"{sum(f.count for f in self.findings.values())} findings "
            f"({len(self.findings)} distinct)"
        )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:80]


def fuzz_loader(
    seed: int,
    count: int,
    out: Path | None,
    time_limit: float | None = None,
    progress: Callable[[int, Mutant, dict], None] | None = None,
    *,
    first: int = 0,
    workers: int = 2,
    timeout: float = TIMEOUT,
    memory_limit: int = MEMORY_LIMIT,
    compare: bool = True,
) -> LoaderReport:
    """Check ``count`` mutants (fewer when ``time_limit`` seconds run out), numbered from
    ``first``; each is reproducible alone from (``seed``, its number).

    Distinct findings are written to ``out`` (when given): ``out/<n>_<key>/`` holds the
    mutant's files and ``finding.txt`` (what was mutated, the traceback, how to reproduce).
    ``compare`` also runs onnxruntime on mutants that load and run, and a result that differs
    is a finding.
    """
    report = LoaderReport(seed)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="onnx2jax-loader-fuzz-") as scratch:
        root = Path(scratch)
        seeds = seed_models(root / "seeds")
        pool = [Worker(root / f"worker{i}.log", memory_limit) for i in range(max(1, workers))]
        pending = iter(range(first, first + count))
        try:
            _run(
                report,
                seeds,
                pool,
                pending,
                root,
                out,
                time_limit,
                start,
                progress,
                timeout,
                memory_limit,
                compare,
            )
        finally:
            for worker in pool:
                worker.stop()
    report.seconds = time.monotonic() - start
    return report


def make_mutant(seeds: list[Seed], seed: int, index: int) -> Mutant:
    """Mutant ``index`` of a run with ``seed``."""
    rng = np.random.default_rng([seed, index])
    return mutate(seeds[int(rng.integers(len(seeds)))], rng)


def _run(
    report: LoaderReport,
    seeds: list[Seed],
    pool: list[Worker],
    pending: Iterator[int],
    root: Path,
    out: Path | None,
    time_limit: float | None,
    start: float,
    progress: Callable[[int, Mutant, dict], None] | None,
    timeout: float,
    memory_limit: int,
    compare: bool,
) -> None:
    """Hand each free worker the next mutant; a thread per worker waits on its reply (the
    workers are processes, the threads only wait on their pipes)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    with ThreadPoolExecutor(len(pool)) as threads:
        running = {}
        free = list(range(len(pool)))
        exhausted = False
        while True:
            while free and not exhausted:
                if time_limit is not None and time.monotonic() - start > time_limit:
                    exhausted = True
                    break
                index = next(pending, None)
                if index is None:
                    exhausted = True
                    break
                slot = free.pop()
                mutant = make_mutant(seeds, report.seed, index)
                folder = root / f"m{index}"
                path = mutant.write(folder)
                future = threads.submit(pool[slot].check, path, index, compare, timeout)
                running[future] = (slot, index, mutant, folder)
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                slot, index, mutant, folder = running.pop(future)
                result = future.result()
                _record(report, index, mutant, folder, result, out)
                if progress is not None:
                    progress(index, mutant, result)
                shutil.rmtree(folder, ignore_errors=True)
                worker = pool[slot]
                if worker.process.poll() is not None or worker.used >= WORKER_LIFETIME:
                    worker.stop()
                    pool[slot] = Worker(worker.log, memory_limit)
                free.append(slot)


def _record(
    report: LoaderReport, index: int, mutant: Mutant, folder: Path, result: dict, out: Path | None
) -> None:
    report.mutants += 1
    status = result["status"]
    if status == "rejected":
        report.outcomes[f"rejected {result['error']}"] += 1
        return
    if status != "finding":
        report.outcomes[status] += 1
        return
    key = result["key"] or f"Mismatch on {mutant.seed}: {mutant.steps[0].split(':')[0]}"
    known = report.findings.get(key)
    if known is not None:
        known.count += 1
        return
    finding = LoaderFinding(key, index, mutant.seed, mutant.steps, result["message"])
    report.findings[key] = finding
    if out is None:
        return
    target = out / f"{len(report.findings):03d}_{_slug(key)}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target, symlinks=True)
    finding.path = target / MODEL_FILE
    (target / "finding.txt").write_text(
        f"{key}\nseed model: {mutant.seed}\nmutations:\n"
        + "".join(f"  {s}\n" for s in mutant.steps)
        + f"stage: {result['stage']}\nmessage: {result['message']}\n"
        + f"reproduce: python -m onnx2jax.fuzz.loader --seed {report.seed} --first {index} "
        "--count 1\n\n" + result.get("traceback", ""),
        errors="replace",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the loader fuzzer; exit status 1 when something was found, 0 otherwise."""
    parser = argparse.ArgumentParser(
        prog="python -m onnx2jax.fuzz.loader", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=500, help="mutants to check")
    parser.add_argument("--first", type=int, default=0, help="number of the first mutant")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("fuzz-loader-out"),
        help="folder for the mutants that produced findings",
    )
    parser.add_argument("--time-limit", type=float, default=None, help="seconds")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per mutant")
    parser.add_argument(
        "--no-compare", action="store_true", help="do not compare results with onnxruntime"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="one line per mutant (and its mutations)"
    )
    args = parser.parse_args(argv)

    def progress(index: int, mutant: Mutant, result: dict) -> None:
        status = result["status"]
        if args.verbose or status == "finding":
            what = result.get("key") or result.get("error") or result.get("note") or ""
            print(
                f"mutant {index} ({mutant.seed}; {'; '.join(mutant.steps)[:200]}): {status} {what}",
                flush=True,
            )

    report = fuzz_loader(
        args.seed,
        args.count,
        args.out,
        args.time_limit,
        progress,
        first=args.first,
        workers=args.workers,
        timeout=args.timeout,
        compare=not args.no_compare,
    )
    for finding in report.findings.values():
        print(
            f"FINDING {finding.key} (x{finding.count}, first mutant {finding.index}) -> "
            f"{finding.path}: {finding.message[:200]}"
        )
    if args.verbose:
        for outcome, n in report.outcomes.most_common():
            print(f"{n:6d} {outcome}")
    print(report.summary())
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
