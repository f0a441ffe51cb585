"""model(...) splits a batch over several CPU devices; model.apply takes the user's sharding."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import onnx2jax
from onnx2jax.runtime.devices import split_devices

# Runs in a process with two CPU devices: JAX fixes its device count when it starts.
TWO_DEVICES = r"""
import tempfile
import jax, numpy as np, onnx2jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from onnx import TensorProto, helper, numpy_helper

assert len(jax.devices()) == 2, jax.devices()
# A two-layer perceptron: matrix products, which a split program runs with XLA's dots.
rng = np.random.default_rng(0)
weights = {"w1": rng.normal(size=(64, 32)) / 8, "b1": rng.normal(size=32),
           "w2": rng.normal(size=(32, 10)) / 6, "b2": rng.normal(size=10)}
graph = helper.make_graph(
    [helper.make_node("MatMul", ["image", "w1"], ["m1"]),
     helper.make_node("Add", ["m1", "b1"], ["a1"]), helper.make_node("Relu", ["a1"], ["r1"]),
     helper.make_node("MatMul", ["r1", "w2"], ["m2"]),
     helper.make_node("Add", ["m2", "b2"], ["logits"])], "mlp",
    [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 8, 64])],
    [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
    initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
folder = tempfile.mkdtemp()
path = folder + "/mlp.onnx"
with open(path, "wb") as file:
    file.write(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
               .SerializeToString())
# 256 inputs of 8 rows: more rows than model(...) runs on one device (model.FEW_ROWS).
images = rng.normal(size=(256, 8, 64)).astype(np.float32)
model = onnx2jax.load(path)
reference = np.asarray(jax.jit(model.apply)(model.params, images)["logits"])

logits = model(images)["logits"]
assert len(logits.sharding.device_set) == 2, logits.sharding
np.testing.assert_allclose(np.asarray(logits), reference, rtol=1e-5, atol=1e-5)
# A batch no device count divides, of few rows, or of one stays on one device.
for batch in (255, 4, 1):
    part = model(images[:batch])["logits"]
    assert len(part.sharding.device_set) == 1, (batch, part.sharding)
    np.testing.assert_allclose(np.asarray(part), reference[:batch], rtol=1e-5, atol=1e-5)

# The weights are copied to the devices once; a changed weight alone is copied again.
(key,) = model.engine.replicas()
copies = model.engine.replicas()[key]
model(images)
assert model.engine.replicas()[key] is copies
name = next(iter(model.params))
model.params[name] = model.params[name] * 0.5
changed = np.asarray(model(images)["logits"])
assert not np.allclose(changed, reference)
np.testing.assert_allclose(
    changed, np.asarray(jax.jit(model.apply)(model.params, images)["logits"]),
    rtol=1e-5, atol=1e-5)
again = model.engine.replicas()[key]
assert again[name] is not copies[name]
assert all(again[k] is v for k, v in copies.items() if k != name)

# The user's own sharding of model.apply.
mesh = Mesh(np.array(jax.devices()), ("data",))
sharded = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
model = onnx2jax.load(path)
mine = jax.jit(model.apply)(model.params, sharded)["logits"]
assert len(mine.sharding.device_set) == 2
np.testing.assert_allclose(np.asarray(mine), reference, rtol=1e-5, atol=1e-5)

# The executable cache keeps the split program apart from the one-device one.
with tempfile.TemporaryDirectory() as folder:
    for _ in range(2):
        cached = onnx2jax.load(path, cache_dir=folder)
        for batch in (256, 255):
            out = cached(images[:batch])["logits"]
            np.testing.assert_allclose(np.asarray(out), reference[:batch], rtol=1e-5, atol=1e-5)

# A convolutional network stays on one device where the native convolutions run.
cnn = onnx2jax.load(onnx2jax.example_path())
digits = np.random.default_rng(1).normal(size=(256, 1, 8, 8)).astype(np.float32)
out = cnn(digits)["logits"]
assert len(out.sharding.device_set) == (1 if onnx2jax.native.available() else 2), out.sharding
# The native kernel sums in another order than XLA's convolution.
np.testing.assert_allclose(np.asarray(out),
                           np.asarray(jax.jit(cnn.apply)(cnn.params, digits)["logits"]),
                           rtol=1e-4, atol=1e-4)

# So does a model with attention where the native attention kernel runs.
rng = np.random.default_rng(2)
nodes = [helper.make_node("MatMul", ["q", "kt"], ["scores"]),
         helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
         helper.make_node("MatMul", ["p", "v"], ["out"])]
shapes = {"q": (256, 2, 8, 16), "kt": (256, 2, 16, 8), "v": (256, 2, 8, 16)}
graph = helper.make_graph(
    nodes, "attention",
    [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", *s[1:]])
     for n, s in shapes.items()],
    [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
attention = onnx2jax.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
feeds = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
out = attention(**feeds)["out"]
assert len(out.sharding.device_set) == (1 if onnx2jax.native.available() else 2), out.sharding
np.testing.assert_allclose(np.asarray(out),
                           np.asarray(jax.jit(attention.apply)(attention.params, **feeds)["out"]),
                           rtol=1e-5, atol=1e-5)
print("ok")
"""


def _run_with_devices(script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        check=False,
    )


def test_model_call_splits_the_batch_over_cpu_devices():
    done = _run_with_devices(TWO_DEVICES, JAX_NUM_CPU_DEVICES="2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ok"


def test_split_batch_can_be_turned_off():
    script = (
        "import jax, numpy as np, onnx2jax\n"
        "model = onnx2jax.load(onnx2jax.example_path())\n"
        "out = model(np.zeros((256, 1, 8, 8), np.float32))['logits']\n"
        "print(len(jax.devices()), len(out.sharding.device_set))\n"
    )
    done = _run_with_devices(script, JAX_NUM_CPU_DEVICES="2", ONNX2JAX_SPLIT_BATCH="0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["2", "1"]


@pytest.mark.skipif(len(jax.devices()) > 1, reason="the test process has several devices")
def test_one_device_runs_the_batch_whole():
    assert split_devices({"x": np.zeros((8, 3), np.float32)}) == []
    model = onnx2jax.load(onnx2jax.example_path())
    out = model(np.zeros((256, 1, 8, 8), np.float32))["logits"]
    assert len(out.sharding.device_set) == 1 and not model.engine.replicas()
