"""The differential fuzzer (onnx2jax.fuzz): a fixed seed finds nothing, its machinery catches a
planted bug and shrinks it, and the bugs it found stay fixed (regression cases at the end)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnx2jax.fuzz import check, fuzz, shrink
from onnx2jax.fuzz.__main__ import main
from onnx2jax.fuzz.judge import compare, run_onnx2jax, run_reference, unjudged
from onnx2jax.ops import registry
from tests.helpers import assert_matches_reference, single_node_model


def test_fixed_seed_finds_no_mismatch(tmp_path):
    report = fuzz(seed=2026, count=500, out=tmp_path)
    print(report.summary())
    for failure in report.failures:
        print(f"graph {failure.index} [{', '.join(failure.ops)}]: {failure.message[:300]}")
    assert not report.failures, "\n".join(
        f"graph {f.index} [{', '.join(f.ops)}] -> {f.path}: {f.message}" for f in report.failures
    )
    # Nearly every graph is judged, and the draw covers the ops and the control flow.
    assert report.passed >= 450
    assert len(report.ops) >= 120
    assert any(op.startswith("If/") for op in report.ops)
    assert any(op.startswith("Loop/") for op in report.ops)


def test_compare_nan_inf_and_tolerance():
    nan_inf = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    assert compare(nan_inf, nan_inf.copy()) is None
    assert compare(nan_inf, np.array([1.0, np.inf, -np.inf, 1.0], np.float32))  # NaN moved
    assert compare(nan_inf, np.array([np.nan, -np.inf, -np.inf, 1.0], np.float32))  # inf sign
    close = np.array([1.0, 2.0], np.float32)
    assert compare(close, close * np.float32(1 + 1e-6)) is None
    assert compare(close, close * np.float32(1 + 1e-3))
    assert compare(np.array([1, 2], np.int64), np.array([1, 3], np.int64))  # ints exactly
    assert compare(np.array([1], np.int32), np.array([1], np.int64))  # dtype
    assert compare(np.zeros((0, 2), np.float32), np.zeros((2, 0), np.float32))  # shape


@pytest.fixture
def broken_neg(monkeypatch):
    """Neg registered (for the opset the fuzzer uses) as the identity: a planted fidelity bug."""
    versions = registry._REGISTRY[("", "Neg")]
    specs = list(versions.specs)
    specs[-1] = dataclasses.replace(specs[-1], function=lambda ctx, x: x)
    monkeypatch.setattr(versions, "specs", specs)


def test_planted_bug_is_found_shrunk_and_written(broken_neg, tmp_path, capsys):
    status = main(
        [
            "--seed",
            "3",
            "--count",
            "12",
            "--out",
            str(tmp_path),
            "--ops",
            "Neg,Add,Relu,Transpose",
            "--max-nodes",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert status == 1
    assert "mismatches" in out.splitlines()[-1]
    repros = sorted(p for p in tmp_path.glob("*.onnx") if not p.stem.endswith("_full"))
    assert repros
    model = onnx.load(repros[0])
    onnx.checker.check_model(model)
    # Shrunk to the one wrong node, with the inputs it read saved beside it.
    assert [n.op_type for n in model.graph.node] == ["Neg"]
    feeds = dict(np.load(repros[0].with_suffix(".npz")))
    assert check(model, feeds).kind == "fail"


def test_clean_run_exits_zero(capsys, tmp_path):
    assert (
        main(["--seed", "3", "--count", "6", "--ops", "Neg,Add,Relu", "--out", str(tmp_path)]) == 0
    )
    assert not list(tmp_path.iterdir())
    assert "0 mismatches" in capsys.readouterr().out.splitlines()[-1]


# ---------------------------------------------------------------- regressions the fuzzer found
@pytest.mark.parametrize(
    "op",
    [
        "ReduceL1",
        "ReduceL2",
        "ReduceSumSquare",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceSum",
        "ReduceMax",
    ],
)
def test_reduce_over_no_axes_applies_the_elementwise_part(op):
    # noop_with_empty_axes=1 and empty axes: onnxruntime and onnx.reference compute
    # ReduceL1 as abs(x), ReduceSumSquare as x*x..., not x itself (found by seed 1, graph 28).
    x = np.array([[-1.5, 2.0, 0.25], [3.0, -0.5, 1.0]], np.float32)
    if op == "ReduceLogSum":
        x = np.abs(x)
    axes = np.array([], np.int64)
    model = single_node_model(
        op,
        {"x": x, "axes": axes},
        initializers={"axes": axes},
        noop_with_empty_axes=1,
        keepdims=0,
        opset=18,
    )
    assert_matches_reference(model, {"x": x})


@pytest.mark.parametrize("op", ["Softplus", "Elu", "Sigmoid", "Gelu", "PRelu"])
def test_activation_of_a_static_value_under_jit(op):
    # An activation of a value computed from constants alone stays static; under jit it
    # raised TracerArrayConversionError (seed 1, graphs 60 and 88; PRelu: seed 2026, graph 11).
    c = np.array([3.0, -0.5], np.float32)
    inputs = ["n", "c"] if op == "PRelu" else ["n"]
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(c)),
        helper.make_node("Neg", ["c"], ["n"]),
        helper.make_node(op, inputs, ["a"]),
        helper.make_node("Add", ["a", "x"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "static_activation",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    feeds = {"x": np.array([0.5, 1.0], np.float32)}
    assert_matches_reference(model, feeds)
    assert_matches_reference(model, feeds, jit=False)


def test_reduce_log_sum_exp_of_a_static_value_under_jit():
    # ReduceLogSumExp of a Constant-only value raised TracerArrayConversionError under jit
    # (seed 7, graph 52).
    c = np.array([[1.0, 2.5], [-1.0, 0.5]], np.float32)
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(c)),
        helper.make_node("ReduceLogSumExp", ["c"], ["r"], keepdims=0),
        helper.make_node("Add", ["r", "x"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "static_logsumexp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    feeds = {"x": np.array(0.5, np.float32)}
    assert_matches_reference(model, feeds)
    assert_matches_reference(model, feeds, jit=False)


def test_gather_nd_of_static_data_with_traced_indices():
    # Constant data, indices from the graph's input: NumPy indexing met a tracer under jit
    # (seed 11, graph 24).
    data = np.array([[-1, 6], [3, 4]], np.int32)
    nodes = [
        helper.make_node("Constant", [], ["d"], value=numpy_helper.from_array(data)),
        helper.make_node("GatherND", ["d", "i"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gather_nd_static_data",
        [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, [2, 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    feeds = {"i": np.array([[1, 0], [-2, 1]], np.int64)}
    assert_matches_reference(model, feeds)
    assert_matches_reference(model, feeds, jit=False)


@pytest.mark.parametrize("reduction", ["add", "mul"])
def test_scatter_elements_reduces_bools(reduction):
    # Bool data with reduction add/mul (logical or/and in onnxruntime) raised a TypeError in
    # JAX's scatter (seed 12, graph 111).
    data = np.array([[True, False], [False, True], [True, True]])
    indices = np.array([[0, 1], [0, 0], [2, 1]], np.int64)
    updates = np.array([[False, True], [True, False], [False, False]])
    inputs = {"d": data, "i": indices, "u": updates}
    model = single_node_model("ScatterElements", inputs, axis=0, reduction=reduction, opset=18)
    assert_matches_reference(model, inputs)


@pytest.mark.parametrize("static", [False, True])
def test_integer_reduce_mean_is_exact(static):
    # int32 means were computed in float32 (1431655808 for 1431655765.67); onnxruntime
    # truncates the exact mean toward zero (seed 9, graph 131).
    x = np.array([[2**31 - 1, 2**31 - 3, 5], [-7, 2, 0]], np.int32)
    axes = np.array([1], np.int64)
    model = single_node_model(
        "ReduceMean",
        {"x": x, "axes": axes},
        keepdims=0,
        opset=18,
        initializers={"axes": axes, **({"x": x} if static else {})},
    )
    assert_matches_reference(model, {} if static else {"x": x})


@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_resize_pytorch_half_pixel_to_one_sample_reads_the_first(mode):
    # pytorch_half_pixel with an output length of 1 samples input index 0 (spec, onnxruntime);
    # onnx2jax and the reference evaluator both took (0 + 0.5) / scale - 0.5 when the scale
    # times the input length was not exactly 1, which the fuzzer first listed as an
    # onnxruntime departure (seed 21, graph 127).
    x = np.array([1.5, 2.5, -1.25], np.float32).reshape(1, 1, 3, 1)
    scales = np.array([1, 1, 0.5, 3], np.float32)
    model = single_node_model(
        "Resize",
        {"x": x, "roi": None, "scales": scales},
        initializers={"scales": scales},
        mode=mode,
        coordinate_transformation_mode="pytorch_half_pixel",
    )
    (out,) = assert_matches_reference(model, {"x": x})
    np.testing.assert_array_equal(out, np.full((1, 1, 1, 3), 1.5, np.float32))


def test_erf_and_softmax_of_constants_under_jit():
    """Seed 2, graph 197: Erf of a Constant node staged jax ops into the trace and failed."""
    for op, attrs in (("Erf", {}), ("Softmax", {"axis": -1})):
        value = numpy_helper.from_array(np.array([[0.5, -1.0, 2.0]], np.float32), "c")
        nodes = [
            helper.make_node("Constant", [], ["c"], value=value),
            helper.make_node(op, ["c"], ["e"], **attrs),
            helper.make_node("Add", ["e", "x"], ["y"]),
        ]
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", 1, [1, 3])],
            [helper.make_tensor_value_info("y", 1, [1, 3])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        assert_matches_reference(model, {"x": np.zeros((1, 3), np.float32)}, rtol=1e-6)


def test_lp_normalization_keeps_nan():
    """Seed 7, graph 95: LpNormalization gave 0 where its input holds NaN."""
    x = np.array([[np.nan, 1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 4.0, 0.0]], np.float32)
    for p in (1, 2):
        model = single_node_model("LpNormalization", {"x": x}, axis=-1, p=p)
        assert_matches_reference(model, {"x": x}, rtol=1e-6)


# ---------------------------------------------------------------- the judge's rules
def _graph(nodes, inputs, outputs, opset=21, initializers=()):
    """A model of ``nodes``; ``inputs`` and ``outputs`` map names to (elem type, shape)."""
    graph = helper.make_graph(
        nodes,
        "judge_rule",
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in outputs.items()],
        initializer=list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _judging(model, feeds):
    """How check() compares ``model``'s outputs (the judge's own steps)."""
    import jax

    with jax.enable_x64(True):
        expected, _, by_evaluator = run_reference(model, feeds)
        actual = [v for v in run_onnx2jax(model, feeds).values() if v is not None]
        return unjudged(model, feeds, expected, actual, by_evaluator)


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_average_pool_over_nan_is_judged_where_an_engine_propagates_it(count_include_pad, dtype):
    # The reference evaluator (the only engine with a float64 AveragePool) pads with NaN when
    # count_include_pad=0 and averages with nanmean, dropping the input's own NaN: its output
    # is not compared there (seed 31: 5559, 7434; seed 32: 657, 6982, 7271, 7371). onnxruntime's
    # float32 AveragePool and count_include_pad=1 propagate NaN and stay compared.
    x = np.array([[[1.5, np.nan, -2.0, 3.0, 0.5]]], dtype)
    model = single_node_model(
        "AveragePool",
        {"x": x},
        kernel_shape=[2],
        pads=[1, 1],
        count_include_pad=count_include_pad,
        opset=19,
    )
    assert check(model, {"x": x}).kind == "ok"
    skipped = _judging(model, {"x": x}).skip
    assert skipped == ({"y"} if dtype == np.float64 and not count_include_pad else set())
    finite = np.nan_to_num(x)
    assert not _judging(model, {"x": finite}).skip


def _loop_of(node, trip_count=2):
    """``node`` alone in the body of a Loop of ``trip_count`` iterations (as the fuzzer wraps
    one), its output scanned; the trip count and condition are Constant nodes ("n", "c")."""
    body = helper.make_graph(
        [node, helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [
            helper.make_tensor_value_info("iter", onnx.TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
            helper.make_value_info(node.output[0], onnx.TypeProto()),
        ],
    )
    trips = numpy_helper.from_array(np.int64(trip_count))
    return [
        helper.make_node("Constant", [], ["n"], value=trips),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.bool_(True))),
        helper.make_node("Loop", ["n", "c"], ["y"], body=body),
    ]


@pytest.mark.parametrize(
    ("op", "x"),
    [
        ("ReduceMean", np.zeros((3, 0), np.float32)),  # empty: onnxruntime 0, spec NaN
        ("ReduceLogSumExp", np.array([[-2.0, np.nan, -1.0, -np.inf, 0.5, np.inf]], np.float16)),
    ],
)
def test_departure_inside_a_loop_is_found_by_unwrapping_it(op, x):
    # onnxruntime gives 0 for ReduceMean of nothing and, at opset 21 in float16, +inf for a
    # ReduceLogSumExp over NaN and +-inf (spec and reference: NaN). Inside a Loop the
    # reference evaluator's own scan-output bug hid that, and the shrinker did not unwrap a
    # Loop beside its Constant trip count (seed 31: 4920, 6312; seed 32: 4448).
    nodes = _loop_of(helper.make_node(op, ["x"], ["r"], keepdims=0))
    elem = helper.np_dtype_to_tensor_dtype(x.dtype)
    outputs = {"n": (onnx.TensorProto.INT64, []), "c": (onnx.TensorProto.BOOL, [])}
    model = _graph(nodes, {"x": (elem, x.shape)}, {**outputs, "y": (elem, None)})
    outcome = check(model, {"x": x})
    assert outcome.kind == "fail"
    small, _, small_outcome = shrink(model, {"x": x}, outcome)
    assert small_outcome.kind == "departure", small_outcome.message
    assert [n.op_type for n in small.graph.node] == [op]


def test_max_pool_of_only_minus_inf_is_an_onnxruntime_departure():
    # onnxruntime's max pooling starts from the lowest finite float: a window of only -inf
    # gives -3.4e38, the spec's max -inf (seed 31, graph 3796). The rule reads exactly that.
    x = np.full((1, 2, 3), -np.inf, np.float32)
    x[0, 1, 0] = 2.0
    model = single_node_model("GlobalMaxPool", {"x": x})
    outcome = check(model, {"x": x})
    assert outcome.kind == "departure" and "lowest finite" in outcome.message
    lowest = np.full((1, 2, 3), np.finfo(np.float32).min, np.float32)  # both engines agree
    assert check(single_node_model("GlobalMaxPool", {"x": lowest}), {"x": lowest}).kind == "ok"


def test_cast_of_a_float16_value_held_in_float32_is_compared_in_float16():
    # onnx2jax holds float16 values in float32 between ops (float16_compute="float32"), as
    # onnxruntime does for values that are not graph outputs; the fuzzer makes every value an
    # output, so there onnxruntime rounds before a Cast to float32 (seed 32: 4603, 6174) and a
    # Mod or comparison reads another value (4874, 4294).
    f16, f32, bool_ = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("CastLike", ["t", "like"], ["c"]),
        helper.make_node("Cast", ["x"], ["exact"], to=f32),  # a graph input: exact float16
        helper.make_node("Less", ["t", "x"], ["less"]),
        helper.make_node("Cast", ["c"], ["back"], to=f16),  # an explicit rounding, compared
    ]
    model = _graph(
        nodes,
        {"x": (f16, [2]), "like": (f32, [1])},
        {"t": (f16, [2]), "c": (f32, [2]), "exact": (f32, [2]), "less": (bool_, [2])}
        | {"back": (f16, [2])},
    )
    feeds = {"x": np.array([-0.3035, 1.5], np.float16), "like": np.zeros(1, np.float32)}
    assert check(model, feeds).kind == "ok"
    judging = _judging(model, feeds)
    assert judging.as_float16 == {"c"}
    assert judging.skip == {"less", "back"}  # "back" reads "c", which the engines hold apart
    assert compare(np.float16([-0.2944]), np.float16([-0.2944])) is None
    # A Cast to float16 of a float32 value is never skipped.
    nodes = [helper.make_node("Sin", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["h"], to=f16)]
    model = _graph(nodes, {"x": (f32, [2])}, {"s": (f32, [2]), "h": (f16, [2])})
    judging = _judging(model, {"x": np.array([0.5, -2.0], np.float32)})
    assert not (judging.skip or judging.as_float16)


@pytest.mark.parametrize(
    ("op", "x", "dtype"),
    [
        ("Acos", 3.0, np.float32),  # erf(3) = 1 - 2.2e-5: acos amplifies 150 times
        ("Atanh", -2.5, np.float64),  # the reference evaluator's Erf is a float32 one
    ],
)
def test_ill_conditioned_op_after_a_last_bit_difference_is_not_compared(op, x, dtype):
    # Erf -> Acos (seed 31, graph 723; both engines within an ulp of the true erf(3)) and
    # Erf -> Atanh in float64 (seed 31, graph 5077; onnx2jax's erf correctly rounded, the
    # reference evaluator's off by 1e-8): the difference times the derivative exceeds the
    # tolerance, so that output is not compared; an exact input is.
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("Erf", ["x"], ["e"]), helper.make_node(op, ["e"], ["y"])]
    model = _graph(nodes, {"x": (elem, [1])}, {"e": (elem, [1]), "y": (elem, [1])})
    feeds = {"x": np.array([x], dtype)}
    assert check(model, feeds).kind == "ok"
    assert _judging(model, feeds).skip == {"y"}
    direct = single_node_model(op, {"x": np.array([0.99997], dtype)})
    assert not _judging(direct, {"x": np.array([0.99997], dtype)}).skip


def test_amplification_rule_reads_the_derivative():
    # Reciprocal of a value that differs by 1e-7 between the engines: 1e-7 / x^2 is 0.1 at
    # x = 1e-3 (more than the output's tolerance, not compared: seed 32, graph 1425, after a
    # cubic Resize where onnxruntime is the less accurate engine) and 4e-7 at x = 0.5.
    nodes = [helper.make_node("Sin", ["x"], ["s"]), helper.make_node("Reciprocal", ["s"], ["r"])]
    f32 = onnx.TensorProto.FLOAT
    model = _graph(nodes, {"x": (f32, [1])}, {"s": (f32, [1]), "r": (f32, [1])})
    for s, skipped in ((1e-3, {"r"}), (0.5, set())):
        expected = [np.float32([s]), np.float32([1 / s])]
        actual = [np.float32([s + 1e-7]), np.float32([1 / (s + 1e-7)])]
        feeds = {"x": np.float32([0.0])}
        assert unjudged(model, feeds, expected, [actual]).skip == skipped
        assert not unjudged(model, feeds, expected, [expected]).skip
