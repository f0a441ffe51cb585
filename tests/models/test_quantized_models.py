"""Whole models quantized by onnxruntime's quantizer, run by onnx2jax and by onnxruntime.

A small CNN and a small attention block are exported from torch, quantized with
``quantize_dynamic`` (int8 and uint8 weights, per tensor and per channel) and with
``quantize_static`` (QDQ and QOperator formats, uint8 and int8 activations, per channel), and
compared on the same inputs. A statically quantized output is a dequantized integer tensor: it
may be at most one quantization step of its scale apart per element. Dynamic quantization keeps
float outputs; they must be close.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.helpers import run_onnx2jax

# Exports and runs real models: after the fast tests (tests/conftest.py).
pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
quantization = pytest.importorskip("onnxruntime.quantization")

RNG = np.random.default_rng(0)


class _SmallCnn(torch.nn.Module):
    """Conv, ReLU, MaxPool, a residual Add, LeakyRelu, Sigmoid, AveragePool, Concat,
    GlobalAveragePool, Gemm: what the QOperator format turns into QLinear ops."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.side = torch.nn.Conv2d(8, 4, 1)
        self.head = torch.nn.Linear(12, 10)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.stem(x)), 2)
        x = torch.nn.functional.leaky_relu(self.conv(x) + x, 0.1)
        side = torch.sigmoid(self.side(torch.nn.functional.avg_pool2d(x, 3, 1, 1)))
        x = torch.cat([x, side], dim=1)
        return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


class _SmallBlock(torch.nn.Module):
    """One-head self-attention with a residual, LayerNorm and an MLP."""

    def __init__(self, hidden=16):
        super().__init__()
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.out = torch.nn.Linear(hidden, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.up = torch.nn.Linear(hidden, 2 * hidden)
        self.down = torch.nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = torch.softmax(q @ k.transpose(1, 2) * 0.25, dim=-1)
        x = self.norm(x + self.out(scores @ v))
        return x + self.down(torch.relu(self.up(x)))


_MODELS = {"cnn": (_SmallCnn, (2, 3, 16, 16)), "block": (_SmallBlock, (2, 8, 16))}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each torch model exported once to ONNX (opset 17), with its inputs."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("quantized_models")
    models = {}
    for name, (cls, shape) in _MODELS.items():
        path = folder / f"{name}.onnx"
        torch.onnx.export(
            cls().eval(),
            (torch.randn(*shape),),
            str(path),
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamo=False,
        )
        calibration = [RNG.normal(size=shape).astype(np.float32) for _ in range(4)]
        models[name] = (path, calibration, RNG.normal(size=shape).astype(np.float32))
    return folder, models


class _Reader(quantization.CalibrationDataReader):
    def __init__(self, batches):
        self._batches = iter([{"x": b} for b in batches])

    def get_next(self):
        return next(self._batches, None)


def _output_step(model: onnx.ModelProto) -> float | None:
    """The scale of the DequantizeLinear that produces the graph's output, if one does."""
    output = model.graph.output[0].name
    producer = next(n for n in model.graph.node if output in n.output)
    if producer.op_type != "DequantizeLinear":
        return None
    scale = next(t for t in model.graph.initializer if t.name == producer.input[1])
    return float(np.max(onnx.numpy_helper.to_array(scale)))


def _run_onnxruntime(model, x, optimize):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if not optimize:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


def _compare(path, x, optimize=True):
    model = onnx.load(str(path))
    want = _run_onnxruntime(model, x, optimize)
    got = run_onnx2jax(model, {"x": x}, x64=False)[0]
    assert got.shape == want.shape and got.dtype == want.dtype
    step = _output_step(model)
    if step is None:
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
        return
    steps = np.abs(got.astype(np.float64) - want) / step
    assert steps.max() <= 1 + 1e-3, f"{steps.max():.2f} steps apart ({step=})"


@pytest.mark.parametrize("name", sorted(_MODELS))
@pytest.mark.parametrize("weight_type", ["QInt8", "QUInt8"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_dynamic(exported, name, weight_type, per_channel):
    folder, models = exported
    path, _, x = models[name]
    target = folder / f"{name}_dynamic_{weight_type}_{per_channel}.onnx"
    quantization.quantize_dynamic(
        str(path),
        str(target),
        per_channel=per_channel,
        weight_type=getattr(quantization.QuantType, weight_type),
    )
    _compare(target, x)


@pytest.mark.parametrize("name", sorted(_MODELS))
@pytest.mark.parametrize("quant_format", ["QDQ", "QOperator"])
@pytest.mark.parametrize(
    "activation_type,per_channel", [("QUInt8", False), ("QInt8", False), ("QInt8", True)]
)
def test_quantize_static(exported, name, quant_format, activation_type, per_channel):
    folder, models = exported
    path, calibration, x = models[name]
    target = folder / f"{name}_static_{quant_format}_{activation_type}_{per_channel}.onnx"
    quantization.quantize_static(
        str(path),
        str(target),
        _Reader(calibration),
        quant_format=getattr(quantization.QuantFormat, quant_format),
        activation_type=getattr(quantization.QuantType, activation_type),
        weight_type=quantization.QuantType.QInt8,
        per_channel=per_channel,
    )
    # onnxruntime's optimizer fuses a QDQ model's DequantizeLinear -> op -> QuantizeLinear
    # groups into its QLinear kernels, whose integer requantization departs from the graph's
    # float arithmetic (two steps on the attention block's output). Unoptimized, it runs the
    # graph as written, which is what the QDQ format means.
    _compare(target, x, optimize=quant_format != "QDQ")


@pytest.mark.parametrize("name", sorted(_MODELS))
@pytest.mark.parametrize("how", ["dynamic", "QDQ"])
def test_onnxruntime_optimized_model(exported, name, how):
    """The model onnxruntime's optimizer saves: its QDQ groups and dynamic MatMuls fused into
    com.microsoft ops (QLinearAdd, QGemm, QLinearSoftmax, DynamicQuantizeMatMul, ...)."""
    import onnxruntime

    folder, models = exported
    path, calibration, x = models[name]
    quantized = folder / f"{name}_{how}_to_optimize.onnx"
    if how == "dynamic":
        quantization.quantize_dynamic(str(path), str(quantized))
    else:
        quantization.quantize_static(
            str(path),
            str(quantized),
            _Reader(calibration),
            quant_format=quantization.QuantFormat.QDQ,
            activation_type=quantization.QuantType.QUInt8,
        )
    optimized = folder / f"{name}_{how}_optimized.onnx"
    options = onnxruntime.SessionOptions()
    # Extended, not all: the highest level adds layout ops of onnxruntime's own CPU kernels.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    onnxruntime.InferenceSession(str(quantized), options, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(str(optimized)).graph.node if n.domain}
    assert fused & {"DynamicQuantizeMatMul", "QLinearAdd", "QGemm"}, fused
    _compare(optimized, x)


class _SmallLstm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(6, 8, batch_first=True, bidirectional=True)

    def forward(self, x):
        return self.lstm(x)[0]


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_dynamic_lstm(tmp_path, per_channel):
    """quantize_dynamic turns LSTM into com.microsoft DynamicQuantizeLSTM."""
    import onnxruntime

    torch.manual_seed(0)
    path, target = tmp_path / "lstm.onnx", tmp_path / "lstm_dynamic.onnx"
    torch.onnx.export(
        _SmallLstm().eval(),
        (torch.randn(3, 5, 6),),
        str(path),
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        dynamo=False,
    )
    quantization.quantize_dynamic(str(path), str(target), per_channel=per_channel)
    model = onnx.load(str(target))
    assert "DynamicQuantizeLSTM" in {n.op_type for n in model.graph.node}
    x = RNG.normal(size=(3, 5, 6)).astype(np.float32)
    # With several threads onnxruntime splits the batch and quantizes each part's hidden state
    # on its own, so its result depends on the thread count; one thread quantizes the whole
    # batch's state at every step, as onnx2jax does.
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    want = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})[0]
    got = run_onnx2jax(model, {"x": x}, x64=False)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))))
