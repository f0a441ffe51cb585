"""Random ops: JAX's generator cannot reproduce NumPy's or onnxruntime's numbers, so these check
shapes, dtypes, reproducibility per seed and the distributions' moments."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from tests.helpers import run_onnx2jax, single_node_model


def run(op_type, inputs=None, x64=True, opset=22, **attrs):
    inputs = inputs or {}
    (out,) = run_onnx2jax(single_node_model(op_type, inputs, opset=opset, **attrs), inputs, x64=x64)
    return out


def test_random_normal_moments_and_seed():
    y = run("RandomNormal", shape=[200, 100], mean=3.0, scale=2.0, seed=5.0)
    assert y.shape == (200, 100) and y.dtype == np.float32
    assert abs(y.mean() - 3.0) < 0.05 and abs(y.std() - 2.0) < 0.05
    np.testing.assert_array_equal(
        y, run("RandomNormal", shape=[200, 100], mean=3.0, scale=2.0, seed=5.0)
    )
    assert not np.array_equal(
        y, run("RandomNormal", shape=[200, 100], mean=3.0, scale=2.0, seed=6.0)
    )


def test_random_uniform_range_and_dtypes():
    y = run("RandomUniform", shape=[5000], low=-2.0, high=-1.0, dtype=TensorProto.DOUBLE, seed=1.0)
    assert y.dtype == np.float64 and y.min() >= -2.0 and y.max() < -1.0
    assert abs(y.mean() + 1.5) < 0.02
    assert run("RandomUniform", shape=[3], dtype=TensorProto.DOUBLE, x64=False).dtype == np.float32
    assert run("RandomUniform", shape=[3], dtype=TensorProto.FLOAT16, opset=1).dtype == np.float16


def test_like_ops_take_shape_and_dtype_from_input():
    x = np.zeros((4, 3), np.float64)
    y = run("RandomNormalLike", {"x": x}, seed=0.0)
    assert y.shape == (4, 3) and y.dtype == np.float64
    y = run("RandomUniformLike", {"x": x}, dtype=TensorProto.FLOAT, opset=1)
    assert y.shape == (4, 3) and y.dtype == np.float32
    with pytest.raises(Exception, match="float"):
        run("RandomUniformLike", {"x": np.zeros(3, np.int32)})


def test_unseeded_nodes_are_reproducible():
    first = run("RandomNormal", shape=[10])
    np.testing.assert_array_equal(first, run("RandomNormal", shape=[10]))


def test_multinomial():
    probs = np.array([[0.0, 0.25, 0.75], [1.0, 0.0, 0.0]], np.float32)
    with np.errstate(divide="ignore"):
        logits = np.log(probs)
    y = run("Multinomial", {"x": logits}, sample_size=4000, seed=2.0)
    assert y.shape == (2, 4000) and y.dtype == np.int32
    assert not (y[0] == 0).any() and (y[1] == 0).all()
    assert abs((y[0] == 2).mean() - 0.75) < 0.03
    y = run("Multinomial", {"x": logits}, dtype=TensorProto.INT64, opset=7)
    assert y.shape == (2, 1) and y.dtype == np.int64


def test_bernoulli():
    p = np.array([0.0, 1.0, 0.3] * 2000, np.float32)
    y = run("Bernoulli", {"p": p}, seed=3.0)
    assert y.dtype == np.float32 and y.shape == p.shape
    assert (y[0::3] == 0).all() and (y[1::3] == 1).all()
    assert abs(y[2::3].mean() - 0.3) < 0.03
    assert run("Bernoulli", {"p": p}, dtype=TensorProto.BOOL, opset=15).dtype == np.bool_
    assert (
        run("Bernoulli", {"p": p.astype(np.float64)}, dtype=TensorProto.INT64, x64=False).dtype
        == np.int32
    )
