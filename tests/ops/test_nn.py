"""nn, normalization and attention ops: the corners the ONNX node suite leaves out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from onnx import TensorProto

import onnx2jax
from tests.helpers import (
    assert_matches_reference,
    run_onnx2jax,
    run_reference,
    single_node_model,
)

RNG = np.random.default_rng(0)


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def _grad_is_finite(model, feeds, wrt):
    compiled = onnx2jax.load(model)

    def loss(value):
        out = compiled.apply(compiled.params, **{**feeds, wrt: value})
        return sum(
            jnp.sum(v.astype(jnp.float32))
            for v in out.values()
            if jnp.issubdtype(v.dtype, jnp.floating)
        )

    grad = jax.jit(jax.grad(loss))(jnp.asarray(feeds[wrt]))
    assert grad.shape == feeds[wrt].shape
    assert np.all(np.isfinite(np.asarray(grad)))


# ---------------------------------------------------------------- convolutions


@pytest.mark.parametrize(
    "engine, attrs",
    [
        ("onnxruntime", dict(group=4, strides=[2, 1], dilations=[1, 2], pads=[1, 0, 2, 1])),
        ("onnxruntime", dict(group=8, auto_pad="SAME_LOWER", strides=[2, 2])),
        # onnxruntime rejects dilations with SAME padding.
        ("reference", dict(auto_pad="SAME_UPPER", dilations=[2, 2])),
        ("onnxruntime", dict(auto_pad="VALID", strides=[3, 2])),
    ],
)
def test_conv_2d(engine, attrs):
    group = attrs.get("group", 1)
    feeds = {"x": rand(2, 8, 9, 7), "w": rand(8, 8 // group, 3, 2), "b": rand(8)}
    model = single_node_model("Conv", feeds, **attrs)
    assert_matches_reference(model, feeds, engine=engine, rtol=1e-4, atol=1e-5)


def test_conv_1d_and_3d_without_bias():
    for x, w in [(rand(1, 3, 11), rand(5, 3, 4)), (rand(1, 2, 5, 6, 4), rand(3, 2, 2, 3, 2))]:
        feeds = {"x": x, "w": w}
        assert_matches_reference(
            single_node_model("Conv", feeds, strides=[2] * (x.ndim - 2)),
            feeds,
            rtol=1e-4,
            atol=1e-5,
        )


def test_conv_x64_off_and_gradient():
    feeds = {"x": rand(1, 2, 6, 6), "w": rand(3, 2, 3, 3)}
    model = single_node_model("Conv", feeds, pads=[1, 1, 1, 1])
    (got,) = run_onnx2jax(model, feeds, x64=False)
    (want,) = run_reference(model, feeds)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    _grad_is_finite(model, feeds, "x")


@pytest.mark.parametrize(
    "attrs",
    [
        dict(group=2, strides=[2, 3], dilations=[2, 1], pads=[1, 0, 0, 2], output_padding=[1, 0]),
        dict(strides=[2, 2], output_shape=[8, 6]),
        dict(strides=[2, 2], auto_pad="SAME_UPPER"),
        dict(strides=[2, 2], auto_pad="SAME_LOWER"),
    ],
)
def test_conv_transpose(attrs):
    group = attrs.get("group", 1)
    feeds = {"x": rand(2, 4, 4, 3), "w": rand(4, 6 // group, 3, 3), "b": rand(6)}
    model = single_node_model("ConvTranspose", feeds, **attrs)
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)


def test_conv_transpose_1d_against_onnxruntime():
    feeds = {"x": rand(1, 3, 5), "w": rand(3, 2, 4)}
    model = single_node_model("ConvTranspose", feeds, strides=[3], pads=[1, 2])
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- pooling


@pytest.mark.parametrize(
    "attrs",
    [
        dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        dict(kernel_shape=[2, 3], pads=[1, 1, 0, 1], count_include_pad=1),
        dict(kernel_shape=[2, 2], dilations=[2, 1], strides=[1, 2], ceil_mode=1, pads=[1, 0, 1, 0]),
        dict(kernel_shape=[3, 2], auto_pad="SAME_LOWER", strides=[2, 2]),
    ],
)
def test_average_pool(attrs):
    feeds = {"x": rand(2, 3, 7, 8)}
    assert_matches_reference(
        single_node_model("AveragePool", feeds, **attrs), feeds, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("storage_order", [0, 1])
def test_max_pool_indices(storage_order):
    feeds = {"x": rand(2, 3, 6, 7)}
    model = single_node_model(
        "MaxPool",
        feeds,
        outputs=("y", "i"),
        kernel_shape=[3, 2],
        strides=[2, 2],
        pads=[1, 0, 1, 1],
        ceil_mode=1,
        storage_order=storage_order,
    )
    assert_matches_reference(model, feeds)


def test_max_pool_int8_3d_and_gradient():
    x = RNG.integers(-128, 127, (1, 2, 5, 4, 6)).astype(np.int8)
    feeds = {"x": x}
    assert_matches_reference(
        single_node_model("MaxPool", feeds, kernel_shape=[2, 2, 3], pads=[1, 1, 1, 0, 0, 1]), feeds
    )
    feeds = {"x": rand(1, 2, 5, 5)}
    _grad_is_finite(single_node_model("MaxPool", feeds, kernel_shape=[2, 2]), feeds, "x")


@pytest.mark.parametrize("op_type", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize(
    "attrs",
    [
        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),  # ResNet's stem
        dict(kernel_shape=[2, 3], strides=[1, 2], dilations=[2, 1], ceil_mode=1),
        dict(kernel_shape=[6, 5]),  # 30 positions: XLA's reduce-window
        # One row: the first and last rows of every window lie in the padding.
        dict(kernel_shape=[3, 3], pads=[1, 2, 1, 2], count_include_pad=1, size=(1, 2)),
    ],
)
def test_pooling_by_slices_matches_reduce_window(op_type, attrs, monkeypatch):
    from onnx2jax.ops import nn

    attrs = dict(attrs)
    if op_type == "MaxPool":
        attrs.pop("count_include_pad", None)
    feeds = {"x": rand(2, 3, *attrs.pop("size", (11, 10)))}
    model = single_node_model(op_type, feeds, opset=19, **attrs)
    sliced = run_onnx2jax(model, feeds)[0]
    monkeypatch.setattr(nn, "SLICED_WINDOW", 0)
    np.testing.assert_allclose(sliced, run_onnx2jax(model, feeds)[0], rtol=1e-6, atol=1e-6)
    assert_matches_reference(model, feeds, rtol=1e-5, atol=1e-6)


def test_lp_pools():
    feeds = {"x": rand(1, 2, 6, 5)}
    assert_matches_reference(
        single_node_model(
            "LpPool", feeds, kernel_shape=[2, 3], p=3, strides=[2, 1], pads=[1, 0, 0, 1]
        ),
        feeds,
        rtol=1e-5,
        atol=1e-5,
    )
    assert_matches_reference(single_node_model("GlobalLpPool", feeds, p=1), feeds, rtol=1e-5)
    assert_matches_reference(single_node_model("GlobalAveragePool", feeds), feeds)
    assert_matches_reference(single_node_model("GlobalMaxPool", feeds), feeds)


def test_max_unpool_roundtrip():
    x = rand(1, 2, 4, 6)
    pool = single_node_model(
        "MaxPool", {"x": x}, outputs=("y", "i"), kernel_shape=[2, 2], strides=[2, 2]
    )
    y, i = run_reference(pool, {"x": x})
    shape = np.array([1, 2, 5, 7], dtype=np.int64)
    model = single_node_model(
        "MaxUnpool",
        {"x": y, "i": i, "shape": shape},
        outputs=("out",),
        kernel_shape=[2, 2],
        strides=[2, 2],
        initializers={"shape": shape},
    )
    # The indices address the unpadded (4, 6) result, placed at the top left of the output
    # (the node suite's semantics; onnxruntime instead indexes into output_shape directly).
    (got,) = run_onnx2jax(model, {"x": y, "i": i})
    want = np.zeros((1, 2, 5, 7), np.float32)
    want[:, :, :4, :6] = np.where(x == np.repeat(np.repeat(y, 2, 2), 2, 3), x, 0)
    np.testing.assert_array_equal(got, want)


def test_max_roi_pool():
    feeds = {
        "x": rand(2, 3, 8, 9),
        "rois": np.array(
            [[0, 1, 1, 6, 5], [1, 0, 2, 8, 7], [1, 3.4, 3.6, 3.5, 3.5]], dtype=np.float32
        ),
    }
    model = single_node_model("MaxRoiPool", feeds, pooled_shape=[3, 2], spatial_scale=0.9)
    assert_matches_reference(model, feeds)


def test_lrn():
    feeds = {"x": rand(2, 6, 3, 4)}
    model = single_node_model("LRN", feeds, size=3, alpha=0.01, beta=0.6, bias=1.5)
    assert_matches_reference(model, feeds, rtol=1e-5, atol=1e-6)


def test_lrn_even_size_follows_the_spec():
    # onnxruntime takes odd sizes only and the reference loops over the wrong axis.
    x = rand(2, 6, 3)
    model = single_node_model("LRN", {"x": x}, size=4, alpha=0.01, beta=0.6, bias=1.5)
    (got,) = run_onnx2jax(model, {"x": x})
    square_sum = np.stack([(x[:, max(0, c - 1) : c + 3] ** 2).sum(1) for c in range(6)], 1)
    np.testing.assert_allclose(got, x / (1.5 + 0.01 / 4 * square_sum) ** 0.6, rtol=1e-5)


def test_col2im_3d_blocks_with_pads():
    image, block = np.array([5, 4, 6]), np.array([2, 2, 3])
    blocks = [(5 + 1 - 2) // 1 + 1, (4 + 0 - 2 * 1 - 1) // 2 + 1, (6 + 2 - 3) // 2 + 1]
    x = rand(2, 2 * 12, int(np.prod(blocks)))
    model = single_node_model(
        "Col2Im",
        {"x": x, "image": image, "block": block},
        strides=[1, 2, 2],
        dilations=[1, 2, 1],
        pads=[1, 0, 1, 0, 0, 1],
        initializers={"image": image, "block": block},
    )
    assert_matches_reference(model, {"x": x}, engine="reference", rtol=1e-5, atol=1e-6)


def test_dropout_inference_and_seeded_training():
    x = rand(3, 4)
    feeds = {"x": x}
    y, mask = run_onnx2jax(single_node_model("Dropout", feeds, outputs=("y", "m")), feeds)
    np.testing.assert_array_equal(y, x)
    assert mask.dtype == np.bool_ and mask.all()
    ratio, training = np.array(0.25, np.float32), np.array(True)
    feeds = {"x": rand(40, 50)}
    model = single_node_model(
        "Dropout",
        {**feeds, "r": ratio, "t": training},
        outputs=("y", "m"),
        seed=3,
        initializers={"r": ratio, "t": training},
    )
    y, mask = run_onnx2jax(model, feeds)
    y2, _ = run_onnx2jax(model, feeds, x64=False)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_allclose(y, np.where(mask, feeds["x"] / 0.75, 0), rtol=1e-6)
    assert 0.15 < 1 - mask.mean() < 0.35


# ---------------------------------------------------------------- normalization


def test_batch_normalization_training_mode():
    feeds = {
        "x": rand(4, 3, 2, 5),
        "s": rand(3),
        "b": rand(3),
        "m": rand(3),
        "v": np.abs(rand(3)) + 0.5,
    }
    model = single_node_model(
        "BatchNormalization",
        feeds,
        outputs=("y", "rm", "rv"),
        training_mode=1,
        momentum=0.8,
        opset=15,
    )
    assert_matches_reference(model, feeds, engine="reference", rtol=1e-5, atol=1e-5)


def test_batch_normalization_inference_legacy_and_x64_off():
    feeds = {
        "x": rand(2, 3, 4),
        "s": rand(3),
        "b": rand(3),
        "m": rand(3),
        "v": np.abs(rand(3)) + 0.5,
    }
    for opset in (7, 9, 15):
        model = single_node_model("BatchNormalization", feeds, epsilon=1e-3, opset=opset)
        assert_matches_reference(model, feeds, rtol=1e-5, atol=1e-5)
    (got,) = run_onnx2jax(model, feeds, x64=False)
    np.testing.assert_allclose(got, run_reference(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_instance_normalization_gradient():
    feeds = {"x": rand(2, 3, 4, 5), "s": rand(3), "b": rand(3)}
    model = single_node_model("InstanceNormalization", feeds, epsilon=1e-3)
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)
    _grad_is_finite(model, feeds, "x")


@pytest.mark.parametrize("axis", [1, -2])
def test_layer_normalization_outputs_and_broadcast_scale(axis):
    x = rand(2, 3, 4, 5)
    feeds = {"x": x, "s": rand(*x.shape[axis:]), "b": rand(x.shape[-1])}
    model = single_node_model(
        "LayerNormalization", feeds, outputs=("y", "mean", "inv"), axis=axis, epsilon=1e-3, opset=17
    )
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)


def test_layer_normalization_float16_stashes_float32():
    feeds = {"x": (rand(3, 8) * 50).astype(np.float16), "s": rand(8).astype(np.float16)}
    model = single_node_model("LayerNormalization", feeds, outputs=("y", "mean", "inv"), opset=17)
    y, mean, inv = run_onnx2jax(model, feeds, x64=False)
    assert y.dtype == np.float16 and mean.dtype == np.float32 and inv.dtype == np.float32
    want = run_reference(model, feeds)
    np.testing.assert_allclose(y.astype(np.float32), want[0].astype(np.float32), atol=2e-2)


@pytest.mark.parametrize("opset", [18, 21])
def test_group_normalization(opset):
    groups = 2
    params = 2 if opset == 18 else 4
    feeds = {"x": rand(2, 4, 3, 3), "s": rand(params), "b": rand(params)}
    model = single_node_model("GroupNormalization", feeds, num_groups=groups, opset=opset)
    x = feeds["x"].reshape(2, groups, -1)
    normalized = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    normalized = normalized.reshape(2, 4, 3, 3)
    scale = np.repeat(feeds["s"], 4 // params)[None, :, None, None]
    bias = np.repeat(feeds["b"], 4 // params)[None, :, None, None]
    (got,) = run_onnx2jax(model, feeds)
    np.testing.assert_allclose(got, normalized * scale + bias, rtol=1e-4, atol=1e-5)


def test_rms_normalization_x64_off():
    feeds = {"x": rand(2, 3, 6), "s": rand(6)}
    model = single_node_model("RMSNormalization", feeds, epsilon=1e-4, opset=23)
    (got,) = run_onnx2jax(model, feeds, x64=False)
    np.testing.assert_allclose(
        got, run_reference(model, feeds, "reference")[0], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("p", [1, 2])
def test_lp_normalization_zero_vector(p):
    x = rand(3, 4)
    x[1] = 0
    feeds = {"x": x}
    model = single_node_model("LpNormalization", feeds, axis=-1, p=p)
    assert_matches_reference(model, feeds)
    _grad_is_finite(model, feeds, "x")


def test_mean_variance_normalization_axes():
    feeds = {"x": rand(2, 3, 4, 5)}
    model = single_node_model("MeanVarianceNormalization", feeds, axes=[1, -1])
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- attention


def _attention_model(feeds, outputs=("y",), opset=23, **attrs):
    return single_node_model("Attention", feeds, outputs=outputs, opset=opset, **attrs)


# The reference softcaps mode 0's output too, and onnxruntime writes the float minimum
# instead of -inf into mode 2's output; each mode is compared with the one that follows the spec.
@pytest.mark.parametrize(
    "mode, engine", [(0, "onnxruntime"), (1, "onnxruntime"), (2, "reference"), (3, "reference")]
)
def test_attention_gqa_3d_with_cache_mask_and_softcap(mode, engine):
    batch, q_len, past, heads, kv_heads, size = 2, 3, 4, 4, 2, 8
    mask = RNG.random((heads, q_len, past + q_len)) > 0.3
    feeds = {
        "q": rand(batch, q_len, heads * size),
        "k": rand(batch, q_len, kv_heads * size),
        "v": rand(batch, q_len, kv_heads * 6),
        "mask": mask,
        "pk": rand(batch, kv_heads, past, size),
        "pv": rand(batch, kv_heads, past, 6),
    }
    model = _attention_model(
        feeds,
        outputs=("y", "pk_out", "pv_out", "qk"),
        q_num_heads=heads,
        kv_num_heads=kv_heads,
        is_causal=1,
        softcap=2.0,
        scale=0.3,
        qk_matmul_output_mode=mode,
    )
    assert_matches_reference(model, feeds, engine=engine, rtol=1e-5, atol=1e-5)


def test_attention_fully_masked_rows_and_gradient():
    feeds = {
        "q": rand(1, 2, 3, 4),
        "k": rand(1, 2, 5, 4),
        "v": rand(1, 2, 5, 4),
        "mask": np.zeros((3, 5), dtype=np.float32),
    }
    feeds["mask"][1] = -np.inf
    model = _attention_model(feeds)
    (got,) = assert_matches_reference(model, feeds, engine="reference", rtol=1e-5, atol=1e-6)
    assert np.all(got[:, :, 1] == 0)
    _grad_is_finite(model, feeds, "q")


def test_attention_nonpad_kv_seqlen_and_softmax_precision():
    feeds = {
        "q": rand(2, 2, 1, 4).astype(np.float16),
        "k": rand(2, 2, 6, 4).astype(np.float16),
        "v": rand(2, 2, 6, 4).astype(np.float16),
        "lens": np.array([3, 6], dtype=np.int64),
    }
    model = single_node_model(
        "Attention",
        {
            "q": feeds["q"],
            "k": feeds["k"],
            "v": feeds["v"],
            "mask": None,
            "pk": None,
            "pv": None,
            "lens": feeds["lens"],
        },
        opset=24,
        is_causal=1,
        softmax_precision=TensorProto.FLOAT,
    )
    (got,) = run_onnx2jax(model, feeds, x64=False)
    (want,) = run_reference(model, feeds, "reference")
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-3)


def test_attention_sliding_window_opset25():
    feeds = {"q": rand(1, 2, 6, 4), "k": rand(1, 2, 6, 4), "v": rand(1, 2, 6, 4)}
    model = _attention_model(feeds, opset=25, left_window_size=2, right_window_size=1)
    assert_matches_reference(model, feeds, engine="reference", rtol=1e-5, atol=1e-6)


def test_attention_rejects_uneven_heads():
    feeds = {"q": rand(1, 3, 2, 4), "k": rand(1, 2, 2, 4), "v": rand(1, 2, 2, 4)}
    with pytest.raises(Exception, match="query heads"):
        run_onnx2jax(_attention_model(feeds), feeds)


@pytest.mark.parametrize("interleaved", [0, 1])
def test_rotary_embedding_3d_partial_with_position_ids(interleaved):
    batch, seq, heads, size, dim = 2, 3, 2, 8, 4
    feeds = {
        "x": rand(batch, seq, heads * size),
        "cos": rand(10, dim // 2),
        "sin": rand(10, dim // 2),
        "pos": RNG.integers(0, 10, (batch, seq)).astype(np.int64),
    }
    model = single_node_model(
        "RotaryEmbedding",
        feeds,
        opset=23,
        num_heads=heads,
        rotary_embedding_dim=dim,
        interleaved=interleaved,
    )
    assert_matches_reference(model, feeds, engine="reference", rtol=1e-5, atol=1e-6)
    (got,) = run_onnx2jax(model, feeds, x64=False)
    np.testing.assert_allclose(
        got, run_reference(model, feeds, "reference")[0], rtol=1e-5, atol=1e-6
    )


def test_rotary_embedding_4d_without_position_ids():
    feeds = {"x": rand(2, 3, 4, 6), "cos": rand(2, 4, 3), "sin": rand(2, 4, 3)}
    model = single_node_model("RotaryEmbedding", feeds, opset=23)
    assert_matches_reference(model, feeds, engine="reference", rtol=1e-5, atol=1e-6)
    _grad_is_finite(model, feeds, "x")


def test_attention_bool_mask_shorter_than_keys():
    feeds = {
        "q": rand(2, 3, 2, 4),
        "k": rand(2, 3, 5, 4),
        "v": rand(2, 3, 5, 4),
        "mask": RNG.random((2, 1, 2, 3)) > 0.2,
    }
    feeds["mask"][..., 0] = True
    model = _attention_model(feeds, outputs=("y", "pk", "pv", "qk"), qk_matmul_output_mode=2)
    got = run_onnx2jax(model, feeds)
    want = run_reference(model, feeds, "reference")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_dropout_mask_output_opset7_is_float():
    feeds = {"x": rand(2, 3)}
    model = single_node_model("Dropout", feeds, outputs=("y", "m"), opset=7)
    y, mask = run_onnx2jax(model, feeds)
    assert mask.dtype == np.float32 and np.all(mask == 1)
    np.testing.assert_array_equal(y, feeds["x"])


def test_unsupported_attribute_values_raise():
    feeds = {"x": rand(1, 2, 4, 4)}
    with pytest.raises(Exception, match="auto_pad"):
        run_onnx2jax(
            single_node_model("MaxPool", feeds, kernel_shape=[2, 2], auto_pad="BOGUS"), feeds
        )
    with pytest.raises(Exception, match="p=3"):
        run_onnx2jax(single_node_model("LpNormalization", feeds, p=3), feeds)


@pytest.mark.parametrize(
    "op, feeds, attrs",
    [
        (
            "AveragePool",
            {"x": rand(1, 2, 5, 5)},
            dict(kernel_shape=[3, 3], ceil_mode=1, strides=[2, 2]),
        ),
        ("LpPool", {"x": rand(1, 2, 5, 5)}, dict(kernel_shape=[2, 2], p=2)),
        ("LRN", {"x": rand(1, 4, 3, 3)}, dict(size=3)),
        ("ConvTranspose", {"x": rand(1, 2, 3, 3), "w": rand(2, 3, 2, 2)}, dict(strides=[2, 2])),
        (
            "MaxRoiPool",
            {"x": rand(1, 2, 6, 6), "rois": np.array([[0, 0, 0, 4, 3]], np.float32)},
            dict(pooled_shape=[2, 2]),
        ),
        (
            "GroupNormalization",
            {"x": rand(2, 4, 3), "s": rand(4), "b": rand(4)},
            dict(num_groups=2, opset=21),
        ),
        ("LayerNormalization", {"x": rand(2, 5), "s": rand(5)}, dict(opset=17)),
        ("RMSNormalization", {"x": rand(2, 5), "s": rand(5)}, dict(opset=23)),
    ],
)
def test_gradients_under_jit(op, feeds, attrs):
    _grad_is_finite(single_node_model(op, feeds, **attrs), feeds, "x")


def test_deform_conv_groups_offset_groups_mask():
    n, c, h, w, oc, kh, kw = 1, 4, 5, 6, 4, 2, 3
    oh, ow = (h + 1 - 2) // 1 + 1, (w + 2 - 3) // 2 + 1
    feeds = {
        "x": rand(n, c, h, w),
        "w": rand(oc, c // 2, kh, kw),
        "offset": rand(n, 2 * kh * kw * 2, oh, ow),
        "b": rand(oc),
        "mask": RNG.random((n, 2 * kh * kw, oh, ow)).astype(np.float32),
    }
    model = single_node_model(
        "DeformConv", feeds, group=2, offset_group=2, pads=[1, 1, 0, 1], strides=[1, 2], opset=19
    )
    assert_matches_reference(model, feeds, rtol=1e-4, atol=1e-5)
    _grad_is_finite(model, feeds, "offset")


def test_causal_conv_with_state_x64_off():
    feeds = {"x": rand(2, 3, 4), "w": rand(3, 1, 3), "b": rand(3), "state": rand(2, 3, 2)}
    model = single_node_model(
        "CausalConvWithState", feeds, outputs=("y", "state_out"), activation="silu", opset=27
    )
    got = run_onnx2jax(model, feeds, x64=False)
    want = run_reference(model, feeds, "reference")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["linear", "gated_delta"])
def test_linear_attention_gqa(rule):
    b, t, hq, hkv, dk, dv = 2, 3, 4, 2, 3, 2
    feeds = {
        "q": rand(b, t, hq * dk),
        "k": rand(b, t, hkv * dk),
        "v": rand(b, t, hkv * dv),
        "state": rand(b, hkv, dk, dv),
    }
    if rule == "gated_delta":
        feeds["decay"] = -np.abs(rand(b, t, hkv * dk))
        feeds["beta"] = RNG.random((b, t, 1)).astype(np.float32)
    model = single_node_model(
        "LinearAttention",
        feeds,
        outputs=("y", "state_out"),
        q_num_heads=hq,
        kv_num_heads=hkv,
        update_rule=rule,
        opset=27,
    )
    got = run_onnx2jax(model, feeds, x64=False)
    want = run_reference(model, feeds, "reference")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    _grad_is_finite(model, feeds, "k")


def test_dropout_training_mode_as_graph_input():
    feeds = {"x": rand(4, 5), "r": np.array(0.5, np.float32), "t": np.array(False)}
    model = single_node_model("Dropout", feeds, outputs=("y", "m"), seed=1)
    y, mask = run_onnx2jax(model, feeds)
    np.testing.assert_array_equal(y, feeds["x"])
    assert mask.all()
    y, mask = run_onnx2jax(model, {**feeds, "t": np.array(True)})
    np.testing.assert_allclose(y, np.where(mask, feeds["x"] * 2, 0), rtol=1e-6)
    assert not mask.all()
