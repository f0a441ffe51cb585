"""Weights kept in the layouts ``model(...)``'s program reads, and back.

The program keeps some weights in another layout between calls so that no weight is
rearranged per call: Conv weights transposed to the layout XLA's CPU convolution reads
(OIHW -> HWIO; the trace transposes them back and XLA cancels the pair), and, with native
kernels, the layouts those kernels read (onnx2jax/native/layouts.py), which the native nodes
take as inputs of their own (onnx2jax/runtime/fusion.py). A QDQ model's weights, computed by
DequantizeLinear nodes from integers fixed between calls, are dequantized here once
(:func:`dequantized_weight`, the op's own arithmetic) where a native kernel reads them. Values
are unchanged; ``model.apply`` is unaffected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import onnx

from onnx2jax import native
from onnx2jax.core.graph import GraphPlan
from onnx2jax.native import layouts as native_layouts
from onnx2jax.ops.registry import MS

# A prepared weight's layout: a permutation of a Conv's OIHW..., or one of the native kernels'
# (onnx2jax.native.layouts: "blocked", "winograd", "blocked_matrix").
Layout = tuple[int, ...] | str


def prepared_weight(value: Any, layout: Layout) -> Any:
    """``value`` in ``layout`` (see Engine.layouts); by NumPy when it is in host memory. An XLA
    transpose per weight shape is a compilation each, far slower than NumPy's on ResNet-50's
    53 Conv weights (benchmarks/LOG.md)."""

    def arrange(array: Any) -> Any:
        if isinstance(layout, str):
            return native_layouts.prepare(array, layout)
        return array.transpose(layout)

    if not isinstance(value, jax.Array):
        return jnp.asarray(np.ascontiguousarray(arrange(np.asarray(value))))
    (device, *others) = value.devices()
    if device.platform == "cpu" and not others:
        return jax.device_put(np.ascontiguousarray(arrange(np.asarray(value))), device)
    return arrange(value)


def restored_weight(value: Any, layout: Layout, shape: Sequence[int]) -> Any:
    """``value`` of ``layout`` (prepared_weight's) back as the param of ``shape``."""
    if isinstance(layout, str):
        return native_layouts.restore(jnp.asarray(value), layout, shape)
    return jnp.transpose(value, np.argsort(layout))


def conv_weight_layouts(
    nodes: Sequence[onnx.NodeProto], params: Mapping[str, Any]
) -> dict[str, tuple[int, ...]]:
    """Params used as the weight of an ai.onnx Conv, with the permutation OIHW... -> HW...IO."""
    layouts = {}
    for node in nodes:
        if node.op_type == "Conv" and node.domain in ("", "ai.onnx") and len(node.input) > 1:
            weight = params.get(node.input[1])
            if weight is not None and weight.ndim >= 3:
                layouts[node.input[1]] = (*range(2, weight.ndim), 1, 0)
    return layouts


def native_weight_kinds(plan: GraphPlan, params: Mapping[str, Any]) -> dict[str, str]:
    """Float32 params that native kernels read, and how: "conv" (the weights of 2-D Convs, of
    one group unless oneDNN computes them, and of FusedConvs with a ReLU or no activation) or
    "matrix" (the right operand of MatMul, or of Gemm without transposes or alpha). A param
    with any other use (subgraphs included) is left out: a prepared weight would be laid out
    again on every call."""
    kinds: dict[str, str] = {}
    other = set()
    for node, reads in zip(plan.nodes, plan.node_reads, strict=True):
        # node_reads lists the node's inputs, then the names its subgraphs capture.
        other.update(reads[sum(1 for n in node.input if n) :])
        attributes = {a.name: a for a in node.attribute}
        for index, name in enumerate(node.input):
            if name not in params:
                continue
            weight = params[name]
            kind = None
            conv = (node.op_type == "Conv" and node.domain in ("", "ai.onnx")) or (
                node.op_type == "FusedConv"
                and node.domain == MS
                and attributes.get("activation", onnx.AttributeProto(s=b"")).s in (b"", b"Relu")
            )
            if (
                index == 1
                and weight.dtype == np.float32
                and (conv or node.domain in ("", "ai.onnx"))
            ):
                group = attributes.get("group", onnx.AttributeProto(i=1)).i
                # Grouped Convs only where oneDNN computes them (asked only for those).
                if conv and weight.ndim == 4 and (group == 1 or native.backend("conv") == "onednn"):
                    kind = "conv"
                elif weight.ndim == 2 and (
                    node.op_type == "MatMul"
                    or (
                        node.op_type == "Gemm"
                        and not any(
                            attributes[a].i for a in ("transA", "transB") if a in attributes
                        )
                        and attributes.get("alpha", onnx.AttributeProto(f=1.0)).f == 1.0
                    )
                ):
                    kind = "matrix"
            if kind is None or kinds.get(name, kind) != kind:
                other.add(name)
            else:
                kinds[name] = kind
    return {name: kind for name, kind in kinds.items() if name not in other}


class Dequantized(NamedTuple):
    """A weight that a DequantizeLinear computes from values fixed between calls: the names of
    its integer ``quantized`` tensor, ``scale`` and ``zero_point`` ("" if none), params or
    constants, the ``axis`` a 1-D scale runs along, and the float32 weight's ``shape``."""

    quantized: str
    scale: str
    zero_point: str
    axis: int
    shape: tuple[int, ...]


def dequantized_weights(plan: GraphPlan, params: Mapping[str, Any]) -> dict[str, Dequantized]:
    """The outputs of ai.onnx DequantizeLinear nodes that ``model(...)``'s program may compute
    once, between calls, as float32 weights (:func:`dequantized_weight`): an integer tensor
    (a frozen param or a constant) dequantized per tensor or per axis (no blocks) by a float32
    scale and an integer zero point, each a param or a constant. Whether a native kernel reads
    one as its weight is :func:`native_weight_kinds`' question."""
    found: dict[str, Dequantized] = {}

    def value(name: str) -> Any:
        return params[name] if name in params else plan.constants.get(name)

    for node in plan.nodes:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        inputs = list(node.input) + [""] * (3 - len(node.input))
        x, scale = value(inputs[0]), value(inputs[1])
        zero_point = value(inputs[2]) if inputs[2] else None
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (
            x is None
            or scale is None
            or (inputs[2] and zero_point is None)
            or not node.output[0]
            or np.dtype(x.dtype).kind not in "iu"
            or np.dtype(scale.dtype) != np.float32
            or (zero_point is not None and np.dtype(zero_point.dtype).kind not in "iu")
            or attributes.get("block_size", 0)
            or attributes.get("output_dtype", 0) not in (0, onnx.TensorProto.FLOAT)
        ):
            continue
        shape = tuple(int(d) for d in np.shape(x))
        axis = int(attributes.get("axis", 1))
        axis = axis + len(shape) if axis < 0 else axis
        if all(_per_axis_size(v, shape, axis) is not None for v in (scale, zero_point)):
            found[node.output[0]] = Dequantized(inputs[0], inputs[1], inputs[2], axis, shape)
    return found


def _per_axis_size(value: Any, shape: tuple[int, ...], axis: int) -> int | None:
    """How many values of a scale or zero point run along ``axis`` of a tensor of ``shape``
    (1: per tensor), or None where DequantizeLinear would not take it without blocks."""
    if value is None or np.size(value) == 1:
        return 1
    if np.ndim(value) == 1 and 0 <= axis < len(shape) and np.shape(value)[0] == shape[axis]:
        return shape[axis]
    return None


def dequantized_weight(weight: Dequantized, values: Mapping[str, Any]) -> np.ndarray:
    """The float32 value of ``weight`` from the ``values`` of its inputs: ``(q - zero_point) *
    scale`` in float32, the scale and zero point along ``weight.axis``, as DequantizeLinear
    computes it (onnx2jax/ops/quantization.py).

    Example:
        >>> weight = Dequantized("q", "s", "z", 0, (2, 2))
        >>> values = {"q": np.array([[1, 2], [3, 4]], np.int8),
        ...           "s": np.array([0.5, 2.0], np.float32), "z": np.array([1, 0], np.int8)}
        >>> dequantized_weight(weight, values).tolist()
        [[0.0, 0.5], [6.0, 8.0]]
    """

    def along_axis(name: str) -> np.ndarray:
        value = np.asarray(values[name])
        if value.size == 1:
            return value.reshape(())
        dims = [1] * len(weight.shape)
        dims[weight.axis] = value.shape[0]
        return value.reshape(dims)

    y = np.asarray(values[weight.quantized]).astype(np.float32)
    if weight.zero_point:
        y = y - along_axis(weight.zero_point).astype(np.float32)
    return (y * along_axis(weight.scale).astype(np.float32)).astype(np.float32)


def winograd_candidates(
    nodes: Sequence[onnx.NodeProto], native_weights: Mapping[str, str]
) -> set[str]:
    """The "conv" ``native_weights`` that only 3x3 Convs of stride and dilation 1 read."""
    candidates, other = set(), set()
    for node in nodes:
        if len(node.input) < 2 or native_weights.get(node.input[1]) != "conv":
            continue
        attributes = {a.name: list(a.ints) for a in node.attribute}
        if (
            list(attributes.get("kernel_shape", [3, 3])) == [3, 3]
            and all(v == 1 for v in attributes.get("strides", []))
            and all(v == 1 for v in attributes.get("dilations", []))
        ):
            candidates.add(node.input[1])
        else:
            other.add(node.input[1])
    return candidates - other
