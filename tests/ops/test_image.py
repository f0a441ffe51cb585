"""Image ops (Resize, Upsample, GridSample, AffineGrid, RoiAlign, NonMaxSuppression,
ImageDecoder): the corners the ONNX node suite leaves out, compared with the ONNX reference
evaluator or onnxruntime, plus gradients, x64 off and the eager fallback."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import onnx2jax
from tests.helpers import (
    assert_matches_reference,
    f32,
    feeds_of,
    run_onnx2jax,
    run_reference,
    single_node_model,
)

RNG = np.random.default_rng(0)


def model_with_constants(op_type, inputs, constants=(), opset=19, **attrs):
    """A one-node model whose inputs named in ``constants`` are initializers."""
    initializers = {k: v for k, v in inputs.items() if k in constants and v is not None}
    return single_node_model(op_type, inputs, opset=opset, initializers=initializers, **attrs)


def check(
    op_type, inputs, constants=(), opset=19, engine="reference", rtol=1e-5, atol=1e-5, **attrs
):
    model = model_with_constants(op_type, inputs, constants, opset, **attrs)
    return assert_matches_reference(
        model, feeds_of(model, inputs), engine=engine, rtol=rtol, atol=atol
    )


# ------------------------------------------------------------------------------- Resize

IMAGE = f32(2, 3, 5, 7)
RESIZE_CASES = [
    ("nearest_up_half_pixel", {"scales": [1, 1, 2.0, 3.0]}, {"mode": "nearest"}),
    (
        "nearest_down_floor",
        {"scales": [1, 1, 0.6, 0.45]},
        {"mode": "nearest", "nearest_mode": "floor"},
    ),
    (
        "nearest_ceil_align",
        {"sizes": [2, 3, 9, 4]},
        {
            "mode": "nearest",
            "nearest_mode": "ceil",
            "coordinate_transformation_mode": "align_corners",
        },
    ),
    (
        "nearest_prefer_ceil_asym",
        {"sizes": [2, 3, 8, 11]},
        {
            "mode": "nearest",
            "nearest_mode": "round_prefer_ceil",
            "coordinate_transformation_mode": "asymmetric",
        },
    ),
    ("linear_up_half_pixel", {"scales": [1, 1, 1.7, 2.3]}, {"mode": "linear"}),
    (
        "linear_down_pytorch",
        {"sizes": [2, 3, 1, 3]},
        {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
    ),
    (
        "linear_symmetric",
        {"scales": [1, 1, 0.7, 1.3]},
        {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"},
    ),
    ("linear_antialias_down", {"scales": [1, 1, 0.4, 0.3]}, {"mode": "linear", "antialias": 1}),
    ("cubic_up", {"scales": [1, 1, 2.0, 1.5]}, {"mode": "cubic"}),
    (
        "cubic_exclude_outside",
        {"sizes": [2, 3, 3, 12]},
        {"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5},
    ),
    ("cubic_antialias_down", {"sizes": [2, 3, 2, 3]}, {"mode": "cubic", "antialias": 1}),
    (
        "cubic_align_corners_resizes_batch",
        {"scales": [1.5, 1, 1.2, 0.8]},
        {"mode": "cubic", "coordinate_transformation_mode": "align_corners"},
    ),
    (
        "axes_negative",
        {"scales": [0.5, 2.0]},
        {"mode": "linear", "axes": [-1, -2], "engine": "onnxruntime"},
    ),
    (
        "not_larger",
        {"sizes": [7, 7]},
        {"mode": "linear", "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"},
    ),
    (
        "not_smaller",
        {"sizes": [7, 7]},
        {"mode": "nearest", "axes": [2, 3], "keep_aspect_ratio_policy": "not_smaller"},
    ),
    (
        "crop_and_resize",
        {"sizes": [2, 3, 4, 6], "roi": [0, 0, 0.2, -0.1, 1, 1, 0.9, 1.3]},
        {
            "mode": "linear",
            "coordinate_transformation_mode": "tf_crop_and_resize",
            "extrapolation_value": 7.0,
        },
    ),
    (
        "crop_and_resize_nearest_axes",
        {"sizes": [3, 6], "roi": [0.2, -0.1, 0.9, 1.3]},
        {"mode": "nearest", "axes": [2, 3], "coordinate_transformation_mode": "tf_crop_and_resize"},
    ),
]


@pytest.mark.parametrize("name,extra,attrs", RESIZE_CASES, ids=[c[0] for c in RESIZE_CASES])
def test_resize_matches_reference(name, extra, attrs):
    inputs = {"x": IMAGE, "roi": None, "scales": None, "sizes": None}
    for key, value in extra.items():
        inputs[key] = np.asarray(value, np.int64 if key == "sizes" else np.float32)
    attrs = dict(attrs)
    engine = attrs.pop("engine", "reference")
    check("Resize", inputs, constants=("roi", "scales", "sizes"), engine=engine, **attrs)


def test_resize_uint8_cubic_rounds_and_saturates():
    x = RNG.integers(0, 256, size=(1, 1, 4, 5), dtype=np.uint8)
    inputs = {"x": x, "roi": None, "scales": np.array([1, 1, 1.5, 1.7], np.float32)}
    check("Resize", inputs, constants=("scales",), mode="cubic")


def test_resize_int_nearest_and_opset11_empty_scales():
    x = np.arange(12, dtype=np.int32).reshape(1, 1, 3, 4)
    inputs = {
        "x": x,
        "roi": np.zeros(0, np.float32),
        "scales": np.zeros(0, np.float32),
        "sizes": np.array([1, 1, 5, 2], np.int64),
    }
    check("Resize", inputs, constants=("roi", "scales", "sizes"), opset=11, engine="onnxruntime")


def test_resize_tf_half_pixel_for_nn_opset11():
    inputs = {
        "x": IMAGE,
        "roi": np.zeros(0, np.float32),
        "scales": np.array([1, 1, 1.6, 0.6], np.float32),
    }
    check(
        "Resize",
        inputs,
        constants=("roi", "scales"),
        opset=11,
        engine="onnxruntime",
        coordinate_transformation_mode="tf_half_pixel_for_nn",
    )


def test_resize_v10_downsample_nearest_rounds_up_like_onnxruntime():
    x = np.arange(20, dtype=np.float32).reshape(1, 1, 4, 5)
    inputs = {"x": x, "scales": np.array([1, 1, 0.6, 0.6], np.float32)}
    check("Resize", inputs, constants=("scales",), opset=10, engine="onnxruntime")
    check("Resize", inputs, constants=("scales",), opset=10, engine="onnxruntime", mode="linear")


def test_upsample_versions():
    x = f32(1, 2, 3, 4)
    check(
        "Upsample",
        {"x": x},
        opset=7,
        engine="onnxruntime",
        scales=[1.0, 1.0, 2.0, 1.5],
        mode="linear",
    )
    check(
        "Upsample",
        {"x": x, "scales": np.array([1, 1, 3, 2], np.float32)},
        ("scales",),
        opset=9,
        engine="onnxruntime",
    )
    model = single_node_model(
        "Upsample", {"x": x}, opset=1, height_scale=2.0, width_scale=3.0, mode="nearest"
    )
    (y,) = run_onnx2jax(model, {"x": x})
    np.testing.assert_array_equal(y, np.repeat(np.repeat(x, 2, axis=2), 3, axis=3))


def test_resize_large_axis_uses_taps_and_matches():
    x = f32(1, 2100)
    inputs = {"x": x, "roi": None, "scales": np.array([1, 2.5], np.float32)}
    check("Resize", inputs, constants=("scales",), mode="cubic")


def test_resize_x64_off_and_gradient():
    x = f32(1, 2, 4, 4)
    inputs = {"x": x, "roi": None, "scales": np.array([1, 1, 2, 2], np.float32)}
    model = model_with_constants("Resize", inputs, ("scales",), mode="linear")
    (want,) = run_reference(model, {"x": x}, engine="reference")
    (got,) = run_onnx2jax(model, {"x": x}, x64=False)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    compiled = onnx2jax.load(model)
    grad = jax.jit(jax.grad(lambda v: compiled.apply(compiled.params, v)["y"].sum()))(
        jnp.asarray(x)
    )
    # Bilinear weights sum to one per output, so each input pixel gets 4 outputs' worth.
    np.testing.assert_allclose(np.asarray(grad).sum(), 4 * 4 * 4 * 2, rtol=1e-5)


def test_resize_rejects_bad_modes():
    inputs = {"x": IMAGE, "roi": None, "scales": np.array([1, 1, 2, 2], np.float32)}
    for attrs in (
        {"mode": "area"},
        {"coordinate_transformation_mode": "tf_half_pixel_for_nn"},
        {"nearest_mode": "round"},
        {"mode": "nearest", "antialias": 1},
    ):
        model = model_with_constants("Resize", inputs, ("scales",), **attrs)
        with pytest.raises(onnx2jax.core.errors.OpError):
            run_onnx2jax(model, {"x": IMAGE})


# --------------------------------------------------------------------------- GridSample

GRID_CASES = [
    (mode, padding, (i + j) % 2)
    for i, mode in enumerate(["linear", "nearest", "cubic"])
    for j, padding in enumerate(["zeros", "border", "reflection"])
]


@pytest.mark.parametrize("mode,padding,align", GRID_CASES)
def test_grid_sample_2d(mode, padding, align):
    x = f32(2, 3, 4, 5)
    grid = RNG.uniform(-1.6, 1.6, size=(2, 3, 4, 2)).astype(np.float32)
    check(
        "GridSample",
        {"x": x, "grid": grid},
        opset=20,
        mode=mode,
        padding_mode=padding,
        align_corners=align,
        atol=1e-5,
    )


@pytest.mark.parametrize("mode,padding", [("linear", "reflection"), ("nearest", "zeros")])
def test_grid_sample_3d(mode, padding):
    x = f32(1, 2, 3, 4, 5)
    grid = RNG.uniform(-1.3, 1.3, size=(1, 2, 3, 2, 3)).astype(np.float32)
    check("GridSample", {"x": x, "grid": grid}, opset=22, mode=mode, padding_mode=padding)


def test_grid_sample_opset16_names_and_float64():
    x = RNG.normal(size=(1, 2, 3, 3))
    grid = RNG.uniform(-1, 1, size=(1, 2, 2, 2))
    inputs = {"x": x, "grid": grid}
    (want,) = run_reference(
        single_node_model("GridSample", inputs, opset=20, mode="cubic"), inputs, engine="reference"
    )
    (got,) = run_onnx2jax(single_node_model("GridSample", inputs, opset=16, mode="bicubic"), inputs)
    assert got.dtype == np.float64
    # The reference rounds the sampling positions to float32.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    model = single_node_model("GridSample", {"x": x, "grid": grid}, opset=16, mode="linear")
    with pytest.raises(onnx2jax.core.errors.OpError, match="mode"):
        run_onnx2jax(model, {"x": x, "grid": grid})


def test_grid_sample_gradients_reach_image_and_grid():
    x = f32(1, 2, 4, 4)
    grid = RNG.uniform(-0.6, 0.6, size=(1, 3, 3, 2)).astype(np.float32)
    model = single_node_model("GridSample", {"x": x, "grid": grid}, opset=20)
    compiled = onnx2jax.load(model)

    def loss(v, g):
        return compiled.apply(compiled.params, v, g)["y"].sum()

    gx, gg = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(grid))
    # Bilinear weights of an interior sample sum to one, per channel.
    np.testing.assert_allclose(np.asarray(gx).sum(), 2 * 9, rtol=1e-5)
    eps = 1e-3
    bumped = grid.copy()
    bumped[0, 1, 1, 0] += eps
    numeric = (jax.jit(loss)(x, bumped) - jax.jit(loss)(x, grid)) / eps
    np.testing.assert_allclose(np.asarray(gg)[0, 1, 1, 0], numeric, rtol=2e-2, atol=2e-3)


# --------------------------------------------------------------------------- AffineGrid


@pytest.mark.parametrize("align", [0, 1])
@pytest.mark.parametrize("size", [[2, 1, 3, 4], [2, 1, 2, 3, 1]])
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the reference, on size 1
def test_affine_grid(align, size):
    k = len(size) - 2
    theta = f32(2, k, k + 1)
    check(
        "AffineGrid",
        {"theta": theta, "size": np.array(size, np.int64)},
        ("size",),
        opset=20,
        align_corners=align,
    )


def test_affine_grid_gradient_and_x64_off():
    theta = f32(1, 2, 3)
    inputs = {"theta": theta, "size": np.array([1, 1, 3, 3], np.int64)}
    model = model_with_constants("AffineGrid", inputs, ("size",), opset=20)
    (got,) = run_onnx2jax(model, {"theta": theta}, x64=False)
    (want,) = run_reference(model, {"theta": theta}, engine="reference")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    compiled = onnx2jax.load(model)
    grad = jax.jit(jax.grad(lambda t: compiled.apply(compiled.params, t)["y"].sum()))(
        jnp.asarray(theta)
    )
    # d(sum)/d(bias) is the number of grid points; the base grid is centered, so 0 elsewhere.
    np.testing.assert_allclose(np.asarray(grad)[0], [[0, 0, 9], [0, 0, 9]], atol=1e-5)


# ----------------------------------------------------------------------------- RoiAlign

FEATURES = f32(2, 3, 6, 7)
ROIS = np.array(
    [
        [0.5, 1.0, 4.0, 5.2],
        [1.2, 0.1, 6.9, 3.3],
        [-2.0, -1.0, 9.0, 8.0],
        [3.0, 3.0, 3.2, 3.1],
        [5.0, 4.0, 2.0, 1.5],
    ],
    np.float32,
)
BATCH = np.array([0, 1, 1, 0, 1], np.int64)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("ctm", ["half_pixel", "output_half_pixel"])
def test_roi_align(mode, ctm):
    inputs = {"x": FEATURES, "rois": ROIS, "batch_indices": BATCH}
    check(
        "RoiAlign",
        inputs,
        opset=16,
        engine="onnxruntime",
        mode=mode,
        coordinate_transformation_mode=ctm,
        sampling_ratio=2,
        output_height=3,
        output_width=2,
        spatial_scale=0.9,
    )


def test_roi_align_v10_and_gradient():
    inputs = {"x": FEATURES, "rois": ROIS, "batch_indices": BATCH}
    check(
        "RoiAlign",
        inputs,
        opset=10,
        engine="onnxruntime",
        sampling_ratio=2,
        output_height=2,
        output_width=2,
    )
    model = single_node_model("RoiAlign", inputs, opset=16, sampling_ratio=2)
    compiled = onnx2jax.load(model)
    grad = jax.jit(jax.grad(lambda v: compiled.apply(compiled.params, v, ROIS, BATCH)["y"].sum()))(
        jnp.asarray(FEATURES)
    )
    assert np.asarray(grad).shape == FEATURES.shape and np.abs(np.asarray(grad)).sum() > 0


def test_roi_align_adaptive_sampling_needs_concrete_rois():
    inputs = {"x": FEATURES, "rois": ROIS, "batch_indices": BATCH}
    model = single_node_model(
        "RoiAlign", inputs, opset=16, mode="max", output_height=3, output_width=2, spatial_scale=0.9
    )
    compiled = onnx2jax.load(model)
    with pytest.raises(onnx2jax.core.errors.DataDependentShapeError):
        jax.jit(compiled.apply)(compiled.params, FEATURES, ROIS, BATCH)
    # model(...) falls back to running eagerly, where the rois are known.
    (want,) = run_reference(model, inputs)
    np.testing.assert_allclose(
        np.asarray(compiled(FEATURES, ROIS, BATCH)["y"]), want, rtol=1e-5, atol=1e-5
    )


# -------------------------------------------------------------------- NonMaxSuppression


def random_boxes(batches, count):
    corners = RNG.uniform(0, 10, size=(batches, count, 2)).astype(np.float32)
    sizes = RNG.uniform(0.5, 4, size=(batches, count, 2)).astype(np.float32)
    boxes = np.concatenate([corners, corners + sizes], axis=-1)
    # Some boxes list their corners the other way round.
    boxes[:, ::3] = boxes[:, ::3][..., [2, 3, 0, 1]]
    return boxes


@pytest.mark.parametrize("center", [0, 1])
def test_non_max_suppression(center):
    boxes = random_boxes(2, 30)
    scores = RNG.uniform(size=(2, 3, 30)).astype(np.float32)
    scores[0, 0, 5] = scores[0, 0, 6]
    inputs = {
        "boxes": boxes,
        "scores": scores,
        "max": np.array([7], np.int64),
        "iou": np.array([0.3], np.float32),
        "score": np.array([0.2], np.float32),
    }
    check(
        "NonMaxSuppression",
        inputs,
        ("max", "iou", "score"),
        opset=11,
        engine="onnxruntime",
        center_point_box=center,
    )


def test_non_max_suppression_defaults_select_nothing_and_traced_boxes_run_eagerly():
    boxes = random_boxes(1, 5)
    scores = RNG.uniform(size=(1, 1, 5)).astype(np.float32)
    (got,) = run_onnx2jax(
        single_node_model("NonMaxSuppression", {"boxes": boxes, "scores": scores}, opset=11),
        {"boxes": boxes, "scores": scores},
    )
    assert got.shape == (0, 3) and got.dtype == np.int64
    inputs = {"boxes": boxes, "scores": scores, "max": np.array([3], np.int64)}
    check("NonMaxSuppression", inputs, opset=10, engine="onnxruntime")


# ------------------------------------------------------------------------- ImageDecoder


@pytest.mark.parametrize("fmt", ["PNG", "BMP"])
@pytest.mark.parametrize("pixel_format", ["RGB", "BGR", "Grayscale"])
def test_image_decoder(fmt, pixel_format):
    pil = pytest.importorskip("PIL.Image")
    pixels = RNG.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    pil.fromarray(pixels).save(buffer, format=fmt)
    encoded = np.frombuffer(buffer.getvalue(), np.uint8).copy()
    (got,) = check(
        "ImageDecoder", {"data": encoded}, ("data",), opset=20, pixel_format=pixel_format
    )
    if pixel_format == "RGB":
        np.testing.assert_array_equal(got, pixels)
