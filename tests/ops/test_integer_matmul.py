"""The exact integer matrix product under MatMulInteger, QLinearMatMul, QGemm and
MatMulIntegerToFloat (float32 products over chunks of the contraction): results equal to the
int64 product bit for bit, on the values and lengths where a float32 sum would first round."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onnx2jax.ops.quantization import integer_matmul
from tests.helpers import run_onnx2jax, run_reference, single_node_model

RNG = np.random.default_rng(0)

# Around the chunk length of 8-bit operands (1024) and the 514 of uncentered uint8 x int8.
DEPTHS = [1, 513, 514, 515, 1023, 1024, 1025, 2049, 4096]
TYPES = [(np.uint8, np.int8), (np.uint8, np.uint8), (np.int8, np.int8), (np.int8, np.uint8)]


def _expected(a, b, a_zero_point=None, b_zero_point=None):
    """The int64 product of the zero-point-shifted operands, wrapped to int32."""
    a = a.astype(np.int64)
    b = b.astype(np.int64)
    if a_zero_point is not None:
        za = np.asarray(a_zero_point, np.int64)
        a = a - (za.reshape(-1, 1) if za.ndim == 1 and za.size > 1 else za)
    if b_zero_point is not None:
        b = b - np.asarray(b_zero_point, np.int64)
    return np.matmul(a, b).astype(np.int32)


def _extremes(a_type, b_type, depth):
    """Operands filled with their types' extreme values, in every sign combination, and random."""
    a_info, b_info = np.iinfo(a_type), np.iinfo(b_type)
    for a_value in (a_info.min, a_info.max):
        for b_value in (b_info.min, b_info.max):
            yield np.full((3, depth), a_value, a_type), np.full((depth, 2), b_value, b_type)
    # Largest odd products with an odd sum: past 2**24 (from 1041 products) float32 cannot hold
    # the total, so a product that is not split into chunks comes out wrong.
    b = np.full((depth, 2), b_info.max, b_type)
    b[0] -= 1
    yield np.full((3, depth), a_info.max, a_type), b
    yield (
        RNG.integers(a_info.min, a_info.max + 1, (3, depth)).astype(a_type),
        RNG.integers(b_info.min, b_info.max + 1, (depth, 2)).astype(b_type),
    )


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("a_type,b_type", TYPES)
def test_extreme_values_are_exact(depth, a_type, b_type):
    product = jax.jit(lambda a, b, za, zb: integer_matmul(jnp, a, b, za, zb))
    a_info, b_info = np.iinfo(a_type), np.iinfo(b_type)
    zero_points = [
        (None, None),
        (a_type(a_info.max), b_type(b_info.min)),
        (a_type(a_info.min), b_type(b_info.max)),
        # Per row of a, per column of b.
        (np.array([a_info.min, a_info.max, 3], a_type), np.array([b_info.max, b_info.min], b_type)),
    ]
    for a, b in _extremes(a_type, b_type, depth):
        for za, zb in zero_points:
            got = np.asarray(product(a, b, za, zb))
            assert got.dtype == np.int32
            np.testing.assert_array_equal(got, _expected(a, b, za, zb))


def test_batched_broadcast_and_vectors():
    a = RNG.integers(0, 256, (2, 1, 4, 1100)).astype(np.uint8)
    b = RNG.integers(-128, 128, (3, 1100, 5)).astype(np.int8)
    za, zb = np.uint8(255), np.int8(-128)
    # With 64-bit types on, the row and column sums must stay int32 too.
    with jax.enable_x64(True):
        got = jax.jit(lambda a, b: integer_matmul(jnp, a, b, za, zb))(a, b)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(got), _expected(a, b, za, zb))
    vector_a, vector_b = a[0, 0, 0], b[0, :, 0]
    for left, right in [(vector_a, b), (a, vector_b), (vector_a, vector_b)]:
        got = np.asarray(jax.jit(lambda x, y: integer_matmul(jnp, x, y, za, zb))(left, right))
        np.testing.assert_array_equal(got, _expected(left, right, za, zb))


def test_empty_contraction():
    a, b = np.zeros((3, 0), np.uint8), np.zeros((0, 4), np.int8)
    got = jax.jit(lambda a, b: integer_matmul(jnp, a, b, np.uint8(7), np.int8(-2)))(a, b)
    np.testing.assert_array_equal(np.asarray(got), np.zeros((3, 4), np.int32))


def test_int16_takes_the_int32_dot():
    a = np.full((2, 3000), -32768, np.int16)
    b = np.full((3000, 2), 32767, np.int16)
    got = jax.jit(lambda a, b: integer_matmul(jnp, a, b))(a, b)
    np.testing.assert_array_equal(np.asarray(got), _expected(a, b))


@pytest.mark.parametrize("depth", [514, 1025, 4096])
@pytest.mark.parametrize("b_type", [np.int8, np.uint8])
@pytest.mark.parametrize("weights", [False, True])
def test_matmul_integer_matches_onnxruntime(depth, b_type, weights):
    """Worst-case operands (uint8 255 against the weight type's extreme) in a graph, the weights
    and their zero point either inputs or initializers, against onnxruntime."""
    a = np.full((2, 3, depth), 255, np.uint8)
    a[1] = RNG.integers(0, 256, (3, depth))
    b_info = np.iinfo(b_type)
    b = np.full((depth, 4), b_info.min, b_type)
    b[:, 1] = b_info.max
    b[:, 2] = RNG.integers(b_info.min, b_info.max + 1, depth)
    feeds = {"a": a, "b": b, "az": np.array(0, np.uint8), "bz": np.array(b_info.max, b_type)}
    initializers = {k: feeds[k] for k in ("b", "bz")} if weights else None
    model = single_node_model("MatMulInteger", feeds, initializers=initializers)
    graph_feeds = {k: v for k, v in feeds.items() if not weights or k not in ("b", "bz")}
    want = run_reference(model, graph_feeds)[0]
    got = run_onnx2jax(model, graph_feeds, x64=False)[0]
    assert got.dtype == want.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, _expected(a, b, feeds["az"], feeds["bz"]))


def test_qlinear_matmul_long_contraction_matches_onnxruntime():
    depth = 1500
    a = RNG.integers(0, 256, (4, depth)).astype(np.uint8)
    b = RNG.integers(-128, 128, (depth, 3)).astype(np.int8)
    feeds = {
        "a": a,
        "a_scale": np.array(0.02, np.float32),
        "a_zero_point": np.array(131, np.uint8),
        "b": b,
        "b_scale": np.array(0.01, np.float32),
        "b_zero_point": np.array(0, np.int8),
        "y_scale": np.array(2.5, np.float32),
        "y_zero_point": np.array(128, np.uint8),
    }
    model = single_node_model("QLinearMatMul", feeds)
    want = run_reference(model, feeds)[0]
    got = run_onnx2jax(model, feeds, x64=False)[0]
    np.testing.assert_array_equal(got, want)
