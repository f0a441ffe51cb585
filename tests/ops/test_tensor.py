"""Shape, indexing and cast ops: the corners the ONNX node suite leaves out.

Static inputs (integer initializers, Constant nodes) take the NumPy path; graph inputs take
the traced JAX path. Both are compared with onnxruntime or the onnx reference evaluator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx2jax
from tests.helpers import (
    assert_matches_reference,
    run_onnx2jax,
    run_reference,
    single_node_model,
)

INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min
RNG = np.random.default_rng(0)


def constant_node_model(op_type, constants, outputs=("y",), opset=21, **attributes):
    """One node whose inputs all come from Constant nodes, so every input is static."""
    nodes = [
        helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value))
        for name, value in constants.items()
    ]
    nodes.append(helper.make_node(op_type, list(constants), list(outputs), **attributes))
    graph = helper.make_graph(
        nodes, "static", [], [helper.make_value_info(n, onnx.TypeProto()) for n in outputs]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def primitives(model, feeds):
    """The jaxpr primitives that ``model.apply`` stages out for ``feeds`` (nested jits opened)."""
    compiled = onnx2jax.load(model)
    closed = jax.make_jaxpr(lambda p, f: compiled.apply(p, **f))(compiled.params, feeds)
    found, pending = set(), [closed.jaxpr]
    while pending:
        for eqn in pending.pop().eqns:
            inner = eqn.params.get("jaxpr")
            if inner is None:
                found.add(eqn.primitive.name)
            else:
                pending.append(getattr(inner, "jaxpr", inner))
    return found


# ------------------------------------------------------------------------- Slice


@pytest.mark.parametrize(
    ("starts", "ends", "axes", "steps"),
    [
        ([INT64_MAX, 1], [INT64_MIN, INT64_MAX], [0, 1], [-1, 2]),
        ([2, -10], [-100, INT64_MAX], [-2, -1], [-1, 3]),
        ([0, -1], [0, -INT64_MAX], [0, 1], [1, -2]),
    ],
)
def test_slice_clamps_like_onnxruntime(starts, ends, axes, steps):
    x = RNG.normal(size=(4, 5)).astype(np.float32)
    consts = {
        "starts": np.array(starts, np.int64),
        "ends": np.array(ends, np.int64),
        "axes": np.array(axes, np.int64),
        "steps": np.array(steps, np.int64),
    }
    model = single_node_model("Slice", {"x": x, **consts}, initializers=consts)
    assert_matches_reference(model, {"x": x})


def test_slice_opset1_attributes_and_static_data():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    model = constant_node_model(
        "Slice", {"x": x}, opset=1, starts=[1, -3], ends=[1000, -1], axes=[1, 2]
    )
    np.testing.assert_array_equal(run_onnx2jax(model, {})[0], x[:, 1:, 1:3])


def test_slice_and_gather_gradients():
    x = RNG.normal(size=(6, 4)).astype(np.float32)
    consts = {
        "starts": np.array([4], np.int64),
        "ends": np.array([0], np.int64),
        "axes": np.array([0], np.int64),
        "steps": np.array([-2], np.int64),
    }
    model = onnx2jax.load(single_node_model("Slice", {"x": x, **consts}, initializers=consts))
    grad = jax.grad(lambda v: model.apply(model.params, x=v)["y"].sum())(jnp.asarray(x))
    expected = np.zeros_like(x)
    expected[[4, 2]] = 1
    np.testing.assert_array_equal(grad, expected)

    # An embedding lookup: Gather of a float table (a trainable param) by traced ids.
    table = RNG.normal(size=(5, 3)).astype(np.float32)
    ids = np.array([[0, 4], [-1, 1]], np.int64)
    model = onnx2jax.load(
        single_node_model("Gather", {"table": table, "ids": ids}, initializers={"table": table})
    )
    assert "table" in model.params
    grads = jax.grad(lambda p: model.apply(p, ids=ids)["y"].sum())(model.params)["table"]
    np.testing.assert_array_equal(grads[:, 0], [1, 1, 0, 0, 2])


# ------------------------------------------------------------------------ Gather


@pytest.mark.parametrize("indices", [np.array(-1), np.array([1, 2, 3]), np.array([[2, -4]])])
def test_gather_static_indices_on_traced_data(indices):
    x = RNG.normal(size=(2, 4, 3)).astype(np.float32)
    consts = {"i": indices.astype(np.int64)}
    model = single_node_model("Gather", {"x": x, **consts}, initializers=consts, axis=1)
    assert_matches_reference(model, {"x": x})
    used = primitives(model, {"x": x})
    # A scalar or a contiguous run of constant indices is a slice, not a gather.
    assert ("gather" in used) == (indices.ndim == 2), used


def test_gather_traced_negative_indices_x64_off():
    x = RNG.normal(size=(5, 2)).astype(np.float32)
    i = np.array([[-1, 0], [3, -5]], np.int64)
    model = single_node_model("Gather", {"x": x, "i": i})
    expected = run_reference(model, {"x": x, "i": i})[0]
    np.testing.assert_array_equal(run_onnx2jax(model, {"x": x, "i": i}, x64=False)[0], expected)


@pytest.mark.parametrize(
    ("data_shape", "indices_shape", "axis", "want"),
    [
        ((0,), (4, 0), 0, (4, 0)),
        ((0, 3), (4, 0), 0, (4, 0, 3)),
        ((2, 0, 3), (0, 1), 1, (2, 0, 1, 3)),
    ],
)
def test_gather_along_an_empty_axis_keeps_the_indices_shape(data_shape, indices_shape, axis, want):
    # Fuzzer seed 33, graph 1171: jnp.take returned the data unchanged, shape (0,) for (4, 0).
    x = np.zeros(data_shape, np.float32)
    i = np.zeros(indices_shape, np.int64)
    model = single_node_model("Gather", {"x": x, "i": i}, axis=axis)
    assert run_onnx2jax(model, {"x": x, "i": i})[0].shape == want
    assert_matches_reference(model, {"x": x, "i": i})


def test_gather_elements_smaller_indices_and_gather_nd_batch_dims():
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    i = np.array([[-1, 0], [2, 1]], np.int64)
    model = single_node_model("GatherElements", {"x": x, "i": i}, axis=0)
    assert_matches_reference(model, {"x": x, "i": i})

    x = RNG.normal(size=(2, 3, 4, 5)).astype(np.float32)
    i = np.array([[[[1], [-2]], [[0], [3]], [[2], [2]]]] * 2, np.int64)  # (2, 3, 2, 1)
    model = single_node_model("GatherND", {"x": x, "i": i}, batch_dims=2)
    assert_matches_reference(model, {"x": x, "i": i})


# ----------------------------------------------------------------------- Scatter


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter_reductions_static_and_traced(reduction):
    data = RNG.normal(size=(4, 3)).astype(np.float32)
    updates = RNG.normal(size=(2, 3)).astype(np.float32)
    indices = np.array([[1, 0, 3], [-1, 2, 0]], np.int64)
    unique = np.array([[1, 0, 3], [2, 2, 0]], np.int64)
    idx = indices if reduction != "none" else unique
    feeds = {"data": data, "indices": idx, "updates": updates}
    model = single_node_model("ScatterElements", feeds, axis=0, reduction=reduction)
    expected = run_reference(model, feeds, engine="reference")[0]
    np.testing.assert_allclose(run_onnx2jax(model, feeds)[0], expected, rtol=1e-6)
    static = constant_node_model("ScatterElements", feeds, axis=0, reduction=reduction)
    np.testing.assert_allclose(run_onnx2jax(static, {})[0], expected, rtol=1e-6)

    nd_indices = np.array([[[1], [-1]], [[1], [0]]], np.int64)
    nd_feeds = {
        "data": data,
        "indices": nd_indices
        if reduction != "none"
        else np.array([[[1], [-1]], [[2], [0]]], np.int64),
        "updates": RNG.normal(size=(2, 2, 3)).astype(np.float32),
    }
    model = single_node_model("ScatterND", nd_feeds, reduction=reduction)
    expected = run_reference(model, nd_feeds, engine="reference")[0]
    np.testing.assert_allclose(run_onnx2jax(model, nd_feeds)[0], expected, rtol=1e-6)


@pytest.mark.parametrize("mode", ["linear", "circular"])
def test_tensor_scatter_axis_and_modes(mode):
    past = RNG.normal(size=(2, 3, 5, 2)).astype(np.float32)
    update = RNG.normal(size=(2, 3, 2, 2)).astype(np.float32)
    write = np.array([3, 1], np.int64)
    feeds = {"past": past, "update": update, "write": write}
    model = single_node_model("TensorScatter", feeds, opset=24, axis=2, mode=mode)
    if mode == "circular":
        feeds["write"] = np.array([4, 1], np.int64)
    assert_matches_reference(model, feeds, engine="reference")


# ------------------------------------------------------------------ TopK, Unique


@pytest.mark.parametrize(
    ("dtype", "largest"),
    [(np.uint8, 0), (np.int64, 0), (np.int32, 1), (np.float32, 0), (np.float32, 1)],
)
def test_top_k_extremes_and_ties(dtype, largest):
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else np.finfo(dtype)
    x = np.array([[3, info.min, 3, info.max, 0, info.min]], dtype)
    k = np.array([4], np.int64)
    model = single_node_model(
        "TopK", {"x": x, "k": k}, outputs=("v", "i"), initializers={"k": k}, largest=largest
    )
    assert_matches_reference(model, {"x": x})
    static = constant_node_model("TopK", {"x": x, "k": k}, outputs=("v", "i"), largest=largest)
    expected = run_reference(static, {})
    for got, want in zip(run_onnx2jax(static, {}), expected, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("axis", "sort"), [(None, 0), (1, 0), (-1, 1)])
def test_unique_all_outputs(axis, sort):
    x = np.array([[2, 1, 2, 1], [3, 0, 3, 0], [2, 1, 2, 1]], np.int64)
    attrs = {"sorted": sort} if axis is None else {"sorted": sort, "axis": axis}
    model = single_node_model("Unique", {"x": x}, outputs=("y", "idx", "inv", "cnt"), **attrs)
    assert_matches_reference(model, {"x": x})


def test_nonzero_compress_run_eagerly():
    x = np.array([[0, 1.5, 0], [2, 0, -1]], np.float32)
    model = single_node_model("NonZero", {"x": x})
    assert_matches_reference(model, {"x": x})
    cond = np.array([False, True, True], bool)
    model = single_node_model("Compress", {"x": x, "c": cond}, axis=-1)
    assert_matches_reference(model, {"x": x, "c": cond})


# ------------------------------------------------------------------ Shape family


def test_shape_arithmetic_stays_static():
    """Shape -> Gather -> Cast -> Range -> Expand -> Tile -> Slice -> ConstantOfShape folds."""
    ints = {
        "one": np.array(1, np.int64),
        "zero": np.array(0, np.int64),
        "reps": np.array([2, 1], np.int64),
        "two": np.array([1, 1], np.int64),
        "s0": np.array([0], np.int64),
        "s1": np.array([1], np.int64),
        "ax": np.array([1], np.int64),
    }
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["n"], axis=0),
        helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["nf"], ["ni"], to=TensorProto.INT64),
        helper.make_node("Range", ["zero", "ni", "one"], ["r"]),
        helper.make_node("Expand", ["r", "two"], ["e"]),
        helper.make_node("Tile", ["e", "reps"], ["t"]),
        helper.make_node("Slice", ["t", "s0", "s1", "ax"], ["col"]),
        helper.make_node("Shape", ["t"], ["tshape"]),
        helper.make_node(
            "ConstantOfShape",
            ["tshape"],
            ["c"],
            value=numpy_helper.from_array(np.array([2.0], np.float32)),
        ),
        helper.make_node("Cast", ["t"], ["tf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["tf", "c"], ["m"]),
        helper.make_node("Add", ["x", "m"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "shapes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
        initializer=[numpy_helper.from_array(v, k) for k, v in ints.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = np.zeros((2, 6), np.float32)
    np.testing.assert_array_equal(
        run_onnx2jax(model, {"x": x})[0], run_reference(model, {"x": x})[0]
    )
    assert primitives(model, {"x": x}) <= {"add"}


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_modes_axes_and_negative_pads(mode):
    x = RNG.normal(size=(3, 4, 5)).astype(np.float32)
    consts = {
        "pads": np.array([2, -1, 1, 1], np.int64),
        "value": np.array(1.5, np.float32),
        "axes": np.array([-1, 0], np.int64),
    }
    feeds = {"x": x, **consts}
    model = single_node_model("Pad", feeds, initializers=consts, opset=19, mode=mode)
    expected = run_reference(model, {"x": x})[0]
    np.testing.assert_allclose(run_onnx2jax(model, {"x": x}, x64=False)[0], expected)
    static = constant_node_model("Pad", feeds, opset=19, mode=mode)
    np.testing.assert_allclose(run_onnx2jax(static, {})[0], expected)


def test_pad_opset2_attribute_and_traced_value_gradient():
    x = RNG.normal(size=(2, 3)).astype(np.float32)
    model = single_node_model("Pad", {"x": x}, opset=2, pads=[0, 1, 1, 0], value=-2.0)
    assert_matches_reference(model, {"x": x}, engine="reference")
    # A traced pad value (a graph input here) still gets its gradient.
    pads = np.array([1, 1, 1, 1], np.int64)
    model = onnx2jax.load(
        single_node_model(
            "Pad",
            {"x": x, "pads": pads, "v": np.float32(0.5)},
            initializers={"pads": pads},
            opset=18,
        )
    )
    grad = jax.grad(lambda v: model.apply(model.params, x=x, v=v)["y"].sum())(np.float32(0.5))
    assert float(grad) == 4 * 5 - 2 * 3


@pytest.mark.parametrize(
    ("split", "num_outputs", "outputs"), [(None, 3, 3), (None, 4, 4), ([1, 0, 6], None, 3)]
)
def test_split_uneven_and_zero_sized(split, num_outputs, outputs):
    x = np.arange(14, dtype=np.float32).reshape(2, 7)
    names = tuple(f"y{i}" for i in range(outputs))
    inputs = {"x": x}
    attrs = {"axis": -1}
    if split is not None:
        inputs["split"] = np.array(split, np.int64)
    else:
        attrs["num_outputs"] = num_outputs
    model = single_node_model(
        "Split",
        inputs,
        outputs=names,
        opset=18,
        initializers={k: v for k, v in inputs.items() if k != "x"},
        **attrs,
    )
    assert_matches_reference(model, {"x": x}, engine="reference")


def test_reshape_infers_on_empty_and_expand_tile_onehot():
    x = np.zeros((0, 4), np.float32)
    shape = np.array([-1, 2, 0], np.int64)
    model = single_node_model(
        "Reshape", {"x": x, "s": shape}, initializers={"s": shape}, allowzero=1
    )
    assert run_onnx2jax(model, {"x": x})[0].shape == (0, 2, 0)

    x = RNG.normal(size=(3, 1)).astype(np.float32)
    shape = np.array([2, 1, 4], np.int64)
    model = single_node_model("Expand", {"x": x, "s": shape}, initializers={"s": shape})
    assert_matches_reference(model, {"x": x})

    indices = np.array([[1.0, -1.0], [5.0, -3.0]], np.float32)
    depth = np.array(3, np.int64)
    values = np.array([0, 7], np.int32)
    model = single_node_model(
        "OneHot", {"i": indices, "d": depth, "v": values}, initializers={"d": depth}, axis=1
    )
    assert_matches_reference(model, {"i": indices, "v": values}, engine="reference")


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_space_depth_round_trip(mode):
    x = RNG.normal(size=(1, 8, 2, 3)).astype(np.float32)
    model = single_node_model("DepthToSpace", {"x": x}, blocksize=2, mode=mode)
    y = assert_matches_reference(model, {"x": x})[0]
    back = single_node_model(
        "SpaceToDepth", {"y": y}, outputs=("z",), opset=28, blocksize=2, mode=mode
    )
    np.testing.assert_array_equal(run_onnx2jax(back, {"y": y})[0], x)


def test_reverse_sequence_traced_lengths_and_trilu_eyelike():
    x = RNG.normal(size=(4, 3, 2)).astype(np.float32)
    lens = np.array([4, 0, 2], np.int64)
    model = single_node_model(
        "ReverseSequence", {"x": x, "lens": lens}, opset=10, batch_axis=1, time_axis=0
    )
    assert_matches_reference(model, {"x": x, "lens": lens})

    x = RNG.normal(size=(2, 3, 4)).astype(np.float32)
    k = np.array(-1, np.int64)
    model = single_node_model("Trilu", {"x": x, "k": k}, initializers={"k": k}, upper=0)
    assert_matches_reference(model, {"x": x})

    x = np.zeros((3, 4), np.int32)
    model = single_node_model("EyeLike", {"x": x}, dtype=TensorProto.DOUBLE, k=2)
    assert_matches_reference(model, {"x": x})


# -------------------------------------------------------------------------- Cast


FLOAT8_CASES = [
    TensorProto.FLOAT8E4M3FN,
    TensorProto.FLOAT8E4M3FNUZ,
    TensorProto.FLOAT8E5M2,
    TensorProto.FLOAT8E5M2FNUZ,
    TensorProto.FLOAT4E2M1,
    TensorProto.INT4,
    TensorProto.UINT4,
    TensorProto.BFLOAT16,
]
SPECIAL = np.array(
    [
        0.0,
        -0.0,
        0.3,
        -1.75,
        447.0,
        449.0,
        470.0,
        1e5,
        -1e9,
        np.inf,
        -np.inf,
        np.nan,
        2.5,
        -8.5,
        17.0,
        1e-9,
    ],
    np.float32,
)


@pytest.mark.parametrize("saturate", [0, 1])
@pytest.mark.parametrize("to", FLOAT8_CASES)
def test_cast_static_and_traced_agree_with_reference(to, saturate):
    x = SPECIAL
    if to in (TensorProto.INT4, TensorProto.UINT4):
        x = x[np.isfinite(x) & (np.abs(x) < 1e4)]
    expected = np.asarray(
        run_reference(
            single_node_model("Cast", {"x": x}, to=to, saturate=saturate),
            {"x": x},
            engine="reference",
        )[0]
    ).astype(np.float32)
    traced = run_onnx2jax(single_node_model("Cast", {"x": x}, to=to, saturate=saturate), {"x": x})[
        0
    ]
    static = run_onnx2jax(constant_node_model("Cast", {"x": x}, to=to, saturate=saturate), {})[0]
    for got in (traced, static):
        assert got.dtype == onnx.helper.tensor_dtype_to_np_dtype(to)
        np.testing.assert_array_equal(got.astype(np.float32), expected)


@pytest.mark.parametrize(
    ("round_mode", "saturate"), [("up", 1), ("down", 0), ("nearest", 1), ("nearest", 0)]
)
def test_cast_float8e8m0_round_modes(round_mode, saturate):
    x = np.array([1.0, 1.5, 1.75, 3.0, 0.3, 2.0**127 * 1.5, 1e-39, np.inf, np.nan, 0.0], np.float32)
    attrs = {"to": TensorProto.FLOAT8E8M0, "saturate": saturate, "round_mode": round_mode}
    expected = run_reference(
        single_node_model("Cast", {"x": x}, opset=25, **attrs), {"x": x}, engine="reference"
    )[0]
    for model, feeds in (
        (single_node_model("Cast", {"x": x}, opset=25, **attrs), {"x": x}),
        (constant_node_model("Cast", {"x": x}, opset=25, **attrs), {}),
    ):
        got = run_onnx2jax(model, feeds)[0]
        assert got.dtype == ml_dtypes.float8_e8m0fnu
        np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))


def test_cast_strings_both_ways():
    text = np.array(["1.5", "-2", "1e3", "INF", "-inf", "NaN", "+INF"], dtype=object)
    model = constant_node_model("Cast", {"s": text.astype(np.str_)}, to=TensorProto.FLOAT)
    got = run_onnx2jax(model, {})[0]
    np.testing.assert_array_equal(
        got, np.array([1.5, -2, 1e3, np.inf, -np.inf, np.nan, np.inf], np.float32)
    )
    model = constant_node_model(
        "Cast", {"s": np.array(["100.5", "-7", "9007199254740993"])}, to=TensorProto.INT64
    )
    np.testing.assert_array_equal(run_onnx2jax(model, {})[0], [100, -7, 9007199254740993])

    x = np.array([0.1, -2.0, 1e-5, np.inf], np.float32)
    model = single_node_model("Cast", {"x": x}, to=TensorProto.STRING)
    want = run_reference(model, {"x": x}, engine="reference")[0]
    got = run_onnx2jax(model, {"x": x})[0]
    assert got.dtype == object
    assert got.tolist() == want.tolist()

    x = np.array([1.5, -448.0], ml_dtypes.bfloat16)
    got = run_onnx2jax(single_node_model("Cast", {"x": x}, to=TensorProto.STRING), {"x": x})[0]
    assert got.tolist() == ["1.5", "-448.0"]
    model = constant_node_model(
        "Cast", {"s": np.array(["1000", "-0.3"])}, to=TensorProto.FLOAT8E4M3FN
    )
    np.testing.assert_array_equal(run_onnx2jax(model, {})[0].astype(np.float32), [448, -0.3125])


def test_cast_bool_int_wrap_x64_off_and_cast_like():
    x = np.array([0.0, -0.0, 0.5, np.nan, -3.0], np.float32)
    assert_matches_reference(single_node_model("Cast", {"x": x}, to=TensorProto.BOOL), {"x": x})
    x = np.array([200, -200, 127, 300], np.int32)
    assert_matches_reference(single_node_model("Cast", {"x": x}, to=TensorProto.INT8), {"x": x})
    x = np.array([1.5, -2.5], np.float32)
    got = run_onnx2jax(
        single_node_model("Cast", {"x": x}, to=TensorProto.INT64), {"x": x}, x64=False
    )[0]
    np.testing.assert_array_equal(got, [1, -2])
    got = run_onnx2jax(single_node_model("Cast", {"x": x}, opset=1, to="DOUBLE"), {"x": x})[0]
    assert got.dtype == np.float64
    like = np.zeros(1, np.float16)
    assert_matches_reference(
        single_node_model("CastLike", {"x": x, "like": like}), {"x": x, "like": like}
    )
