"""Static-QDQ convolutional models through the native conv kernels.

In a QDQ model every Conv's weight is ``DequantizeLinear(int8 weight, scale, zero point)``.
``model(...)``'s program computes those weights once, between calls, in the kernel's layout
(onnx2jax.runtime.layouts.dequantized_weights): the Convs become NativeConv nodes and the
weights' DequantizeLinear nodes leave the program. ``model.apply`` keeps the graph as it is.
"""

from __future__ import annotations

import jax
import numpy as np
import onnx
import pytest

import onnx2jax
from onnx2jax import native

# Exports and quantizes a torch model: after the fast tests (tests/conftest.py).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not native.available(), reason=f"native kernels unavailable: {native.status()}"
    ),
]

torch = pytest.importorskip("torch")
quantization = pytest.importorskip("onnxruntime.quantization")

RNG = np.random.default_rng(0)
SHAPE = (2, 3, 12, 12)


class _ConvNet(torch.nn.Module):
    """A stem too small for its int8 weight to be a frozen param (a constant), a 3x3 Conv
    with a residual, a strided 3x3 Conv and a 1x1 Conv (frozen params), and a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.down = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.side = torch.nn.Conv2d(32, 32, 1)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv(x) + x)
        x = torch.relu(self.side(torch.relu(self.down(x))))
        return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


class _Reader(quantization.CalibrationDataReader):
    def __init__(self, batches):
        self._batches = iter([{"x": b} for b in batches])

    def get_next(self):
        return next(self._batches, None)


@pytest.fixture(scope="module", params=[True, False], ids=["per_channel", "per_tensor"])
def qdq_path(request, tmp_path_factory):
    """The net quantized by ``quantize_static`` to QDQ, int8 weights and activations."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("qdq_native")
    path = folder / "net.onnx"
    torch.onnx.export(
        _ConvNet().eval(),
        (torch.randn(*SHAPE),),
        str(path),
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        dynamo=False,
    )
    target = folder / f"net_qdq_{request.param}.onnx"
    quantization.quantize_static(
        str(path),
        str(target),
        _Reader([RNG.normal(size=SHAPE).astype(np.float32) for _ in range(4)]),
        quant_format=quantization.QuantFormat.QDQ,
        activation_type=quantization.QuantType.QInt8,
        weight_type=quantization.QuantType.QInt8,
        per_channel=request.param,
    )
    return target


def _onnxruntime(path, x):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # Unoptimized: the graph as written (its QLinear fusions requantize in integers).
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _output_step(model: onnx.ModelProto) -> float:
    """The scale of the DequantizeLinear that produces the graph's output."""
    output = model.graph.output[0].name
    producer = next(n for n in model.graph.node if output in n.output)
    assert producer.op_type == "DequantizeLinear"
    scale = next(t for t in model.graph.initializer if t.name == producer.input[1])
    return float(np.max(onnx.numpy_helper.to_array(scale)))


def _native_plan(model, x):
    kernels = model.inference_function(model.bind_inputs((x,), {}))[2]
    return kernels, model.engine.fused_plan(kernels, None)


def test_dequantized_conv_weights_feed_native_convs(qdq_path):
    model = onnx2jax.load(str(qdq_path))
    x = RNG.normal(size=SHAPE).astype(np.float32)
    conv_weights = {n.input[1] for n in model.plan.nodes if n.op_type == "Conv"}
    assert len(conv_weights) == 4 and conv_weights <= model.engine.dequantized.keys()
    # The stem's int8 weight is a constant, the others frozen params.
    quantized = {model.engine.dequantized[w].quantized for w in conv_weights}
    assert 0 < len(quantized & model.params.keys()) < len(quantized)

    kernels, plan = _native_plan(model, x)
    assert "conv" in kernels
    natives = [n for n in plan.nodes if n.op_type == "NativeConv"]
    assert len(natives) == 4
    produced = {out for n in plan.nodes for out in n.output}
    assert not conv_weights & produced  # their DequantizeLinear nodes left the program
    assert any(n.op_type == "DequantizeLinear" for n in plan.nodes)  # the activations' stay
    assert any(n.op_type == "FakeQuantizeLinear" for n in plan.nodes)
    inputs = model.engine.native_inputs(kernels)
    assert {inputs[w].value for w in conv_weights} == {n.input[1] for n in natives}

    hlo = model.engine.lower(model.bind_inputs((x,), {})).compile().as_text()
    assert "onnx2jax_conv2d" in hlo

    got = np.asarray(model(x)["y"])
    # The plain program (XLA's convolutions, the weights dequantized in it) computes the same
    # float arithmetic: equal but for the convolutions' order of summation.
    plain = np.asarray(jax.jit(model.apply)(model.params, x)["y"])
    step = _output_step(onnx.load(str(qdq_path)))
    assert np.abs(got - plain).max() <= step * (1 + 1e-3)
    # Against onnxruntime, at most one quantization step of the output's scale apart.
    want = _onnxruntime(qdq_path, x)
    assert got.shape == want.shape and got.dtype == want.dtype
    steps = np.abs(got.astype(np.float64) - want) / step
    assert steps.max() <= 1 + 1e-3, f"{steps.max():.2f} steps apart ({step=})"


def test_the_dequantized_weights_are_the_ops_own(qdq_path):
    """Each prepared weight, back in ONNX's layout, is bit for bit what the graph's
    DequantizeLinear computes."""
    model = onnx2jax.load(str(qdq_path))
    x = RNG.normal(size=SHAPE).astype(np.float32)
    kernels, _ = _native_plan(model, x)
    prepared = model.engine.prepared_params(kernels)
    restored = model.engine.restore_layouts(prepared, kernels)
    names = sorted(model.engine.native_inputs(kernels).keys() & model.engine.dequantized.keys())
    assert len(names) == 4
    ops = jax.jit(model.apply, static_argnames="outputs")(model.params, x, outputs=tuple(names))
    for name in names:
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(ops[name]))


def test_assigned_params_are_dequantized_again(qdq_path):
    model = onnx2jax.load(str(qdq_path))
    x = RNG.normal(size=SHAPE).astype(np.float32)
    before = np.asarray(model(x)["y"])
    kernels, _ = _native_plan(model, x)
    conv_weights = [n.input[1] for n in model.plan.nodes if n.op_type == "Conv"]
    # Every frozen int8 weight negated, and every float scale doubled.
    changed = dict(model.params)
    for name in conv_weights:
        weight = model.engine.dequantized[name]
        if weight.quantized in changed:
            changed[weight.quantized] = -np.asarray(changed[weight.quantized])
        if weight.scale in changed:
            changed[weight.scale] = 2 * np.asarray(changed[weight.scale])
    model.params = changed
    got = np.asarray(model(x)["y"])
    assert not np.array_equal(got, before)
    plain = np.asarray(jax.jit(model.apply)(model.params, x)["y"])
    step = _output_step(onnx.load(str(qdq_path)))
    assert np.abs(got - plain).max() <= step * (1 + 1e-3)
    assert "conv" in _native_plan(model, x)[0]


@pytest.mark.parametrize("columns", [32, 40])
def test_dequantized_matrices_stay_int8(columns):
    """A MatMul's weight dequantized per column (axis 1) from a frozen int8 param, a few rows:
    not held again in float32 for the matrix kernel (4x the int8 weight, for as long as the
    model lives); the DequantizeLinear and the MatMul stay XLA's, and the result is right."""
    from onnx import TensorProto, helper, numpy_helper

    q = RNG.integers(-128, 128, size=(64, columns), dtype=np.int8)
    scale = RNG.uniform(0.01, 0.02, size=columns).astype(np.float32)
    zero_point = RNG.integers(-3, 4, size=columns, dtype=np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["w"], axis=1),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, columns])],
        initializer=[
            numpy_helper.from_array(q, "q"),
            numpy_helper.from_array(scale, "scale"),
            numpy_helper.from_array(zero_point, "zero_point"),
        ],
    )
    model = onnx2jax.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert "q" in model.params  # a frozen param
    x = RNG.normal(size=(2, 64)).astype(np.float32)
    _, plan = _native_plan(model, x)
    assert [n.op_type for n in plan.nodes] == ["DequantizeLinear", "MatMul"]
    assert "w" not in model.engine.native_weights
    w = (q.astype(np.float32) - zero_point.astype(np.float32)) * scale
    np.testing.assert_allclose(np.asarray(model(x)["y"]), x @ w, rtol=1e-5, atol=1e-4)
