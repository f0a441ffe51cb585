"""Planning: topological order, value kinds (params, constants, inputs), op lookup. No numerics."""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx2jax.core.errors import ModelLoadError, UnsupportedOpError
from onnx2jax.core.loader import tensor_to_numpy
from onnx2jax.ops.registry import ONNX2JAX, OpSpec, canonical_domain, lookup


@dataclass(frozen=True)
class TensorInfo:
    """Declared type of a graph value: ONNX element type and shape (``None``/str for free dims)."""

    name: str
    elem_type: int | None
    shape: tuple[int | str | None, ...] | None
    kind: str = "tensor"  # tensor, sequence, optional, map

    @property
    def dtype(self) -> np.dtype | None:
        if self.elem_type in (None, onnx.TensorProto.UNDEFINED):
            return None
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))

    def describe(self) -> str:
        dims = (
            "?"
            if self.shape is None
            else "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"
        )
        dtype = self.dtype.name if self.dtype is not None else "?"
        kind = "" if self.kind == "tensor" else f"{self.kind} of "
        return f"{self.name}: {kind}{dtype}{dims}"


def tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    type_proto = value.type
    kind = "tensor"
    while True:
        which = type_proto.WhichOneof("value")
        if which == "sequence_type" and kind == "tensor":
            kind, type_proto = "sequence", type_proto.sequence_type.elem_type
        elif which == "optional_type" and kind == "tensor":
            kind, type_proto = "optional", type_proto.optional_type.elem_type
        elif which in ("sequence_type", "optional_type"):
            type_proto = getattr(type_proto, which).elem_type
        else:
            break
    if which == "map_type":
        return TensorInfo(value.name, None, None, "map")
    if which not in ("tensor_type", "sparse_tensor_type"):
        return TensorInfo(value.name, None, None, kind)
    tensor_type = getattr(type_proto, which)
    shape = None
    if tensor_type.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim
        )
    return TensorInfo(value.name, tensor_type.elem_type, shape, kind)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    found = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend(attr.graphs)
    return found


def outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads from enclosing scopes."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for sub in subgraphs(node):
            used |= outer_names(sub)
        defined.update(node.output)
    used.update(v.name for v in graph.output)
    return used - defined


def node_label(node: onnx.NodeProto) -> str:
    name = node.name or (f"<output {node.output[0]}>" if node.output else "<unnamed>")
    return f"{node.op_type} node {name!r}"


@dataclass
class GraphPlan:
    """A graph ready to interpret: nodes in topological order with their op implementations."""

    graph: onnx.GraphProto
    nodes: list[onnx.NodeProto]
    specs: list[OpSpec]
    # Every name a node reads, subgraph captures included.
    node_reads: list[list[str]]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    constants: dict[str, np.ndarray]
    param_names: list[str]
    # Host copies of the params' initial values; the Model moves them to the device and drops them.
    param_values: dict[str, np.ndarray] = field(default_factory=dict)
    value_info: dict[str, TensorInfo] = field(default_factory=dict)
    producer: dict[str, int] = field(default_factory=dict)

    def nodes_for(self, wanted: list[str]) -> list[int]:
        """Indices of the nodes needed to compute ``wanted``, in execution order."""
        needed: set[int] = set()
        stack = [self.producer[n] for n in wanted if n in self.producer]
        while stack:
            index = stack.pop()
            if index in needed:
                continue
            needed.add(index)
            stack.extend(self.producer[n] for n in self.node_reads[index] if n in self.producer)
        return sorted(needed)


def is_trainable_dtype(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name in ("bfloat16",)


def plan_graph(
    graph: onnx.GraphProto,
    opsets: dict[str, int],
    base_dir: Path | None,
    trainable: bool = True,
    decoded: Mapping[str, Any] | None = None,
) -> GraphPlan:
    """Order ``graph`` and sort its initializers into params and static constants.

    Params are the float initializers (trainable), and the integer ones of at least
    :data:`FROZEN_PARAM_MIN_BYTES` that nodes read only as weights (packed or quantized weights:
    frozen params, which ``train`` never selects); floats feeding a static input, and every
    other integer, are constants.

    With ``trainable`` false (subgraphs) every initializer is a constant and the graph may
    read names of enclosing scopes; a main graph reading a name nothing defines is refused.
    ``decoded`` gives initializers' values decoded already (some of whose bytes the graph no
    longer holds).
    """
    decoded = decoded or {}
    _check_names(graph)
    initializers = {
        t.name: decoded[t.name] if t.name in decoded else tensor_to_numpy(t, base_dir)
        for t in graph.initializer
    }
    for sparse in graph.sparse_initializer:
        initializers[sparse.values.name] = sparse_to_dense(sparse, base_dir)
    nodes = _topological_order(
        graph, set(initializers) | {v.name for v in graph.input}, enclosed=not trainable
    )
    nodes = fuse_quantize_pairs(nodes)
    specs = []
    for node in nodes:
        domain = canonical_domain(node.domain)
        spec = lookup(domain, node.op_type, opsets.get(domain, 1))
        specs.append(spec)
    node_reads = []
    for node in nodes:
        reads = [n for n in node.input if n]
        for sub in subgraphs(node):
            reads.extend(sorted(outer_names(sub)))
        node_reads.append(reads)

    static_fed = set()
    for node, spec in zip(nodes, specs, strict=True):
        if spec is not None:
            static_fed.update(node.input[i] for i in spec.static_inputs if i < len(node.input))
    frozen = _weight_only_names(nodes, specs, initializers) if trainable else set()
    param_names = [
        name
        for name, value in initializers.items()
        if trainable
        and name not in static_fed
        and (is_trainable_dtype(value.dtype) or name in frozen)
    ]
    params = set(param_names)
    constants = {k: v for k, v in initializers.items() if k not in params}
    value_info = {v.name: tensor_info(v) for v in (*graph.value_info, *graph.output)}
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    graph_inputs = [tensor_info(v) for v in graph.input if v.name not in initializers]
    for info in graph_inputs:
        if info.elem_type not in _KNOWN_ELEM_TYPES:
            raise ModelLoadError(
                f"graph input {info.name!r} has element type {info.elem_type}, "
                "which is not an ONNX tensor type"
            )
    return GraphPlan(
        graph=graph,
        nodes=nodes,
        specs=specs,
        node_reads=node_reads,
        inputs=graph_inputs,
        outputs=[tensor_info(v) for v in graph.output],
        constants=constants,
        param_names=param_names,
        param_values={k: initializers[k] for k in param_names},
        value_info=value_info,
        producer=producer,
    )


_KNOWN_ELEM_TYPES = {None, *onnx.helper.get_all_tensor_dtypes()}

# Integer initializers smaller than this stay constants even when only weight inputs read them:
# a zero point or a small table costs nothing compiled in, and keeps its value known.
FROZEN_PARAM_MIN_BYTES = 1024


def is_frozen_param_dtype(dtype: np.dtype) -> bool:
    """Whether an integer initializer of ``dtype`` may be a frozen param: NumPy's integers of 8
    to 32 bits, which JAX holds as they are stored. 64-bit ones would be narrowed with x64 off;
    the 4-bit and 2-bit ml_dtypes ones have no NumPy file format (AOT artifacts store params as
    ``.npz``), so they stay constants.

    Example:
        >>> is_frozen_param_dtype(np.dtype(np.uint8)), is_frozen_param_dtype(np.dtype(np.int64))
        (True, False)
    """
    return dtype.kind in "iu" and dtype.itemsize <= 4


def _weight_only_names(
    nodes: list[onnx.NodeProto], specs: list[OpSpec | None], initializers: Mapping[str, Any]
) -> set[str]:
    """The integer initializers to hold as frozen params: large enough, of a dtype JAX keeps,
    and read by at least one node, every read through an input its op declares a weight input
    (``weight_inputs``, ops/registry.py). A read anywhere else (a static input, an op that
    computes on the value with NumPy, a subgraph's capture) keeps the initializer a constant."""
    candidates = {
        name
        for name, value in initializers.items()
        if not is_trainable_dtype(value.dtype)
        and is_frozen_param_dtype(value.dtype)
        and value.nbytes >= FROZEN_PARAM_MIN_BYTES
    }
    weight_read: set[str] = set()
    other_read: set[str] = set()
    for node, spec in zip(nodes, specs, strict=True):
        weights = spec.weight_inputs if spec is not None else ()
        for index, name in enumerate(node.input):
            if name in candidates:
                (weight_read if index in weights else other_read).add(name)
        for sub in subgraphs(node):
            other_read |= outer_names(sub) & candidates
    return weight_read - other_read


def _check_names(graph: onnx.GraphProto) -> None:
    """Refuse names that are not valid UTF-8 (protobuf hands them over as bytes)."""

    def bad(where: str, value: Any) -> ModelLoadError:
        return ModelLoadError(
            f"graph {graph.name!r}: {where} {value!r} is not valid UTF-8; "
            "the file is corrupt or was not written by an ONNX exporter"
        )

    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        if not isinstance(value.name, str):
            raise bad("the name", value.name)
    for node in graph.node:
        for what, text in (
            ("the op type", node.op_type),
            ("the domain", node.domain),
            ("the node name", node.name),
        ):
            if not isinstance(text, str):
                raise bad(what, text)
        for name in (*node.input, *node.output):
            if not isinstance(name, str):
                raise bad(f"a tensor name of node {node.name!r}", name)


def sparse_to_dense(sparse: onnx.SparseTensorProto, base_dir: Path | None) -> np.ndarray:
    """The dense array of a sparse initializer; indices are checked against its shape.

    Example:
        >>> from onnx import helper, numpy_helper
        >>> values = numpy_helper.from_array(np.array([5.0, 7.0], np.float32), "s")
        >>> indices = numpy_helper.from_array(np.array([1, 3], np.int64), "s_indices")
        >>> sparse_to_dense(helper.make_sparse_tensor(values, indices, [2, 2]), None).tolist()
        [[0.0, 5.0], [0.0, 7.0]]
    """
    name = sparse.values.name
    values = tensor_to_numpy(sparse.values, base_dir)
    indices = tensor_to_numpy(sparse.indices, base_dir)
    dims = tuple(int(d) for d in sparse.dims)
    if any(d < 0 for d in dims):
        raise ModelLoadError(
            f"sparse initializer {name!r} has a negative dimension in {list(dims)}"
        )
    if values.ndim != 1 or indices.dtype.kind not in "iu":
        raise ModelLoadError(
            f"sparse initializer {name!r}: values must be 1-D and indices "
            f"integers, got values of shape {list(values.shape)} and indices "
            f"of dtype {indices.dtype}"
        )
    # ONNX allows flat indices [nnz] or coordinates [nnz, rank].
    if indices.shape not in ((values.size,), (values.size, len(dims))):
        raise ModelLoadError(
            f"sparse initializer {name!r}: indices of shape "
            f"{list(indices.shape)} do not fit {values.size} values of a "
            f"tensor of shape {list(dims)}"
        )
    bounds = math.prod(dims) if indices.ndim == 1 else np.array(dims, np.int64)
    if indices.size and (np.any(indices < 0) or np.any(indices >= bounds)):
        raise ModelLoadError(
            f"sparse initializer {name!r} has indices outside its shape {list(dims)}"
        )
    try:
        dense = np.zeros(dims, dtype=values.dtype)
    except (MemoryError, ValueError) as exc:
        raise ModelLoadError(
            f"sparse initializer {name!r} of shape {list(dims)} is too large to make dense: {exc}"
        ) from None
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    return dense


def _topological_order(
    graph: onnx.GraphProto, available: set[str], enclosed: bool = True
) -> list[onnx.NodeProto]:
    """Kahn's algorithm in O(n log n): of the nodes ready, the earliest in the file runs first,
    so the file's order is kept where it is already valid.

    ``enclosed``: a subgraph, whose names not defined inside come from enclosing scopes.
    """
    nodes = list(graph.node)
    ready = set(available) | {""}
    if enclosed:
        ready |= outer_names(graph)
    writer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for out in node.output:
            if not out:
                continue
            if out in writer:
                raise ModelLoadError(
                    f"graph {graph.name!r}: tensor {out!r} is written by two nodes, "
                    f"{node_label(nodes[writer[out]])} and {node_label(node)}; ONNX graphs "
                    "assign each tensor once"
                )
            if out in available:
                raise ModelLoadError(
                    f"graph {graph.name!r}: {node_label(node)} writes {out!r}, which is already "
                    "a graph input or an initializer"
                )
            writer[out] = index
    waiting = [0] * len(nodes)
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        reads = {n for n in node.input if n}
        for sub in subgraphs(node):
            reads |= outer_names(sub)
        for name in reads - ready:
            readers.setdefault(name, []).append(index)
            waiting[index] += 1
    heap = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(heap)
    order: list[onnx.NodeProto] = []
    while heap:
        index = heapq.heappop(heap)
        order.append(nodes[index])
        for out in nodes[index].output:
            for reader in readers.pop(out, ()):
                waiting[reader] -= 1
                if waiting[reader] == 0:
                    heapq.heappush(heap, reader)
    if len(order) < len(nodes):
        stuck = [node for index, node in enumerate(nodes) if waiting[index]]
        unknown = sorted(name for name in readers if name not in writer)
        detail = (
            f"these tensors are used but never defined: {unknown[:10]}"
            if unknown
            else "the graph has a cycle"
        )
        raise ModelLoadError(
            f"cannot order the graph {graph.name!r}: {detail} "
            f"(first stuck node: {node_label(stuck[0])})"
        )
    return order


def fuse_quantize_pairs(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Each QuantizeLinear whose output only a DequantizeLinear reads, with that node, as one
    onnx2jax FakeQuantizeLinear node (onnx2jax/ops/fake_quant.py) at the DequantizeLinear's
    place: it runs the two original nodes (its ``quantize`` and ``dequantize`` graphs) and
    gives the pair a straight-through gradient, where the integer between them gives zero.
    Both outputs keep their names; the saved model is the original proto, pairs included.

    Example:
        >>> from onnx import helper
        >>> pair = [
        ...     helper.make_node("QuantizeLinear", ["w", "s"], ["q"]),
        ...     helper.make_node("DequantizeLinear", ["q", "s"], ["y"]),
        ... ]
        >>> [(n.op_type, list(n.output)) for n in fuse_quantize_pairs(pair)]
        [('FakeQuantizeLinear', ['q', 'y'])]
    """
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        reads = {n for n in node.input if n}
        for sub in subgraphs(node):
            reads |= outer_names(sub)
        for name in reads:
            readers.setdefault(name, []).append(index)
    fused: dict[int, onnx.NodeProto] = {}
    absorbed: set[int] = set()
    for index, node in enumerate(nodes):
        if node.op_type != "QuantizeLinear" or canonical_domain(node.domain) != "":
            continue
        found = readers.get(node.output[0], []) if node.output else []
        if len(found) != 1:
            continue
        pair = nodes[found[0]]
        if pair.op_type != "DequantizeLinear" or canonical_domain(pair.domain) != "":
            continue
        if pair.input[0] != node.output[0] or not pair.output:
            continue
        q_inputs = [*node.input, "", ""][:3]
        dq_inputs = [*pair.input[1:], ""][:2]
        fused[found[0]] = onnx.helper.make_node(
            "FakeQuantizeLinear",
            [*q_inputs, *dq_inputs],
            [node.output[0], *pair.output[:1]],
            name=node.name or pair.name,
            domain=ONNX2JAX,
            quantize=_one_node_graph(node),
            dequantize=_one_node_graph(pair),
        )
        absorbed.add(index)
    return [fused.get(i, node) for i, node in enumerate(nodes) if i not in absorbed]


def _one_node_graph(node: onnx.NodeProto) -> onnx.GraphProto:
    """A graph of ``node`` alone, its present inputs the graph's inputs in order."""
    return onnx.helper.make_graph(
        [node],
        f"{node.op_type} {node.name}",
        [onnx.helper.make_empty_tensor_value_info(n) for n in node.input if n],
        [onnx.helper.make_empty_tensor_value_info(node.output[0])],
    )


def find_unsupported(graph: onnx.GraphProto, opsets: dict[str, int]) -> None:
    """Raise :class:`UnsupportedOpError` listing every op of ``graph`` (and subgraphs) we lack."""
    missing: dict[tuple[str, str, int], list[str]] = {}

    def visit(g: onnx.GraphProto) -> None:
        _check_names(g)
        for node in g.node:
            domain = canonical_domain(node.domain)
            opset = opsets.get(domain, 1)
            if lookup(domain, node.op_type, opset) is None:
                missing.setdefault((domain, node.op_type, opset), []).append(
                    node.name or next((o for o in node.output if o), "<unnamed>")
                )
            for sub in subgraphs(node):
                visit(sub)

    visit(graph)
    if missing:
        raise UnsupportedOpError(missing)


def model_opsets(model: onnx.ModelProto) -> dict[str, int]:
    opsets = {canonical_domain(o.domain): o.version for o in model.opset_import}
    if not model.opset_import:
        opsets[""] = 1
    return opsets
