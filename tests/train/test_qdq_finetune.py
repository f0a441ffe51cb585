"""Statically quantized (QDQ) models fine-tune: the QuantizeLinear -> DequantizeLinear pairs
run as planned FakeQuantizeLinear nodes with a straight-through gradient, the weights behind
them train, and the saved file keeps its Q/DQ nodes and scales for onnxruntime."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import optax
import pytest
from onnx import TensorProto, helper

import onnx2jax
from onnx2jax import train
from onnx2jax.core import graph

torch = pytest.importorskip("torch")


def qdq_mlp(folder: Path, per_channel: bool) -> tuple[Path, np.ndarray]:
    """A torch MLP exported to ONNX, then quantize_static in QDQ format with the float weights
    kept behind Q/DQ pairs (``AddQDQPairToWeight``), as quantization-aware tuning needs."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    ).eval()
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    base = export_torch(net, x, folder / "mlp.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": x}])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    out = folder / "mlp-qdq.onnx"
    quantize_static(
        str(base),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        extra_options={"AddQDQPairToWeight": True},
    )
    return out, x


def export_torch(net: torch.nn.Module, x: np.ndarray, path: Path) -> Path:
    """``net`` exported with the TorchScript exporter: input ``x``, output ``y``, every axis
    but the last dynamic."""
    torch.onnx.export(
        net,
        (torch.from_numpy(x),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {axis: f"d{axis}" for axis in range(x.ndim - 1)}},
        dynamo=False,
        opset_version=17,
    )
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["per-tensor", "per-channel"])
def qdq(request, tmp_path_factory) -> tuple[Path, np.ndarray]:
    return qdq_mlp(tmp_path_factory.mktemp("qdq"), request.param)


def quantized_weights(model: onnx2jax.Model) -> set[str]:
    """The float params the planned Q/DQ pairs quantize: the weights that train."""
    return {
        node.input[0]
        for node in model.plan.nodes
        if node.op_type == "FakeQuantizeLinear" and node.input[0] in model.params
    }


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def test_pairs_planned_as_fake_quantize_compute_the_pair_bit_for_bit(qdq, monkeypatch):
    path, x = qdq
    model = onnx2jax.load(path)
    ops = [node.op_type for node in model.plan.nodes]
    assert "QuantizeLinear" not in ops and ops.count("FakeQuantizeLinear") == 5
    assert quantized_weights(model) == {"0.weight", "2.weight"}
    # Every tensor keeps its name: the quantized integers stay readable.
    assert "0.weight_QuantizeLinear_Output" in model.tensor_names()
    fused = model.apply(model.params, x)["y"]
    np.testing.assert_array_equal(np.asarray(fused), np.asarray(model(x)["y"]))
    np.testing.assert_allclose(np.asarray(fused), ort_run(path, x), atol=1e-6, rtol=0)
    monkeypatch.setattr(graph, "fuse_quantize_pairs", lambda nodes: nodes)
    pairs = onnx2jax.load(path)
    assert "FakeQuantizeLinear" not in [node.op_type for node in pairs.plan.nodes]
    np.testing.assert_array_equal(np.asarray(pairs.apply(pairs.params, x)["y"]), fused)


def pair_model(scale: float, zero_type: int, zero: int, opset: int, size: int) -> onnx2jax.Model:
    """``y = DequantizeLinear(QuantizeLinear(x))`` with a scalar scale and zero point."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "pair",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size])],
        [
            helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
            helper.make_tensor("z", zero_type, [], [zero]),
        ],
    )
    return onnx2jax.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def test_straight_through_gradient_is_one_inside_the_range_and_zero_outside():
    # uint8, scale 0.1, zero point 128: the pair represents [-12.8, 12.7].
    model = pair_model(0.1, TensorProto.UINT8, 128, 19, size=6)
    x = np.array([-20.0, -12.8, -3.04, 0.0, 12.7, 13.5], np.float32)
    grad = jax.grad(lambda x: model.apply(model.params, x)["y"].sum())(x)
    np.testing.assert_array_equal(np.asarray(grad), [0, 1, 1, 1, 1, 0])
    # The scale's gradient is the DequantizeLinear's, the integers held: sum(q - 128).
    q = np.clip(np.round(x / np.float32(0.1)) + 128, 0, 255)
    grad_s = jax.grad(lambda p: model.apply(p, x)["y"].sum())(model.params)["s"]
    np.testing.assert_allclose(float(grad_s), float((q - 128).sum()), rtol=1e-6)


def test_qdq_model_fine_tunes_and_saves_with_its_scales(qdq, tmp_path):
    path, x = qdq
    model = onnx2jax.load(path)
    target = np.asarray(model(x)["y"])[:, ::-1].copy()  # outputs reversed: a real change
    weights = quantized_weights(model)
    tuned, frozen = train.split(model.params, lambda name, value: name in weights)

    def loss_fn(params, batch):
        return jnp.mean((model.apply(params, batch["x"])["y"] - batch["t"]) ** 2)

    grads = jax.grad(loss_fn)({**tuned, **frozen}, {"x": x, "t": target})
    assert all(float(jnp.abs(grads[name]).max()) > 0 for name in weights)
    result = train.fit(
        loss_fn,
        optax.adam(1e-2),
        tuned,
        lambda step: {"x": x, "t": target},
        steps=30,
        frozen=frozen,
        progress=False,
    )
    assert result.losses[-1] < 0.7 * result.losses[0]

    saved = tmp_path / "tuned.onnx"
    model.save(saved, result.params)
    before = {t.name: t.SerializeToString() for t in onnx.load(str(path)).graph.initializer}
    after = {t.name: t.SerializeToString() for t in onnx.load(str(saved)).graph.initializer}
    assert [n.op_type for n in onnx.load(str(saved)).graph.node] == [
        n.op_type for n in onnx.load(str(path)).graph.node
    ]
    assert {k for k in before if before[k] != after[k]} == weights
    served = ort_run(saved, x)
    ours = np.asarray(onnx2jax.load(saved).apply(result.params, x)["y"])
    np.testing.assert_allclose(np.asarray(model.apply(result.params, x)["y"]), ours, atol=0)
    # Within one step of the output's quantizer (onnxruntime may round a product differently).
    step = float(
        onnx.numpy_helper.to_array(
            next(t for t in onnx.load(str(saved)).graph.initializer if t.name == "y_scale")
        )
    )
    assert np.abs(served - ours).max() <= step * 1.0001


def test_only_pairs_whose_integer_nothing_else_reads_are_fused():
    shared = [
        helper.make_node("QuantizeLinear", ["w", "s"], ["q"], "quantize"),
        helper.make_node("DequantizeLinear", ["q", "s"], ["y"], "dequantize"),
        helper.make_node("Identity", ["q"], ["q_copy"], "reader"),
    ]
    assert [n.op_type for n in graph.fuse_quantize_pairs(shared)] == [
        "QuantizeLinear",
        "DequantizeLinear",
        "Identity",
    ]
    fused = graph.fuse_quantize_pairs(shared[:2])
    assert [(n.op_type, n.domain, n.name, list(n.input)) for n in fused] == [
        ("FakeQuantizeLinear", "ai.onnx2jax", "quantize", ["w", "s", "", "s", ""])
    ]


@pytest.mark.parametrize(
    "elem_type,opset",
    [(TensorProto.INT8, 13), (TensorProto.INT4, 21), (TensorProto.FLOAT8E4M3FN, 19)],
    ids=["int8", "int4", "float8e4m3fn"],
)
def test_straight_through_gradient_clips_at_each_types_range(elem_type, opset):
    # Scale 0.5: int8 represents [-64, 63.5], int4 [-4, 3.5], float8e4m3fn [-224, 224].
    model = pair_model(0.5, elem_type, 0, opset, size=5)
    x = np.array([-600.0, -3.9, 0.2, 3.4, 600.0], np.float32)
    grad = jax.grad(lambda x: model.apply(model.params, x)["y"].sum())(x)
    np.testing.assert_array_equal(np.asarray(grad), [0, 1, 1, 1, 0])
