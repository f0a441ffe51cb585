"""Element-wise, activation, math and reduction ops: the corners the ONNX node suite leaves out
(broadcasting, empty tensors, negative axes, dtypes, legacy opsets, x64 off, gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx2jax
from tests.helpers import (
    assert_matches_reference,
    f32,
    feeds_of,
    run_onnx2jax,
    run_reference,
    single_node_model,
)

RNG = np.random.default_rng(0)


def i64(values):
    return np.asarray(values, np.int64)


# (id, op_type, inputs, attributes, opset, engine, initializer names)
CASES = [
    (
        "max_variadic_broadcast",
        "Max",
        {"a": f32(2, 1, 3), "b": f32(4, 1), "c": f32(3)},
        {},
        13,
        "onnxruntime",
        (),
    ),
    (
        "mean_variadic_broadcast",
        "Mean",
        {"a": f32(2, 1, 3), "b": f32(4, 1), "c": f32(3)},
        {},
        13,
        "onnxruntime",
        (),
    ),
    ("sum_single", "Sum", {"a": f32(2, 3)}, {}, 13, "onnxruntime", ()),
    (
        "min_int32",
        "Min",
        {"a": np.array([[1, -5, 3]], np.int32), "b": np.array([[2], [-7]], np.int32)},
        {},
        13,
        "onnxruntime",
        (),
    ),
    (
        "pow_float_int_exponent",
        "Pow",
        {"x": f32(2, 3), "e": np.array([2, 3, -1], np.int64)},
        {},
        15,
        "onnxruntime",
        (),
    ),
    (
        "pow_constant_square_broadcasts",
        "Pow",
        {"x": f32(3), "e": np.full((2, 1), 2.0, np.float32)},
        {},
        15,
        "onnxruntime",
        ("e",),
    ),
    (
        "pow_int_base",
        "Pow",
        {"x": np.array([1, 2, -3], np.int32), "e": np.array([3, 2, 3], np.int32)},
        {},
        15,
        "onnxruntime",
        (),
    ),
    (
        "mod_int_floor",
        "Mod",
        {"a": np.array([-7, 7, -7, 7], np.int32), "b": np.array([3, -3, -3, 3], np.int32)},
        {},
        13,
        "onnxruntime",
        (),
    ),
    (
        "mod_int_fmod",
        "Mod",
        {"a": np.array([-7, 7, -7, 7], np.int64), "b": np.array([3, -3, -3, 3], np.int64)},
        {"fmod": 1},
        13,
        "onnxruntime",
        (),
    ),
    (
        "mod_float_fmod_broadcast",
        "Mod",
        {"a": f32(2, 3) * 5, "b": np.array([1.5], np.float32)},
        {"fmod": 1},
        13,
        "onnxruntime",
        (),
    ),
    (
        "clip_only_max_int",
        "Clip",
        {"x": np.array([-5, 0, 9], np.int32), "min": None, "max": np.array(4, np.int32)},
        {},
        13,
        "onnxruntime",
        (),
    ),
    (
        "clip_min_above_max",
        "Clip",
        {"x": f32(5), "min": np.array(1, np.float32), "max": np.array(-1, np.float32)},
        {},
        13,
        "reference",
        (),
    ),
    (
        "clip_attributes_v6",
        "Clip",
        {"x": f32(2, 4)},
        {"min": -0.5, "max": 0.25},
        6,
        "onnxruntime",
        (),
    ),
    (
        "where_broadcast",
        "Where",
        {"c": np.array([[True], [False]]), "x": f32(3), "z": np.array(7.0, np.float32)},
        {},
        16,
        "onnxruntime",
        (),
    ),
    ("erf_int", "Erf", {"x": np.array([-2, 0, 1], np.int32)}, {}, 13, "reference", ()),
    (
        "round_half_even",
        "Round",
        {"x": np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 2.6], np.float32)},
        {},
        22,
        "onnxruntime",
        (),
    ),
    (
        "isinf_none",
        "IsInf",
        {"x": np.array([np.inf, -np.inf, 1.0], np.float32)},
        {"detect_positive": 0, "detect_negative": 0},
        20,
        "reference",
        (),
    ),
    (
        "bitshift_signed_right",
        "BitShift",
        {"x": np.array([-16, 16, -1, 5, -5], np.int8), "s": np.array([2, 2, 9, -1, 8], np.int8)},
        {"direction": "RIGHT"},
        28,
        "reference",
        (),
    ),
    (
        "bitshift_signed_left",
        "BitShift",
        {"x": np.array([-16, 64, 1, 5], np.int16), "s": np.array([2, 2, 16, 3], np.int16)},
        {"direction": "LEFT"},
        28,
        "reference",
        (),
    ),
    (
        "bitshift_uint_overwide",
        "BitShift",
        {"x": np.array([1, 255, 7], np.uint8), "s": np.array([8, 1, 3], np.uint8)},
        {"direction": "LEFT"},
        11,
        "reference",
        (),
    ),
    (
        "shrink_int",
        "Shrink",
        {"x": np.arange(-4, 5, dtype=np.int32)},
        {"lambd": 1.5, "bias": 1.0},
        9,
        "onnxruntime",
        (),
    ),
    (
        "equal_bool",
        "Equal",
        {"a": np.array([True, False, True]), "b": np.array([True])},
        {},
        19,
        "onnxruntime",
        (),
    ),
    (
        "prelu_channel_slope",
        "PRelu",
        {"x": f32(2, 3, 4), "s": f32(3, 1)},
        {},
        16,
        "onnxruntime",
        (),
    ),
    ("relu_int8", "Relu", {"x": np.array([-3, 0, 4], np.int8)}, {}, 14, "onnxruntime", ()),
    ("gelu_tanh", "Gelu", {"x": f32(3, 4)}, {"approximate": "tanh"}, 20, "onnxruntime", ()),
    ("celu_alpha", "Celu", {"x": f32(3, 4)}, {"alpha": 2.0}, 12, "onnxruntime", ()),
    ("selu_float16", "Selu", {"x": f32(6).astype(np.float16)}, {}, 6, "onnxruntime", ()),
    ("matmul_vec_mat", "MatMul", {"a": f32(4), "b": f32(2, 4, 3)}, {}, 13, "onnxruntime", ()),
    ("matmul_mat_vec", "MatMul", {"a": f32(2, 3, 4), "b": f32(4)}, {}, 13, "onnxruntime", ()),
    (
        "matmul_batch_broadcast",
        "MatMul",
        {"a": f32(2, 1, 3, 4), "b": f32(5, 4, 2)},
        {},
        13,
        "onnxruntime",
        (),
    ),
    (
        "matmul_int32",
        "MatMul",
        {
            "a": np.arange(6, dtype=np.int32).reshape(2, 3),
            "b": np.arange(6, dtype=np.int32).reshape(3, 2),
        },
        {},
        13,
        "onnxruntime",
        (),
    ),
    (
        "gemm_trans_both_c_row",
        "Gemm",
        {"a": f32(4, 3), "b": f32(5, 4), "c": f32(5)},
        {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0},
        13,
        "onnxruntime",
        (),
    ),
    (
        "gemm_no_c",
        "Gemm",
        {"a": f32(3, 4), "b": f32(4, 5), "c": None},
        {"alpha": 3.0},
        13,
        "onnxruntime",
        (),
    ),
    (
        "gemm_legacy_broadcast",
        "Gemm",
        {"a": f32(3, 4), "b": f32(4, 5), "c": f32(1)},
        {"broadcast": 1},
        6,
        "reference",
        (),
    ),
    (
        "gemm_int32",
        "Gemm",
        {
            "a": np.arange(6, dtype=np.int32).reshape(2, 3),
            "b": np.arange(6, dtype=np.int32).reshape(3, 2),
            "c": np.array([1, -1], np.int32),
        },
        {},
        13,
        "reference",
        (),
    ),
    (
        "einsum_spaces_ellipsis",
        "Einsum",
        {"a": f32(2, 3, 4), "b": f32(2, 4, 5)},
        {"equation": "...ij, ...jk -> ...ik"},
        12,
        "onnxruntime",
        (),
    ),
    (
        "einsum_implicit_trace",
        "Einsum",
        {"a": f32(3, 3)},
        {"equation": "ii"},
        12,
        "onnxruntime",
        (),
    ),
    (
        "cumsum_reverse_exclusive_negative_axis",
        "CumSum",
        {"x": f32(2, 4), "axis": i64(-1)},
        {"reverse": 1, "exclusive": 1},
        14,
        "onnxruntime",
        ("axis",),
    ),
    (
        "cumsum_int32_exclusive",
        "CumSum",
        {"x": np.arange(1, 7, dtype=np.int32).reshape(2, 3), "axis": np.array(0, np.int32)},
        {"exclusive": 1},
        14,
        "onnxruntime",
        ("axis",),
    ),
    (
        "cumprod_reverse",
        "CumProd",
        {"x": f32(3, 2), "axis": i64(0)},
        {"reverse": 1},
        26,
        "reference",
        ("axis",),
    ),
    ("softmax_legacy_flattens", "Softmax", {"x": f32(2, 3, 4)}, {"axis": 1}, 11, "onnxruntime", ()),
    ("softmax_axis0", "Softmax", {"x": f32(2, 3, 4)}, {"axis": 0}, 13, "onnxruntime", ()),
    # Rows over 32 wide reduce in two steps on the CPU (a row of 128; trailing axes of 6x8).
    ("softmax_wide_rows", "Softmax", {"x": f32(2, 3, 128) * 8}, {}, 13, "onnxruntime", ()),
    (
        "softmax_legacy_wide_trailing_axes",
        "Softmax",
        {"x": f32(2, 6, 8) * 8},
        {"axis": 1},
        11,
        "onnxruntime",
        (),
    ),
    (
        "softmax_wide_rows_masked",
        "Softmax",
        {"x": np.where(RNG.random((4, 64)) < 0.5, -np.inf, f32(4, 64)).astype(np.float32)},
        {},
        13,
        "onnxruntime",
        (),
    ),
    ("logsoftmax_legacy_default", "LogSoftmax", {"x": f32(2, 3, 4)}, {}, 1, "onnxruntime", ()),
    (
        "hardmax_legacy_ties",
        "Hardmax",
        {"x": np.array([[[1, 3], [3, 0]], [[2, 2], [0, 1]]], np.float32)},
        {"axis": 1},
        11,
        "onnxruntime",
        (),
    ),
    ("hardmax_middle_axis", "Hardmax", {"x": f32(2, 3, 4)}, {"axis": -2}, 13, "onnxruntime", ()),
    ("det_batched", "Det", {"x": f32(2, 3, 3)}, {}, 22, "onnxruntime", ()),
    (
        "reduce_sum_negative_axes_input",
        "ReduceSum",
        {"x": f32(2, 3, 4), "axes": i64([-1, 0])},
        {"keepdims": 0},
        13,
        "onnxruntime",
        ("axes",),
    ),
    (
        "reduce_sum_noop",
        "ReduceSum",
        {"x": f32(2, 3), "axes": i64([])},
        {"noop_with_empty_axes": 1},
        13,
        "onnxruntime",
        ("axes",),
    ),
    (
        "reduce_sum_int8",
        "ReduceSum",
        {"x": np.full((4, 5), 30, np.int8), "axes": None},
        {"keepdims": 0},
        13,
        "reference",
        (),
    ),
    (
        "reduce_mean_axes_attr",
        "ReduceMean",
        {"x": f32(2, 3, 4)},
        {"axes": [1, -1]},
        13,
        "onnxruntime",
        (),
    ),
    (
        "reduce_max_empty",
        "ReduceMax",
        {"x": np.zeros((2, 0, 3), np.float32), "axes": i64([1])},
        {},
        18,
        "onnxruntime",
        ("axes",),
    ),
    (
        "reduce_min_empty_int",
        "ReduceMin",
        {"x": np.zeros((0, 3), np.int32), "axes": i64([0])},
        {"keepdims": 0},
        18,
        "onnxruntime",
        ("axes",),
    ),
    (
        "reduce_max_bool",
        "ReduceMax",
        {"x": np.array([[True, False], [False, False]]), "axes": i64([1])},
        {},
        20,
        "reference",
        ("axes",),
    ),
    (
        "reduce_prod_empty",
        "ReduceProd",
        {"x": np.zeros((0, 3), np.float32)},
        {"axes": [0]},
        13,
        "onnxruntime",
        (),
    ),
    (
        "reduce_l2_int",
        "ReduceL2",
        {"x": np.array([[3, 4], [5, 12]], np.int32)},
        {"axes": [1]},
        13,
        "onnxruntime",
        (),
    ),
    (
        "reduce_log_sum_exp_large",
        "ReduceLogSumExp",
        {"x": np.array([[1000.0, 1000.0], [-np.inf, 0.0]], np.float32), "axes": i64([1])},
        {},
        18,
        "reference",
        ("axes",),
    ),
    (
        "reduce_log_sum_exp_empty",
        "ReduceLogSumExp",
        {"x": np.zeros((2, 0), np.float32), "axes": i64([1])},
        {"keepdims": 0},
        18,
        "reference",
        ("axes",),
    ),
    (
        "reduce_sum_square_scalar",
        "ReduceSumSquare",
        {"x": np.array(3.0, np.float32)},
        {},
        13,
        "onnxruntime",
        (),
    ),
    (
        "argmax_last_index_negative_axis",
        "ArgMax",
        {"x": np.array([[1, 5, 5], [7, 7, 0]], np.float32)},
        {"axis": -1, "keepdims": 0, "select_last_index": 1},
        13,
        "onnxruntime",
        (),
    ),
    (
        "argmin_first_index",
        "ArgMin",
        {"x": np.array([[1, 0, 0], [7, 7, 9]], np.int32)},
        {"axis": 1},
        13,
        "onnxruntime",
        (),
    ),
]


@pytest.mark.parametrize(
    ("op_type", "inputs", "attributes", "opset", "engine", "constants"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_matches_reference(op_type, inputs, attributes, opset, engine, constants):
    initializers = {name: inputs[name] for name in constants}
    model = single_node_model(op_type, inputs, opset=opset, initializers=initializers, **attributes)
    half = any(v is not None and v.dtype == np.float16 for v in inputs.values())
    assert_matches_reference(
        model, feeds_of(model, inputs), engine=engine, rtol=2e-3 if half else 1e-4, atol=1e-5
    )


X64_OFF_CASES = [
    "gemm_trans_both_c_row",
    "cumsum_int32_exclusive",
    "reduce_min_empty_int",
    "argmax_last_index_negative_axis",
    "mod_int_fmod",
    "pow_float_int_exponent",
    "softmax_legacy_flattens",
    "reduce_sum_negative_axes_input",
    "softmax_wide_rows",
]


@pytest.mark.parametrize("case_id", X64_OFF_CASES)
def test_x64_off(case_id):
    """With x64 off, int64 becomes int32 and float64 float32; the values must not change."""
    _, op_type, inputs, attributes, opset, engine, constants = next(
        c for c in CASES if c[0] == case_id
    )
    model = single_node_model(
        op_type,
        inputs,
        opset=opset,
        initializers={name: inputs[name] for name in constants},
        **attributes,
    )
    feeds = feeds_of(model, inputs)
    (want,) = run_reference(model, feeds, engine=engine)
    (got,) = run_onnx2jax(model, feeds, x64=False)
    assert got.dtype.itemsize <= 4
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_equal_on_static_strings_folds():
    """String tensors only exist statically: Equal of two string constants runs in NumPy."""
    a = helper.make_tensor("a", TensorProto.STRING, [2], [b"x", b"y"])
    b = helper.make_tensor("b", TensorProto.STRING, [1], [b"y"])
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["ca"], value=a),
            helper.make_node("Constant", [], ["cb"], value=b),
            helper.make_node("Equal", ["ca", "cb"], ["eq"]),
            helper.make_node("Neg", ["x"], ["minus_x"]),
            helper.make_node("Where", ["eq", "x", "minus_x"], ["y"]),
        ],
        "strings",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    (got,) = run_onnx2jax(model, {"x": np.ones(2, np.float32)})
    np.testing.assert_array_equal(got, [-1.0, 1.0])


def test_static_values_stay_static():
    """Softmax/Erf/ReduceMax of constants fold to NumPy at trace time (no HLO constants)."""
    from onnx2jax.core.convert import OpContext
    from onnx2jax.ops.registry import lookup

    node = helper.make_node("Softmax", ["x"], ["y"], axis=0)

    class FakeInterpreter:
        opsets = {"": 13}
        base_dir = None

        @staticmethod
        def attributes(n):
            return {a.name: helper.get_attribute_value(a) for a in n.attribute}

    ctx = OpContext(FakeInterpreter(), node, {}, plan=None)
    x = np.array([1.0, 2.0], np.float32)
    for op_type in ("Softmax", "Erf", "Relu", "Sigmoid"):
        out = lookup("", op_type, 13).function(ctx, x)
        assert isinstance(out, np.ndarray) and out.dtype == np.float32, op_type
    out = lookup("", "ReduceMax", 18).function(ctx, x, np.array([0], np.int64))
    assert isinstance(out, np.ndarray)


def _softmax_model(shape, dtype=TensorProto.FLOAT):
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "scale"], ["scaled"]),
            helper.make_node("Softmax", ["scaled"], ["y"], axis=-1),
        ],
        "softmax",
        [helper.make_tensor_value_info("x", dtype, shape)],
        [helper.make_tensor_value_info("y", dtype, shape)],
        initializer=[
            numpy_helper.from_array(np.array(0.5, helper.tensor_dtype_to_np_dtype(dtype)), "scale")
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_wide_softmax_fuses_its_input_on_cpu():
    """A softmax over 128 scores compiles to two-step reductions that read the scaled input
    directly: XLA:CPU's reduce-window split (which wrote the input out first) is gone."""
    model = onnx2jax.load(_softmax_model([4, 128]))
    x = f32(4, 128)
    bound = model.bind_inputs((x,), {})
    text = model.engine.lower(bound).compile().as_text()
    assert "reduce-window" not in text
    np.testing.assert_allclose(
        np.asarray(model(x)["y"]), jax.nn.softmax(x * 0.5, axis=-1), rtol=1e-6, atol=1e-7
    )


def test_wide_softmax_gradient_vmap_and_float64():
    x = f32(3, 96) * 4
    w = f32(3, 96)
    model = onnx2jax.load(_softmax_model(["rows", 96]))

    def loss(v, softmax):
        return jnp.sum(softmax(v) * w)

    ours = jax.grad(loss)(x, lambda v: model.apply(model.params, v)["y"])
    want = jax.grad(loss)(x, lambda v: jax.nn.softmax(v * 0.5, axis=-1))
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-7)
    batched = jax.vmap(lambda v: model.apply(model.params, v[None])["y"][0])(x)
    np.testing.assert_allclose(batched, jax.nn.softmax(x * 0.5, axis=-1), rtol=1e-6, atol=1e-7)
    with jax.enable_x64(True):
        model64 = onnx2jax.load(_softmax_model(["rows", 96], TensorProto.DOUBLE))
        x64 = x.astype(np.float64)
        got = np.asarray(model64(x64)["y"])
        assert got.dtype == np.float64
        want64 = np.exp(x64 * 0.5 - (x64 * 0.5).max(-1, keepdims=True))
        np.testing.assert_allclose(got, want64 / want64.sum(-1, keepdims=True), rtol=1e-13)


def _chain_model():
    """y = ReduceLogSumExp(Softmax(LeakyRelu(Gemm(x, w, b)) ** 2)), float64, w and b params."""
    w = numpy_helper.from_array(f32(4, 3).astype(np.float64), "w")
    b = numpy_helper.from_array(f32(3).astype(np.float64), "b")
    two = numpy_helper.from_array(np.array(2.0), "two")
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["g"]),
            helper.make_node("LeakyRelu", ["g"], ["r"], alpha=0.1),
            helper.make_node("Pow", ["r", "two"], ["p"]),
            helper.make_node("Softmax", ["p"], ["s"], axis=-1),
            helper.make_node("ReduceLogSumExp", ["s"], ["y"], keepdims=0),
        ],
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [])],
        initializer=[w, b, two],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_gradients_match_finite_differences():
    x = f32(2, 4).astype(np.float64)
    with jax.enable_x64(True):
        model = onnx2jax.load(_chain_model())
        # Pow's exponent initializer stays a constant (its gradient is NaN at negative bases).
        assert set(model.params) == {"w", "b"}

        @jax.jit
        def loss(params):
            return model.apply(params, x)["y"]

        params = model.params
        grads = jax.grad(loss)(params)
        eps = 1e-6
        for name, value in params.items():
            for index in np.ndindex(value.shape):
                step = jnp.zeros_like(value).at[index].set(eps)
                numeric = (
                    loss({**params, name: value + step}) - loss({**params, name: value - step})
                ) / (2 * eps)
                np.testing.assert_allclose(grads[name][index], numeric, rtol=1e-5, atol=1e-9)


def test_pow_square_gradient_at_negative_base():
    model = onnx2jax.load(
        single_node_model(
            "Pow",
            {"x": np.zeros(3, np.float32), "e": np.array(2.0, np.float32)},
            opset=15,
            initializers={"e": np.array(2.0, np.float32)},
        )
    )
    x = jnp.array([-2.0, 0.0, 3.0], jnp.float32)
    grad = jax.grad(lambda v: model.apply(model.params, v)["y"].sum())(x)
    np.testing.assert_allclose(grad, [-4.0, 0.0, 6.0])


def test_relu_gradient_at_zero_is_zero():
    model = onnx2jax.load(single_node_model("Relu", {"x": np.zeros(3, np.float32)}, opset=14))
    grad = jax.grad(lambda v: model.apply(model.params, v)["y"].sum())(jnp.array([-1.0, 0.0, 1.0]))
    np.testing.assert_array_equal(grad, [0.0, 0.0, 1.0])


@pytest.mark.parametrize(
    ("op_type", "attributes", "message"),
    [
        ("Mod", {"fmod": 2}, "fmod"),
        ("BitShift", {"direction": "UP"}, "direction"),
        ("Gelu", {"approximate": "erf"}, "approximate"),
    ],
)
def test_bad_attributes_raise(op_type, attributes, message):
    x = np.array([1, 2], np.uint8) if op_type == "BitShift" else np.ones(2, np.float32)
    inputs = {"x": x} if op_type == "Gelu" else {"x": x, "b": x}
    model = single_node_model(op_type, inputs, opset=20, **attributes)
    with pytest.raises(onnx2jax.core.errors.OpError, match=message):
        run_onnx2jax(model, inputs)


def _divide_by_constant_model(divisor: np.ndarray, as_constant_node: bool):
    """x / divisor with the divisor a float initializer (a param) or a Constant node."""
    tensor = numpy_helper.from_array(divisor, "d")
    nodes = [helper.make_node("Div", ["x", "d"], ["y"])]
    initializers = [tensor]
    if as_constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["d"], value=tensor))
        initializers = []
    elem = helper.np_dtype_to_tensor_dtype(divisor.dtype)
    graph = helper.make_graph(
        nodes,
        "div",
        [helper.make_tensor_value_info("x", elem, None)],
        [helper.make_tensor_value_info("y", elem, None)],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def _spread(dtype, *shape):
    """Values over many binades, so that quotients hit every rounding case."""
    return (RNG.normal(size=shape) * RNG.choice([1e-3, 1.0, 1e3], size=shape)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("divisor_shape", [(), (64,), (256, 1), (256, 64)])
@pytest.mark.parametrize("source", ["input", "initializer", "constant_node"])
def test_div_is_correctly_rounded_under_jit(dtype, divisor_shape, source):
    # XLA turns x / c into x * (1 / c), an ulp off for about a tenth of the quotients; Div must
    # equal NumPy's division bit for bit (fp16: one float32 division rounded once, as
    # onnxruntime computes it, which is also the correctly rounded quotient).
    x = _spread(dtype, 256, 64)
    divisor = np.asarray(_spread(dtype, *divisor_shape) + dtype(0.5))
    with np.errstate(over="ignore", divide="ignore"):  # fp16 quotients may overflow
        want = x / divisor
    if source == "input":
        model = single_node_model("Div", {"x": x, "d": divisor}, opset=14)
        (got,) = run_onnx2jax(model, {"x": x, "d": divisor}, x64=False)
        (ort,) = run_reference(model, {"x": x, "d": divisor})
        np.testing.assert_array_equal(ort, want)
    else:
        model = _divide_by_constant_model(divisor, source == "constant_node")
        (got,) = run_onnx2jax(model, {"x": x}, x64=False)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)


def test_div_by_a_power_of_two_stays_a_multiplication():
    model = onnx2jax.load(_divide_by_constant_model(np.array(0.25, np.float32), True))
    x = _spread(np.float32, 8, 8)
    bound = model.bind_inputs((x,), {})
    text = model.engine.lower(bound).compile().as_text()
    assert "opt-barrier" not in text
    np.testing.assert_array_equal(np.asarray(model(x)["y"]), x / np.float32(0.25))


@pytest.mark.parametrize("op_type", ["Softmax", "LogSoftmax"])
def test_float16_softmax_as_accurate_as_onnxruntime(op_type):
    # fp16 softmax computed in float32 and rounded once, as onnxruntime does: at most a few
    # results an ulp from the correctly rounded value, where per-op fp16 rounding missed ~40%.
    x = (RNG.normal(size=(256, 128)) * 3).astype(np.float16)
    model = single_node_model(op_type, {"x": x}, opset=13)
    (ort,) = run_reference(model, {"x": x})
    (got,) = run_onnx2jax(model, {"x": x})
    wide = x.astype(np.float64)
    shifted = wide - wide.max(-1, keepdims=True)
    log_total = np.log(np.exp(shifted).sum(-1, keepdims=True))
    exact = np.exp(shifted - log_total) if op_type == "Softmax" else shifted - log_total
    exact = exact.astype(np.float16)
    assert got.dtype == np.float16
    allowed = max(int(np.sum(ort != exact)), 0) + x.size // 1000
    assert int(np.sum(got != exact)) <= allowed
    np.testing.assert_allclose(got.astype(np.float32), ort.astype(np.float32), rtol=2e-3, atol=1e-4)


def test_float16_gemm_rounds_once_like_onnxruntime():
    # alpha * A.B + beta * C in float32, rounded once: onnxruntime's values but for the odd
    # last bit where the two sum the products in another order.
    feeds = {
        "a": RNG.normal(size=(16, 32)).astype(np.float16),
        "b": RNG.normal(size=(24, 32)).astype(np.float16),
        "c": RNG.normal(size=(24,)).astype(np.float16),
    }
    model = single_node_model("Gemm", feeds, opset=13, transB=1, alpha=0.5, beta=2.0)
    (want,) = run_reference(model, feeds)
    (got,) = run_onnx2jax(model, feeds)
    assert got.dtype == np.float16
    assert np.mean(got != want) <= 0.01
    np.testing.assert_allclose(
        got.astype(np.float32), want.astype(np.float32), rtol=1e-3, atol=1e-3
    )


@pytest.mark.parametrize("op_type", ["Mean", "Sum"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_variadic_sum_and_mean_bit_for_bit_with_onnxruntime(op_type, dtype):
    # onnxruntime's Mean multiplies the sum by 1/n; fp16 inputs are summed in float32 and
    # rounded once (rounding after every addition missed about half of the results).
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    feeds = {f"x{i}": RNG.normal(size=(64, 64)).astype(dtype) for i in range(3)}
    graph = helper.make_graph(
        [helper.make_node(op_type, list(feeds), ["y"])],
        "variadic",
        [helper.make_tensor_value_info(name, elem, [64, 64]) for name in feeds],
        [helper.make_tensor_value_info("y", elem, [64, 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    (want,) = run_reference(model, feeds)
    (got,) = run_onnx2jax(model, feeds, x64=False)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)


def test_integer_pow_with_negative_exponents_truncates_as_exact_arithmetic():
    """Found by the loader fuzzer: int32 3 ** -2 came out 703701817 (XLA's repeated squaring);
    exact arithmetic truncates to 0, and bases 1 and -1 keep their magnitude."""
    x = np.array([3, -3, 1, -1, -1, 2, 0, 5], np.int32)
    y = np.array([-2, -1, -5, -3, -2, 3, 2, 0], np.int32)
    model = single_node_model("Pow", {"x": x, "y": y}, outputs=("z",), opset=15)
    for jit in (True, False):
        (got,) = run_onnx2jax(model, {"x": x, "y": y}, jit=jit)
        np.testing.assert_array_equal(got, [0, 0, 1, -1, 1, 8, 0, 1])
        (static,) = run_onnx2jax(
            single_node_model(
                "Pow", {"x": x, "y": y}, outputs=("z",), opset=15, initializers={"x": x, "y": y}
            ),
            {},
            jit=jit,
        )
        np.testing.assert_array_equal(static, got)
