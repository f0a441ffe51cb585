"""Graph rewrites for the program ``model(...)`` compiles with native kernels.

A Conv followed by a residual Add and a ReLU (ResNet's blocks), or by one of them, becomes one
com.microsoft FusedConv node, which the native kernel computes in one pass
(onnx2jax/native.py). Run as separate XLA ops, the Add and the ReLU each read and wrote the
whole activation again: at ResNet-50 b8 that was about 90 ms of XLA's 240 ms of thread time.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Collection

import onnx

from onnx2jax.graph import GraphPlan
from onnx2jax.ops.contrib import MS
from onnx2jax.ops.registry import canonical_domain, lookup


def _is(node: onnx.NodeProto, op_type: str) -> bool:
    return node.op_type == op_type and canonical_domain(node.domain) == ""


def fuse_conv_epilogues(plan: GraphPlan, keep: Collection[str] = ()) -> GraphPlan:
    """``plan`` with every Conv -> Add -> Relu, Conv -> Add and Conv -> Relu chain as one
    FusedConv node, where the intermediate tensors are read by the chain alone and are neither
    graph outputs nor in ``keep`` (outputs asked for by name).

    Example:
        >>> import onnx2jax
        >>> from onnx2jax.fusion import fuse_conv_epilogues
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> [n.op_type for n in model.plan.nodes][:3]
        ['Conv', 'Relu', 'MaxPool']
        >>> [n.op_type for n in fuse_conv_epilogues(model.plan).nodes][:2]
        ['FusedConv', 'MaxPool']
    """
    readers: dict[str, list[int]] = defaultdict(list)
    for index, reads in enumerate(plan.node_reads):
        for name in reads:
            readers[name].append(index)
    kept = set(keep) | {v.name for v in plan.outputs}

    fused_at: dict[int, onnx.NodeProto] = {}  # index of a chain's last node -> its FusedConv
    absorbed: set[int] = set()

    def sole_reader(name: str) -> int | None:
        """The node that alone reads ``name``, unless it is in a chain already."""
        found = readers.get(name, [])
        free = len(found) == 1 and found[0] not in absorbed and found[0] not in fused_at
        return found[0] if free and name not in kept else None

    for index, node in enumerate(plan.nodes):
        if not _is(node, "Conv") or len(node.output) != 1:
            continue
        chain, residual, relu = [index], None, False
        reader = sole_reader(node.output[0])
        if reader is not None and _is(plan.nodes[reader], "Add"):
            others = [n for n in plan.nodes[reader].input if n != node.output[0]]
            if len(others) == 1 and others[0]:
                residual = others[0]
                chain.append(reader)
                reader = sole_reader(plan.nodes[reader].output[0])
            else:
                reader = None
        if reader is not None and _is(plan.nodes[reader], "Relu"):
            chain.append(reader)
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
        fused_at[chain[-1]] = fused
        absorbed.update(chain[:-1])
    if not fused_at:
        return plan

    spec = lookup(MS, "FusedConv", 1)
    nodes, specs, node_reads = [], [], []
    for index, node in enumerate(plan.nodes):
        if index in absorbed:
            continue
        if index in fused_at:
            node = fused_at[index]
            nodes.append(node)
            specs.append(spec)
            node_reads.append([n for n in node.input if n])
        else:
            nodes.append(node)
            specs.append(plan.specs[index])
            node_reads.append(plan.node_reads[index])
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    return dataclasses.replace(plan, nodes=nodes, specs=specs, node_reads=node_reads,
                               producer=producer)
