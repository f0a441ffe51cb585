"""Hostile graphs: bounded time and memory at load and on the first call, clear errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnx2jax
from onnx2jax.core.errors import ModelLoadError, Onnx2JaxError, UnsupportedOpError

ROOT = Path(__file__).resolve().parents[2]


def run_limited(code: str, memory_gb: float = 4.0, timeout: float = 300) -> str:
    """Run ``code`` in a child process with at most ``memory_gb`` of address space."""
    limited = textwrap.dedent(f"""
        import resource
        limit = int({memory_gb} * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    """) + textwrap.dedent(code)
    done = subprocess.run(
        [sys.executable, "-c", limited], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def chain_model(count: int, reverse: bool = False) -> onnx.ModelProto:
    nodes = [helper.make_node("Neg", [f"t{i}"], [f"t{i + 1}"]) for i in range(count)]
    if reverse:
        nodes.reverse()
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info(f"t{count}", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_graph_stored_in_reverse_order_is_planned_in_linear_time():
    # Quadratic ordering took minutes at this size; the limit is generous on a busy host.
    out = run_limited(
        """
        import time
        from tests.core.test_hardening import chain_model
        from onnx2jax.core.graph import plan_graph
        model = chain_model(30000, reverse=True)
        start = time.perf_counter()
        plan = plan_graph(model.graph, {"": 17}, None)
        print(len(plan.nodes), plan.nodes[0].input[0], time.perf_counter() - start)
    """,
        timeout=120,
    )
    count, first, _ = out.split()
    assert (count, first) == ("30000", "t0")


def test_reverse_order_runs():
    model = onnx2jax.load(chain_model(7, reverse=True))
    np.testing.assert_array_equal(model(t0=np.array([1, 2], np.float32))["t7"], [-1, -2])


def test_two_nodes_writing_one_tensor_are_refused():
    nodes = [
        helper.make_node("Neg", ["x"], ["y"], name="first"),
        helper.make_node("Relu", ["x"], ["y"], name="second"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", 1, [2])],
        [helper.make_tensor_value_info("y", 1, [2])],
    )
    with pytest.raises(ModelLoadError, match="'y' is written by two nodes.*first.*second"):
        onnx2jax.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_node_overwriting_a_graph_input_is_refused():
    graph = helper.make_graph(
        [helper.make_node("Neg", ["y"], ["x"])],
        "g",
        [helper.make_tensor_value_info("x", 1, [2]), helper.make_tensor_value_info("y", 1, [2])],
        [helper.make_tensor_value_info("x", 1, [2])],
    )
    with pytest.raises(ModelLoadError, match="already a graph input"):
        onnx2jax.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_unknown_op_without_outputs_is_named():
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], []), helper.make_node("Neg", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", 1, [2])],
        [helper.make_tensor_value_info("y", 1, [2])],
    )
    with pytest.raises(UnsupportedOpError, match="Frobnicate"):
        onnx2jax.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def huge_constant_model(producer: str) -> onnx.ModelProto:
    """y = x + reduce(10^12 elements made from constants): the reduction is static."""
    shape = helper.make_node(
        "Constant",
        [],
        ["shape"],
        value=helper.make_tensor("shape", TensorProto.INT64, [2], [10**6, 10**6]),
    )
    if producer == "Expand":
        one = helper.make_node(
            "Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
        )
        made = [one, helper.make_node("Expand", ["one", "shape"], ["big"])]
    else:
        made = [
            helper.make_node(
                "ConstantOfShape",
                ["shape"],
                ["big"],
                value=helper.make_tensor("value", TensorProto.FLOAT, [1], [1.0]),
            )
        ]
    nodes = [
        shape,
        *made,
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        helper.make_node("Add", ["total", "x"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "huge",
        [helper.make_tensor_value_info("x", 1, [])],
        [helper.make_tensor_value_info("y", 1, [])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("producer", ["Expand", "ConstantOfShape"])
def test_huge_static_values_are_left_to_xla(producer):
    """10^12 floats are 4 TB: folded with NumPy this would fill memory or sum for minutes."""
    out = run_limited(
        f"""
        import numpy as np, onnx2jax
        from tests.core.test_hardening import huge_constant_model
        model = onnx2jax.load(huge_constant_model({producer!r}))
        print(float(model(x=np.float32(1))["y"]))
    """,
        timeout=240,
    )
    assert float(out) == pytest.approx(1e12, rel=1e-6)


def test_static_size_limit_is_a_setting(monkeypatch):
    monkeypatch.setenv("ONNX2JAX_MAX_STATIC_BYTES", "nonsense")
    model = onnx2jax.load(huge_constant_model("Expand"))
    with pytest.raises(Onnx2JaxError, match="ONNX2JAX_MAX_STATIC_BYTES must be a whole number"):
        model(x=np.float32(1))
    # A small limit hands even a 4-element value to XLA: the same numbers.
    monkeypatch.setenv("ONNX2JAX_MAX_STATIC_BYTES", "8")
    shape = helper.make_node(
        "Constant", [], ["s"], value=helper.make_tensor("s", TensorProto.INT64, [1], [4])
    )
    graph = helper.make_graph(
        [
            shape,
            helper.make_node(
                "ConstantOfShape",
                ["s"],
                ["c"],
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [2.5]),
            ),
            helper.make_node("CumSum", ["c", "axis"], ["cs"]),
            helper.make_node("Add", ["cs", "x"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", 1, [4])],
        [helper.make_tensor_value_info("y", 1, [4])],
        initializer=[onnx.numpy_helper.from_array(np.int64(0), "axis")],
    )
    small = onnx2jax.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    np.testing.assert_array_equal(small(x=np.zeros(4, np.float32))["y"], [2.5, 5, 7.5, 10])


def relu_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", 1, [2])],
        [helper.make_tensor_value_info("y", 1, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("old, new", [(b"Relu", b"R\xffu\xfe"), (b"\x01x", b"\x01\xff")])
def test_names_that_are_not_utf8_are_refused(old, new):
    data = relu_model().SerializeToString()
    assert old in data
    with pytest.raises(ModelLoadError, match="not valid UTF-8"):
        onnx2jax.load(data.replace(old, new))


def test_graph_input_of_unknown_element_type_is_refused():
    model = relu_model()
    model.graph.input[0].type.tensor_type.elem_type = 999
    with pytest.raises(ModelLoadError, match="element type 999"):
        onnx2jax.load(model)


@pytest.mark.parametrize("repo, filename", [("../etc", "model.onnx"), ("a/b", "../../x.onnx")])
def test_hub_addresses_with_dot_dot_are_refused(repo, filename, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot get"):
        onnx2jax.from_hub(repo, filename=filename, cache_dir=tmp_path)


def growing_loop_model(trip_count: int) -> onnx.ModelProto:
    """A Loop whose carried value grows by one element a step: it can only be unrolled."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Concat", ["acc_in", "one"], ["acc_out"], axis=0),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None),
        ],
        initializer=[onnx.numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[onnx.numpy_helper.from_array(np.int64(trip_count), "trips")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_unrolling_is_bounded(monkeypatch):
    monkeypatch.setenv("ONNX2JAX_MAX_UNROLL", "50")
    np.testing.assert_array_equal(
        onnx2jax.load(growing_loop_model(40))(x=np.zeros(1, np.float32))["y"], [0] + [1] * 40
    )
    with pytest.raises(Onnx2JaxError, match="10+ times unrolled.*limit of 50.*MAX_UNROLL"):
        onnx2jax.load(growing_loop_model(10**9))(x=np.zeros(1, np.float32))


@pytest.mark.parametrize("value", [[[1.0, 2.0], [1.0]], [1.0, [2.0]]])
def test_ragged_python_lists_are_input_errors(value):
    with pytest.raises(onnx2jax.InputError, match="cannot be read as an array"):
        onnx2jax.load(relu_model())(x=value)


def test_a_huge_constant_trip_count_runs_as_a_while_loop():
    """Found by the loader fuzzer: a trip count of 2**56 - 1 made lax.scan overflow."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c"], ["c_out"]),
            helper.make_node("Add", ["a", "one"], ["a_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("a_out", TensorProto.FLOAT, [1]),
        ],
        initializer=[onnx.numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Less", ["x", "ten"], ["keep_going"]),
            helper.make_node("Loop", ["trips", "keep_going", "x"], ["y"], body=body),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[
            onnx.numpy_helper.from_array(np.int64(2**56 - 1), "trips"),
            onnx.numpy_helper.from_array(np.float32([10]), "ten"),
        ],
    )
    model = onnx2jax.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    np.testing.assert_array_equal(model(x=np.float32([100]))["y"], [100])
