"""The interpreter: walks a planned graph once per input signature, one op function per node.

Values are *static* (NumPy arrays, computed at trace time) when they depend only on constants
and shapes, and *traced* (JAX arrays) when they depend on inputs or params. Shape arithmetic
therefore folds away before XLA sees it, and ops such as Reshape get concrete arguments.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx

from onnx2jax.core.errors import DataDependentShapeError, OpError
from onnx2jax.core.graph import GraphPlan, node_label, plan_graph
from onnx2jax.core.loader import tensor_to_numpy
from onnx2jax.core.settings import max_static_bytes
from onnx2jax.ops.registry import canonical_domain


def is_static(value: Any) -> bool:
    """True for values known at trace time (NumPy arrays, and sequences of them)."""
    if isinstance(value, np.ndarray | np.generic):
        return True
    if isinstance(value, list):
        return all(is_static(v) for v in value)
    return value is None


def is_concrete(value: Any) -> bool:
    """True when the value can be read on the host (static, or an eager JAX array)."""
    return is_static(value) or (
        isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)
    )


# Ops that read their input's bits, which a float16 value held widened would change.
_BIT_EXACT_OPS = {"BitCast"}
# Outputs typed by the op's stash type (float32 by default), not by its float16 inputs: the
# normalizations' mean and inverse standard deviation.
_STASH_TYPED_OUTPUTS = {
    "LayerNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1,),
    "SkipLayerNormalization": (1, 2),
    "SkipSimplifiedLayerNormalization": (1, 2),
}


def _folded_bytes(value: Any) -> int:
    """The bytes a static array would take materialized (a broadcast view counts in full)."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        return value.size * value.itemsize
    return 0


def _to_xla(value: np.ndarray) -> jax.Array:
    """A static value too large to fold on the host, as a JAX value XLA computes with.

    Broadcast views (zero strides, as Expand and ConstantOfShape leave them) go over as their
    one stored element per broadcast axis plus a broadcast, never materialized on the host.
    """
    stored = value[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in value.strides)]
    return jnp.broadcast_to(jnp.asarray(np.ascontiguousarray(stored)), value.shape)


class OpContext:
    """What an op function knows about its node: attributes, opset, helpers for static values."""

    def __init__(
        self,
        interpreter: Interpreter,
        node: onnx.NodeProto,
        scope: Mapping[str, Any],
        plan: GraphPlan,
    ):
        self.interpreter = interpreter
        self.plan = plan  # the graph being run (the training Gradient op re-runs part of it)
        self.node = node
        self.scope = scope
        self.opset = interpreter.opsets.get(canonical_domain(node.domain), 1)
        self.attrs = interpreter.attributes(node)

    @property
    def name(self) -> str:
        return node_label(self.node)

    @property
    def num_outputs(self) -> int:
        return len(self.node.output)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def has_output(self, index: int) -> bool:
        return index < len(self.node.output) and bool(self.node.output[index])

    def input_name(self, index: int) -> str:
        return self.node.input[index] if index < len(self.node.input) else ""

    def error(self, message: str) -> OpError:
        return OpError(f"{self.name}: {message}")

    def static(self, value: Any, index: int | None = None, what: str = "this input") -> Any:
        """``value`` as a NumPy array (or list of them); raise if it is only known at run time."""
        if is_static(value):
            return value
        if is_concrete(value):
            if isinstance(value, list):
                return [np.asarray(v) for v in value]
            return np.asarray(value)
        if isinstance(value, list):
            return [self.static(v, index, what) for v in value]
        tensor = f" (tensor {self.input_name(index)!r})" if index is not None else ""
        raise DataDependentShapeError(
            f"{self.name} needs the value of {what}{tensor} at trace time, but it depends on the "
            "model's inputs or weights. Under your own jax.jit this cannot work; call the model "
            "directly (model(...)), which runs data-dependent parts outside jit, or make the "
            "value a constant of the graph."
        )

    def static_ints(
        self, value: Any, index: int | None = None, what: str = "this input"
    ) -> list[int]:
        return [int(v) for v in np.asarray(self.static(value, index, what)).reshape(-1)]

    @staticmethod
    def xp(*values: Any) -> ModuleType:
        """NumPy when every value is static, else jax.numpy."""
        return np if all(is_static(v) for v in values) else jnp

    def run_subgraph(self, attr_name: str, inputs: Sequence[Any]) -> list[Any]:
        """Run the graph attribute ``attr_name`` with ``inputs``, reading outer names in scope."""
        graph = self.attrs[attr_name]
        return self.interpreter.run_subgraph(graph, inputs, self.scope)


class Interpreter:
    """Evaluates planned graphs. One instance per model; subgraph plans are cached."""

    def __init__(
        self,
        opsets: Mapping[str, int],
        base_dir: Path | None = None,
        precision: str = "float32",
        widen_float16: bool = False,
    ):
        self.opsets = dict(opsets)
        self.base_dir = base_dir
        self.precision = precision  # see PRECISIONS in onnx2jax/core/model.py
        # float16 values held in float32 between ops (Model.float16_compute), and the names
        # of those seen, whose ONNX type is float16 (outputs go back to it).
        self.widen_float16 = widen_float16
        self.float16_names: set[str] = set()
        # Plans (by id, kept alive) -> the element types ONNX gives their values.
        self._tensor_types: dict[int, tuple[GraphPlan, dict[str, int]]] = {}
        # Keyed by id(); each entry keeps its key object alive so ids are never reused.
        self._subplans: dict[int, tuple[onnx.GraphProto, GraphPlan]] = {}
        self._attrs: dict[int, tuple[onnx.NodeProto, dict[str, Any]]] = {}

    def attributes(self, node: onnx.NodeProto) -> dict[str, Any]:
        cached = self._attrs.get(id(node))
        if cached is None:
            cached = (node, {a.name: self.attribute_value(a) for a in node.attribute})
            self._attrs[id(node)] = cached
        return cached[1]

    def attribute_value(self, attr: onnx.AttributeProto) -> Any:
        kind = attr.type
        if kind == onnx.AttributeProto.TENSOR:
            return tensor_to_numpy(attr.t, self.base_dir)
        if kind == onnx.AttributeProto.TENSORS:
            return [tensor_to_numpy(t, self.base_dir) for t in attr.tensors]
        if kind == onnx.AttributeProto.STRING:
            return attr.s.decode("utf-8", errors="replace")
        if kind == onnx.AttributeProto.STRINGS:
            return [s.decode("utf-8", errors="replace") for s in attr.strings]
        if kind == onnx.AttributeProto.SPARSE_TENSOR:
            return attr.sparse_tensor
        return onnx.helper.get_attribute_value(attr)

    def run(
        self, plan: GraphPlan, env: MutableMapping[str, Any], wanted: Sequence[str]
    ) -> list[Any]:
        """Evaluate the nodes ``wanted`` depends on; ``env`` holds inputs, params, constants."""
        self.run_nodes(plan, env, plan.nodes_for(list(wanted)))
        missing = [n for n in wanted if n not in env]
        if missing:
            raise OpError(f"no tensor named {missing[0]!r} in the graph")
        return [env[n] for n in wanted]

    def run_nodes(
        self, plan: GraphPlan, env: MutableMapping[str, Any], indices: Sequence[int]
    ) -> None:
        """Evaluate the nodes ``plan.nodes[i]`` for ``i`` in ``indices``, in that order."""
        for index in indices:
            node = plan.nodes[index]
            spec = plan.specs[index]
            if spec is None:
                raise OpError(
                    f"{node_label(node)}: {node.domain or 'ai.onnx'}::{node.op_type} "
                    "is not supported"
                )
            args = []
            for name in node.input:
                if not name:
                    args.append(None)
                    continue
                if name not in env:
                    raise OpError(f"{node_label(node)} reads {name!r}, which nothing defines")
                args.append(env[name])
            limit = max_static_bytes()
            args = [_to_xla(arg) if _folded_bytes(arg) > limit else arg for arg in args]
            if self.widen_float16 and node.op_type in _BIT_EXACT_OPS and not node.domain:
                args = [
                    self.narrow(plan, name, arg) for name, arg in zip(node.input, args, strict=True)
                ]
            ctx = OpContext(self, node, env, plan)
            try:
                result = spec.function(ctx, *args)
            except DataDependentShapeError as exc:
                # Outermost plan wins: the segmented runner moves that node out of jit.
                exc.plan, exc.node_index = plan, index
                raise
            except OpError:
                raise
            except Exception as exc:
                raise OpError(f"{node_label(node)} failed: {type(exc).__name__}: {exc}") from exc
            self._store(node, result, env)

    def _store(self, node: onnx.NodeProto, result: Any, env: MutableMapping[str, Any]) -> None:
        results = result if isinstance(result, tuple) else (result,)
        # A float result of an op reading float16 values is float16 in ONNX terms (its inputs'
        # type), though computed in float32; Cast and CastLike say their type themselves.
        if node.op_type == "Cast":
            carries_float16 = False
        elif node.op_type == "CastLike":
            carries_float16 = node.input[1] in self.float16_names
        else:
            carries_float16 = any(n in self.float16_names for n in node.input if n)
        own_type = _STASH_TYPED_OUTPUTS.get(node.op_type, ())
        for index, (name, value) in enumerate(zip(node.output, results, strict=False)):
            if name:
                if isinstance(value, np.generic | int | float | bool):
                    value = np.asarray(value)
                env[name] = self.widen(value, name)
                if (
                    self.widen_float16
                    and carries_float16
                    and index not in own_type
                    and getattr(env[name], "dtype", None) == np.float32
                ):
                    self.float16_names.add(name)

    def narrow(self, plan: GraphPlan, name: str, value: Any) -> Any:
        """``value`` back in float16 if it is held widened and its ONNX type is float16: the
        graph's type where ONNX knows it, else the type it carried while running."""
        if not self.widen_float16 or getattr(value, "dtype", None) != np.float32:
            return value
        typed = self.tensor_types(plan)
        float16 = (
            typed[name] == onnx.TensorProto.FLOAT16
            if name in typed
            else (name in self.float16_names)
        )
        return value.astype(np.float16) if float16 else value

    def tensor_types(self, plan: GraphPlan) -> dict[str, int]:
        """The ONNX element types of ``plan``'s values: declared, else found by ONNX's shape
        inference (an op computing in float32 on widened inputs no longer shows its type)."""
        cached = self._tensor_types.get(id(plan))
        if cached is None:
            typed = {
                info.name: info.elem_type
                for info in (*plan.inputs, *plan.outputs, *plan.value_info.values())
                if info.elem_type
            }
            produced = [out for node in plan.nodes for out in node.output if out]
            if any(name not in typed for name in produced):
                typed.update(
                    (name, elem)
                    for name, elem in self._inferred_types(plan).items()
                    if name not in typed and elem
                )
            cached = self._tensor_types[id(plan)] = (plan, typed)
        return cached[1]

    def _inferred_types(self, plan: GraphPlan) -> dict[str, int]:
        opsets = [
            onnx.helper.make_opsetid(domain, version) for domain, version in self.opsets.items()
        ]
        try:
            model = onnx.helper.make_model(plan.graph, opset_imports=opsets)
            graph = onnx.shape_inference.infer_shapes(model).graph
        except Exception:  # a graph ONNX cannot type: the declared types only
            return {}
        return {
            v.name: v.type.tensor_type.elem_type
            for v in (*graph.value_info, *graph.output)
            if v.type.HasField("tensor_type")
        }

    def widen(self, value: Any, name: str | None = None) -> Any:
        """``value`` in float32 if it is float16 and float16 values are held widened."""
        if not self.widen_float16:
            return value
        if isinstance(value, list):
            return [self.widen(v) for v in value]
        if getattr(value, "dtype", None) == np.float16:
            if name is not None:
                self.float16_names.add(name)
            return value.astype(np.float32)
        return value

    def run_subgraph(
        self, graph: onnx.GraphProto, inputs: Sequence[Any], outer: Mapping[str, Any]
    ) -> list[Any]:
        cached = self._subplans.get(id(graph))
        if cached is None:
            cached = (graph, plan_graph(graph, self.opsets, self.base_dir, trainable=False))
            self._subplans[id(graph)] = cached
        plan = cached[1]
        local: dict[str, Any] = {k: self.widen(v, k) for k, v in plan.constants.items()}
        names = [v.name for v in graph.input]
        if len(inputs) > len(names):
            raise OpError(f"subgraph {graph.name!r} takes {len(names)} inputs, got {len(inputs)}")
        local.update(zip(names, inputs, strict=False))
        env = ChainMap(local, outer)
        return self.run(plan, env, [v.name for v in graph.output])
