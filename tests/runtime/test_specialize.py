"""model(...) on a graph whose control flow tests a small input (silero-vad's If on its sample
rate): one jitted program per value of that input, up to a cap, then segments as before."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

import onnx2jax

FRAME = 8


def sr_model() -> bytes:
    """An If on Equal(sr, 16000) whose branches give outputs of different shapes (the whole
    frame; its first half, doubled), so lax.cond cannot run it; both lead to a [1, 1] output
    and a new state."""
    then_graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    else_graph = helper.make_graph(
        [
            helper.make_node("Slice", ["x", "start", "end", "axis"], ["half"]),
            helper.make_node("Mul", ["half", "three"], ["e"]),
        ],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
        [
            helper.make_tensor("start", TensorProto.INT64, [1], [0]),
            helper.make_tensor("end", TensorProto.INT64, [1], [FRAME // 2]),
            helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
            helper.make_tensor("three", TensorProto.FLOAT, [], [3.0]),
        ],
    )
    nodes = [
        helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
        helper.make_node(
            "If", ["is16k"], ["branch"], then_branch=then_graph, else_branch=else_graph
        ),
        helper.make_node("ReduceSum", ["branch", "axes"], ["summed"], keepdims=1),
        helper.make_node("Tanh", ["summed"], ["y"]),
        helper.make_node("Add", ["state", "y"], ["new_state"]),
    ]
    graph = helper.make_graph(
        nodes,
        "sr_switch",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, FRAME]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, 4]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1]),
            helper.make_tensor_value_info("new_state", TensorProto.FLOAT, [2, 1, 4]),
        ],
        [
            helper.make_tensor("rate", TensorProto.INT64, [], [16000]),
            helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def frames(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal((1, FRAME)).astype(np.float32) * 0.3 for _ in range(count)]


def stream(model, rates: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Runs the frames in turn, feeding each call's state to the next, as silero-vad is run."""
    state = np.zeros((2, 1, 4), np.float32)
    results = []
    for x, sr in zip(frames(len(rates)), rates, strict=True):
        y, state = model(x, state, np.array(sr, np.int64))
        # NumPy in, as each call's: a JAX array would be an input signature of its own.
        y, state = np.asarray(y), np.asarray(state)
        results.append((y, state))
    return results


def onnx2jax_call(model: onnx2jax.Model):
    def call(x, state, sr):
        out = model(x=x, state=state, sr=sr)
        return out["y"], out["new_state"]

    return call


def ort_call(data: bytes):
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])

    def call(x, state, sr):
        return session.run(None, {"x": x, "state": state, "sr": sr})

    return call


def counted_traces(model: onnx2jax.Model, monkeypatch) -> list[dict | None]:
    """Records every program model(...) builds under jit (the static values it fixes)."""
    engine = model.engine
    traced: list[dict | None] = []
    ready_call = engine.ready_call

    def counting(bound, outputs=None, static=None):
        traced.append(None if static is None else {k: int(v) for k, v in static.items()})
        return ready_call(bound, outputs, static)

    monkeypatch.setattr(engine, "ready_call", counting)
    return traced


def assert_same(got, want) -> None:
    assert len(got) == len(want)
    for (y, state), (y_want, state_want) in zip(got, want, strict=True):
        np.testing.assert_allclose(y, y_want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(state, state_want, rtol=1e-6, atol=1e-6)


RATES = [16000, 8000, 16000, 8000, 16000, 8000]


def test_one_program_per_rate_matches_segments_and_onnxruntime(monkeypatch):
    data = sr_model()
    model = onnx2jax.load(data)
    traced = counted_traces(model, monkeypatch)
    got = stream(onnx2jax_call(model), RATES)
    # The first call fails under jit (the branches' shapes differ); then one program per rate.
    assert traced == [None, {"sr": 16000}, {"sr": 8000}]
    assert model.engine.segmented_runner() is None

    segmented = onnx2jax.load(data)
    segmented.engine.max_specializations = 0
    want = stream(onnx2jax_call(segmented), RATES)
    assert segmented.engine.segmented_runner() is not None
    assert_same(got, want)
    assert_same(got, stream(ort_call(data), RATES))
    # The two rates gave different results: each program took its own branch.
    assert not np.allclose(got[0][0], got[1][0])


def test_beyond_the_cap_the_outputs_run_as_segments(monkeypatch):
    data = sr_model()
    model = onnx2jax.load(data)
    model.engine.max_specializations = 2
    traced = counted_traces(model, monkeypatch)
    rates = [16000, 8000, 8001, 16000, 8002, 8000]
    got = stream(onnx2jax_call(model), rates)
    # A third rate would be a third program: segments from then on, no more traces.
    assert traced == [None, {"sr": 16000}, {"sr": 8000}]
    assert model.engine.segmented_runner() is not None
    assert_same(got, stream(ort_call(data), rates))


def test_a_model_without_small_inputs_runs_as_before(monkeypatch):
    """The rate is a constant here: the If's condition is known at trace time, and the one
    program serves every call."""
    data = onnx.load_from_string(sr_model())
    graph = data.graph
    graph.initializer.append(helper.make_tensor("sr", TensorProto.INT64, [], [8000]))
    del graph.input[2]
    data = data.SerializeToString()
    model = onnx2jax.load(data)
    traced = counted_traces(model, monkeypatch)
    state = np.zeros((2, 1, 4), np.float32)
    theirs = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    for x in frames(3):
        out = model(x=x, state=state)
        y_want, state_want = theirs.run(None, {"x": x, "state": state})
        np.testing.assert_allclose(np.asarray(out["y"]), y_want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out["new_state"]), state_want, rtol=1e-6, atol=1e-6)
        state = state_want
    assert traced == [None]
    assert model.engine.segmented_runner() is None
