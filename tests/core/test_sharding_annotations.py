"""ONNX's own sharding annotations (ShardingSpecProto) as the default sharding of load.

The mapping onto a mesh is checked here on abstract meshes; loading, running and training on
8 CPU devices in a process of its own (``python tests/core/test_sharding_annotations.py
MODEL OUT``, JAX fixing its device count when it starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import onnx
import onnxruntime
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from onnx import TensorProto, helper, numpy_helper

import onnx2jax
from onnx2jax.core.sharding import annotated_sharding

ROOT = Path(__file__).resolve().parents[2]


def annotate(
    node: onnx.NodeProto,
    tensor: str,
    splits: list[tuple[int, int]],
    devices: list[int],
    configuration: str = "eight",
    groups: dict[int, list[int]] | None = None,
) -> None:
    """Give ``node`` a ShardingSpecProto for its input ``tensor``: ``splits`` are
    (axis, shards) pairs, ``devices`` one device (or group key of ``groups``) per shard."""
    config = next(
        (c for c in node.device_configurations if c.configuration_id == configuration), None
    )
    if config is None:
        config = node.device_configurations.add(configuration_id=configuration)
    spec = config.sharding_spec.add(tensor_name=tensor, device=devices)
    for key, members in (groups or {}).items():
        spec.index_to_device_group_map.add(key=key, value=members)
    for axis, shards in splits:
        spec.sharded_dim.add(axis=axis).simple_sharding.add(num_shards=shards)


def mlp(devices: int = 8, splits: int = 8) -> onnx.ModelProto:
    """A two-layer perceptron whose weights carry annotations: ``w1`` split on its output
    axis, ``w2`` on its input axis (Megatron's pair), ``b1`` replicated on a device group."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.normal(size=(16, 64)) / 4,
        "b1": rng.normal(size=64),
        "w2": rng.normal(size=(64, 16)) / 8,
    }
    first = helper.make_node("MatMul", ["x", "w1"], ["m1"], name="first")
    bias = helper.make_node("Add", ["m1", "b1"], ["a1"], name="bias")
    second = helper.make_node("MatMul", ["r1", "w2"], ["y"], name="second")
    annotate(first, "w1", [(1, splits)], list(range(splits)))
    annotate(bias, "b1", [], [-1], groups={-1: list(range(devices))})
    annotate(second, "w2", [(-2, splits)], list(range(splits)))
    annotate(second, "r1", [(1, splits)], list(range(splits)))  # an activation: left to XLA
    graph = helper.make_graph(
        [first, bias, helper.make_node("Relu", ["a1"], ["r1"]), second],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.configuration.add(name="eight", num_devices=devices)
    return model


def test_annotations_map_onto_the_mesh():
    mesh, specs = annotated_sharding(mlp(), AbstractMesh((8,), ("data",)))
    assert specs == {"w1": P(None, "data"), "b1": P(), "w2": P("data")}
    # On two axes, a split of 8 takes both; a split of 4 the axis of 4 devices.
    _, specs = annotated_sharding(mlp(), AbstractMesh((2, 4), ("data", "model")))
    assert specs["w1"] == P(None, ("data", "model"))
    _, specs = annotated_sharding(mlp(splits=4), AbstractMesh((2, 4), ("data", "model")))
    assert specs == {"w1": P(None, "model"), "b1": P(), "w2": P("model")}
    # Two axes split: each onto its own mesh axis.
    model = mlp()
    del model.graph.node[0].device_configurations[:]
    annotate(model.graph.node[0], "w1", [(0, 2), (1, 4)], list(range(8)))
    _, specs = annotated_sharding(model, AbstractMesh((2, 4), ("data", "model")))
    assert specs["w1"] == P("data", "model")
    # No annotation on any initializer: no default.
    plain = mlp()
    for node in plain.graph.node:
        del node.device_configurations[:]
    assert annotated_sharding(plain, AbstractMesh((8,), ("data",))) is None


@pytest.mark.parametrize(
    ("change", "mesh", "message"),
    [
        (lambda m: m.configuration[0].__setattr__("name", "other"), (8,), "does not declare"),
        (None, (4,), "do not fit the mesh of 4 devices"),
        (
            lambda m: m.graph.node[0].device_configurations[0].sharding_spec[0].device.remove(7),
            (8,),
            "not one device or group per shard",
        ),
        (
            lambda m: (
                m.graph.node[0]
                .device_configurations[0]
                .sharding_spec[0]
                .sharded_dim[0]
                .__setattr__("axis", 2)
            ),
            (8,),
            "names axis 2 of a param of shape",
        ),
        (
            lambda m: (
                m.graph.node[0]
                .device_configurations[0]
                .sharding_spec[0]
                .__setattr__("tensor_name", "w2")
            ),
            (8,),
            "neither reads nor writes",
        ),
        (
            lambda m: annotate(m.graph.node[3], "w2", [(1, 8)], list(range(8))),
            (8,),
            "another node's annotation",
        ),
        (
            lambda m: (
                m.graph.node[0]
                .device_configurations[0]
                .sharding_spec[0]
                .sharded_dim[0]
                .simple_sharding.add(num_shards=1)
            ),
            (8,),
            "one simple sharding per axis",
        ),
        (lambda m: mlp(splits=4), (2, 2, 2), "no unused axis of the mesh"),
    ],
)
def test_annotations_that_do_not_fit_are_errors(change, mesh, message):
    model = mlp()
    if change is not None:
        changed = change(model)
        model = changed if isinstance(changed, onnx.ModelProto) else model
    names = ("data", "model", "pipe")[: len(mesh)]
    with pytest.raises(onnx2jax.ShardingError, match=message):
        annotated_sharding(model, AbstractMesh(mesh, names))


def test_too_few_devices_loads_whole_with_a_warning_and_onnxruntime_runs_it():
    model = mlp(devices=len(jax.devices()) + 1, splits=1)
    x = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
    with pytest.warns(UserWarning, match="they are ignored"):
        loaded = onnx2jax.load(model.SerializeToString())
    assert loaded.mesh is None
    # onnxruntime ignores the annotations, and agrees.
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (want,) = session.run(["y"], {"x": x})
    np.testing.assert_allclose(np.asarray(loaded(x)["y"]), want, atol=1e-5)
    # An explicit sharding overrides the annotations.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replicated = onnx2jax.load(model.SerializeToString(), sharding="replicated")
    assert all(v.sharding.spec == P() for v in replicated.params.values())


def test_annotated_model_on_eight_devices(tmp_path: Path):
    """Loaded with no sharding argument on 8 devices, the params take the annotated specs, each
    device holding its part; outputs and a train step equal the unannotated model's, and
    onnxruntime runs the annotated file."""
    path = tmp_path / "mlp.onnx"
    onnx.save_model(mlp(), str(path))
    out = tmp_path / "report.json"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": "8",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, __file__, str(path), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["devices"] == 8
    assert report["specs"] == {"w1": "P(None, 'data')", "b1": "P()", "w2": "P('data',)"}
    assert report["fractions"] == {"w1": [0.125], "b1": [1.0], "w2": [0.125]}
    assert report["output_error"] < 1e-5
    assert report["grad_error"] < 1e-5
    x = np.asarray(report["x"], np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (want,) = session.run(["y"], {"x": x})
    np.testing.assert_allclose(np.asarray(report["y"]), want, atol=1e-5)


def _eight_devices(path: str, out: str) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    model = onnx2jax.load(path)
    plain = onnx.load(path)
    for node in plain.graph.node:
        del node.device_configurations[:]
    del plain.configuration[:]
    reference = onnx2jax.load(plain.SerializeToString())
    x = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
    y = np.asarray(model(x)["y"])

    def loss(params, model=model):
        return (model.apply(params, x)["y"] ** 2).mean()

    grads = jax.jit(jax.grad(loss))(model.params)
    want = jax.grad(lambda p: loss(p, reference))(reference.params)
    report = {
        "devices": len(jax.devices()),
        "specs": {k: str(v.sharding.spec) for k, v in model.params.items()},
        "fractions": {
            k: sorted({s.data.size / v.size for s in v.addressable_shards})
            for k, v in model.params.items()
        },
        "output_error": float(np.abs(y - np.asarray(reference(x)["y"])).max()),
        "grad_error": max(
            float(np.abs(np.asarray(grads[k]) - np.asarray(want[k])).max()) for k in want
        ),
        "x": x.tolist(),
        "y": y.tolist(),
    }
    Path(out).write_text(json.dumps(report))


if __name__ == "__main__":
    _eight_devices(*sys.argv[1:3])
