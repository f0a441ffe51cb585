"""RNN, GRU and LSTM inside If/Loop/Scan bodies whose shapes are not declared.

Branch values have no value_info and the branch outputs an empty TypeProto, as exporters write
them; the recurrent ops read their weights and states from the outer scope.
"""

from __future__ import annotations

import jax
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

import onnx2jax
from onnx2jax.core.errors import DataDependentShapeError, OpError
from tests.helpers import run_onnx2jax, run_reference

RNG = np.random.default_rng(7)
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def info(name, elem=T.FLOAT, shape=None):
    return h.make_tensor_value_info(name, elem, shape)


def unknown(name):
    return h.make_value_info(name, onnx.TypeProto())


def const(name, value):
    return onnx.numpy_helper.from_array(np.asarray(value), name)


def model_of(nodes, inputs, outputs, initializers=(), opset=22):
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=10)


def compare(model, feeds, engine="onnxruntime", rtol=1e-4, atol=1e-5):
    """onnx2jax under model(...) and under a plain (eager) apply against ``engine``."""
    expected = run_reference(model, feeds, engine)
    for jit in (True, False):
        got = run_onnx2jax(model, feeds, jit=jit)
        assert len(got) == len(expected)
        for g, w in zip(got, expected, strict=True):
            assert g.shape == np.shape(w), (g.shape, np.shape(w))
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def _branch(prefix, op, outer, reshape_to, states, seq_lens, num_dir, layout, negate):
    """A branch graph: reshape the outer input, run ``op`` on it, return Y and Y_h (and Y_c)."""
    nodes = [h.make_node("Reshape", ["x", reshape_to], [f"{prefix}_x3"])]
    x_name = f"{prefix}_x3"
    if negate:
        nodes.append(h.make_node("Neg", [x_name], [f"{prefix}_xn"]))
        x_name = f"{prefix}_xn"
    inputs = [x_name, *outer, "lens" if seq_lens else ""]
    if states:
        inputs += ["h0"] + (["c0"] if op == "LSTM" else [])
    outs = [f"{prefix}_y", f"{prefix}_yh"] + ([f"{prefix}_yc"] if op == "LSTM" else [])
    direction = (
        {1: "forward", 2: "bidirectional"}[num_dir]
        if not negate
        else ("reverse" if num_dir == 1 else "bidirectional")
    )
    nodes.append(h.make_node(op, inputs, outs, hidden_size=3, direction=direction, layout=layout))
    return h.make_graph(nodes, prefix, [], [unknown(o) for o in outs])


@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("num_dir", [1, 2])
@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_recurrent_op_in_if_branches_with_undeclared_shapes(op, num_dir, layout):
    seq, batch, size, hidden = 4, 2, 3, 3
    gates = GATES[op]
    # The states and sequence lengths come and go with the case so both forms are covered.
    states = (num_dir + layout) % 2 == 1
    seq_lens = op != "RNN" or layout == 0
    if layout:
        # onnxruntime lacks layout=1 (batch first); the reference evaluator has it but not
        # sequence_lens.
        seq_lens = False
    shape3 = [batch, seq, size] if layout else [seq, batch, size]
    state_shape = [batch, num_dir, hidden] if layout else [num_dir, batch, hidden]
    outer = ["W", "R", "B"]
    then_g = _branch("then", op, outer, "shape3", states, seq_lens, num_dir, layout, False)
    else_g = _branch("else", op, outer, "shape3", states, seq_lens, num_dir, layout, True)
    outs = ["y", "yh"] + (["yc"] if op == "LSTM" else [])
    nodes = [h.make_node("If", ["c"], outs, then_branch=then_g, else_branch=else_g)]
    feeds = {
        "c": None,
        "x": rand(seq * batch, size),
        "W": rand(num_dir, gates * hidden, size),
        "R": rand(num_dir, gates * hidden, hidden),
        "B": rand(num_dir, 2 * gates * hidden),
    }
    if states:
        feeds["h0"] = rand(*state_shape)
        if op == "LSTM":
            feeds["c0"] = rand(*state_shape)
    if seq_lens:
        feeds["lens"] = np.array([4, 2], np.int32)
    inputs = [info("c", T.BOOL, [])] + [
        info(k, T.INT32 if k == "lens" else T.FLOAT, None) for k in feeds if k != "c"
    ]
    model = model_of(
        nodes, inputs, [unknown(o) for o in outs], [const("shape3", np.array(shape3, np.int64))]
    )
    engine = "reference" if layout else "onnxruntime"
    for flag in (True, False):
        compare(model, {**feeds, "c": np.array(flag)}, engine)


def _silero_branch(prefix, stride, size, hidden):
    """16 kHz / 8 kHz branch of a silero-vad-like model: framing Conv, the TorchScript
    exporter's "Squeeze the last axis if it has size 1" If, LSTM with the outer state."""
    squeeze_if = h.make_node(
        "If",
        [f"{prefix}_one"],
        [f"{prefix}_feat"],
        then_branch=h.make_graph(
            [h.make_node("Squeeze", [f"{prefix}_conv", "minus1"], [f"{prefix}_sq"])],
            "sq",
            [],
            [unknown(f"{prefix}_sq")],
        ),
        else_branch=h.make_graph(
            [h.make_node("Identity", [f"{prefix}_conv"], [f"{prefix}_id"])],
            "id",
            [],
            [unknown(f"{prefix}_id")],
        ),
    )
    nodes = [
        h.make_node("Unsqueeze", ["input", "one"], [f"{prefix}_in3"]),
        h.make_node(
            "Conv", [f"{prefix}_in3", f"{prefix}_basis"], [f"{prefix}_conv"], strides=[stride]
        ),
        h.make_node("Shape", [f"{prefix}_conv"], [f"{prefix}_shape"]),
        h.make_node("Gather", [f"{prefix}_shape", "minus1"], [f"{prefix}_last"]),
        h.make_node("Equal", [f"{prefix}_last", "one"], [f"{prefix}_one"]),
        squeeze_if,
        h.make_node("Unsqueeze", [f"{prefix}_feat", "zero"], [f"{prefix}_x"]),
        h.make_node("Gather", ["state", "first"], [f"{prefix}_h"], axis=0),
        h.make_node("Gather", ["state", "second"], [f"{prefix}_c"], axis=0),
        h.make_node("Unsqueeze", [f"{prefix}_h", "zero"], [f"{prefix}_h0"]),
        h.make_node("Unsqueeze", [f"{prefix}_c", "zero"], [f"{prefix}_c0"]),
        h.make_node(
            "LSTM",
            [
                f"{prefix}_x",
                f"{prefix}_W",
                f"{prefix}_R",
                f"{prefix}_B",
                "",
                f"{prefix}_h0",
                f"{prefix}_c0",
            ],
            ["", f"{prefix}_yh", f"{prefix}_yc"],
            hidden_size=hidden,
        ),
        h.make_node("Concat", [f"{prefix}_yh", f"{prefix}_yc"], [f"{prefix}_state"], axis=0),
        h.make_node("ReduceMean", [f"{prefix}_yh"], [f"{prefix}_mean"], keepdims=0),
        h.make_node("Sigmoid", [f"{prefix}_mean"], [f"{prefix}_prob"]),
    ]
    inits = [
        const(f"{prefix}_basis", rand(size, 1, stride)),
        const(f"{prefix}_W", rand(1, 4 * hidden, size, scale=0.5)),
        const(f"{prefix}_R", rand(1, 4 * hidden, hidden, scale=0.5)),
        const(f"{prefix}_B", rand(1, 8 * hidden, scale=0.5)),
    ]
    return h.make_graph(
        nodes,
        prefix,
        [],
        [unknown(f"{prefix}_prob"), unknown(f"{prefix}_state")],
        initializer=inits,
    )


def _silero_like():
    size, hidden = 5, 4
    then_g = _silero_branch("s16", 8, size, hidden)
    else_g = _silero_branch("s8", 4, size, hidden)
    nodes = [
        h.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
        h.make_node("If", ["is16k"], ["output", "stateN"], then_branch=then_g, else_branch=else_g),
    ]
    inputs = [
        info("input", T.FLOAT, ["batch", "samples"]),
        info("state", T.FLOAT, [2, "batch", hidden]),
        info("sr", T.INT64, []),
    ]
    inits = [
        const("sr16k", np.int64(16000)),
        const("zero", np.array([0], np.int64)),
        const("one", np.array([1], np.int64)),
        const("minus1", np.array([-1], np.int64)),
        const("first", np.int64(0)),
        const("second", np.int64(1)),
    ]
    return model_of(nodes, inputs, [unknown("output"), unknown("stateN")], inits, opset=16), hidden


@pytest.mark.parametrize("batch", [1, 3])
def test_silero_like_lstm_in_if_whose_other_branch_cannot_run(batch):
    # At 16 kHz an 8-sample frame is one 16 kHz step but two 8 kHz steps: under lax.cond the
    # 8 kHz branch keeps the Conv's time axis and its LSTM input has rank 4.
    model, hidden = _silero_like()
    for sr, samples in ((16000, 8), (8000, 4)):
        feeds = {
            "input": rand(batch, samples),
            "state": rand(2, batch, hidden),
            "sr": np.array(sr, np.int64),
        }
        compare(model, feeds)
    compiled = onnx2jax.load(model)
    with pytest.raises(DataDependentShapeError, match="branch taken"):
        jax.jit(compiled.apply)(
            compiled.params, rand(batch, 8), rand(2, batch, hidden), np.array(16000, np.int64)
        )


def _scan_with_lstm():
    """Scan over chunks; each step runs an LSTM on its chunk from the carried state."""
    hidden, size = 3, 2
    body = h.make_graph(
        [
            h.make_node("Unsqueeze", ["h_in", "zero"], ["h0"]),
            h.make_node("Unsqueeze", ["c_in", "zero"], ["c0"]),
            h.make_node(
                "LSTM",
                ["chunk", "W", "R", "", "", "h0", "c0"],
                ["y", "yh", "yc"],
                hidden_size=hidden,
            ),
            h.make_node("Squeeze", ["yh", "zero"], ["h_out"]),
            h.make_node("Squeeze", ["yc", "zero"], ["c_out"]),
            h.make_node("ReduceSum", ["y", "zero"], ["y_sum"], keepdims=0),
        ],
        "body",
        [unknown("h_in"), unknown("c_in"), unknown("chunk")],
        [unknown("h_out"), unknown("c_out"), unknown("y_sum")],
    )
    nodes = [
        h.make_node("Scan", ["h", "c", "xs"], ["hN", "cN", "ys"], body=body, num_scan_inputs=1)
    ]
    inputs = [info("h", T.FLOAT, None), info("c", T.FLOAT, None), info("xs", T.FLOAT, None)]
    inits = [
        const("zero", np.array([0], np.int64)),
        const("W", rand(1, 4 * hidden, size)),
        const("R", rand(1, 4 * hidden, hidden)),
    ]
    return model_of(nodes, inputs, [unknown("hN"), unknown("cN"), unknown("ys")], inits), hidden


@pytest.mark.parametrize("chunks", [3, 20])
def test_lstm_in_scan_body(chunks):
    model, hidden = _scan_with_lstm()
    feeds = {"h": rand(2, hidden), "c": rand(2, hidden), "xs": rand(chunks, 4, 2, 2)}
    compare(model, feeds)


def test_gru_in_loop_body_with_traced_trip_count():
    hidden, size = 3, 2
    body = h.make_graph(
        [
            h.make_node("Unsqueeze", ["h_in", "zero"], ["h0"]),
            h.make_node(
                "GRU",
                ["x", "W", "R", "", "", "h0"],
                ["", "yh"],
                hidden_size=hidden,
                direction="reverse",
                linear_before_reset=1,
            ),
            h.make_node("Squeeze", ["yh", "zero"], ["h_out"]),
            h.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [info("i", T.INT64, []), info("cond_in", T.BOOL, []), unknown("h_in")],
        [unknown("cond_out"), unknown("h_out")],
    )
    nodes = [h.make_node("Loop", ["n", "", "h"], ["hN"], body=body)]
    inputs = [info("n", T.INT64, []), info("h", T.FLOAT, None), info("x", T.FLOAT, None)]
    inits = [
        const("zero", np.array([0], np.int64)),
        const("W", rand(1, 3 * hidden, size)),
        const("R", rand(1, 3 * hidden, hidden)),
    ]
    model = model_of(nodes, inputs, [unknown("hN")], inits)
    feeds = {"n": np.array(5, np.int64), "h": rand(2, hidden), "x": rand(4, 2, size)}
    compare(model, feeds)


@pytest.mark.parametrize("layout", [0, 1])
def test_recurrent_inputs_of_the_wrong_rank_are_clear_errors(layout):
    hidden = 3
    node = h.make_node(
        "LSTM", ["X", "W", "R", "", "", "h0"], ["Y"], hidden_size=hidden, layout=layout, name="lstm"
    )
    inputs = [info(n, T.FLOAT, None) for n in ("X", "W", "R", "h0")]
    model = onnx2jax.load(model_of([node], inputs, [unknown("Y")]))
    w, r = rand(1, 4 * hidden, 2), rand(1, 4 * hidden, hidden)
    with pytest.raises(OpError, match="LSTM node 'lstm'.*X has shape .*rank 3"):
        model(X=rand(1, 4, 2, 2), W=w, R=r, h0=rand(1, 2, hidden))
    order = r"\[2, 1, 3\]" if layout else r"\[1, 2, 3\]"
    with pytest.raises(OpError, match=f"initial_h has shape .*expected {order}"):
        model(X=rand(4, 2, 2) if not layout else rand(2, 4, 2), W=w, R=r, h0=rand(2, 3))


def test_eager_branch_is_compiled_once_per_signature():
    # With no program per value of sr allowed, model(...) runs the silero-like If outside jit;
    # its branch is jitted, not run op by op (which traced and compiled the LSTM's lax.scan
    # anew on every call).
    from onnx2jax.ops.control_flow import _EagerBranch

    model, hidden = _silero_like()
    compiled = onnx2jax.load(model)
    compiled.engine.max_specializations = 0
    feeds = {"input": rand(1, 8), "state": rand(2, 1, hidden), "sr": np.array(16000, np.int64)}
    first = compiled(**feeds)
    second = compiled(**feeds)
    for a, b in zip(first.values(), second.values(), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    branches = list(_EagerBranch._cache[compiled.interpreter].values())
    assert [len(b._compiled) for b in branches if b.graph.name == "s16"] == [1]
    compiled(**{**feeds, "input": rand(1, 8)})
    assert [len(b._compiled) for b in branches if b.graph.name == "s16"] == [1]


def test_eager_branch_that_needs_data_values_runs_op_by_op():
    then_g = h.make_graph([h.make_node("NonZero", ["x"], ["nz"])], "then", [], [unknown("nz")])
    else_g = h.make_graph(
        [h.make_node("Neg", ["x"], ["nx"]), h.make_node("NonZero", ["nx"], ["nz2"])],
        "else",
        [],
        [unknown("nz2")],
    )
    nodes = [h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    model = model_of(nodes, [info("c", T.BOOL, []), info("x", T.FLOAT, [5])], [unknown("y")])
    x = np.array([0, 1, -2, 0, 3], np.float32)
    for flag in (True, False, True):
        compare(model, {"c": np.array(flag), "x": x})
