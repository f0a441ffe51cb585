"""NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss: the corners the node suite leaves out
(negative ignore_index with weights, int32 targets, every position ignored, half precision,
constant inputs, x64 off, gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx2jax
from onnx2jax.core.errors import OpError
from tests.helpers import assert_matches_reference, run_onnx2jax, run_reference, single_node_model

RNG = np.random.default_rng(0)


def _scores(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def _targets(shape, classes, ignore=None, dtype=np.int64):
    target = RNG.integers(0, classes, size=shape).astype(dtype)
    if ignore is not None:
        target.reshape(-1)[::3] = ignore
    return target


def _model(op, x, target, weight=None, outputs=("loss",), opset=13, **attrs):
    return single_node_model(
        op, {"x": x, "t": target, "w": weight}, outputs=outputs, opset=opset, **attrs
    )


@pytest.mark.parametrize("op", ["NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_index", [None, -1, 2])
def test_matches_onnxruntime(op, reduction, weighted, ignore_index):
    x, target = _scores(3, 4, 2, 5), _targets((3, 2, 5), 4, ignore_index)
    weight = RNG.uniform(0.5, 2, size=4).astype(np.float32) if weighted else None
    attrs = {"reduction": reduction}
    if ignore_index is not None:
        attrs["ignore_index"] = ignore_index
    model = _model(op, x, target, weight, **attrs)
    assert_matches_reference(
        model,
        {"x": x, "t": target, "w": weight} if weighted else {"x": x, "t": target},
        rtol=1e-5,
        atol=1e-6,
    )


def test_sce_log_prob_output_int32_targets_and_2d():
    x, target = _scores(5, 3), _targets((5,), 3, ignore=1, dtype=np.int32)
    model = _model(
        "SoftmaxCrossEntropyLoss", x, target, outputs=("loss", "log_prob"), ignore_index=1
    )
    assert_matches_reference(model, {"x": x, "t": target})


def test_nll_opset22_double():
    x, target = _scores(4, 3, dtype=np.float64), _targets((4,), 3)
    weight = np.array([0.2, 1.0, 3.0])
    model = _model("NegativeLogLikelihoodLoss", x, target, weight, opset=22)
    assert_matches_reference(
        model, {"x": x, "t": target, "w": weight}, engine="reference", rtol=1e-12, atol=1e-12
    )


def test_half_precision_matches_float32():
    x, target = _scores(4, 6, 3), _targets((4, 3), 6, ignore=-100)
    model16 = _model("SoftmaxCrossEntropyLoss", x.astype(np.float16), target, ignore_index=-100)
    model32 = _model("SoftmaxCrossEntropyLoss", x, target, ignore_index=-100)
    (got,) = run_onnx2jax(model16, {"x": x.astype(np.float16), "t": target})
    (want,) = run_reference(model32, {"x": x, "t": target})
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3)


def test_every_target_ignored_gives_nan_mean_and_zero_sum():
    x, target = _scores(2, 3), np.array([-1, -1], np.int64)
    mean = _model("NegativeLogLikelihoodLoss", x, target, ignore_index=-1)
    total = _model("NegativeLogLikelihoodLoss", x, target, ignore_index=-1, reduction="sum")
    assert np.isnan(run_onnx2jax(mean, {"x": x, "t": target})[0])
    assert run_onnx2jax(total, {"x": x, "t": target})[0] == 0


def test_ignored_position_with_infinite_score_stays_finite():
    x = np.array([[-np.inf, 0.0], [1.0, 2.0]], np.float32)
    target = np.array([-5, 1], np.int64)
    model = _model("NegativeLogLikelihoodLoss", x, target, ignore_index=-5, reduction="none")
    np.testing.assert_array_equal(run_onnx2jax(model, {"x": x, "t": target})[0], [0.0, -2.0])


def test_constant_inputs_fold_at_trace_time():
    x, target = _scores(3, 4), _targets((3,), 4)
    nodes = [
        helper.make_node("SoftmaxCrossEntropyLoss", ["x", "t"], ["loss"], reduction="sum"),
        helper.make_node("Reshape", ["loss", "one"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "folded",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(target, "t"),
        ],
    )
    graph.node.insert(0, helper.make_node("Constant", [], ["x"], value=numpy_helper.from_array(x)))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    (want,) = run_reference(model, {})
    for x64 in (True, False):
        np.testing.assert_allclose(run_onnx2jax(model, {}, x64=x64)[0], want, rtol=1e-6)


@pytest.mark.parametrize("op", ["NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss"])
def test_x64_off(op):
    x, target = _scores(2, 3, 4), _targets((2, 4), 3, ignore=0)
    weight = np.array([1.0, 2.0, 0.5], np.float32)
    model = _model(op, x, target, weight, ignore_index=0)
    feeds = {"x": x, "t": target, "w": weight}
    (want,) = run_reference(model, feeds)
    (got,) = run_onnx2jax(model, feeds, x64=False)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_sce_gradient_is_softmax_minus_one_hot():
    x, target = _scores(4, 5), _targets((4,), 5, ignore=3)
    weight = RNG.uniform(0.5, 2, size=5).astype(np.float32)
    model = _model("SoftmaxCrossEntropyLoss", x, target, weight, ignore_index=3)
    compiled = onnx2jax.load(model)

    def loss(scores):
        return compiled.apply(compiled.params, scores, target, weight)["loss"]

    def expected(scores):
        kept = target != 3
        w = jnp.where(kept, weight[np.clip(target, 0, 4)], 0)
        picked = jnp.take_along_axis(jax.nn.log_softmax(scores), target[:, None] % 5, 1)[:, 0]
        return -jnp.sum(w * picked) / jnp.sum(w)

    got = jax.jit(jax.grad(loss))(jnp.asarray(x))
    np.testing.assert_allclose(got, jax.grad(expected)(jnp.asarray(x)), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got)[target == 3] == 0)


def test_nll_gradient_with_x64_off():
    x, target = _scores(3, 4, 2), _targets((3, 2), 4)
    model = _model("NegativeLogLikelihoodLoss", x, target, reduction="sum")
    with jax.enable_x64(False):
        compiled = onnx2jax.load(model)
        grad = jax.grad(lambda s: compiled.apply(compiled.params, s, target)["loss"])(
            jnp.asarray(x)
        )
    want = -np.moveaxis(np.eye(4, dtype=np.float32)[target], -1, 1)
    np.testing.assert_array_equal(grad, want)


@pytest.mark.parametrize(
    "attrs, target_shape, match",
    [
        ({"reduction": "max"}, (3,), "reduction"),
        ({}, (4,), "target of shape"),
    ],
)
def test_bad_attributes_and_shapes_raise(attrs, target_shape, match):
    x, target = _scores(3, 4), np.zeros(target_shape, np.int64)
    model = _model("NegativeLogLikelihoodLoss", x, target, **attrs)
    with pytest.raises(OpError, match=match):
        run_onnx2jax(model, {"x": x, "t": target})
