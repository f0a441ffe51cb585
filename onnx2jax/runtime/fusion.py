"""Graph rewrites for the program ``model(...)`` compiles with native kernels.

A Conv followed by a residual Add and a ReLU (ResNet's blocks), or by one of them, becomes one
com.microsoft FusedConv node, which the native kernel computes in one pass. Run as separate
XLA ops, the Add and the ReLU each read and wrote the whole activation again, a large share of
ResNet-50's time (benchmarks/LOG.md).

Attention as exported (MatMul, scale, mask, Softmax, MatMul) becomes one onnx2jax
SoftmaxAttention node, which the native kernel computes a few query rows at a time without
writing the scores out (onnx2jax/native/kernels/attention.cc).

Then every node a kernel computes becomes an explicit onnx2jax node (:func:`native_nodes`):
NativeConv, NativeMatMul, NativeAttention, NativeMatMulNBits (onnx2jax/ops/native_calls.py),
whose inputs include the weights in the layout the kernel reads, a graph value of their own
that the engine feeds from its prepared params (MatMulNBits' packed weight is read as
stored). A convolution weight that a DequantizeLinear computes from fixed integers (a QDQ
model's) is one of those prepared params too: its node leaves the plan
(:func:`prepared_dequantizations`). The rewritten plan says what runs natively; no op looks at
any other state.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Collection, Mapping
from typing import NamedTuple

import onnx

from onnx2jax import native as kernels
from onnx2jax.core.graph import GraphPlan
from onnx2jax.native import layouts
from onnx2jax.ops.native_calls import PRECISION
from onnx2jax.ops.registry import MS, ONNX2JAX, canonical_domain, lookup


class NativeInput(NamedTuple):
    """A weight as a native node reads it: the graph value that holds it, in ``layout``
    (onnx2jax.native.layouts), and its ONNX ``shape``."""

    value: str
    layout: str
    shape: tuple[int, ...]


def _is(node: onnx.NodeProto, op_type: str) -> bool:
    return node.op_type == op_type and canonical_domain(node.domain) == ""


class _Rewrite:
    """Chains of a plan's nodes, each to be replaced by one node."""

    def __init__(self, plan: GraphPlan, keep: Collection[str]):
        self.plan = plan
        self.readers: dict[str, list[int]] = defaultdict(list)
        for index, reads in enumerate(plan.node_reads):
            for name in reads:
                self.readers[name].append(index)
        self.kept = set(keep) | {v.name for v in plan.outputs}
        self.fused_at: dict[int, onnx.NodeProto] = {}  # a chain's last node -> its replacement
        self.absorbed: set[int] = set()

    def sole_reader(self, name: str) -> int | None:
        """The node that alone reads ``name``, unless it is in a chain already or ``name``
        must be kept."""
        found = self.readers.get(name, [])
        free = len(found) == 1 and found[0] not in self.absorbed and found[0] not in self.fused_at
        return found[0] if free and name not in self.kept else None

    def next_if(self, name: str, op_type: str) -> int | None:
        """The sole reader of ``name`` if it is an ``op_type`` node."""
        reader = self.sole_reader(name)
        return reader if reader is not None and _is(self.plan.nodes[reader], op_type) else None

    def replace(self, chain: list[int], node: onnx.NodeProto) -> None:
        self.fused_at[chain[-1]] = node
        self.absorbed.update(chain[:-1])

    def result(self) -> GraphPlan:
        plan = self.plan
        if not self.fused_at:
            return plan
        nodes, specs, node_reads = [], [], []
        for index, node in enumerate(plan.nodes):
            if index in self.absorbed:
                continue
            if index in self.fused_at:
                node = self.fused_at[index]
                nodes.append(node)
                specs.append(lookup(node.domain, node.op_type, 1))
                node_reads.append([n for n in node.input if n])
            else:
                nodes.append(node)
                specs.append(plan.specs[index])
                node_reads.append(plan.node_reads[index])
        producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
        return dataclasses.replace(
            plan, nodes=nodes, specs=specs, node_reads=node_reads, producer=producer
        )


def fuse(
    plan: GraphPlan,
    kinds: Collection[str],
    keep: Collection[str] = (),
    native_inputs: Mapping[str, NativeInput] | None = None,
    precision: str = PRECISION,
) -> GraphPlan:
    """``plan`` rewritten for these kinds of native kernels (onnx2jax.native.KINDS): Conv
    epilogues fused for "conv", attention chains as one node for "attention", then the nodes
    the kernels compute as native nodes (:func:`native_nodes`). Kinds that no backend computes
    on this machine (:func:`onnx2jax.native.backend`) are left to XLA."""
    kinds = {kind for kind in kinds if kernels.backend(kind) is not None}
    if "conv" in kinds:
        plan = fuse_conv_epilogues(plan, keep)
    if "attention" in kinds:
        plan = fuse_attention(plan, keep)
    return native_nodes(plan, kinds, native_inputs or {}, precision)


def native_nodes(
    plan: GraphPlan,
    kinds: Collection[str],
    native_inputs: Mapping[str, NativeInput],
    precision: str = PRECISION,
) -> GraphPlan:
    """``plan`` with each node these kinds of native kernels compute replaced by its native
    node, which reads the weights in the kernel's layout:

    - "conv": a Conv, or a FusedConv with a ReLU or no activation, whose weight is in
      ``native_inputs`` with a Conv layout -> NativeConv, naming the backend that computes it
      here (onnx2jax.native.backend: the hand-written kernels or oneDNN);
    - "matrix": a MatMul, or a Gemm (its weight is only there without transposes or alpha),
      whose weight is in ``native_inputs`` with a matrix layout -> NativeMatMul;
    - "attention": a SoftmaxAttention -> NativeAttention;
    - "nbits": a com.microsoft MatMulNBits of 4 bits without g_idx -> NativeMatMulNBits (the
      same inputs and attributes: the kernel reads the packed weight as stored).

    ``native_inputs`` maps a weight's name to the value that holds it in the kernel's layout
    (:class:`NativeInput`). The kernels compute float32
    products: under another ``precision`` (Model.precision) matrix products, attention and
    MatMulNBits are left to XLA.

    Example:
        >>> from onnx import helper, TensorProto
        >>> import numpy as np, onnx2jax
        >>> from onnx2jax.runtime.fusion import NativeInput, native_nodes
        >>> f = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        >>> w = onnx.numpy_helper.from_array(np.ones((4, 16), np.float32), "w")
        >>> graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        ...                           [f("x")], [f("y")], initializer=[w])
        >>> plan = onnx2jax.load(helper.make_model(graph)).plan
        >>> weights = {"w": NativeInput("w", "matrix", (4, 16))}
        >>> node = native_nodes(plan, {"matrix"}, weights).nodes[0]
        >>> node.op_type, list(node.input)
        ('NativeMatMul', ['x', 'w'])
    """
    products = precision == PRECISION
    nodes, specs, node_reads = list(plan.nodes), list(plan.specs), list(plan.node_reads)
    changed = False
    for index, node in enumerate(plan.nodes):
        native = None
        weight = native_inputs.get(node.input[1]) if len(node.input) > 1 else None
        if "conv" in kinds and weight is not None and weight.layout in layouts.CONV_LAYOUTS:
            native = _native_conv(node, weight)
        elif (
            "matrix" in kinds
            and products
            and weight is not None
            and weight.layout in layouts.MATRIX_LAYOUTS
            and (_is(node, "MatMul") or _is(node, "Gemm"))
        ):
            native = _native_matmul(node, weight)
        elif (
            "attention" in kinds
            and products
            and node.op_type == "SoftmaxAttention"
            and node.domain == ONNX2JAX
            and _attribute(node, "cast_to", 0) in (0, onnx.TensorProto.FLOAT)
        ):
            native = onnx.NodeProto()
            native.CopyFrom(node)
            native.op_type = "NativeAttention"
            native.attribute.append(onnx.helper.make_attribute("precision", precision))
        elif "nbits" in kinds and products and _nbits_applies(node):
            native = onnx.NodeProto()
            native.CopyFrom(node)
            native.op_type = "NativeMatMulNBits"
            native.domain = ONNX2JAX
        if native is not None:
            nodes[index] = native
            specs[index] = lookup(ONNX2JAX, native.op_type, 1)
            node_reads[index] = [n for n in native.input if n]
            changed = True
    if not changed:
        return plan
    return dataclasses.replace(plan, nodes=nodes, specs=specs, node_reads=node_reads)


def has_nbits_nodes(plan: GraphPlan) -> bool:
    """Whether ``plan`` holds MatMulNBits nodes that the "nbits" kind of :func:`native_nodes`
    rewrites: 4 bits, no g_idx.

    Example:
        >>> from onnx import helper
        >>> import onnx2jax
        >>> node = helper.make_node("Relu", ["x"], ["y"])
        >>> f = lambda name: helper.make_tensor_value_info(name, 1, None)
        >>> graph = helper.make_graph([node], "g", [f("x")], [f("y")])
        >>> has_nbits_nodes(onnx2jax.load(helper.make_model(graph)).plan)
        False
    """
    return any(_nbits_applies(node) for node in plan.nodes)


def _nbits_applies(node: onnx.NodeProto) -> bool:
    """A com.microsoft MatMulNBits of 4 bits without g_idx (the native kernel's case)."""
    return (
        node.op_type == "MatMulNBits"
        and node.domain == MS
        and _attribute(node, "bits", 4) == 4
        and (len(node.input) < 5 or not node.input[4])
    )


def _native_conv(node: onnx.NodeProto, weight: NativeInput) -> onnx.NodeProto | None:
    """The NativeConv of a Conv or FusedConv node, reading ``weight``."""
    fused = node.op_type == "FusedConv" and node.domain == MS
    activation = _attribute(node, "activation", b"")
    if not (_is(node, "Conv") or (fused and activation in (b"", b"Relu"))):
        return None
    inputs = list(node.input) + [""] * (4 - len(node.input))
    inputs[1] = weight.value
    native = onnx.helper.make_node(
        "NativeConv",
        inputs,
        list(node.output),
        name=node.name,
        domain=ONNX2JAX,
        layout=weight.layout,
        relu=int(activation == b"Relu"),
        backend=kernels.backend("conv") or "native",
    )
    native.attribute.extend(
        a for a in node.attribute if a.name not in ("activation", "activation_params")
    )
    return native


def _native_matmul(node: onnx.NodeProto, weight: NativeInput) -> onnx.NodeProto:
    """The NativeMatMul of a MatMul or Gemm node, reading ``weight`` [K, N]."""
    return onnx.helper.make_node(
        "NativeMatMul",
        [node.input[0], weight.value, *node.input[2:3]],
        list(node.output),
        name=node.name,
        domain=ONNX2JAX,
        layout=weight.layout,
        columns=int(weight.shape[1]),
        beta=float(_attribute(node, "beta", 1.0)),
        precision=PRECISION,
    )


def prepared_dequantizations(plan: GraphPlan, names: Collection[str]) -> GraphPlan:
    """``plan`` without the DequantizeLinear nodes that compute ``names``: weights the engine
    dequantizes once, between calls, and feeds to the program as prepared params
    (onnx2jax.runtime.layouts.dequantized_weights).

    Example:
        >>> from onnx import helper, TensorProto
        >>> import numpy as np, onnx2jax
        >>> from onnx2jax.runtime.fusion import prepared_dequantizations
        >>> f = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        >>> q = onnx.numpy_helper.from_array(np.ones((4, 16), np.int8), "q")
        >>> s = onnx.numpy_helper.from_array(np.float32(0.5), "s")
        >>> nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"]),
        ...          helper.make_node("MatMul", ["x", "w"], ["y"])]
        >>> graph = helper.make_graph(nodes, "g", [f("x")], [f("y")], initializer=[q, s])
        >>> plan = onnx2jax.load(helper.make_model(graph)).plan
        >>> [n.op_type for n in prepared_dequantizations(plan, {"w"}).nodes]
        ['MatMul']
    """
    names = set(names)
    dropped = {
        index
        for index, node in enumerate(plan.nodes)
        if _is(node, "DequantizeLinear") and node.output[0] in names
    }
    if not dropped:
        return plan
    kept = [index for index in range(len(plan.nodes)) if index not in dropped]
    nodes = [plan.nodes[index] for index in kept]
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    return dataclasses.replace(
        plan,
        nodes=nodes,
        specs=[plan.specs[index] for index in kept],
        node_reads=[plan.node_reads[index] for index in kept],
        producer=producer,
    )


def fuse_conv_epilogues(plan: GraphPlan, keep: Collection[str] = ()) -> GraphPlan:
    """``plan`` with every Conv -> Add -> Relu, Conv -> Add and Conv -> Relu chain as one
    FusedConv node, where the intermediate tensors are read by the chain alone and are neither
    graph outputs nor in ``keep`` (outputs asked for by name).

    Example:
        >>> import onnx2jax
        >>> from onnx2jax.runtime.fusion import fuse_conv_epilogues
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> [n.op_type for n in model.plan.nodes][:3]
        ['Conv', 'Relu', 'MaxPool']
        >>> [n.op_type for n in fuse_conv_epilogues(model.plan).nodes][:2]
        ['FusedConv', 'MaxPool']
    """
    rewrite = _Rewrite(plan, keep)
    for index, node in enumerate(plan.nodes):
        if not _is(node, "Conv") or len(node.output) != 1:
            continue
        chain, residual, relu = [index], None, False
        add = rewrite.next_if(node.output[0], "Add")
        if add is not None:
            others = [n for n in plan.nodes[add].input if n != node.output[0]]
            if len(others) == 1 and others[0]:
                residual = others[0]
                chain.append(add)
        relu_at = rewrite.next_if(plan.nodes[chain[-1]].output[0], "Relu")
        if relu_at is not None:
            chain.append(relu_at)
            relu = True
        if len(chain) == 1:
            continue
        fused = onnx.NodeProto()
        fused.CopyFrom(node)
        fused.op_type, fused.domain = "FusedConv", MS
        inputs = list(node.input) + [""] * (3 - len(node.input))
        fused.ClearField("input")
        fused.input.extend(inputs + [residual] if residual else inputs)
        fused.ClearField("output")
        fused.output.append(plan.nodes[chain[-1]].output[0])
        if relu:
            fused.attribute.append(onnx.helper.make_attribute("activation", "Relu"))
        rewrite.replace(chain, fused)
    return rewrite.result()


def fuse_attention(plan: GraphPlan, keep: Collection[str] = ()) -> GraphPlan:
    """``plan`` with every MatMul -> [Mul or Div by a scale] -> [Add a mask] -> Softmax over
    the last axis -> [Casts to float] -> MatMul chain (attention as torch.onnx exports it) as
    one onnx2jax SoftmaxAttention node, where the intermediate tensors are read by the chain
    alone and are neither graph outputs nor in ``keep``.

    Example:
        >>> from onnx import helper, TensorProto
        >>> import onnx2jax
        >>> from onnx2jax.runtime.fusion import fuse_attention
        >>> f = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        >>> nodes = [helper.make_node("MatMul", ["q", "kt"], ["s"]),
        ...          helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        ...          helper.make_node("MatMul", ["p", "v"], ["out"])]
        >>> graph = helper.make_graph(nodes, "g", [f("q"), f("kt"), f("v")], [f("out")])
        >>> model = onnx2jax.load(helper.make_model(graph))
        >>> [n.op_type for n in fuse_attention(model.plan).nodes]
        ['SoftmaxAttention']
    """
    rewrite = _Rewrite(plan, keep)
    for index, node in enumerate(plan.nodes):
        if not _is(node, "MatMul") or len(node.input) != 2:
            continue
        chain, scale, divide, mask, cast_to = [index], "", 0, "", 0
        at = node.output[0]
        scaled = rewrite.sole_reader(at)
        if scaled is not None and (
            _is(plan.nodes[scaled], "Mul") or _is(plan.nodes[scaled], "Div")
        ):
            inputs = list(plan.nodes[scaled].input)
            divide = int(plan.nodes[scaled].op_type == "Div")
            if len(inputs) == 2 and inputs.count(at) == 1 and (not divide or inputs[0] == at):
                scale = inputs[1 - inputs.index(at)]
                chain.append(scaled)
                at = plan.nodes[scaled].output[0]
        add = rewrite.next_if(at, "Add")
        if (
            add is not None
            and len(plan.nodes[add].input) == 2
            and list(plan.nodes[add].input).count(at) == 1
        ):
            inputs = list(plan.nodes[add].input)
            mask = inputs[1 - inputs.index(at)]
            chain.append(add)
            at = plan.nodes[add].output[0]
        softmax = rewrite.next_if(at, "Softmax")
        # Softmax before opset 13 flattens at `axis` (default 1): the same over the last one.
        legacy = softmax is not None and plan.specs[softmax].since < 13
        if softmax is None or _attribute(plan.nodes[softmax], "axis", 1 if legacy else -1) != -1:
            continue
        chain.append(softmax)
        at = plan.nodes[softmax].output[0]
        # ViT's export casts twice: a second Cast to the same type changes nothing.
        while (cast := rewrite.next_if(at, "Cast")) is not None and _attribute(
            plan.nodes[cast], "to", 0
        ) == onnx.TensorProto.FLOAT:
            chain.append(cast)
            at = plan.nodes[cast].output[0]
            cast_to = onnx.TensorProto.FLOAT
        product = rewrite.next_if(at, "MatMul")
        if product is None or list(plan.nodes[product].input)[0] != at:
            continue
        chain.append(product)
        fused = onnx.helper.make_node(
            "SoftmaxAttention",
            [node.input[0], node.input[1], plan.nodes[product].input[1], mask, scale],
            [plan.nodes[product].output[0]],
            name=f"{node.name or 'MatMul'}/SoftmaxAttention",
            domain=ONNX2JAX,
            divide=divide,
            cast_to=cast_to,
        )
        rewrite.replace(chain, fused)
    return rewrite.result()


def _attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default
