"""float16 models: held in float32 between ops as onnxruntime's CPU provider runs them, or
rounded after every op on request."""

from __future__ import annotations

import jax
import numpy as np
import onnx
import onnxruntime
import pytest
from onnxconverter_common import float16

import onnx2jax


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


@pytest.fixture(scope="module")
def digits():
    model = onnx.load(str(onnx2jax.example_path()))
    samples = np.load(onnx2jax.example_path().with_name("digits_samples.npz"))
    images = samples[samples.files[0]][:16].astype(np.float32)
    return model, images, ort_run(model, {"image": images})[0]


@pytest.mark.parametrize("keep_io_types", [True, False])
def test_float16_cnn_matches_onnxruntime(digits, keep_io_types):
    model, images, exact = digits
    half = float16.convert_float_to_float16(model, keep_io_types=keep_io_types)
    feed = images if keep_io_types else images.astype(np.float16)
    (want,) = ort_run(half, {"image": feed})
    loaded = onnx2jax.load(half, float16_compute="float32")
    got = loaded(image=feed)["logits"]
    assert got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=2e-5)
    applied = loaded.apply(loaded.params, feed)["logits"]
    np.testing.assert_allclose(np.asarray(applied, np.float64), want, rtol=0, atol=2e-5)
    # No further from the float32 model than onnxruntime is.
    ours = np.abs(np.asarray(got, np.float64) - exact).max()
    theirs = np.abs(want.astype(np.float64) - exact).max()
    assert ours <= 1.2 * theirs


def test_rounding_after_every_op_is_a_choice(digits):
    model, images, exact = digits
    half = float16.convert_float_to_float16(model, keep_io_types=True)
    rounded = onnx2jax.load(half, float16_compute="float16")
    widened = onnx2jax.load(half)
    assert (rounded.float16_compute, widened.float16_compute) == ("float16", "float32")
    got = np.asarray(rounded(image=images)["logits"], np.float64)
    held = np.asarray(widened(image=images)["logits"], np.float64)
    assert not np.array_equal(got, held)
    assert np.abs(got - exact).max() < 0.05


def test_intermediate_outputs_and_gradients_keep_float16(digits):
    model, images, _ = digits
    half = float16.convert_float_to_float16(model, keep_io_types=False)
    loaded = onnx2jax.load(half)
    first = loaded.tensor_names()[0]
    feed = images.astype(np.float16)
    out = loaded.apply(loaded.params, feed, outputs=[first, "logits"])
    assert [v.dtype for v in out.values()] == [np.float16, np.float16]
    (want,) = ort_run(half, {"image": feed})
    np.testing.assert_array_equal(np.asarray(out["logits"]), want)

    def loss(params):
        return loaded.apply(params, feed)["logits"].astype(np.float32).sum()

    grads = jax.grad(loss)(loaded.params)
    assert all(
        g.dtype == np.float16 and np.isfinite(np.asarray(g, np.float32)).all()
        for g in grads.values()
    )


def test_unknown_float16_compute_is_refused():
    with pytest.raises(ValueError, match="float16_compute must be one of"):
        onnx2jax.load(onnx2jax.example_path(), float16_compute="half")
