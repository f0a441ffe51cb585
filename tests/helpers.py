"""Building small ONNX models and comparing onnx2jax with onnxruntime or the reference evaluator."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import onnx
from onnx import helper

import onnx2jax
from onnx2jax.core.dtypes import onnx_elem_type


def single_node_model(
    op_type: str,
    inputs: Mapping[str, np.ndarray | None],
    outputs: Sequence[str] = ("y",),
    opset: int = 21,
    domain: str = "",
    initializers: Mapping[str, np.ndarray] | None = None,
    **attributes: Any,
) -> onnx.ModelProto:
    """A model of one node; ``inputs`` with value None become empty (absent) optional inputs."""
    initializers = dict(initializers or {})
    node = helper.make_node(
        op_type,
        [n if v is not None or n in initializers else "" for n, v in inputs.items()],
        list(outputs),
        domain=domain,
        **attributes,
    )
    graph_inputs = [
        helper.make_tensor_value_info(name, onnx_elem_type(value.dtype), value.shape)
        for name, value in inputs.items()
        if value is not None and name not in initializers
    ]
    graph_outputs = [helper.make_value_info(name, onnx.TypeProto()) for name in outputs]
    graph = helper.make_graph(
        [node],
        f"{op_type.lower()}_test",
        graph_inputs,
        graph_outputs,
        initializer=[onnx.numpy_helper.from_array(v, n) for n, v in initializers.items()],
    )
    opsets = [helper.make_opsetid("", opset)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def feeds_of(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray | None]) -> dict:
    graph_inputs = {v.name for v in model.graph.input}
    return {k: v for k, v in inputs.items() if v is not None and k in graph_inputs}


def run_onnx2jax(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], jit: bool = True, x64: bool = True
) -> list[np.ndarray]:
    with jax.enable_x64(x64):
        compiled = onnx2jax.load(model)
        out = compiled(**feeds) if jit else compiled.apply(compiled.params, **feeds)
        return [np.asarray(out[name]) for name in compiled.output_names]


def run_reference(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], engine: str = "onnxruntime"
) -> list[np.ndarray]:
    if engine == "onnxruntime":
        import onnxruntime

        session = onnxruntime.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        return session.run(None, dict(feeds))
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, dict(feeds))


def assert_matches_reference(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    engine: str = "onnxruntime",
    rtol: float = 1e-5,
    atol: float = 1e-6,
    jit: bool = True,
) -> list[np.ndarray]:
    """Run both and compare every output (dtype, shape, values); return onnx2jax's outputs."""
    expected = run_reference(model, feeds, engine)
    actual = run_onnx2jax(model, feeds, jit=jit)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        want = np.asarray(want)
        assert got.shape == want.shape, (got.shape, want.shape)
        assert got.dtype == want.dtype, (got.dtype, want.dtype)
        np.testing.assert_allclose(
            got.astype(np.float64) if got.dtype.kind == "f" else got, want, rtol=rtol, atol=atol
        )
    return actual


_RNG = np.random.default_rng(0)


def f32(*shape: int) -> np.ndarray:
    """Standard-normal float32 test data of ``shape``."""
    return _RNG.normal(size=shape).astype(np.float32)
