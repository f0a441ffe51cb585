"""The native convolution kernel of model(...) (onnx2jax/native/, native/kernels/conv2d.cc)
and the explicit native nodes that call it (onnx2jax/ops/native_calls.py)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import onnx2jax
from onnx2jax import native
from onnx2jax.native import calls, layouts
from tests.helpers import f32, single_node_model

needs_kernels = pytest.mark.skipif(
    not native.available(), reason=f"native kernels unavailable: {native.status()}"
)


def conv2d(x, w, b, strides, pads, dilations, residual=None, relu=False):
    """The kernel's Conv of OIHW weights ``w``, laid out as model(...) would lay them out."""
    layout = layouts.conv_layout(np.shape(w), strides, dilations)
    weights = layouts.prepare(jnp.asarray(w), layout)
    return calls.conv2d(
        x, weights, layout, b, strides, pads, dilations, residual=residual, relu=relu
    )


def _compiled_text(model: onnx2jax.Model, feeds: dict) -> str:
    return model.engine.lower(model.bind_inputs((), feeds)).compile().as_text()


def test_status_says_what_is_used():
    state = native.status()
    assert ("lanes" in state) != ("reason" in state)
    if "lanes" in state:
        assert state["lanes"] >= native.MIN_LANES and state["path"].exists()


@needs_kernels
@pytest.mark.parametrize("out_channels", [16, 64, 80, 128])  # HWIO and blocked weights
@pytest.mark.parametrize(
    "kernel, stride, dilation, pads, width",
    [
        (3, 1, 1, ((1, 1), (1, 1)), 13),
        (3, 2, 1, ((1, 1), (1, 1)), 17),
        (1, 1, 1, ((0, 0), (0, 0)), 9),
        (1, 2, 1, ((0, 0), (0, 0)), 14),
        (7, 2, 1, ((3, 3), (3, 3)), 20),
        (3, 1, 2, ((2, 2), (2, 2)), 11),
        (3, 1, 1, ((0, 2), (1, 0)), 6),  # uneven padding
        (2, 3, 1, ((0, 0), (0, 0)), 8),  # windows that skip input columns
    ],
)
def test_conv2d_matches_xla(out_channels, kernel, stride, dilation, pads, width):
    if out_channels % native.status()["lanes"]:
        pytest.skip("output channels not a multiple of this CPU's vector width")
    x, w, b = f32(2, 5, 10, width), f32(out_channels, 5, kernel, kernel), f32(out_channels)
    want = lax.conv_general_dilated(x, w, (stride, stride), pads, rhs_dilation=(dilation,) * 2)
    want = want + b[None, :, None, None]
    got = jax.jit(lambda x, w, b: conv2d(x, w, b, (stride,) * 2, pads, (dilation,) * 2))(x, w, b)
    # Sums of up to 245 products of standard-normal values, in another order than XLA's.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    without_bias = conv2d(x, w, None, (stride,) * 2, pads, (dilation,) * 2)
    np.testing.assert_allclose(
        np.asarray(without_bias), np.asarray(want - b[None, :, None, None]), rtol=1e-4, atol=1e-4
    )


@needs_kernels
@pytest.mark.parametrize("channels, size", [(64, 260), (128, 184)])  # one block, two
def test_a_large_output_with_residual_and_relu_matches_xla(channels, size):
    """Outputs over 16 MB are written with streaming stores (conv2d.cc, kStreamBytes), block
    by block or every block of a pixel tile in turn (kTileMajorWeightBytes)."""
    x, w, b = f32(1, 3, size, size), f32(channels, 3, 3, 3), f32(channels)
    residual = f32(1, channels, size, size)
    want = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1))) + b[None, :, None, None]
    want = jax.nn.relu(want + residual)
    got = jax.jit(
        lambda x, w, b, r: conv2d(x, w, b, (1, 1), ((1, 1), (1, 1)), (1, 1), residual=r, relu=True)
    )(x, w, b, residual)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("in_channels, out_channels", [(256, 1024), (1024, 256)])
def test_large_weights_split_between_threads_match_xla(in_channels, out_channels):
    """ResNet-50's 1x1 convolutions with 1 MB of weights at b8: large enough activations for
    the threads to split the channel blocks between them where the L2 is 2 MB or less
    (conv2d.cc, the tile-major order)."""
    x, w, b = f32(8, in_channels, 14, 14), f32(out_channels, in_channels, 1, 1), f32(out_channels)
    residual = f32(8, out_channels, 14, 14)
    want = lax.conv_general_dilated(x, w, (1, 1), ((0, 0), (0, 0))) + b[None, :, None, None]
    want = jax.nn.relu(want + residual)
    got = jax.jit(
        lambda x, w, b, r: conv2d(x, w, b, (1, 1), ((0, 0), (0, 0)), (1, 1), residual=r, relu=True)
    )(x, w, b, residual)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize(
    "x_shape, out_channels, pads, residual, relu",
    [
        ((2, 16, 9, 9), 64, ((1, 1), (1, 1)), False, False),  # odd sizes: half tiles at the edge
        ((1, 32, 7, 10), 128, ((1, 1), (1, 1)), True, True),  # two channel blocks
        ((2, 64, 6, 5), 64, ((0, 2), (1, 0)), True, False),  # uneven padding
        ((1, 16, 5, 6), 64, ((0, 4), (3, 0)), False, True),  # more below than above
        ((3, 48, 1, 1), 64, ((1, 1), (1, 1)), False, True),  # tile chunks that span images
        ((1, 256, 14, 14), 64, ((1, 1), (1, 1)), False, False),  # the most input channels
        ((9, 16, 4, 4), 64, ((0, 0), (0, 0)), True, True),  # no padding
    ],
)
def test_winograd_matches_xla(x_shape, out_channels, pads, residual, relu):
    c = x_shape[1]
    x, w, b = f32(*x_shape), f32(out_channels, c, 3, 3) / np.sqrt(9 * c), f32(out_channels)
    assert layouts.winograd_applies(w.shape, (1, 1), (1, 1))
    want = lax.conv_general_dilated(x, w, (1, 1), pads) + b[None, :, None, None]
    addend = f32(*want.shape) if residual else None
    if residual:
        want = want + addend
    if relu:
        want = jax.nn.relu(want)
    got = jax.jit(lambda x, w, b, r: conv2d(x, w, b, (1, 1), pads, (1, 1), residual=r, relu=relu))(
        x, w, b, addend
    )
    assert (
        "onnx2jax_winograd"
        in jax.jit(lambda x, w: conv2d(x, w, None, (1, 1), pads, (1, 1))).lower(x, w).as_text()
    )
    # The transforms add and subtract up to 16 values (F(2x2, 3x3)'s error is a few ulps).
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_winograd_applies_to_3x3_convolutions_of_stride_1_up_to_256_channels():
    if not native.status().get("block"):
        pytest.skip("no kernels on this machine")
    assert layouts.winograd_applies((64, 64, 3, 3), (1, 1), (1, 1))
    assert layouts.winograd_applies((128, 256, 3, 3), (1, 1), (1, 1))
    assert not layouts.winograd_applies((512, 512, 3, 3), (1, 1), (1, 1))  # slower there
    assert not layouts.winograd_applies((64, 64, 3, 3), (2, 2), (1, 1))
    assert not layouts.winograd_applies((64, 64, 3, 3), (1, 1), (2, 2))
    assert not layouts.winograd_applies((64, 64, 1, 1), (1, 1), (1, 1))
    assert not layouts.winograd_applies((64, 8, 3, 3), (1, 1), (1, 1))  # under a vector wide
    assert not layouts.winograd_applies((48, 64, 3, 3), (1, 1), (1, 1))  # under a block


def test_winograd_weights_invert():
    if not native.status().get("block"):
        pytest.skip("no kernels on this machine")
    w = f32(128, 32, 3, 3)
    u = layouts.winograd_weights(w)
    assert u.shape == (2, 16, 32, 64)
    np.testing.assert_allclose(
        np.asarray(layouts.unwinograd_weights(jnp.asarray(u))), w, rtol=1e-6, atol=1e-6
    )
    # NumPy (at load) and JAX (inside a trace) give the same layout.
    np.testing.assert_allclose(
        np.asarray(layouts.winograd_weights(jnp.asarray(w))), u, rtol=1e-6, atol=1e-6
    )


@needs_kernels
def test_winograd_weights_are_kept_transformed_and_follow_param_changes():
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    # w3 is read by a Conv of stride 1 and one of stride 2: it keeps the blocked layout.
    weights = {"w3": f32(64, 32, 3, 3) / 16, "w1": f32(64, 32, 3, 3) / 16, "b": f32(64)}
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1", "b"], ["y"], pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["x", "w3"], ["z"], pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["x", "w3"], ["s"], pads=[1, 1, 1, 1], strides=[2, 2]),
        ],
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32, 10, 10])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "yzs"],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = onnx2jax.load(proto)
    prepared = model.engine.layouts(frozenset({"conv"}))
    assert prepared["w1"] == "winograd" and prepared["w3"] == "blocked"
    x = f32(2, 32, 10, 10)
    want = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})
    got = model(x)
    for name, value in zip("yzs", want, strict=True):
        np.testing.assert_allclose(np.asarray(got[name]), value, rtol=1e-5, atol=1e-5)
    model.params["w1"] = model.params["w1"] * 0.5
    np.testing.assert_allclose(
        np.asarray(model(x)["y"]),
        np.asarray(jax.jit(model.apply)(model.params, x)["y"]),
        rtol=1e-5,
        atol=1e-5,
    )


@needs_kernels
def test_model_call_runs_the_kernel_and_matches_onnxruntime():
    import onnxruntime

    weights = {"w": f32(64, 8, 3, 3), "b": f32(64)}
    proto = single_node_model(
        "Conv",
        {"x": f32(2, 8, 15, 15), **weights},
        initializers=weights,
        strides=[2, 2],
        pads=[1, 0, 1, 2],
    )
    x = f32(2, 8, 15, 15)
    model = onnx2jax.load(proto)
    assert "onnx2jax_conv2d" in _compiled_text(model, {"x": x})
    (want,) = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})
    np.testing.assert_allclose(np.asarray(model(x)["y"]), want, rtol=1e-5, atol=1e-5)
    # apply() stays pure JAX: differentiable, and the same numbers.
    np.testing.assert_allclose(
        np.asarray(jax.jit(model.apply)(model.params, x)["y"]), want, rtol=1e-5, atol=1e-5
    )
    grad = jax.grad(lambda p: model.apply(p, x)["y"].sum())(model.params)
    assert np.isfinite(np.asarray(grad["w"])).all()


@needs_kernels
def test_example_cnn_uses_the_kernel_and_follows_param_changes():
    model = onnx2jax.load(onnx2jax.example_path())
    images = f32(4, 1, 8, 8)
    assert _compiled_text(model, {"image": images}).count("onnx2jax_conv2d") >= 2
    # 32 output channels: HWIO weights (a block is 64 channels).
    name = "onnx::Conv_31"
    for scale in (1.0, 0.5):
        model.params[name] = model.params[name] * scale
        want = jax.jit(model.apply)(model.params, images)["logits"]
        np.testing.assert_allclose(
            np.asarray(model(images)["logits"]), np.asarray(want), rtol=1e-5, atol=1e-5
        )


@needs_kernels
def test_kernels_are_off_under_vmap_and_by_environment(monkeypatch):
    model = onnx2jax.load(onnx2jax.example_path())
    images = f32(3, 1, 8, 8)
    want = np.asarray(model(images)["logits"])
    # Under the user's vmap the convolutions are XLA's (the kernel has no batching rule).
    batched = jax.vmap(lambda x: model(x[None])["logits"][0])(images)
    np.testing.assert_allclose(np.asarray(batched), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("ONNX2JAX_NATIVE", "0")
    assert "onnx2jax_conv2d" not in _compiled_text(model, {"image": images})
    np.testing.assert_allclose(np.asarray(model(images)["logits"]), want, rtol=1e-5, atol=1e-5)


def test_the_executable_cache_keeps_native_and_xla_programs_apart(tmp_path, monkeypatch):
    model = onnx2jax.load(onnx2jax.example_path(), cache_dir=tmp_path)
    images = f32(2, 1, 8, 8)
    first = np.asarray(model(images)["logits"])
    monkeypatch.setenv("ONNX2JAX_NATIVE", "0")
    np.testing.assert_allclose(np.asarray(model(images)["logits"]), first, rtol=1e-5, atol=1e-5)
    expected = 2 if native.status().get("lanes") else 1
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) >= expected


BUILD_FAILS = r"""
import numpy as np, onnx2jax
from onnx2jax import native
state = native.status()
assert "did not build" in state["reason"], state
model = onnx2jax.load(onnx2jax.example_path())
images = np.ones((2, 1, 8, 8), np.float32)
out = model(images)["logits"]
np.testing.assert_allclose(np.asarray(out), np.asarray(model.apply(model.params, images)["logits"]),
                           rtol=1e-5, atol=1e-5)
print("xla convolutions")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the kernels build on Linux x86-64")
def test_a_failed_build_leaves_xla_convolutions(tmp_path):
    if not native.status().get("lanes"):
        pytest.skip("no kernels on this machine in the first place")
    env = {**os.environ, "CXX": "false", "ONNX2JAX_NATIVE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", BUILD_FAILS], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "xla convolutions" in done.stdout
    assert not list(tmp_path.iterdir())  # the failed build left no file behind


@needs_kernels
def test_the_built_library_is_reused(tmp_path):
    env = {**os.environ, "ONNX2JAX_NATIVE_DIR": str(tmp_path)}
    script = "from onnx2jax import native; print(native.status()['path'])"
    paths = [
        subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout.strip()
        for _ in range(2)
    ]
    # The library and the manifest that vouches for it (onnx2jax/native/__init__.py).
    assert paths[0] == paths[1] and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [os.path.basename(paths[0]), Path(paths[0]).with_suffix(".json").name]
    )
    modified = os.stat(paths[0]).st_mtime_ns
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    assert os.stat(paths[0]).st_mtime_ns == modified


def test_the_kernel_computes_single_group_2d_convolutions_of_whole_vectors_only():
    lanes = native.status().get("lanes")
    assert layouts.conv_applies((64, 4, 3, 3), 1) == (lanes is not None)
    assert not layouts.conv_applies((64, 4, 3, 3), 2)
    assert not layouts.conv_applies((64, 4, 3), 1)
    assert not layouts.conv_applies((60, 4, 3, 3), 1)


def test_grouped_and_1d_convolutions_keep_their_weights_for_xla():
    """Only weights the kernel reads take its blocked layout: a grouped or 1-D Conv's weight
    would otherwise be laid out again on every call (or not fit the layout at all)."""
    from onnx import TensorProto, helper, numpy_helper

    weights = {"grouped": f32(64, 1, 3, 3), "one_d": f32(64, 4, 3), "plain": f32(64, 4, 3, 3)}
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "grouped"], ["y"], group=4, pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["z", "one_d"], ["u"]),
            helper.make_node("Conv", ["x", "plain"], ["v"]),
        ],
        "convs",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 9]),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "yuv"],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = onnx2jax.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert model.engine.native_weights == {"plain": "conv"}
    x, z = f32(1, 4, 8, 8), f32(1, 4, 9)
    got, want = model(x, z), jax.jit(model.apply)(model.params, x, z)
    for name in "yuv":
        np.testing.assert_allclose(
            np.asarray(got[name]), np.asarray(want[name]), rtol=1e-5, atol=1e-5
        )


def _matmul_model(
    b_uses_gemm: bool, c_shape: tuple | None = None, columns: int = 128, **gemm_attributes
) -> tuple:
    """x [2, 5, 24] @ w [24, columns] (+ c): a MatMul, or a Gemm on the flattened rows."""
    from onnx import TensorProto, helper, numpy_helper

    w, c = f32(24, columns), f32(*(c_shape or (columns,)))
    if b_uses_gemm:
        nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], **gemm_attributes)]
        x = f32(10, 24)
    else:
        nodes = [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["m", "c"], ["y"]),
        ]
        x = f32(2, 5, 24)
    graph = helper.make_graph(
        nodes,
        "product",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), x


@needs_kernels
@pytest.mark.parametrize(
    "gemm, attributes, native_kind",
    [
        (False, {}, "matrix"),
        (True, {}, "matrix"),
        (True, {"beta": 0.5}, "matrix"),
        (True, {"transB": 0, "beta": 0.0}, "matrix"),
        (True, {"c_shape": (10, 1)}, "matrix"),  # C broadcast along columns: added after
        (True, {"c_shape": (1, 128)}, "matrix"),
        (True, {"alpha": 2.0}, None),  # the kernel has no alpha: XLA's dot
        # Columns not a multiple of the vector width: the weights padded to whole blocks.
        (False, {"columns": 150}, "matrix"),
        (True, {"columns": 150}, "matrix"),
        (True, {"columns": 5, "beta": 0.0}, "matrix"),
    ],
)
def test_matrix_products_run_the_kernel_and_match_onnxruntime(gemm, attributes, native_kind):
    import onnxruntime

    proto, x = _matmul_model(gemm, **attributes)
    model = onnx2jax.load(proto)
    assert model.engine.native_weights.get("w") == native_kind
    assert ("onnx2jax_conv2d" in _compiled_text(model, {"x": x})) == (native_kind is not None)
    (want,) = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})
    np.testing.assert_allclose(np.asarray(model(x)["y"]), want, rtol=1e-5, atol=1e-5)
    # A changed weight is laid out again, and the program reads it.
    model.params["w"] = model.params["w"] * 2.0
    np.testing.assert_allclose(
        np.asarray(model(x)["y"]),
        np.asarray(jax.jit(model.apply)(model.params, x)["y"]),
        rtol=1e-5,
        atol=1e-5,
    )


@needs_kernels
def test_a_padded_matrix_is_read_as_model_call_keeps_it():
    proto, x = _matmul_model(False, columns=150)
    model = onnx2jax.load(proto)
    text = _compiled_text(model, {"x": x})
    # No per-call round trip through the unpadded weights (XLA would not cancel it).
    assert "onnx2jax_conv2d" in text
    assert not any(op in text for op in (" pad(", " slice(", " transpose("))


@needs_kernels
def test_many_rows_keep_native_convolutions_and_xla_matrix_products():
    cnn = onnx2jax.load(onnx2jax.example_path())
    images = f32(200, 1, 8, 8)
    assert "onnx2jax_conv2d" in _compiled_text(cnn, {"image": images})
    np.testing.assert_allclose(
        np.asarray(cnn(images)["logits"]),
        np.asarray(jax.jit(cnn.apply)(cnn.params, images)["logits"]),
        rtol=1e-5,
        atol=1e-5,
    )
    proto, _ = _matmul_model(False)
    for dim, name in zip(proto.graph.input[0].type.tensor_type.shape.dim, "bs", strict=False):
        dim.dim_param = name
    product = onnx2jax.load(proto)
    rows = f32(40, 50, 24)  # 2,000 rows: XLA's dots measured faster there
    assert "onnx2jax_conv2d" not in _compiled_text(product, {"x": rows})
    # ... and so its weight keeps XLA's layout in that program.
    bound = product.bind_inputs((), {"x": rows})
    _, _, kernels = product.inference_function(bound)
    assert kernels == frozenset()
    assert product.engine.prepared_params(kernels)["w"].shape == (24, 128)


def _resnet_block(x_shape=(2, 16, 9, 9), channels=64, outputs=("y",)):
    """A ResNet bottleneck with a projection shortcut: Conv -> Relu -> Conv (3x3) -> Relu ->
    Conv, plus Conv(x), Add, Relu."""
    from onnx import TensorProto, helper, numpy_helper

    c = x_shape[1]
    weights = {
        "w1": f32(channels, c, 1, 1),
        "b1": f32(channels),
        "w2": f32(channels, channels, 3, 3) / 8,
        "b2": f32(channels),
        "w3": f32(channels, channels, 1, 1) / 8,
        "b3": f32(channels),
        "ws": f32(channels, c, 1, 1),
        "bs": f32(channels),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"]),
        helper.make_node("Conv", ["x", "ws", "bs"], ["shortcut"]),
        helper.make_node("Add", ["c3", "shortcut"], ["sum"]),
        helper.make_node("Relu", ["sum"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conv_epilogues_fuse_where_nothing_else_reads_the_intermediates():
    from onnx2jax.runtime.fusion import fuse_conv_epilogues

    model = onnx2jax.load(_resnet_block())
    fused = fuse_conv_epilogues(model.plan)
    assert [n.op_type for n in fused.nodes] == ["FusedConv", "FusedConv", "Conv", "FusedConv"]
    last = fused.nodes[-1]
    assert list(last.input) == ["r2", "w3", "b3", "shortcut"] and list(last.output) == ["y"]
    assert [a.s for a in last.attribute if a.name == "activation"] == [b"Relu"]
    # A tensor asked for by name, or a graph output, stays.
    kept = fuse_conv_epilogues(model.plan, keep=("c2", "sum"))
    assert [n.op_type for n in kept.nodes] == [
        "FusedConv",
        "Conv",
        "Relu",
        "Conv",
        "FusedConv",
        "Relu",
    ]
    assert list(kept.nodes[4].output) == ["sum"] and not kept.nodes[4].attribute
    assert (
        fuse_conv_epilogues(onnx2jax.load(_resnet_block(outputs=("y", "c1"))).plan).nodes[0].op_type
        == "Conv"
    )


@needs_kernels
@pytest.mark.parametrize(
    "x_shape, channels", [((2, 16, 9, 9), 64), ((1, 8, 7, 20), 64), ((2, 16, 9, 9), 192)]
)  # three blocks
def test_fused_resnet_block_matches_onnxruntime(x_shape, channels):
    import onnxruntime

    proto = _resnet_block(x_shape, channels)
    model = onnx2jax.load(proto)
    x = f32(*x_shape)
    compiled = _compiled_text(model, {"x": x})
    # The 3x3 Conv by Winograd, from weights kept transformed: no product of weights per call.
    assert compiled.count("onnx2jax_conv2d") == 3 and compiled.count("onnx2jax_winograd") == 1
    assert "relu = true" in compiled and " dot(" not in compiled
    assert "maximum" not in compiled  # every ReLU in a kernel
    (want,) = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})
    # Sums of up to 1,728 products per 3x3 output, in another order than onnxruntime's (whose
    # own XLA counterpart differs by 5e-7 of the largest output at 192 channels).
    tolerance = 2e-6 * float(np.abs(want).max())
    np.testing.assert_allclose(np.asarray(model(x)["y"]), want, rtol=1e-5, atol=tolerance)
    # An intermediate asked for by name comes out right, and so does the rest.
    got = model(x, outputs=["c2", "y"])
    np.testing.assert_allclose(np.asarray(got["y"]), want, rtol=1e-5, atol=tolerance)
    np.testing.assert_allclose(
        np.asarray(got["c2"]),
        np.asarray(model.apply(model.params, x, outputs=["c2"])["c2"]),
        rtol=1e-5,
        atol=tolerance,
    )


def test_blocked_layouts_invert_exactly():
    if not native.status().get("block"):
        pytest.skip("no kernels on this machine")
    block = native.status()["block"]
    w, b = f32(2 * block, 3, 3, 5), f32(7, 3 * block)
    np.testing.assert_array_equal(layouts.unblocked_weights(layouts.blocked_weights(w)), w)
    np.testing.assert_array_equal(layouts.unblocked_matrix(layouts.blocked_matrix(b)), b)
    # Columns that are not whole blocks are padded with zeros, and the padding dropped again.
    ragged = f32(7, 2 * block + 3)
    padded = layouts.blocked_matrix(ragged)
    assert padded.shape == (3, 1, 1, 7, block) and not padded[2, 0, 0, :, 3:].any()
    np.testing.assert_array_equal(layouts.unblocked_matrix(padded, 2 * block + 3), ragged)
    # A block holds `block` consecutive output channels (columns) at each input position.
    np.testing.assert_array_equal(layouts.blocked_matrix(b)[1, 0, 0, 4], b[4, block : 2 * block])


def test_a_weight_with_another_use_keeps_its_layout():
    from onnx import TensorProto, helper, numpy_helper

    w = f32(16, 64)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("Transpose", ["w"], ["t"]),
        ],
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "yt"],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = onnx2jax.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert model.engine.native_weights == {}
    x = f32(3, 16)
    np.testing.assert_allclose(np.asarray(model(x)["y"]), x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(sys.platform != "linux", reason="the kernels build on Linux x86-64")
def test_a_build_without_avx512_is_not_used(tmp_path):
    if not native.status().get("lanes"):
        pytest.skip("no kernels on this machine in the first place")
    compiler = tmp_path / "cxx-without-avx512"
    compiler.write_text('#!/bin/sh\nexec g++ "$@" -mno-avx512f\n')
    compiler.chmod(0o755)
    env = {**os.environ, "CXX": str(compiler), "ONNX2JAX_NATIVE_DIR": str(tmp_path / "built")}
    script = "from onnx2jax import native; print(native.status()['reason'])"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "need AVX-512" in done.stdout


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@needs_kernels
def test_the_program_holds_native_nodes_that_read_the_prepared_weights():
    """model(...)'s plan says what the kernels compute: each native node reads a weight in the
    kernel's layout, a value of its own that the engine feeds from its prepared params, and
    model.apply (the graph as it is, XLA's ops) agrees with it."""
    model = onnx2jax.load(_resnet_block())
    x = f32(2, 16, 9, 9)
    kernels = model.inference_function(model.bind_inputs((x,), {}))[2]
    assert kernels == frozenset({"conv"})
    plan = model.engine.fused_plan(kernels, None)
    assert [(n.op_type, n.domain) for n in plan.nodes] == [("NativeConv", "ai.onnx2jax")] * 4
    assert not any(n.domain == "ai.onnx2jax" for n in model.plan.nodes)
    inputs = model.engine.native_inputs(kernels)
    prepared = model.engine.prepared_params(kernels)
    by_value = {native_input.value: name for name, native_input in inputs.items()}
    for node in plan.nodes:
        layout = _attributes(node)["layout"].decode()
        name = by_value[node.input[1]]  # the weight, under a name of its own
        assert node.input[1] not in model.params and inputs[name].layout == layout
        np.testing.assert_allclose(
            np.asarray(layouts.restore(prepared[name], layout, inputs[name].shape)),
            np.asarray(model.params[name]),
            rtol=1e-6,
            atol=1e-6,
        )
    assert {_attributes(n)["layout"] for n in plan.nodes} == {b"blocked", b"winograd"}
    assert [_attributes(n)["relu"] for n in plan.nodes] == [1, 1, 0, 1]
    want = np.asarray(jax.jit(model.apply)(model.params, x)["y"])
    tolerance = 2e-6 * float(np.abs(want).max())
    np.testing.assert_allclose(np.asarray(model(x)["y"]), want, rtol=1e-5, atol=tolerance)


@needs_kernels
def test_matrix_products_are_native_nodes_under_float32_products_only():
    proto, x = _matmul_model(True, columns=150)  # a Gemm, its weight padded to whole blocks
    model = onnx2jax.load(proto)
    kernels = model.inference_function(model.bind_inputs((x,), {}))[2]
    (node,) = model.engine.fused_plan(kernels, None).nodes
    assert node.op_type == "NativeMatMul" and list(node.input) == ["x", "w:blocked_matrix", "c"]
    assert _attributes(node) == {
        "layout": b"blocked_matrix",
        "columns": 150,
        "beta": 1.0,
        "precision": b"float32",
    }
    np.testing.assert_allclose(
        np.asarray(model(x)["y"]),
        np.asarray(jax.jit(model.apply)(model.params, x)["y"]),
        rtol=1e-5,
        atol=1e-5,
    )
    rounded = onnx2jax.load(proto, precision="bfloat16")
    kernels = rounded.inference_function(rounded.bind_inputs((x,), {}))[2]
    assert "matrix" not in kernels
    assert [n.op_type for n in rounded.engine.fused_plan(kernels, None).nodes] == ["Gemm"]
    assert rounded.engine.prepared_params(kernels)["w"].shape == (24, 150)


@needs_kernels
def test_a_native_node_written_by_hand_runs_and_checks_its_attributes():
    """The native nodes are ordinary ops of the onnx2jax domain: a graph may hold one."""
    from onnx import TensorProto, helper, numpy_helper

    from onnx2jax.errors import OpError

    def model(precision):
        node = helper.make_node(
            "NativeMatMul",
            ["x", "w"],
            ["y"],
            domain="ai.onnx2jax",
            layout="matrix",
            columns=32,
            precision=precision,
        )
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            initializer=[numpy_helper.from_array(w, "w")],
        )
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx2jax", 1)]
        return onnx2jax.load(helper.make_model(graph, opset_imports=opsets))

    x, w = f32(3, 8), f32(8, 32)
    got = model("float32").apply({"w": w}, x)["y"]
    np.testing.assert_allclose(np.asarray(got), x @ w, rtol=1e-5, atol=1e-5)
    with pytest.raises(OpError, match="float32 products only"):
        model("bfloat16").apply({"w": w}, x)
