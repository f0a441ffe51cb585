"""Control flow (If, Loop, Scan), sequences/optionals and RNN/GRU/LSTM beyond the node suite."""

from __future__ import annotations

import jax
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

import onnx2jax
from onnx2jax.core.errors import DataDependentShapeError
from onnx2jax.ops.sequence import EMPTY
from tests.helpers import assert_matches_reference, run_onnx2jax, run_reference

RNG = np.random.default_rng(0)


def info(name, elem=T.FLOAT, shape=None):
    return h.make_tensor_value_info(name, elem, shape)


def model_of(nodes, inputs, outputs, opset=21, initializers=()):
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=10)


def const(name, value):
    return onnx.numpy_helper.from_array(np.asarray(value), name)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------------------- If
def _if_model(then_value, else_value):
    then_g = h.make_graph(
        [h.make_node("Mul", ["x", "two"], ["t"])],
        "then",
        [],
        [info("t")],
        initializer=[const("two", then_value)],
    )
    else_g = h.make_graph(
        [h.make_node("Add", ["x", "three"], ["e"])],
        "else",
        [],
        [info("e")],
        initializer=[const("three", else_value)],
    )
    node = h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)
    return model_of([node], [info("c", T.BOOL, []), info("x", T.FLOAT, [3])], [info("y")])


@pytest.mark.parametrize("flag", [True, False])
def test_if_traced_condition_uses_lax_cond_and_differentiates(flag):
    model = _if_model(np.float32(2), np.float32(3))
    feeds = {"c": np.array(flag), "x": rand(3)}
    assert_matches_reference(model, feeds)
    compiled = onnx2jax.load(model)
    grad = jax.grad(lambda x: compiled.apply(compiled.params, c=feeds["c"], x=x)["y"].sum())(
        feeds["x"]
    )
    np.testing.assert_allclose(grad, np.full(3, 2.0 if flag else 1.0))


def test_if_branches_of_different_shapes_run_eagerly():
    model = _if_model(np.float32(2), np.zeros((2, 3), np.float32))
    for flag in (True, False):
        feeds = {"c": np.array(flag), "x": rand(3)}
        assert_matches_reference(model, feeds)
    compiled = onnx2jax.load(model)
    with pytest.raises(DataDependentShapeError, match="lax.cond"):
        jax.jit(compiled.apply)(compiled.params, np.array(True), rand(3))


def test_if_optional_output():
    then_g = h.make_graph(
        [h.make_node("Optional", ["x"], ["o"])],
        "then",
        [],
        [
            h.make_value_info(
                "o", h.make_optional_type_proto(h.make_tensor_type_proto(T.FLOAT, [2]))
            )
        ],
    )
    else_g = h.make_graph(
        [h.make_node("Optional", [], ["o2"], type=h.make_tensor_type_proto(T.FLOAT, [2]))],
        "else",
        [],
        [
            h.make_value_info(
                "o2", h.make_optional_type_proto(h.make_tensor_type_proto(T.FLOAT, [2]))
            )
        ],
    )
    nodes = [
        h.make_node("If", ["c"], ["opt"], then_branch=then_g, else_branch=else_g),
        h.make_node("OptionalHasElement", ["opt"], ["y"]),
    ]
    model = model_of(
        nodes, [info("c", T.BOOL, []), info("x", T.FLOAT, [2])], [info("y", T.BOOL, [])], opset=18
    )
    for flag in (True, False):
        out = onnx2jax.load(model)(c=np.array(flag), x=rand(2))
        assert bool(out["y"]) is flag


# ------------------------------------------------------------------------------------- Loop
def _counting_body(scan=True, cond_expr=None):
    """x_out = x_in * a + i (a read from the outer scope), scan output x_out."""
    nodes = [
        h.make_node("Cast", ["i"], ["i_f"], to=T.FLOAT),
        h.make_node("Mul", ["x_in", "a"], ["ax"]),
        h.make_node("Add", ["ax", "i_f"], ["x_out"]),
    ]
    if cond_expr is None:
        nodes.append(h.make_node("Identity", ["cond_in"], ["cond_out"]))
    else:
        nodes += cond_expr
    outputs = [info("cond_out", T.BOOL, []), info("x_out", T.FLOAT, [2])]
    if scan:
        nodes.append(h.make_node("Identity", ["x_out"], ["s_out"]))
        outputs.append(info("s_out", T.FLOAT, [2]))
    return h.make_graph(
        nodes,
        "body",
        [info("i", T.INT64, []), info("cond_in", T.BOOL, []), info("x_in", T.FLOAT, [2])],
        outputs,
    )


@pytest.mark.parametrize("trips", [0, 3, 40])
def test_loop_static_trip_count(trips):
    node = h.make_node("Loop", ["M", "", "x0"], ["x", "s"], body=_counting_body())
    model = model_of(
        [node],
        [info("x0", T.FLOAT, [2]), info("a", T.FLOAT, [2])],
        [info("x"), info("s")],
        initializers=[const("M", np.int64(trips))],
    )
    feeds = {"x0": rand(2), "a": np.full(2, 0.9, np.float32)}
    assert_matches_reference(model, feeds, rtol=1e-4)
    compiled = onnx2jax.load(model)
    grad = jax.grad(lambda a: compiled.apply(compiled.params, feeds["x0"], a)["s"].sum())(
        feeds["a"]
    )
    assert np.all(np.isfinite(grad))


def test_loop_traced_trip_count_runs_eagerly_with_scan_outputs():
    node = h.make_node("Loop", ["M", "", "x0"], ["x", "s"], body=_counting_body())
    model = model_of(
        [node],
        [info("M", T.INT64, []), info("x0", T.FLOAT, [2]), info("a", T.FLOAT, [2])],
        [info("x"), info("s")],
    )
    feeds = {"M": np.array(5), "x0": rand(2), "a": np.full(2, 1.5, np.float32)}
    assert_matches_reference(model, feeds)
    compiled = onnx2jax.load(model)
    with pytest.raises(DataDependentShapeError):
        jax.jit(compiled.apply)(compiled.params, **feeds)


def test_loop_traced_trip_count_without_scan_outputs_is_a_while_loop():
    node = h.make_node("Loop", ["M", "", "x0"], ["x"], body=_counting_body(scan=False))
    model = model_of(
        [node],
        [info("M", T.INT64, []), info("x0", T.FLOAT, [2]), info("a", T.FLOAT, [2])],
        [info("x")],
    )
    feeds = {"M": np.array(7), "x0": rand(2), "a": np.full(2, 1.5, np.float32)}
    compiled = onnx2jax.load(model)
    expected = run_reference(model, feeds)[0]
    np.testing.assert_allclose(
        jax.jit(compiled.apply)(compiled.params, **feeds)["x"], expected, rtol=1e-5
    )


def test_loop_data_dependent_condition():
    # while (sum(x) < 50) x = x * a + i
    cond = [
        h.make_node("ReduceSum", ["x_out"], ["total"], keepdims=0),
        h.make_node("Less", ["total", "limit"], ["cond_out"]),
    ]
    body = _counting_body(scan=False, cond_expr=cond)
    node = h.make_node("Loop", ["", "c0", "x0"], ["x"], body=body)
    model = model_of(
        [node],
        [info("c0", T.BOOL, []), info("x0", T.FLOAT, [2]), info("a", T.FLOAT, [2])],
        [info("x")],
        initializers=[const("limit", np.float32(50))],
    )
    feeds = {"c0": np.array(True), "x0": np.ones(2, np.float32), "a": np.full(2, 1.5, np.float32)}
    assert_matches_reference(model, feeds)
    assert_matches_reference(model, {**feeds, "c0": np.array(False)})


def test_loop_growing_state_falls_back_to_unrolling():
    body = h.make_graph(
        [
            h.make_node("Identity", ["cond_in"], ["cond_out"]),
            h.make_node("Unsqueeze", ["i", "zero"], ["i1"]),
            h.make_node("Cast", ["i1"], ["i_f"], to=T.FLOAT),
            h.make_node("Concat", ["acc_in", "i_f"], ["acc_out"], axis=0),
        ],
        "body",
        [info("i", T.INT64, []), info("cond_in", T.BOOL, []), info("acc_in", T.FLOAT, None)],
        [info("cond_out", T.BOOL, []), info("acc_out", T.FLOAT, None)],
        initializer=[const("zero", np.array([0], np.int64))],
    )
    node = h.make_node("Loop", ["M", "", "acc0"], ["acc"], body=body)
    model = model_of(
        [node], [info("acc0", T.FLOAT, [1])], [info("acc")], initializers=[const("M", np.int64(20))]
    )
    out = assert_matches_reference(model, {"acc0": np.zeros(1, np.float32)})
    assert out[0].shape == (21,)


def test_loop_x64_off():
    node = h.make_node("Loop", ["M", "", "x0"], ["x", "s"], body=_counting_body())
    model = model_of(
        [node],
        [info("x0", T.FLOAT, [2]), info("a", T.FLOAT, [2])],
        [info("x"), info("s")],
        initializers=[const("M", np.int64(30))],
    )
    feeds = {"x0": rand(2), "a": np.full(2, 0.5, np.float32)}
    expected = run_reference(model, feeds)
    for got, want in zip(run_onnx2jax(model, feeds, x64=False), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5)


# ------------------------------------------------------------------------------------- Scan
def test_scan_axes_and_directions():
    body = h.make_graph(
        [
            h.make_node("Add", ["s_in", "x_t"], ["s_out"]),
            h.make_node("Mul", ["s_out", "x_t"], ["y_t"]),
        ],
        "body",
        [info("s_in", T.FLOAT, [3]), info("x_t", T.FLOAT, [3])],
        [info("s_out", T.FLOAT, [3]), info("y_t", T.FLOAT, [3])],
    )
    node = h.make_node(
        "Scan",
        ["s0", "x"],
        ["s", "y"],
        body=body,
        num_scan_inputs=1,
        scan_input_axes=[-1],
        scan_input_directions=[1],
        scan_output_axes=[1],
        scan_output_directions=[1],
    )
    model = model_of(
        [node], [info("s0", T.FLOAT, [3]), info("x", T.FLOAT, [3, 5])], [info("s"), info("y")]
    )
    feeds = {"s0": rand(3), "x": rand(3, 5)}
    assert_matches_reference(model, feeds, rtol=1e-5)
    compiled = onnx2jax.load(model)
    grad = jax.grad(lambda x: compiled.apply(compiled.params, feeds["s0"], x)["y"].sum())(
        feeds["x"]
    )
    assert grad.shape == (3, 5)


def test_scan_v8_sequence_lens():
    body = h.make_graph(
        [
            h.make_node("Add", ["s_in", "x_t"], ["s_out"]),
            h.make_node("Identity", ["s_out"], ["y_t"]),
        ],
        "body",
        [info("s_in", T.FLOAT, [2]), info("x_t", T.FLOAT, [2])],
        [info("s_out", T.FLOAT, [2]), info("y_t", T.FLOAT, [2])],
    )
    node = h.make_node(
        "Scan", ["lens", "s0", "x"], ["s", "y"], body=body, num_scan_inputs=1, directions=[1]
    )
    model = model_of(
        [node],
        [info("s0", T.FLOAT, [2, 2]), info("x", T.FLOAT, [2, 4, 2])],
        [info("s"), info("y")],
        opset=8,
        initializers=[const("lens", np.array([4, 2], np.int64))],
    )
    model.ir_version = 8
    assert_matches_reference(model, {"s0": rand(2, 2), "x": rand(2, 4, 2)})


# -------------------------------------------------------------------------- Sequences
def _run_sequence_model(nodes, inputs, feeds, opset=21, initializers=()):
    model = model_of(
        nodes, inputs, [info("y", T.FLOAT, None)], opset=opset, initializers=initializers
    )
    expected = run_reference(model, feeds)[0]
    got = run_onnx2jax(model, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_sequence_ops_chain():
    nodes = [
        h.make_node("SplitToSequence", ["x", "split"], ["seq"], axis=-1),
        h.make_node("SequenceInsert", ["seq", "z", "pos"], ["seq2"]),
        h.make_node("SequenceErase", ["seq2"], ["seq3"]),
        h.make_node("SequenceAt", ["seq3", "neg"], ["last"]),
        h.make_node("SequenceInsert", ["seq3", "last"], ["seq4"]),
        h.make_node("ConcatFromSequence", ["seq4"], ["y"], axis=-1),
    ]
    inits = [const("split", np.int64(2)), const("pos", np.int64(1)), const("neg", np.int64(-1))]
    _run_sequence_model(
        nodes,
        [info("x", T.FLOAT, [2, 5]), info("z", T.FLOAT, [2, 2])],
        {"x": rand(2, 5), "z": rand(2, 2)},
        initializers=inits,
    )


def test_sequence_output_is_a_list_of_arrays_as_in_onnxruntime():
    seq_type = h.make_sequence_type_proto(h.make_tensor_type_proto(T.FLOAT, None))
    nodes = [
        h.make_node("SplitToSequence", ["x", "split"], ["seq"], axis=1),
        h.make_node("Neg", ["x"], ["y"]),
    ]
    model = model_of(
        nodes,
        [info("x", T.FLOAT, [2, 5])],
        [h.make_value_info("seq", seq_type), info("y")],
        initializers=[const("split", np.array([2, 3], np.int64))],
    )
    x = rand(2, 5)
    want_seq, want_y = run_reference(model, {"x": x})
    out = onnx2jax.load(model)(x)
    assert list(out) == ["seq", "y"] and isinstance(out["seq"], list)
    assert len(out["seq"]) == len(want_seq)
    for got, want in zip(out["seq"], want_seq, strict=True):
        assert isinstance(got, jax.Array) and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(out["y"], want_y, rtol=1e-6)


def test_sequence_at_traced_position_and_new_axis():
    nodes = [
        h.make_node("SplitToSequence", ["x"], ["seq"], axis=1, keepdims=0),
        h.make_node("SequenceAt", ["seq", "p"], ["item"]),
        h.make_node("SequenceConstruct", ["item", "item"], ["pair"]),
        h.make_node("ConcatFromSequence", ["pair"], ["y"], axis=-1, new_axis=1),
    ]
    _run_sequence_model(
        nodes,
        [info("x", T.FLOAT, [2, 4]), info("p", T.INT64, [])],
        {"x": rand(2, 4), "p": np.array(-2)},
    )


def test_sequence_map_with_tensor_input():
    body = h.make_graph(
        [h.make_node("Add", ["a", "b"], ["c"])],
        "body",
        [info("a", T.FLOAT, None), info("b", T.FLOAT, None)],
        [info("c", T.FLOAT, None)],
    )
    nodes = [
        h.make_node("SplitToSequence", ["x", "split"], ["seq"], axis=0),
        h.make_node("SequenceMap", ["seq", "z"], ["mapped"], body=body),
        h.make_node("ConcatFromSequence", ["mapped"], ["y"], axis=0),
    ]
    _run_sequence_model(
        nodes,
        [info("x", T.FLOAT, [5, 2]), info("z", T.FLOAT, [2])],
        {"x": rand(5, 2), "z": rand(2)},
        initializers=[const("split", np.array([1, 4], np.int64))],
    )


def test_empty_optional_is_a_pytree_and_not_none():
    node = h.make_node("Optional", [], ["o"], type=h.make_tensor_type_proto(T.FLOAT, [2]))
    model = model_of(
        [node],
        [],
        [
            h.make_value_info(
                "o", h.make_optional_type_proto(h.make_tensor_type_proto(T.FLOAT, [2]))
            )
        ],
        opset=18,
    )
    assert onnx2jax.load(model)()["o"] is EMPTY
    assert jax.tree_util.tree_leaves([EMPTY]) == []


# ---------------------------------------------------------------------------- RNN family
def _recurrent_model(op, inputs, num_outputs, **attrs):
    names = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"][: len(inputs)]
    node = h.make_node(
        op,
        [n if inputs[i] is not None else "" for i, n in enumerate(names)],
        ["Y", "Y_h", "Y_c"][:num_outputs],
        **attrs,
    )
    graph_inputs = [
        info(n, T.INT32 if n == "sequence_lens" else T.FLOAT, v.shape)
        for n, v in zip(names, inputs, strict=True)
        if v is not None
    ]
    outputs = [info(n) for n in ["Y", "Y_h", "Y_c"][:num_outputs]]
    feeds = {n: v for n, v in zip(names, inputs, strict=True) if v is not None}
    return model_of([node], graph_inputs, outputs, opset=22), feeds


def test_lstm_everything():
    seq, batch, size, hidden, dirs = 4, 3, 2, 3, 2
    inputs = [
        rand(seq, batch, size),
        rand(dirs, 4 * hidden, size),
        rand(dirs, 4 * hidden, hidden),
        rand(dirs, 8 * hidden),
        np.array([4, 2, 3], np.int32),
        rand(dirs, batch, hidden),
        rand(dirs, batch, hidden),
        rand(dirs, 3 * hidden),
    ]
    attrs = dict(
        hidden_size=hidden,
        direction="bidirectional",
        clip=1.5,
        input_forget=1,
        activations=["HardSigmoid", "LeakyRelu", "ScaledTanh", "Sigmoid", "Tanh", "Tanh"],
        activation_alpha=[0.3, 0.1, 0.8],
        activation_beta=[0.4, 1.2],
    )
    model, feeds = _recurrent_model("LSTM", inputs, 3, **attrs)
    y, y_h, y_c = assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)
    # onnxruntime lacks layout=1 (batch first): compare with the layout=0 results.
    batch_first = list(inputs)
    batch_first[0] = inputs[0].transpose(1, 0, 2)
    batch_first[5] = inputs[5].transpose(1, 0, 2)
    batch_first[6] = inputs[6].transpose(1, 0, 2)
    model, feeds = _recurrent_model("LSTM", batch_first, 3, layout=1, **attrs)
    got = run_onnx2jax(model, feeds)
    np.testing.assert_allclose(got[0], y.transpose(2, 0, 1, 3), rtol=1e-6)
    np.testing.assert_allclose(got[1], y_h.transpose(1, 0, 2), rtol=1e-6)
    np.testing.assert_allclose(got[2], y_c.transpose(1, 0, 2), rtol=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_gru_linear_before_reset_with_lengths(direction):
    seq, batch, size, hidden = 5, 2, 3, 4
    dirs = 2 if direction == "bidirectional" else 1
    inputs = [
        rand(seq, batch, size),
        rand(dirs, 3 * hidden, size),
        rand(dirs, 3 * hidden, hidden),
        rand(dirs, 6 * hidden),
        np.array([5, 3], np.int32),
        rand(dirs, batch, hidden),
    ]
    model, feeds = _recurrent_model(
        "GRU", inputs, 2, hidden_size=hidden, direction=direction, linear_before_reset=1
    )
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)


def test_rnn_reverse_relu_no_bias_and_gradient():
    seq, batch, size, hidden = 4, 2, 3, 2
    inputs = [
        rand(seq, batch, size),
        rand(1, hidden, size) * 0.5,
        rand(1, hidden, hidden) * 0.5,
        None,
        np.array([2, 4], np.int32),
    ]
    model, feeds = _recurrent_model(
        "RNN", inputs, 2, hidden_size=hidden, direction="reverse", activations=["Relu"]
    )
    assert_matches_reference(model, feeds, rtol=1e-5, atol=1e-6)
    compiled = onnx2jax.load(model)
    grad = jax.grad(lambda w: compiled.apply(compiled.params, **{**feeds, "W": w})["Y"].sum())(
        feeds["W"]
    )
    assert np.all(np.isfinite(grad)) and grad.shape == feeds["W"].shape


def test_gru_x64_off():
    seq, batch, size, hidden = 3, 2, 2, 3
    inputs = [rand(seq, batch, size), rand(1, 3 * hidden, size), rand(1, 3 * hidden, hidden)]
    model, feeds = _recurrent_model("GRU", inputs, 2, hidden_size=hidden)
    expected = run_reference(model, feeds)
    for got, want in zip(run_onnx2jax(model, feeds, x64=False), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_exporter_style_while_loop_with_growing_state():
    # M = INT64_MAX with a condition computed from a tensor that grows each iteration.
    body = h.make_graph(
        [
            h.make_node("Concat", ["acc_in", "x"], ["acc_out"], axis=0),
            h.make_node("Size", ["acc_out"], ["n"]),
            h.make_node("Less", ["n", "stop"], ["cond_out"]),
        ],
        "body",
        [info("i", T.INT64, []), info("cond_in", T.BOOL, []), info("acc_in", T.FLOAT, None)],
        [info("cond_out", T.BOOL, []), info("acc_out", T.FLOAT, None)],
    )
    node = h.make_node("Loop", ["M", "c0", "x"], ["acc"], body=body)
    model = model_of(
        [node],
        [info("x", T.FLOAT, [2]), info("stop", T.INT64, [])],
        [info("acc")],
        initializers=[const("M", np.int64(2**63 - 1)), const("c0", np.bool_(True))],
    )
    out = assert_matches_reference(model, {"x": rand(2), "stop": np.array(7)})
    assert out[0].shape == (8,)


def test_if_inside_lax_scan_loop():
    # The iteration number is traced inside lax.scan, so the If becomes lax.cond.
    then_g = h.make_graph(
        [h.make_node("Mul", ["x_in", "two"], ["t"])],
        "then",
        [],
        [info("t")],
        initializer=[const("two", np.float32(2))],
    )
    else_g = h.make_graph([h.make_node("Neg", ["x_in"], ["e"])], "else", [], [info("e")])
    body = h.make_graph(
        [
            h.make_node("Mod", ["i", "two_i"], ["r"]),
            h.make_node("Equal", ["r", "zero_i"], ["even"]),
            h.make_node("If", ["even"], ["x_out"], then_branch=then_g, else_branch=else_g),
            h.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [info("i", T.INT64, []), info("cond_in", T.BOOL, []), info("x_in", T.FLOAT, [2])],
        [info("cond_out", T.BOOL, []), info("x_out", T.FLOAT, [2])],
        initializer=[const("two_i", np.int64(2)), const("zero_i", np.int64(0))],
    )
    node = h.make_node("Loop", ["M", "", "x0"], ["x"], body=body)
    model = model_of(
        [node], [info("x0", T.FLOAT, [2])], [info("x")], initializers=[const("M", np.int64(21))]
    )
    assert_matches_reference(model, {"x0": rand(2)})
