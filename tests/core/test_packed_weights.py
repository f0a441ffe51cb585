"""Packed and quantized integer weights are frozen params: device arrays passed to the compiled
program in their file's dtype and size, never literals compiled into it (issue 24)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import onnx
import onnxruntime
import optax
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import onnx2jax
from onnx2jax import train
from onnx2jax.core.errors import InputError
from onnx2jax.core.graph import FROZEN_PARAM_MIN_BYTES
from onnx2jax.runtime.aot import export_model, load_artifact
from onnx2jax.train.checkpoint import Checkpointer

MS = "com.microsoft"
RNG = np.random.default_rng(0)
K, N, BLOCK, VOCAB = 128, 512, 32, 64


def ort_run(model: onnx.ModelProto | Path, feeds: dict) -> list[np.ndarray]:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def int4_model() -> onnx.ModelProto:
    """A builder-style int4 model: a GatherBlockQuantized embedding (4 KiB packed), then a
    MatMulNBits projection (32 KiB packed, 1 KiB of packed zero points) and a smaller one whose
    512 bytes of packed weight stay a constant."""
    blocks = K // BLOCK
    values = {
        "emb": RNG.integers(0, 256, size=(VOCAB, K // 2), dtype=np.uint8),
        "emb_scales": RNG.uniform(0.01, 0.1, size=(VOCAB, blocks)).astype(np.float32),
        "w": RNG.integers(0, 256, size=(N, blocks, BLOCK // 2), dtype=np.uint8),
        "w_scales": RNG.uniform(0.01, 0.1, size=(N, blocks)).astype(np.float32),
        "w_zp": RNG.integers(0, 256, size=(N, blocks // 2), dtype=np.uint8),
        "head": RNG.integers(0, 256, size=(2, N // BLOCK, BLOCK // 2), dtype=np.uint8),
        "head_scales": RNG.uniform(0.01, 0.1, size=(2, N // BLOCK)).astype(np.float32),
    }
    nodes = [
        helper.make_node(
            "GatherBlockQuantized", ["emb", "ids", "emb_scales"], ["h"], domain=MS,
            bits=4, block_size=BLOCK, gather_axis=0, quantize_axis=1,
        ),
        helper.make_node(
            "MatMulNBits", ["h", "w", "w_scales", "w_zp"], ["z"], domain=MS,
            K=K, N=N, bits=4, block_size=BLOCK,
        ),
        helper.make_node(
            "MatMulNBits", ["z", "head", "head_scales"], ["y"], domain=MS,
            K=N, N=2, bits=4, block_size=BLOCK,
        ),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "int4",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[onnx.numpy_helper.from_array(v, k) for k, v in values.items()],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
        ir_version=10,
    )


def largest_literal_bytes(lowered: jax.stages.Lowered) -> int:
    """The size of the largest constant a lowered program holds (StableHLO prints each one's
    bytes as a hex ``dense<"0x...">`` literal)."""
    literals = re.findall(r'dense<"0x([0-9A-Fa-f]*)">', lowered.as_text())
    return max((len(hex_digits) // 2 for hex_digits in literals), default=0)


def compiled_constants(compiled: jax.stages.Compiled) -> list[tuple[str, int]]:
    """(dtype, element count) of every constant in the optimized HLO."""
    text = compiled.as_text() or ""
    found = re.findall(r"(\w+)\[([\d,]*)\]\{[^}]*\} constant\(", text)
    return [(dtype, int(np.prod([int(d) for d in dims.split(",") if d]))) for dtype, dims in found]


def stored_initializers(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in model.graph.initializer}


# ----------------------------------------------------------------------------- int4


def test_int4_weights_are_frozen_params_in_the_files_dtype_and_size():
    proto = int4_model()
    model = onnx2jax.load(proto)
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for name in ("emb", "w", "w_zp"):
        assert model.params[name].dtype == np.uint8
        assert model.params[name].shape == stored[name].shape
        np.testing.assert_array_equal(np.asarray(model.params[name]), stored[name])
    # Under FROZEN_PARAM_MIN_BYTES: a constant, like the shape tensors.
    assert stored["head"].nbytes < FROZEN_PARAM_MIN_BYTES
    assert "head" in model.plan.constants and "head" not in model.params
    # The model's memory is what its file says: every byte is a param but the small head's.
    held = sum(p.nbytes for p in model.params.values())
    assert held == sum(v.nbytes for k, v in stored.items() if k != "head")
    # Floats train, integers never do.
    assert train.trainable_names(model.params) == ["emb_scales", "w_scales", "head_scales"]


def test_int4_program_holds_no_literal_of_the_weights_and_matches_onnxruntime():
    proto = int4_model()
    model = onnx2jax.load(proto)
    ids = RNG.integers(0, VOCAB, size=(2, 5))
    lowered = jax.jit(model.apply).lower(model.params, ids)
    # Compiled in, the 32 KiB weight would be a 32 KiB literal (and XLA folds its unpacking).
    assert largest_literal_bytes(lowered) < FROZEN_PARAM_MIN_BYTES
    compiled = lowered.compile()
    assert all(size < FROZEN_PARAM_MIN_BYTES for _, size in compiled_constants(compiled))
    packed = sum(model.params[k].nbytes for k in ("emb", "w", "w_zp"))
    assert compiled.memory_analysis().argument_size_in_bytes >= packed
    # model(...)'s own program (the engine's) too.
    engine_lowered = model.engine.lower({"ids": ids})
    assert largest_literal_bytes(engine_lowered) < FROZEN_PARAM_MIN_BYTES
    want = ort_run(proto, {"ids": ids})[0]
    np.testing.assert_allclose(np.asarray(model(ids)["y"]), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(compiled(model.params, ids)["y"]), want, rtol=1e-4, atol=1e-4
    )


def test_int4_save_round_trips_byte_identical(tmp_path):
    proto = int4_model()
    model = onnx2jax.load(proto.SerializeToString())
    model.save(tmp_path / "same.onnx")
    assert stored_initializers(onnx.load(str(tmp_path / "same.onnx"))) == stored_initializers(proto)
    again = onnx2jax.load(tmp_path / "same.onnx")
    ids = RNG.integers(0, VOCAB, size=(1, 3))
    np.testing.assert_array_equal(np.asarray(again(ids)["y"]), np.asarray(model(ids)["y"]))


def test_int4_aot_artifact_and_checkpoint_keep_the_packed_params(tmp_path):
    model = onnx2jax.load(int4_model())
    ids = RNG.integers(0, VOCAB, size=(2, 5))
    export_model(model, {"ids": ids}, tmp_path / "int4.o2j")
    artifact = load_artifact(tmp_path / "int4.o2j")
    # An artifact runs the graph on XLA's kernels (model(...) may call the native 4-bit one).
    want = np.asarray(model.apply(model.params, ids)["y"])
    np.testing.assert_array_equal(np.asarray(artifact(ids)["y"]), want)
    with Checkpointer(tmp_path / "checkpoints") as checkpoints:
        checkpoints.save(0, model.params)
        checkpoints.wait()
        restored = checkpoints.restore(model.params)
    for name, value in model.params.items():
        assert restored[name].dtype == value.dtype
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(value))


def test_fsdp_splits_the_packed_params(tmp_path):
    # Two CPU devices need a fresh process (XLA reads the flag once).
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parents[2])!r})
import numpy as np, onnx2jax
from jax.sharding import PartitionSpec
from onnx2jax.core.sharding import default_mesh
from tests.core.test_packed_weights import VOCAB, int4_model
proto = int4_model()
model = onnx2jax.load(proto, mesh=default_mesh(), sharding="fsdp")
assert len(model.params["w"].sharding.device_set) == 2, model.params["w"].sharding
assert model.params["w"].dtype == np.uint8
assert model.params["w"].sharding.spec == PartitionSpec("data"), model.params["w"].sharding
ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 5))
want = np.asarray(onnx2jax.load(proto)(ids)["y"])
np.testing.assert_allclose(np.asarray(model(ids)["y"]), want, rtol=1e-5, atol=1e-5)
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_integer_params_to_train_are_refused_with_the_route():
    model = onnx2jax.load(int4_model())
    with pytest.raises(InputError, match=r"train\.split"):
        train.init(model.params, optax.sgd(0.1))
    trainable, frozen = train.split(model.params)
    assert set(frozen) == {"emb", "w", "w_zp"}
    ids = RNG.integers(0, VOCAB, size=(1, 3))

    def loss(params):
        return model.apply(train.merge(params, frozen), ids)["y"].sum()

    grads = jax.grad(loss)(trainable)
    assert set(grads) == set(trainable)


# ----------------------------------------------------------------- int4 DequantizeLinear


def test_int4_dequantize_linear_weight_stays_a_constant(tmp_path):
    # ml_dtypes' int4 has no NumPy file format, which AOT artifacts store params in: a 4-bit
    # initializer stays a constant (is_frozen_param_dtype), and the save keeps its bytes.
    w = RNG.integers(-8, 8, size=(64, 64)).astype(ml_dtypes.int4)
    scale = RNG.uniform(0.01, 0.1, size=(2, 64)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w", "scale"], ["wf"], axis=0, block_size=32),
            helper.make_node("MatMul", ["x", "wf"], ["y"]),
        ],
        "int4_qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[
            onnx.numpy_helper.from_array(w, "w"),
            onnx.numpy_helper.from_array(scale, "scale"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    model = onnx2jax.load(proto.SerializeToString())
    assert "w" in model.plan.constants and list(model.params) == ["scale"]
    x = RNG.normal(size=(3, 64)).astype(np.float32)
    # The reference evaluator: onnxruntime fuses DequantizeLinear + MatMul into its MatMulNBits,
    # which rounds the activations to int8.
    want = ReferenceEvaluator(proto).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.asarray(model(x)["y"]), want, rtol=1e-5, atol=1e-5)
    model.save(tmp_path / "same.onnx")
    assert stored_initializers(onnx.load(str(tmp_path / "same.onnx"))) == stored_initializers(proto)


# ----------------------------------------------------------------------------- static QDQ


@pytest.fixture(scope="module")
def qdq_conv(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A tiny conv net quantized by onnxruntime's quantize_static in the QDQ format, weights
    stored as int8 (the format's default) behind lone DequantizeLinear nodes."""
    torch = pytest.importorskip("torch")
    from onnxruntime import quantization

    folder = tmp_path_factory.mktemp("qdq")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(8, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 16, 3, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 6 * 6, 4),
    ).eval()
    x = np.random.default_rng(0).normal(size=(2, 8, 6, 6)).astype(np.float32)
    torch.onnx.export(
        net,
        (torch.from_numpy(x),),
        str(folder / "net.onnx"),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}},
        dynamo=False,
        opset_version=17,
    )

    class Calibration(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": x}])

        def get_next(self):
            return next(self.batches, None)

    out = folder / "net-qdq.onnx"
    quantization.quantize_static(
        str(folder / "net.onnx"),
        str(out),
        Calibration(),
        quant_format=quantization.QuantFormat.QDQ,
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
    )
    return out, x


def test_qdq_int8_weights_are_frozen_params_and_match_onnxruntime(qdq_conv):
    path, x = qdq_conv
    proto = onnx.load(str(path))
    model = onnx2jax.load(path)
    int8 = {
        t.name: t
        for t in proto.graph.initializer
        if t.data_type == TensorProto.INT8 and int(np.prod(t.dims)) >= FROZEN_PARAM_MIN_BYTES
    }
    assert len(int8) == 3  # both Conv weights and the Linear's
    for name, tensor in int8.items():
        assert model.params[name].dtype == np.int8
        assert model.params[name].shape == tuple(tensor.dims)
    lowered = jax.jit(model.apply).lower(model.params, x)
    assert largest_literal_bytes(lowered) < FROZEN_PARAM_MIN_BYTES
    served = ort_run(path, {"x": x})[0]
    step = max(
        float(onnx.numpy_helper.to_array(t).max())
        for t in proto.graph.initializer
        if t.name.startswith("y_scale")
    )
    # Within one step of the output's quantizer (two exact evaluations may round a tie apart).
    assert np.abs(np.asarray(model(x)["y"]) - served).max() <= step * 1.0001


def test_qdq_save_round_trips_and_floats_train(qdq_conv, tmp_path):
    path, x = qdq_conv
    model = onnx2jax.load(path)
    model.save(tmp_path / "same.onnx")
    assert stored_initializers(onnx.load(str(tmp_path / "same.onnx"))) == stored_initializers(
        onnx.load(str(path))
    )
    trainable, frozen = train.split(model.params)
    assert all(v.dtype == np.float32 for v in trainable.values())
    assert {v.dtype for v in frozen.values()} == {np.dtype(np.int8)}
    target = np.asarray(model(x)["y"])[:, ::-1].copy()

    def loss_fn(params, batch):
        return jnp.mean((model.apply(params, batch)["y"] - target) ** 2)

    result = train.fit(
        loss_fn, optax.adam(1e-2), trainable, lambda step: x, steps=5, frozen=frozen,
        progress=False,
    )  # fmt: skip
    assert set(result.state.params) == set(trainable)
    for name, value in frozen.items():
        assert result.params[name] is value
