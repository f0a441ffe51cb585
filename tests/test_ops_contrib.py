"""com.microsoft contrib ops against onnxruntime, which defines them."""

from __future__ import annotations

import numpy as np
import pytest

from onnx2jax.errors import OpError
from tests.helpers import assert_matches_reference, run_onnx2jax, single_node_model

MS = "com.microsoft"
RNG = np.random.default_rng(0)


def _f32(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def _ms_model(op_type, inputs, outputs=("y",), **attrs):
    return single_node_model(op_type, inputs, outputs, opset=17, domain=MS, **attrs)


@pytest.mark.parametrize("op_type", ["Gelu", "QuickGelu", "FastGelu"])
def test_gelu_family(op_type):
    x = _f32(2, 3, 8)
    assert_matches_reference(_ms_model(op_type, {"x": x}), {"x": x}, rtol=1e-4, atol=1e-5)


def test_bias_gelu_and_fast_gelu_bias():
    feeds = {"x": _f32(2, 8), "b": _f32(8)}
    assert_matches_reference(_ms_model("BiasGelu", feeds), feeds, rtol=1e-4, atol=1e-5)
    assert_matches_reference(_ms_model("FastGelu", feeds), feeds, rtol=1e-4, atol=1e-5)


def test_bias_add():
    # onnxruntime implements BiasAdd only on CUDA.
    feeds = {"x": _f32(2, 3, 4), "b": _f32(4), "s": _f32(2, 3, 4)}
    got = run_onnx2jax(_ms_model("BiasAdd", feeds), feeds)[0]
    np.testing.assert_allclose(got, feeds["x"] + feeds["b"] + feeds["s"], rtol=1e-6)


def test_fused_matmul_transposes():
    feeds = {"a": _f32(2, 4, 3), "b": _f32(2, 5, 4)}
    model = _ms_model("FusedMatMul", feeds, alpha=0.5, transA=1, transB=1)
    assert_matches_reference(model, feeds, rtol=1e-5, atol=1e-5)


def test_skip_layer_normalization_all_outputs():
    feeds = {"x": _f32(2, 3, 8), "skip": _f32(2, 3, 8), "gamma": _f32(8), "beta": _f32(8),
             "bias": _f32(8)}
    model = _ms_model("SkipLayerNormalization", feeds, ("y", "mean", "inv_std", "sum"),
                      epsilon=1e-5)
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)


def test_skip_simplified_layer_normalization():
    feeds = {"x": _f32(2, 3, 8), "skip": _f32(2, 3, 8), "gamma": _f32(8)}
    model = _ms_model("SkipSimplifiedLayerNormalization", feeds, epsilon=1e-5)
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)


def test_simplified_layer_normalization_onnx_domain():
    feeds = {"x": _f32(2, 3, 8), "scale": _f32(8)}
    model = single_node_model("SimplifiedLayerNormalization", feeds, opset=17, axis=-1,
                              epsilon=1e-5)
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)


def test_embed_layer_normalization():
    ids = RNG.integers(0, 10, size=(2, 5)).astype(np.int32)
    feeds = {"ids": ids, "seg": (ids % 2).astype(np.int32), "word": _f32(10, 8),
             "pos": _f32(6, 8), "segemb": _f32(2, 8), "gamma": _f32(8), "beta": _f32(8),
             "mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)}
    model = _ms_model("EmbedLayerNormalization", feeds, ("y", "mask_index"), epsilon=1e-5)
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("unidirectional", [0, 1])
def test_attention_with_mask(unidirectional):
    feeds = {"x": _f32(2, 4, 8), "w": _f32(8, 24), "b": _f32(24),
             "mask": np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)}
    model = _ms_model("Attention", feeds, num_heads=2, unidirectional=unidirectional)
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-4)


def test_multi_head_attention_bias_and_padding_mask():
    feeds = {"q": _f32(2, 3, 8), "k": _f32(2, 5, 8), "v": _f32(2, 5, 8), "b": _f32(24),
             "mask": np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], np.int32)}
    model = _ms_model("MultiHeadAttention", feeds, num_heads=2)
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-4)


def test_unsupported_attention_past_is_a_clear_error():
    feeds = {"x": _f32(1, 2, 4), "w": _f32(4, 12), "b": _f32(12), "m": None,
             "past": _f32(2, 1, 2, 1, 2)}
    model = _ms_model("Attention", feeds, num_heads=2)
    model.graph.node[0].output.append("present")
    with pytest.raises(OpError, match="past"):
        run_onnx2jax(model, {k: v for k, v in feeds.items() if v is not None})


@pytest.mark.parametrize("activation, params", [
    ("", None), ("Relu", None), ("Tanh", None), ("Sigmoid", None), ("LeakyRelu", [0.2]),
    ("Clip", [-0.5, 0.7]), ("HardSigmoid", [0.3, 0.4])])
@pytest.mark.parametrize("with_sum", [False, True])
def test_fused_conv(activation, params, with_sum):
    # Weights of 64 output channels: model(...) runs the native kernel where this CPU has one.
    feeds = {"x": _f32(2, 5, 9, 9), "w": _f32(64, 5, 3, 3), "b": _f32(64)}
    if with_sum:
        feeds["z"] = _f32(2, 64, 5, 5)
    attrs = {"activation": activation} if activation else {}
    if params:
        attrs["activation_params"] = params
    weights = {"w": feeds.pop("w"), "b": feeds.pop("b")}
    model = single_node_model("FusedConv", {"x": feeds["x"], **weights, **feeds}, ("y",),
                              opset=17, domain=MS, initializers=weights, strides=[2, 2],
                              pads=[1, 1, 1, 1], **attrs)
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-4)


def test_fused_conv_rejects_an_unknown_activation():
    feeds = {"x": _f32(1, 2, 4, 4), "w": _f32(4, 2, 1, 1)}
    with pytest.raises(OpError, match="activation 'Gelu'"):
        run_onnx2jax(_ms_model("FusedConv", feeds, activation="Gelu"), feeds)
