"""Quantization, ai.onnx.ml, training and string ops beyond the node suite, against onnxruntime
(or the reference evaluator where onnxruntime lacks the op)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnx2jax
from onnx2jax.ops.registry import ML
from tests.helpers import (
    assert_matches_reference,
    feeds_of,
    run_onnx2jax,
    run_reference,
    single_node_model,
)

RNG = np.random.default_rng(0)


def _ml_model(op_type, inputs, outputs=("y",), **attrs):
    model = single_node_model(op_type, inputs, outputs, opset=17, domain=ML, **attrs)
    del model.opset_import[1:]
    model.opset_import.append(helper.make_opsetid(ML, 3))
    return model


# ------------------------------------------------------------------------------ quantization
@pytest.mark.parametrize(
    "zero_point",
    [
        np.array(3, np.uint8),
        np.array(-2, np.int8),
        np.array(100, np.uint16),
        np.array(-7, np.int16),
    ],
)
def test_quantize_dequantize_roundtrip(zero_point):
    x = RNG.normal(scale=20, size=(2, 3, 4)).astype(np.float32)
    scale = np.array(0.5, np.float32)
    feeds = {"x": x, "s": scale, "z": np.asarray(zero_point)}
    q = assert_matches_reference(single_node_model("QuantizeLinear", feeds), feeds)[0]
    feeds = {"q": q, "s": scale, "z": np.asarray(zero_point)}
    assert_matches_reference(single_node_model("DequantizeLinear", feeds), feeds)


def test_quantize_per_axis_negative_axis_and_ties():
    # Halves round to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
    x = np.array([[0.5, 1.5, 2.5, -0.5], [1.0, 3.0, 5.0, 7.0]], np.float32)
    scale = np.array([1.0, 2.0], np.float32)
    feeds = {"x": x, "s": scale, "z": np.array([0, 1], np.int8)}
    model = single_node_model("QuantizeLinear", feeds, axis=-2)
    assert_matches_reference(model, feeds)


def test_quantize_blocked_and_int4():
    x = RNG.normal(size=(2, 6)).astype(np.float32)
    scale = np.array([[0.1, 0.2], [0.3, 0.4]], np.float32)
    zero = np.array([[1, -1], [0, 2]], ml_dtypes.int4)
    feeds = {"x": x, "s": scale, "z": zero}
    model = single_node_model(
        "QuantizeLinear", feeds, initializers={"s": scale, "z": zero}, axis=1, block_size=3
    )
    expected = run_reference(model, feeds, engine="reference")[0]
    got = run_onnx2jax(model, {"x": x})[0]
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got.astype(np.int8), expected.astype(np.int8))


@pytest.mark.parametrize("dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
def test_quantize_float8_saturate(dtype):
    x = np.array([0.0, 1.3, -700.0, 1e6, -1e6], np.float32)
    zero = np.zeros((), dtype)
    for saturate in (0, 1):
        feeds = {"x": x, "s": np.array(1.0, np.float32), "z": zero}
        model = single_node_model(
            "QuantizeLinear", feeds, initializers={"z": zero}, saturate=saturate
        )
        expected = run_reference(model, feeds, engine="reference")[0]
        got = run_onnx2jax(model, {"x": x, "s": np.array(1.0, np.float32)})[0]
        np.testing.assert_array_equal(got.astype(np.float32), expected.astype(np.float32))


def test_dequantize_output_dtype_and_x64_off():
    x = np.array([[0, 10, 255]], np.uint8)
    feeds = {"x": x, "s": np.array(0.25, np.float32), "z": np.array(128, np.uint8)}
    model = single_node_model("DequantizeLinear", feeds, opset=23, output_dtype=TensorProto.FLOAT16)
    expected = run_reference(model, feeds, engine="reference")[0]
    got = run_onnx2jax(model, feeds, x64=False)[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, expected)


def test_dequantize_gradient_wrt_scale():
    q = np.array([1, 2, 3], np.int8)
    scale = np.array([0.5], np.float32)
    model = single_node_model("DequantizeLinear", {"q": q, "s": scale}, initializers={"s": scale})
    compiled = onnx2jax.load(model)
    grads = jax.grad(lambda p: jnp.sum(compiled.apply(p, q)["y"]))(compiled.params)
    np.testing.assert_allclose(grads["s"], [6.0])


def test_dynamic_quantize_all_zero_and_empty():
    # onnxruntime gives an all-zero input scale 1 (the reference evaluator 1/255); we follow it.
    x = np.zeros((3,), np.float32)
    model = single_node_model("DynamicQuantizeLinear", {"x": x}, ("y", "s", "z"))
    y, scale, zero = assert_matches_reference(model, {"x": x})
    assert scale == 1 and zero == 0
    x = np.zeros((0, 2), np.float32)
    model = single_node_model("DynamicQuantizeLinear", {"x": x}, ("y", "s", "z"))
    y, scale, zero = run_onnx2jax(model, {"x": x})
    assert y.shape == (0, 2) and y.dtype == np.uint8 and scale == 1 and zero == 0


def _quantize_model(x, scale, zero, how):
    """QuantizeLinear with the scale as a graph input, an initializer or a Constant node."""
    feeds = {"x": x, "s": scale, "z": zero}
    if how == "input":
        return single_node_model("QuantizeLinear", feeds), feeds
    model = single_node_model("QuantizeLinear", feeds, initializers={"s": scale, "z": zero})
    if how == "constant":
        del model.graph.initializer[:]
        for name, value in (("s", scale), ("z", zero)):
            model.graph.node.insert(
                0,
                helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(value)),
            )
    return model, {"x": x}


@pytest.mark.parametrize("how", ["input", "initializer", "constant"])
@pytest.mark.parametrize("per_axis", [False, True])
def test_quantize_linear_divides_like_onnxruntime(how, per_axis):
    # XLA turns x / scale into x * (1 / scale); onnxruntime divides, and values near a half
    # step then land on different integers. Many values make such near-ties certain.
    # x near (k + 1/2) * scale and its float neighbours puts many quotients by a near-tie.
    rng = np.random.default_rng(7)
    if per_axis:
        scale = rng.uniform(0.001, 0.2, 4).astype(np.float32)
        zero = rng.integers(-10, 10, 4).astype(np.int8)
    else:
        scale = np.array(rng.uniform(0.001, 0.2), np.float32)
        zero = np.array(128, np.uint8)
    half = rng.integers(-130, 130, (8, 4, 1024)) + np.float32(0.5)
    x = (half * scale.reshape(-1, 1)).astype(np.float32)
    x = np.concatenate(
        [x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf)), -x], axis=-1
    )
    model, feeds = _quantize_model(x, scale, zero, how)
    want = run_reference(model, feeds)[0]
    got = run_onnx2jax(model, feeds, x64=False)[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", range(4))
def test_dynamic_quantize_linear_scale_like_onnxruntime(seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((64, 1024)) * rng.uniform(0.01, 10)).astype(np.float32)
    x[3, 5] = np.nan  # left out of the range, quantized to 0, as onnxruntime does
    model = single_node_model("DynamicQuantizeLinear", {"x": x}, ("y", "s", "z"))
    for got, want in zip(
        run_onnx2jax(model, {"x": x}, x64=False), run_reference(model, {"x": x}), strict=True
    ):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_quantize_float16_divides_in_float32():
    # onnxruntime divides float16 inputs by a float16 scale in float32; a float16 quotient
    # would move hundreds of these values a step.
    x = (np.random.default_rng(3).normal(size=20000) * 30).astype(np.float16)
    feeds = {"x": x, "s": np.array(0.0371, np.float16), "z": np.array(128, np.uint8)}
    model = single_node_model("QuantizeLinear", feeds)
    np.testing.assert_array_equal(
        run_onnx2jax(model, feeds, x64=False)[0], run_reference(model, feeds)[0]
    )


@pytest.mark.parametrize(
    "zero",
    [np.array(3, np.uint8), np.array(3, np.int8), np.array(-5, np.int16), np.array(7, np.uint16)],
)
def test_quantize_nan_and_infinity(zero):
    # The spec leaves NaN open; onnxruntime gives the type's minimum whatever the zero point.
    x = np.array([np.nan, np.inf, -np.inf, 1.0, -np.nan] * 5, np.float32)
    feeds = {"x": x, "s": np.array(0.5, np.float32), "z": zero}
    model = single_node_model("QuantizeLinear", feeds)
    got = assert_matches_reference(model, feeds)[0]
    assert got[0] == np.iinfo(zero.dtype).min


def test_matmul_integer_per_row_zero_point():
    a = RNG.integers(0, 255, size=(3, 4)).astype(np.uint8)
    b = RNG.integers(0, 255, size=(4, 2)).astype(np.uint8)
    a_zero, b_zero = np.array([1, 2, 3], np.uint8), np.array([7, 9], np.uint8)
    feeds = {"a": a, "b": b, "az": a_zero, "bz": b_zero}
    # Neither onnxruntime nor the reference evaluator takes a per-row a_zero_point.
    expected = (a.astype(np.int32) - a_zero[:, None]) @ (b.astype(np.int32) - b_zero)
    got = run_onnx2jax(single_node_model("MatMulInteger", feeds), feeds)[0]
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)


def test_matmul_integer_batched():
    a = RNG.integers(-128, 127, size=(2, 3, 4)).astype(np.int8)
    b = RNG.integers(-128, 127, size=(4, 5)).astype(np.int8)
    feeds = {"a": a, "b": b, "az": np.array(1, np.int8), "bz": np.array(-3, np.int8)}
    assert_matches_reference(single_node_model("MatMulInteger", feeds), feeds)


def test_conv_integer_per_channel_zero_point_auto_pad():
    x = RNG.integers(0, 255, size=(1, 2, 5, 5)).astype(np.uint8)
    w = RNG.integers(0, 255, size=(3, 2, 3, 3)).astype(np.uint8)
    feeds = {"x": x, "w": w, "xz": np.array(10, np.uint8), "wz": np.array([1, 2, 3], np.uint8)}
    model = single_node_model("ConvInteger", feeds, auto_pad="SAME_UPPER", strides=[2, 2])
    assert_matches_reference(model, feeds, engine="reference")


def test_qlinear_conv_per_channel_with_bias():
    x = RNG.integers(0, 255, size=(1, 2, 4, 4)).astype(np.uint8)
    w = RNG.integers(-20, 20, size=(2, 2, 3, 3)).astype(np.int8)
    feeds = {
        "x": x,
        "xs": np.array(0.02, np.float32),
        "xz": np.array(128, np.uint8),
        "w": w,
        "ws": np.array([0.01, 0.03], np.float32),
        "wz": np.array([0, 0], np.int8),
        "ys": np.array(0.05, np.float32),
        "yz": np.array(100, np.uint8),
        "b": np.array([50, -40], np.int32),
    }
    model = single_node_model("QLinearConv", feeds, pads=[1, 1, 1, 1])
    got = run_onnx2jax(model, feeds)[0]
    expected = run_reference(model, feeds)[0]
    assert got.dtype == np.uint8
    assert np.max(np.abs(got.astype(int) - expected.astype(int))) <= 1


def test_qlinear_matmul_x64_off():
    a = RNG.integers(0, 255, size=(2, 3)).astype(np.uint8)
    b = RNG.integers(0, 255, size=(3, 2)).astype(np.uint8)
    feeds = {
        "a": a,
        "as": np.array(0.1, np.float32),
        "az": np.array(120, np.uint8),
        "b": b,
        "bs": np.array(0.2, np.float32),
        "bz": np.array(130, np.uint8),
        "ys": np.array(0.3, np.float32),
        "yz": np.array(128, np.uint8),
    }
    model = single_node_model("QLinearMatMul", feeds)
    np.testing.assert_array_equal(
        run_onnx2jax(model, feeds, x64=False)[0], run_reference(model, feeds)[0]
    )


# ------------------------------------------------------------------------------ com.microsoft
MS = "com.microsoft"


def _ms_model(op_type, feeds, outputs=("y",), initializers=None, **attrs):
    return single_node_model(
        op_type, feeds, outputs, opset=17, domain=MS, initializers=initializers, **attrs
    )


def _q(dtype, *shape, rng=RNG):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, size=shape).astype(dtype)


def _assert_quantized_close(got, want, steps=0):
    """Same dtype and shape; at most ``steps`` quantization steps apart."""
    assert got.dtype == want.dtype and got.shape == want.shape, (
        got.dtype,
        got.shape,
        want.dtype,
        want.shape,
    )
    diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
    assert diff.max(initial=0) <= steps, (diff.max(), np.argwhere(diff > steps)[:5])


def _compare_ms(model, feeds, steps=0, jit_feeds=None):
    want = run_reference(model, feeds)
    got = run_onnx2jax(model, jit_feeds if jit_feeds is not None else feeds, x64=False)
    for g, w in zip(got, want, strict=True):
        _assert_quantized_close(g, np.asarray(w), steps)
    return got


@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_add_mul(op, dtype):
    a, b = _q(dtype, 2, 3, 16), _q(dtype, 3, 1)
    zero = np.array(5, dtype)
    feeds = {
        "a": a,
        "as": np.array(0.05, np.float32),
        "az": zero,
        "b": b,
        "bs": np.array(0.07, np.float32),
        "bz": np.array(-3 if dtype == np.int8 else 200, dtype),
        "cs": np.array(0.3 if op == "QLinearMul" else 0.09, np.float32),
        "cz": np.array(10, dtype),
    }
    _compare_ms(_ms_model(op, feeds), feeds)


@pytest.mark.parametrize("op,attrs", [("QLinearSigmoid", {}), ("QLinearLeakyRelu", {"alpha": 0.1})])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_lookup_activations(op, attrs, dtype):
    # Every input value, so the whole 256-entry table onnxruntime builds is compared.
    x = np.arange(np.iinfo(dtype).min, np.iinfo(dtype).max + 1).astype(dtype).reshape(4, 64)
    feeds = {
        "x": x,
        "xs": np.array(0.06, np.float32),
        "xz": np.array(3, dtype),
        "ys": np.array(1 / 256 if op == "QLinearSigmoid" else 0.05, np.float32),
        "yz": np.array(0 if op == "QLinearSigmoid" else 7, dtype),
    }
    _compare_ms(_ms_model(op, feeds, **attrs), feeds)


def test_qlinear_concat_requantizes_each_input():
    x1, x2 = _q(np.uint8, 1, 2, 3), _q(np.uint8, 1, 3, 3)
    feeds = {
        "ys": np.array(0.1, np.float32),
        "yz": np.array(120, np.uint8),
        "x1": x1,
        "s1": np.array(0.1, np.float32),
        "z1": np.array(120, np.uint8),
        "x2": x2,
        "s2": np.array(0.037, np.float32),
        "z2": np.array(14, np.uint8),
    }
    _compare_ms(_ms_model("QLinearConcat", feeds, axis=1), feeds)


def test_qlinear_where():
    cond = RNG.random((2, 5)) > 0.5
    x, y = _q(np.int8, 2, 5), _q(np.int8, 1, 5)
    feeds = {
        "c": cond,
        "x": x,
        "xs": np.array(0.02, np.float32),
        "xz": np.array(1, np.int8),
        "y2": y,
        "ys": np.array(0.05, np.float32),
        "yz": np.array(-4, np.int8),
        "zs": np.array(0.03, np.float32),
        "zz": np.array(2, np.int8),
    }
    _compare_ms(_ms_model("QLinearWhere", feeds, ("z",)), feeds)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("opset,axis", [(13, -1), (13, 1), (12, 1)])
@pytest.mark.parametrize("constant_scales", [True, False])
def test_qlinear_softmax(dtype, opset, axis, constant_scales):
    # onnxruntime's int8 kernel wraps an output of 128 around to -128; we saturate at 127
    # (y_scale 1/256, zero point -128, as its quantizer writes, reaches 128 only for a row
    # with one dominant value, which these inputs avoid).
    x = _q(dtype, 8, 4, 40)
    zero = np.array(0 if dtype == np.uint8 else -128, dtype)
    feeds = {
        "x": x,
        "xs": np.array(0.08, np.float32),
        "xz": np.array(3, dtype),
        "ys": np.array(1 / 256, np.float32),
        "yz": zero,
    }
    scales = {k: feeds[k] for k in ("xs", "xz", "ys", "yz")} if constant_scales else None
    model = _ms_model("QLinearSoftmax", feeds, initializers=scales, axis=axis)
    model.graph.node[0].attribute.append(helper.make_attribute("opset", opset))
    # With x_scale a constant (as the quantizer writes it) the exponential table is built in
    # double precision as onnxruntime's is; from a graph input without x64 it is float32,
    # an ulp off, which can move a value one step.
    _compare_ms(model, feeds if scales is None else {"x": x}, steps=0 if scales else 1)


@pytest.mark.parametrize("channels_last", [0, 1])
def test_qlinear_global_average_pool(channels_last):
    x = _q(np.uint8, 2, 3, 5, 7)
    feeds = {
        "x": x,
        "xs": np.array(0.03, np.float32),
        "xz": np.array(128, np.uint8),
        "ys": np.array(0.011, np.float32),
        "yz": np.array(120, np.uint8),
    }
    _compare_ms(_ms_model("QLinearGlobalAveragePool", feeds, channels_last=channels_last), feeds)


@pytest.mark.parametrize(
    "attrs",
    [
        {"kernel_shape": [7, 6]},  # the whole image: onnxruntime's global average pool
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
        {"kernel_shape": [2, 3], "strides": [2, 2], "ceil_mode": 1, "channels_last": 1},
    ],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_average_pool(attrs, dtype):
    x = _q(dtype, 2, 3, 7, 6)
    feeds = {
        "x": x,
        "xs": np.array(0.05, np.float32),
        "xz": np.array(7, dtype),
        "ys": np.array(0.03, np.float32),
        "yz": np.array(-2 if dtype == np.int8 else 90, dtype),
    }
    # onnxruntime rounds each dequantized value before summing; XLA:CPU fuses the multiply
    # into the sum's adds, so a value by a half step may land one step off.
    _compare_ms(_ms_model("QLinearAveragePool", feeds, **attrs), feeds, steps=1)


def test_qlinear_reduce_mean_exact():
    # onnxruntime's CPU provider has no QLinearReduceMean kernel: exact arithmetic instead.
    x = _q(np.uint8, 2, 3, 4)
    feeds = {
        "x": x,
        "xs": np.array(0.1, np.float32),
        "xz": np.array(100, np.uint8),
        "ys": np.array(0.07, np.float32),
        "yz": np.array(130, np.uint8),
    }
    model = _ms_model("QLinearReduceMean", feeds, axes=[-1, 1], keepdims=0)
    got = run_onnx2jax(model, feeds)[0]
    mean = (x.astype(np.float64) - 100).mean(axis=(1, 2)) * np.float64(np.float32(0.1))
    want = np.clip(np.round(mean / np.float64(np.float32(0.07))) + 130, 0, 255)
    _assert_quantized_close(got, want.astype(np.uint8))


@pytest.mark.parametrize("quantized_output", [False, True])
@pytest.mark.parametrize("per_column,trans_b", [(False, 0), (True, 1)])
def test_qgemm(quantized_output, per_column, trans_b):
    a, b = _q(np.uint8, 4, 6), _q(np.int8, 5, 6) if trans_b else _q(np.int8, 6, 5)
    b_scale = (RNG.uniform(0.01, 0.05, 5) if per_column else np.array(0.02)).astype(np.float32)
    b_zero = np.zeros(b_scale.shape, np.int8)
    feeds = {
        "a": a,
        "as": np.array(0.03, np.float32),
        "az": np.array(128, np.uint8),
        "b": b,
        "bs": b_scale,
        "bz": b_zero,
        "c": RNG.integers(-500, 500, 5).astype(np.int32),
        "ys": np.array(0.5, np.float32) if quantized_output else None,
        "yz": np.array(120, np.uint8) if quantized_output else None,
    }
    model = _ms_model("QGemm", feeds, alpha=0.75, transB=trans_b)
    feeds = {k: v for k, v in feeds.items() if v is not None}
    if quantized_output:
        _compare_ms(model, feeds)
    else:
        assert_matches_reference(model, feeds)


@pytest.mark.parametrize("b_dtype", [np.uint8, np.int8])
def test_matmul_integer_to_float_and_dynamic_quantize_matmul(b_dtype):
    a, b = _q(np.uint8, 2, 3, 8), _q(b_dtype, 8, 4)
    b_scale = RNG.uniform(0.01, 0.05, 4).astype(np.float32)
    b_zero = _q(b_dtype, 4)
    bias = RNG.normal(size=4).astype(np.float32)
    feeds = {
        "a": a,
        "b": b,
        "as": np.array(0.04, np.float32),
        "bs": b_scale,
        "az": np.array(9, np.uint8),
        "bz": b_zero,
        "bias": bias,
    }
    assert_matches_reference(_ms_model("MatMulIntegerToFloat", feeds), feeds)
    x = RNG.normal(size=(2, 3, 8)).astype(np.float32)
    feeds = {"x": x, "b": b, "bs": b_scale, "bz": b_zero, "bias": bias}
    assert_matches_reference(_ms_model("DynamicQuantizeMatMul", feeds), feeds)


def test_ms_quantize_dequantize_linear_int16():
    x = RNG.normal(scale=50, size=(3, 4)).astype(np.float32)
    feeds = {
        "x": x,
        "s": np.array([0.01, 0.02, 0.03], np.float32),
        "z": np.array([-5, 0, 7], np.int16),
    }
    q = _compare_ms(_ms_model("QuantizeLinear", feeds, axis=0), feeds)[0]
    feeds = {"q": q, "s": feeds["s"], "z": feeds["z"]}
    assert_matches_reference(_ms_model("DequantizeLinear", feeds, axis=0), feeds)


@pytest.mark.parametrize("channels_last", [0, 1])
def test_ms_qlinear_conv_channels_last(channels_last):
    x = _q(np.uint8, 1, 2, 5, 5)
    w = RNG.integers(-20, 20, size=(3, 2, 3, 3)).astype(np.int8)
    feeds = {
        "x": x.transpose(0, 2, 3, 1) if channels_last else x,
        "xs": np.array(0.02, np.float32),
        "xz": np.array(128, np.uint8),
        "w": w,
        "ws": np.array([0.01, 0.03, 0.02], np.float32),
        "wz": np.zeros(3, np.int8),
        "ys": np.array(0.05, np.float32),
        "yz": np.array(100, np.uint8),
    }
    model = _ms_model("QLinearConv", feeds, pads=[1, 1, 1, 1], channels_last=channels_last)
    got = run_onnx2jax(model, feeds)[0]
    reference = single_node_model("QLinearConv", {**feeds, "x": x}, pads=[1, 1, 1, 1])
    want = run_reference(reference, {**feeds, "x": x}, engine="reference")[0]
    _assert_quantized_close(got, want.transpose(0, 2, 3, 1) if channels_last else want, 1)


@pytest.mark.parametrize("with_mask", [False, True])
def test_qattention(with_mask):
    batch, length, hidden, heads = 2, 5, 8, 2
    x = _q(np.uint8, batch, length, hidden)
    w = _q(np.int8, hidden, 3 * hidden)
    feeds = {
        "x": x,
        "w": w,
        "bias": RNG.normal(size=3 * hidden).astype(np.float32),
        "xs": np.array(0.02, np.float32),
        "ws": np.array(0.01, np.float32),
        "mask": np.array([5, 3], np.int32) if with_mask else None,
        "xz": np.array(128, np.uint8),
        "wz": np.array(0, np.int8),
    }
    model = _ms_model("QAttention", feeds, num_heads=heads)
    assert_matches_reference(model, feeds_of(model, feeds), rtol=1e-4, atol=1e-5)


def test_qembed_layer_norm():
    batch, length, hidden, vocab = 2, 4, 8, 11
    word, pos, seg = _q(np.uint8, vocab, hidden), _q(np.uint8, 6, hidden), _q(np.uint8, 2, hidden)
    feeds = {
        "ids": RNG.integers(0, vocab, (batch, length)).astype(np.int32),
        "segs": RNG.integers(0, 2, (batch, length)).astype(np.int32),
        "word": word,
        "pos": pos,
        "seg": seg,
        "gamma": _q(np.uint8, hidden),
        "beta": _q(np.uint8, hidden),
        "mask": np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32),
        "ws": np.array(0.01, np.float32),
        "ps": np.array(0.02, np.float32),
        "ss": np.array(0.03, np.float32),
        "gs": np.array(0.004, np.float32),
        "bs": np.array(0.002, np.float32),
        "wz": np.array(128, np.uint8),
        "pz": np.array(120, np.uint8),
        "sz": np.array(130, np.uint8),
        "gz": np.array(0, np.uint8),
        "bz": np.array(128, np.uint8),
    }
    model = _ms_model("QEmbedLayerNormalization", feeds, ("y", "mask_index"), epsilon=1e-5)
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ ai.onnx.ml
def test_linear_regressor_and_scaler():
    x = RNG.normal(size=(4, 3)).astype(np.float32)
    model = _ml_model(
        "LinearRegressor",
        {"x": x},
        coefficients=[1.0, 2, 3, 4, 5, 6],
        intercepts=[0.5, -1.0],
        targets=2,
    )
    assert_matches_reference(model, {"x": x})
    model = _ml_model("Scaler", {"x": x}, offset=[1.0, 2, 3], scale=[0.5, 2, 1])
    assert_matches_reference(model, {"x": x})


@pytest.mark.parametrize("norm", ["MAX", "L1", "L2"])
def test_normalizer(norm):
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    assert_matches_reference(_ml_model("Normalizer", {"x": x}, norm=norm), {"x": x})


def test_imputer_nan_and_one_hot():
    x = np.array([[1.0, np.nan], [np.nan, 4.0]], np.float32)
    model = _ml_model(
        "Imputer", {"x": x}, imputed_value_floats=[9.0, 8.0], replaced_value_float=float("nan")
    )
    assert_matches_reference(model, {"x": x})
    ids = np.array([[1, 5], [3, 1]], np.int64)
    assert_matches_reference(
        _ml_model("OneHotEncoder", {"x": ids}, cats_int64s=[1, 3, 4]), {"x": ids}
    )


def test_label_encoder_int_to_float_traced():
    x = np.array([[1, 7], [3, 2]], np.int64)
    model = _ml_model(
        "LabelEncoder",
        {"x": x},
        keys_int64s=[1, 2, 3],
        values_floats=[0.5, 1.5, 2.5],
        default_float=-3.0,
    )
    model.opset_import[1].version = 2
    assert_matches_reference(model, {"x": x})


def test_zipmap_matches_onnxruntime():
    x = RNG.random((3, 2)).astype(np.float32)
    node = helper.make_node("ZipMap", ["x"], ["y"], domain=ML, classlabels_int64s=[4, 7])
    out_type = helper.make_sequence_type_proto(
        helper.make_map_type_proto(
            TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
        )
    )
    graph = helper.make_graph(
        [node],
        "zipmap",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2])],
        [helper.make_value_info("y", out_type)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ML, 1)],
        ir_version=10,
    )
    expected = run_reference(model, {"x": x})[0]
    got = onnx2jax.load(model)(x=x)["y"]
    assert [list(d) for d in got] == [list(d) for d in expected]
    np.testing.assert_allclose(
        [[float(v) for v in d.values()] for d in got],
        [list(d.values()) for d in expected],
        rtol=1e-6,
    )


def _tree_regressor(aggregate, n_targets=1):
    # Two trees: x0 <= 0.5 ? (x1 < 2 ? a : b) : c, and a stump on x1 with BRANCH_GT.
    model = _ml_model(
        "TreeEnsembleRegressor",
        {"x": np.zeros((1, 2), np.float32)},
        aggregate_function=aggregate,
        n_targets=n_targets,
        nodes_treeids=[0, 0, 0, 0, 0, 1, 1, 1],
        nodes_nodeids=[0, 1, 2, 3, 4, 0, 1, 2],
        nodes_featureids=[0, 1, 0, 0, 0, 1, 0, 0],
        nodes_modes=[
            "BRANCH_LEQ",
            "BRANCH_LT",
            "LEAF",
            "LEAF",
            "LEAF",
            "BRANCH_GT",
            "LEAF",
            "LEAF",
        ],
        nodes_values=[0.5, 2.0, 0, 0, 0, 1.0, 0, 0],
        nodes_truenodeids=[1, 3, 0, 0, 0, 1, 0, 0],
        nodes_falsenodeids=[2, 4, 0, 0, 0, 2, 0, 0],
        nodes_missing_value_tracks_true=[1, 0, 0, 0, 0, 0, 0, 0],
        target_treeids=[0, 0, 0, 1, 1],
        target_nodeids=[2, 3, 4, 1, 2],
        target_ids=[0, 0, 0, 0, 0],
        target_weights=[1.0, 2.0, 3.0, 10.0, 20.0],
        base_values=[0.25],
    )
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    return model


@pytest.mark.parametrize("aggregate", ["SUM", "AVERAGE", "MIN", "MAX"])
def test_tree_regressor_aggregates_and_missing(aggregate):
    x = np.array([[0.0, 1.0], [1.0, 3.0], [np.nan, 0.0], [0.2, 5.0]], np.float32)
    assert_matches_reference(_tree_regressor(aggregate), {"x": x})


def test_tree_regressor_x64_off_and_jit_shapes():
    model = _tree_regressor("SUM")
    for rows in (1, 5):
        x = RNG.normal(size=(rows, 2)).astype(np.float32)
        np.testing.assert_allclose(
            run_onnx2jax(model, {"x": x}, x64=False)[0],
            run_reference(model, {"x": x})[0],
            rtol=1e-6,
        )


@pytest.fixture(scope="module")
def sklearn_data():
    pytest.importorskip("skl2onnx")
    x = RNG.normal(size=(60, 4)).astype(np.float32)
    binary = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    three = np.digitize(x[:, 0] - x[:, 2], [-0.5, 0.5])
    return x, binary, three


def _check_sklearn(estimator, x, y):
    from skl2onnx import to_onnx

    estimator.fit(x, y)
    model = to_onnx(
        estimator, x[:1], options={id(estimator): {"zipmap": False}}, target_opset={"": 17, ML: 3}
    )
    expected = run_reference(model, {"X": x})
    got = run_onnx2jax(model, {"X": x})
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["binary", "three"])
def test_sklearn_logistic_regression(sklearn_data, target):
    from sklearn.linear_model import LogisticRegression

    x, binary, three = sklearn_data
    _check_sklearn(LogisticRegression(), x, binary if target == "binary" else three)


@pytest.mark.parametrize("target", ["binary", "three"])
def test_sklearn_random_forest(sklearn_data, target):
    from sklearn.ensemble import RandomForestClassifier

    x, binary, three = sklearn_data
    forest = RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0)
    _check_sklearn(forest, x, binary if target == "binary" else three)


def test_sklearn_scaler_pipeline(sklearn_data):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, _, three = sklearn_data
    from skl2onnx import to_onnx

    pipeline = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, three)
    model = to_onnx(pipeline, x[:1], options={"zipmap": False})
    expected = run_reference(model, {"X": x})
    got = run_onnx2jax(model, {"X": x})
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-5, atol=1e-6)


def test_sklearn_gradient_boosting_regressor(sklearn_data):
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingRegressor

    x, _, _ = sklearn_data
    y = x[:, 0] * 2 - x[:, 3]
    model = to_onnx(GradientBoostingRegressor(n_estimators=10, max_depth=3).fit(x, y), x[:1])
    np.testing.assert_allclose(
        run_onnx2jax(model, {"X": x})[0], run_reference(model, {"X": x})[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "kind", ["binary_rbf", "three_poly", "three_probability", "binary_sigmoid_probability"]
)
def test_sklearn_svc(sklearn_data, kind):
    from sklearn.svm import SVC

    x, binary, three = sklearn_data
    kernel = {"binary_rbf": "rbf", "three_poly": "poly"}.get(kind, "sigmoid")
    svc = SVC(kernel=kernel, degree=2, probability="probability" in kind, random_state=0)
    _check_sklearn(svc, x, binary if kind.startswith("binary") else three)


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_sklearn_svr(sklearn_data, kernel):
    from skl2onnx import to_onnx
    from sklearn.svm import SVR

    x, _, _ = sklearn_data
    model = to_onnx(
        SVR(kernel=kernel).fit(x, x[:, 1] - x[:, 2]), x[:1], target_opset={"": 17, ML: 3}
    )
    np.testing.assert_allclose(
        run_onnx2jax(model, {"X": x})[0], run_reference(model, {"X": x})[0], rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------------------------ training
def test_adam_multiple_tensors_x64_off():
    inputs = {
        "r": np.array(0.1, np.float32),
        "t": np.array(3, np.int64),
        "x1": np.ones(2, np.float32),
        "x2": np.ones(3, np.float32),
        "g1": np.full(2, 0.5, np.float32),
        "g2": np.full(3, -1.0, np.float32),
        "v1": np.zeros(2, np.float32),
        "v2": np.ones(3, np.float32),
        "h1": np.ones(2, np.float32),
        "h2": np.ones(3, np.float32),
    }
    node = helper.make_node(
        "Adam",
        list(inputs),
        ["x1n", "x2n", "v1n", "v2n", "h1n", "h2n"],
        domain="ai.onnx.preview.training",
        alpha=0.9,
        beta=0.99,
        norm_coefficient=0.01,
    )
    graph = helper.make_graph(
        [node],
        "adam",
        [
            helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for k, v in inputs.items()
        ],
        [helper.make_value_info(n, onnx.TypeProto()) for n in node.output],
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 17),
            helper.make_opsetid("ai.onnx.preview.training", 1),
        ],
    )
    expected = run_reference(model, inputs, engine="reference")
    for x64 in (True, False):
        for got, want in zip(run_onnx2jax(model, inputs, x64=x64), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5)


# ------------------------------------------------------------------------------ strings
def _const_string_model(op_type, values, outputs=("y",), **attrs):
    """String input as a Constant, so the whole graph stays static (strings never trace)."""
    const = helper.make_node(
        "Constant", [], ["s"], value=onnx.numpy_helper.from_array(np.asarray(values, dtype=object))
    )
    node = helper.make_node(op_type, ["s"], list(outputs), **attrs)
    graph = helper.make_graph(
        [const, node], "strings", [], [helper.make_value_info(n, onnx.TypeProto()) for n in outputs]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_string_split_and_normalizer_static():
    model = _const_string_model("StringSplit", [["a b", ""], ["c  d e", "f"]], ("y", "z"))
    # Graphs of static strings run outside jit.
    got = run_onnx2jax(model, {}, jit=False)
    expected = run_reference(model, {}, engine="reference")
    assert got[0].tolist() == expected[0].tolist()
    np.testing.assert_array_equal(got[1], expected[1])
    model = _const_string_model(
        "StringNormalizer",
        ["Monday", "tuesday", "MONDAY"],
        case_change_action="UPPER",
        stopwords=["monday"],
    )
    assert run_onnx2jax(model, {}, jit=False)[0].tolist() == ["TUESDAY"]


def test_tfidf_traced_int_input_x64_off():
    x = np.array([[1, 2, 3, 2, 3], [3, 3, 1, 2, 7]], np.int32)
    model = single_node_model(
        "TfIdfVectorizer",
        {"x": x},
        opset=17,
        mode="TFIDF",
        min_gram_length=1,
        max_gram_length=2,
        max_skip_count=1,
        ngram_counts=[0, 3],
        ngram_indexes=[0, 1, 2, 3, 4],
        pool_int64s=[1, 2, 3, 2, 3, 3, 1],
        weights=[1, 2, 3, 4, 5],
    )
    expected = run_reference(model, {"x": x}, engine="reference")[0]
    np.testing.assert_allclose(run_onnx2jax(model, {"x": x}, x64=False)[0], expected)
