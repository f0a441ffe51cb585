"""com.microsoft contrib ops against onnxruntime, which defines them."""

from __future__ import annotations

import numpy as np
import pytest

from onnx2jax.core.errors import OpError
from tests.helpers import (
    assert_matches_reference,
    run_onnx2jax,
    run_reference,
    single_node_model,
)

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
    feeds = {
        "x": _f32(2, 3, 8),
        "skip": _f32(2, 3, 8),
        "gamma": _f32(8),
        "beta": _f32(8),
        "bias": _f32(8),
    }
    model = _ms_model(
        "SkipLayerNormalization", feeds, ("y", "mean", "inv_std", "sum"), epsilon=1e-5
    )
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)


def test_skip_simplified_layer_normalization():
    feeds = {"x": _f32(2, 3, 8), "skip": _f32(2, 3, 8), "gamma": _f32(8)}
    model = _ms_model("SkipSimplifiedLayerNormalization", feeds, epsilon=1e-5)
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)


def test_simplified_layer_normalization_onnx_domain():
    feeds = {"x": _f32(2, 3, 8), "scale": _f32(8)}
    model = single_node_model(
        "SimplifiedLayerNormalization", feeds, opset=17, axis=-1, epsilon=1e-5
    )
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)


def test_embed_layer_normalization():
    ids = RNG.integers(0, 10, size=(2, 5)).astype(np.int32)
    feeds = {
        "ids": ids,
        "seg": (ids % 2).astype(np.int32),
        "word": _f32(10, 8),
        "pos": _f32(6, 8),
        "segemb": _f32(2, 8),
        "gamma": _f32(8),
        "beta": _f32(8),
        "mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32),
    }
    model = _ms_model("EmbedLayerNormalization", feeds, ("y", "mask_index"), epsilon=1e-5)
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)


# Every mask_index form of com.microsoft Attention (batch 2, sequence 4, past 3 where used);
# the cases where a row's keys are all masked check which value fills them.
_MASKS = {
    "none": lambda past: None,
    "lengths": lambda past: np.array([3 + past, 0], np.int32),
    "ends_and_starts": lambda past: np.array([3 + past, 4 + past, 1, 9], np.int32),
    "raw_2d": lambda past: RNG.integers(-1, 3, (2, 4 + past)).astype(np.int32),
    "raw_2d_one_column": lambda past: np.array([[0], [1]], np.int32),
    "raw_3d": lambda past: RNG.integers(0, 2, (2, 4, 4 + past)).astype(np.int32),
}


def _attention_feeds(mask, past=0, q=8, v=8):
    feeds = {"x": _f32(2, 4, 8), "w": _f32(8, 2 * q + v), "b": _f32(2 * q + v), "mask": mask}
    if past:
        feeds["past"] = _f32(2, 2, 2, past, v // 2)
    return feeds


@pytest.mark.parametrize("unidirectional", [0, 1])
@pytest.mark.parametrize("mask", sorted(_MASKS))
def test_attention_mask_forms(mask, unidirectional):
    feeds = _attention_feeds(_MASKS[mask](0))
    model = _ms_model("Attention", feeds, num_heads=2, unidirectional=unidirectional)
    assert_matches_reference(
        model, {k: v for k, v in feeds.items() if v is not None}, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("unidirectional", [0, 1])
@pytest.mark.parametrize("mask", ["none", "lengths", "raw_2d", "raw_3d"])
def test_attention_past_and_present(mask, unidirectional):
    feeds = _attention_feeds(_MASKS[mask](3), past=3)
    model = _ms_model(
        "Attention", feeds, ("y", "present"), num_heads=2, unidirectional=unidirectional
    )
    got = assert_matches_reference(
        model, {k: v for k, v in feeds.items() if v is not None}, rtol=1e-4, atol=1e-5
    )
    assert got[1].shape == (2, 2, 2, 7, 4)


def test_attention_one_decoding_step_with_past():
    feeds = {
        "x": _f32(2, 1, 8),
        "w": _f32(8, 24),
        "b": _f32(24),
        "mask": np.array([[1, 1, 1, 1], [0, 1, 1, 1]], np.int32),
        "past": _f32(2, 2, 2, 3, 4),
    }
    model = _ms_model("Attention", feeds, ("y", "present"), num_heads=2, unidirectional=1)
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)


def test_attention_qkv_hidden_sizes_bias_scale_and_filter_value():
    # V's head size (6) differs from Q/K's (4); attention_bias broadcasts over the batch.
    feeds = _attention_feeds(np.array([[1, 1, 0, 0], [0, 0, 0, 0]], np.int32), v=12)
    feeds.update(past=None, bias=_f32(1, 2, 4, 4))
    model = _ms_model(
        "Attention",
        feeds,
        num_heads=2,
        qkv_hidden_sizes=[8, 8, 12],
        scale=0.3,
        mask_filter_value=-7.0,
        unidirectional=1,
    )
    got = assert_matches_reference(
        model, {k: v for k, v in feeds.items() if v is not None}, rtol=1e-4, atol=1e-5
    )
    assert got[0].shape == (2, 4, 12)


def test_attention_without_bias_input():
    feeds = {"x": _f32(2, 4, 8), "w": _f32(8, 24), "b": None, "mask": np.array([2, 4], np.int32)}
    model = _ms_model("Attention", feeds, num_heads=2)
    assert_matches_reference(
        model, {k: v for k, v in feeds.items() if v is not None}, rtol=1e-4, atol=1e-5
    )


def test_attention_4d_megatron_mask():
    # onnxruntime's CPU kernel refuses the 4-D form (its CUDA kernel reads row past + s of the
    # [batch, 1, max, max] mask for query s); compared with NumPy instead.
    past, max_length = 2, 8
    feeds = _attention_feeds(
        RNG.integers(0, 2, (2, 1, max_length, max_length)).astype(np.int32), past=past
    )
    model = _ms_model("Attention", feeds, ("y", "present"), num_heads=2)
    got, present = run_onnx2jax(model, feeds)
    x, w, b, mask = feeds["x"], feeds["w"], feeds["b"], feeds["mask"]
    q, k, v = np.split(x @ w + b, 3, axis=-1)

    def heads(t):
        return t.reshape(2, -1, 2, 4).transpose(0, 2, 1, 3)

    k = np.concatenate([feeds["past"][0], heads(k)], axis=2)
    v = np.concatenate([feeds["past"][1], heads(v)], axis=2)
    rows = mask[:, 0, past : past + 4, : past + 4]
    scores = heads(q) @ k.transpose(0, 1, 3, 2) / 2 + np.where(rows > 0, 0, -10000.0)[:, None]
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    want = (weights @ v).transpose(0, 2, 1, 3).reshape(2, 4, 8)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(present, np.stack([k, v]))


@pytest.mark.parametrize(
    "mask",
    [
        np.array([4, 2], np.int32),
        np.array([[1, 1, 1, 0, 0], [0, 1, 0, 1, 0]], np.int32),
        RNG.integers(0, 2, (2, 3, 5)).astype(np.int32),
    ],
    ids=["lengths", "raw_2d", "raw_3d"],
)
def test_multi_head_attention_key_padding_mask_forms(mask):
    feeds = {
        "q": _f32(2, 3, 8),
        "k": _f32(2, 5, 8),
        "v": _f32(2, 5, 8),
        "b": _f32(24),
        "mask": mask,
    }
    model = _ms_model("MultiHeadAttention", feeds, num_heads=2)
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("unidirectional", [0, 1])
def test_multi_head_attention_past_key_value(unidirectional):
    feeds = {
        "q": _f32(2, 3, 8),
        "k": _f32(2, 3, 8),
        "v": _f32(2, 3, 8),
        "b": _f32(24),
        "mask": np.array([6, 7], np.int32),
        "bias": _f32(1, 2, 3, 7),
        "past_k": _f32(2, 2, 4, 4),
        "past_v": _f32(2, 2, 4, 4),
    }
    model = _ms_model(
        "MultiHeadAttention",
        feeds,
        ("y", "present_k", "present_v"),
        num_heads=2,
        unidirectional=unidirectional,
    )
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)


def test_attention_rotary_and_bad_masks_are_clear_errors():
    feeds = {"x": _f32(1, 2, 4), "w": _f32(4, 12), "b": _f32(12)}
    with pytest.raises(OpError, match="do_rotary"):
        run_onnx2jax(_ms_model("Attention", feeds, num_heads=2, do_rotary=1), feeds)
    feeds["mask"] = np.ones((3,), np.int32)
    with pytest.raises(OpError, match=r"mask of shape \(3,\)"):
        run_onnx2jax(_ms_model("Attention", feeds, num_heads=2), feeds)


@pytest.mark.parametrize(
    "activation, params",
    [
        ("", None),
        ("Relu", None),
        ("Tanh", None),
        ("Sigmoid", None),
        ("LeakyRelu", [0.2]),
        ("Clip", [-0.5, 0.7]),
        ("HardSigmoid", [0.3, 0.4]),
    ],
)
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
    model = single_node_model(
        "FusedConv",
        {"x": feeds["x"], **weights, **feeds},
        ("y",),
        opset=17,
        domain=MS,
        initializers=weights,
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        **attrs,
    )
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-4)


def test_fused_conv_rejects_an_unknown_activation():
    feeds = {"x": _f32(1, 2, 4, 4), "w": _f32(4, 2, 1, 1)}
    with pytest.raises(OpError, match="activation 'Gelu'"):
        run_onnx2jax(_ms_model("FusedConv", feeds, activation="Gelu"), feeds)


@pytest.mark.parametrize("opset", [11, 14])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_layer_normalization_below_opset_17(opset, dtype):
    # onnxruntime's transformer optimizer leaves LayerNormalization in the default domain of
    # models below opset 17; onnxruntime runs it (its kernel is registered from opset 1).
    feeds = {
        "x": _f32(2, 3, 8).astype(dtype),
        "scale": _f32(8).astype(dtype),
        "bias": _f32(8).astype(dtype),
    }
    model = single_node_model(
        "LayerNormalization", feeds, ("y", "mean", "inv_std"), opset=opset, axis=-1, epsilon=1e-5
    )
    tolerance = 1e-5 if dtype == np.float32 else 2e-3
    assert_matches_reference(model, feeds, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("op_type", ["Gelu", "FastGelu", "QuickGelu"])
def test_gelu_family_float16_computes_in_float32(op_type):
    # Rounded once from float32, fp16 results are at least as close to the exact values as
    # onnxruntime's (per-op fp16 rounding put ~45% of them an ulp or more away).
    from scipy.special import erf

    x = (RNG.normal(size=(64, 256)) * 3).astype(np.float16)
    model = _ms_model(op_type, {"x": x})
    (ort,) = run_reference(model, {"x": x})
    (got,) = run_onnx2jax(model, {"x": x})
    wide = x.astype(np.float64)
    if op_type == "Gelu":
        exact = 0.5 * wide * (1 + erf(wide / np.sqrt(2)))
    elif op_type == "FastGelu":
        exact = 0.5 * wide * (1 + np.tanh(np.sqrt(2 / np.pi) * (wide + 0.044715 * wide**3)))
    else:
        exact = wide / (1 + np.exp(-1.702 * wide))
    assert got.dtype == np.float16
    assert np.abs(got - exact).sum() <= np.abs(ort - exact).sum()
    np.testing.assert_allclose(got.astype(np.float32), ort.astype(np.float32), rtol=4e-3, atol=2e-3)


def _f16(*shape):
    return RNG.normal(size=shape).astype(np.float16)


@pytest.mark.parametrize(
    "op_type", ["Attention", "SkipLayerNormalization", "EmbedLayerNormalization"]
)
def test_float16_transformer_ops_round_once_like_onnxruntime(op_type):
    # onnxruntime runs these fp16 nodes in float32 and rounds the result once; so does
    # onnx2jax, which lands on the same fp16 values but for the odd last-bit tie.
    if op_type == "Attention":
        feeds = {
            "x": _f16(2, 16, 32),
            "w": _f16(32, 96) * np.float16(0.2),
            "b": _f16(96),
            "mask": np.array([16, 9], np.int32),
        }
        attrs, outputs = {"num_heads": 2}, ("y",)
    elif op_type == "SkipLayerNormalization":
        feeds = {
            "x": _f16(2, 16, 32),
            "skip": _f16(2, 16, 32),
            "gamma": _f16(32),
            "beta": _f16(32),
            "bias": _f16(32),
        }
        attrs, outputs = {"epsilon": 1e-5}, ("y", "mean", "inv_std", "sum")
    else:
        feeds = {
            "ids": RNG.integers(0, 50, (2, 16)).astype(np.int32),
            "seg": RNG.integers(0, 2, (2, 16)).astype(np.int32),
            "word": _f16(50, 32),
            "pos": _f16(16, 32),
            "segemb": _f16(2, 32),
            "gamma": _f16(32),
            "beta": _f16(32),
        }
        attrs, outputs = {"epsilon": 1e-5}, ("y", "mask_index")
    model = _ms_model(op_type, feeds, outputs, **attrs)
    want = run_reference(model, feeds)
    got = run_onnx2jax(model, feeds)
    for ours, theirs in zip(got, want, strict=True):
        assert ours.dtype == theirs.dtype
        if ours.dtype == np.float16:
            assert np.mean(ours != theirs) <= 0.005
        # Float32 statistics (mean, inv_std) differ in summation order only.
        np.testing.assert_allclose(
            ours.astype(np.float32), theirs.astype(np.float32), rtol=1e-3, atol=1e-3
        )
