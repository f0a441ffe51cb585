"""Signal ops (DFT, STFT, windows, MelWeightMatrix): the corners the ONNX node suite leaves out,
compared with the ONNX reference evaluator, plus gradients and x64 off."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from onnx import TensorProto

import onnx2jax
from tests.helpers import assert_matches_reference, f32, feeds_of, run_onnx2jax, single_node_model

RNG = np.random.default_rng(0)


def check(op_type, inputs, constants=(), opset=20, rtol=1e-4, atol=1e-4, **attrs):
    initializers = {k: v for k, v in inputs.items() if k in constants and v is not None}
    model = single_node_model(op_type, inputs, opset=opset, initializers=initializers, **attrs)
    return assert_matches_reference(
        model, feeds_of(model, inputs), engine="reference", rtol=rtol, atol=atol
    )


def scalar(value):
    return np.asarray(value, np.int64)


DFT_CASES = [
    ("real_axis1", f32(2, 6, 3, 1), None, 1, {}),
    ("real_pad", f32(2, 5, 1), 8, -2, {}),
    ("real_truncate_onesided", f32(3, 9, 1), 6, 1, {"onesided": 1}),
    ("complex_axis0", f32(4, 3, 2), None, 0, {}),
    ("complex_onesided_slices", f32(2, 7, 2), None, 1, {"onesided": 1}),
    ("inverse_complex", f32(2, 5, 2), None, -2, {"inverse": 1}),
    ("inverse_real", f32(5, 2, 1), None, 0, {"inverse": 1}),
    ("irfft_default_length", f32(2, 5, 2), None, 1, {"inverse": 1, "onesided": 1}),
    ("irfft_odd_length", f32(2, 5, 2), 9, 1, {"inverse": 1, "onesided": 1}),
]


@pytest.mark.parametrize("name,x,length,axis,attrs", DFT_CASES, ids=[c[0] for c in DFT_CASES])
def test_dft_opset20(name, x, length, axis, attrs):
    inputs = {
        "x": x,
        "dft_length": None if length is None else scalar(length),
        "axis": scalar(axis),
    }
    check("DFT", inputs, ("dft_length", "axis"), **attrs)


def test_dft_opset17_axis_attribute_and_float64():
    x = RNG.normal(size=(2, 4, 6, 2))
    check(
        "DFT",
        {"x": x, "dft_length": scalar(5)},
        ("dft_length",),
        opset=17,
        axis=2,
        rtol=1e-10,
        atol=1e-10,
    )
    check("DFT", {"x": x.astype(np.float32)}, opset=17, axis=-3)


def test_dft_x64_off_and_float16():
    x = f32(3, 8, 1)
    model = single_node_model("DFT", {"x": x}, opset=20)
    (got,) = run_onnx2jax(model, {"x": x}, x64=False)
    want = np.fft.fft(x[..., 0].astype(np.float64), axis=1)
    np.testing.assert_allclose(got[..., 0] + 1j * got[..., 1], want, rtol=1e-4, atol=1e-4)
    half = x.astype(np.float16)
    (got,) = run_onnx2jax(single_node_model("DFT", {"x": half}, opset=20), {"x": half})
    assert got.dtype == np.float16
    np.testing.assert_allclose(got[..., 0], want.real, rtol=1e-2, atol=2e-2)


def test_dft_gradient_is_parseval():
    x = f32(2, 8, 1)
    compiled = onnx2jax.load(single_node_model("DFT", {"x": x}, opset=20))
    grad = jax.jit(jax.grad(lambda v: jnp.sum(compiled.apply(compiled.params, v)["y"] ** 2)))(
        jnp.asarray(x)
    )
    # sum |FFT(x)|^2 = N * sum x^2, so the gradient is 2 N x.
    np.testing.assert_allclose(np.asarray(grad), 2 * 8 * x, rtol=1e-4, atol=1e-4)


def test_dft_rejects_the_complex_axis():
    x = f32(2, 4, 1)
    model = single_node_model(
        "DFT",
        {"x": x, "dft_length": None, "axis": scalar(-1)},
        opset=20,
        initializers={"axis": scalar(-1)},
    )
    with pytest.raises(onnx2jax.core.errors.OpError, match="axis"):
        run_onnx2jax(model, {"x": x})


STFT_CASES = [
    ("window_onesided", f32(2, 32, 1), 4, np.hanning(10).astype(np.float32), None, 1),
    ("window_twosided", f32(1, 20, 1), 3, np.hamming(8).astype(np.float32), 8, 0),
    ("length_only", f32(2, 17, 1), 5, None, 6, 1),
    ("complex_signal", f32(1, 16, 2), 4, np.ones(5, np.float32), None, 0),
]


@pytest.mark.parametrize(
    "name,signal,step,window,length,onesided", STFT_CASES, ids=[c[0] for c in STFT_CASES]
)
def test_stft(name, signal, step, window, length, onesided):
    inputs = {
        "signal": signal,
        "frame_step": scalar(step),
        "window": window,
        "frame_length": None if length is None else scalar(length),
    }
    check("STFT", inputs, ("frame_step", "frame_length"), opset=17, onesided=onesided)


@pytest.mark.parametrize("op_type", ["HannWindow", "HammingWindow", "BlackmanWindow"])
@pytest.mark.parametrize("periodic", [0, 1])
def test_windows(op_type, periodic):
    check(
        op_type, {"size": scalar(7)}, ("size",), opset=17, periodic=periodic, rtol=1e-5, atol=1e-6
    )
    (got,) = check(
        op_type,
        {"size": scalar(5)},
        ("size",),
        opset=17,
        periodic=periodic,
        output_datatype=TensorProto.DOUBLE,
        rtol=1e-12,
        atol=1e-12,
    )
    assert got.dtype == np.float64


@pytest.mark.parametrize(
    "bins,length,rate,low,high", [(8, 32, 8000, 0.0, 4000.0), (5, 64, 16000, 100.0, 6000.0)]
)
def test_mel_weight_matrix(bins, length, rate, low, high):
    inputs = {
        "bins": scalar(bins),
        "length": scalar(length),
        "rate": scalar(rate),
        "low": np.asarray(low, np.float32),
        "high": np.asarray(high, np.float32),
    }
    check("MelWeightMatrix", inputs, tuple(inputs), opset=17, rtol=1e-6, atol=1e-7)
    check(
        "MelWeightMatrix",
        inputs,
        tuple(inputs),
        opset=17,
        rtol=1e-12,
        atol=1e-12,
        output_datatype=TensorProto.DOUBLE,
    )
