"""Params loaded as sharded jax.Arrays on a mesh (onnx2jax/core/sharding.py).

The 8-device checks run tests/core/sharding_check.py in a process of its own (JAX fixes its
device count when it starts); the graph analysis of the "tensor" preset is checked here on
an abstract mesh.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from onnx import TensorProto, helper, numpy_helper

import onnx2jax
from onnx2jax.core.graph import model_opsets, plan_graph
from onnx2jax.core.sharding import fsdp_spec, tensor_parallel_specs
from tests.models.exports import export_transformers_variant

ROOT = Path(__file__).resolve().parents[2]


def _block() -> onnx.ModelProto:
    """An attention block and an MLP with separate query, key and value weights (BERT's
    layout), Gemm with transB for the output projection, and biases added after MatMuls."""
    rng = np.random.default_rng(0)
    shapes = {
        "wq": (16, 16),
        "wk": (16, 16),
        "wv": (16, 16),
        "bq": (16,),
        "wo": (16, 16),
        "bo": (16,),
        "w1": (16, 64),
        "b1": (64,),
        "w2": (64, 16),
        "norm": (16,),
    }
    inits = [
        numpy_helper.from_array(rng.normal(size=s).astype(np.float32), k) for k, s in shapes.items()
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q0"]),
        helper.make_node("Add", ["q0", "bq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[1, 0]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["attended"]),
        helper.make_node("Gemm", ["attended", "wo", "bo"], ["o"], transB=1),
        helper.make_node("Add", ["o", "x"], ["h"]),
        helper.make_node("Mul", ["h", "norm"], ["hn"]),
        helper.make_node("MatMul", ["hn", "w1"], ["u0"]),
        helper.make_node("Add", ["u0", "b1"], ["u"]),
        helper.make_node("Relu", ["u"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_tensor_preset_splits_pairs_of_weight_products():
    proto = _block()
    opsets = model_opsets(proto)
    plan = plan_graph(proto.graph, opsets, None)
    shapes = {k: (v.shape, v.dtype) for k, v in plan.param_values.items()}
    specs = tensor_parallel_specs(plan, shapes, AbstractMesh((4,), ("model",)))
    column, row = P(None, "model"), P("model")
    assert specs == {
        "wq": column,
        "wk": column,
        "wv": column,
        "bq": row,
        "wo": P(None, "model"),  # Gemm(transB=1): the input axis is the second
        "w1": column,
        "b1": row,
        "w2": P("model", None),
    }
    # An axis the model axis's size does not divide stays whole.
    assert tensor_parallel_specs(plan, shapes, AbstractMesh((3,), ("model",))) == {}


def test_fsdp_splits_the_largest_divisible_axis_of_large_params():
    assert fsdp_spec((32, 96), 8, "data") == P(None, "data")
    assert fsdp_spec((100, 32), 8, "data") == P(None, "data")
    assert fsdp_spec((64, 32), 8, "data") == P("data", None)
    assert fsdp_spec((99, 33), 8, "data") is None
    assert fsdp_spec((96,), 8, "data") is None  # small: replicated
    assert fsdp_spec((32, 96), 1, "data") is None


def test_one_device_mesh_and_errors_in_process():
    model = onnx2jax.load(onnx2jax.example_path(), sharding="fsdp")
    plain = onnx2jax.load(onnx2jax.example_path())
    assert model.mesh is not None and plain.mesh is None and plain.shardings is None
    assert set(model.shardings) == set(model.params)
    x = np.random.default_rng(0).normal(size=(4, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(model(x)["logits"]), np.asarray(plain(x)["logits"]), atol=1e-4
    )
    with pytest.raises(onnx2jax.ShardingError, match="unknown sharding preset"):
        onnx2jax.load(onnx2jax.example_path(), sharding="zero")
    with pytest.raises(onnx2jax.ShardingError, match="names mesh axis 'model'"):
        onnx2jax.load(onnx2jax.example_path(), sharding=[("*", P("model"))])
    with pytest.raises(onnx2jax.ShardingError, match="has 1 axes"):
        onnx2jax.load(onnx2jax.example_path(), sharding=[("10.bias", P(None, "data"))])


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny GPT-2 exported by torch (batch and length dynamic), inline and with external data."""
    folder = tmp_path_factory.mktemp("gpt2")
    inline = folder / "gpt2.onnx"
    export_transformers_variant("gpt2", inline)
    (folder / "ext").mkdir()
    external = folder / "ext" / "gpt2.onnx"
    onnx.save_model(
        onnx.load(str(inline)),
        str(external),
        save_as_external_data=True,
        location="gpt2.onnx.data",
        size_threshold=0,
    )
    return inline, external


def _script(name: str, *args: str, devices: int, log: Path) -> subprocess.Popen:
    """The script ``name`` of this folder with JAX on ``devices`` CPU devices; its output to
    ``log`` (a file, so that processes that wait on each other never wait on a full pipe)."""
    with open(log, "w") as handle:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "core" / name), *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={
                **os.environ,
                "JAX_PLATFORMS": "cpu",
                "JAX_NUM_CPU_DEVICES": str(devices),
                # The checkout's onnx2jax, installed or not (a script's folder is on its path,
                # not the working directory).
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
                ),
            },
        )


def _finished(process: subprocess.Popen, log: Path) -> None:
    process.wait(timeout=1200)
    assert process.returncode == 0, log.read_text()[-4000:]


@pytest.mark.slow
def test_gpt2_on_eight_devices(gpt2: tuple[Path, Path], tmp_path: Path):
    """fsdp and tensor: each device holds 1/8 of each split param; outputs, three adam steps,
    fit and LoRA match the unsharded model; saves are byte-identical to unsharded ones and
    onnxruntime agrees; orbax restores the shardings; rules, callables and their errors."""
    inline, external = gpt2
    out = tmp_path / "report.json"
    log = tmp_path / "log.txt"
    script = _script("sharding_check.py", str(inline), str(external), str(out), devices=8, log=log)
    _finished(script, log)
    report = json.loads(out.read_text())
    unsharded = report["unsharded_losses"]
    for key in ("fsdp/inline", "fsdp/external", "tensor/inline", "tensor/external"):
        entry = report[key]
        split = {k: v for k, v in entry["shards"].items() if v[0] != "P()"}
        assert split, key
        for name, (spec, fractions, count) in entry["shards"].items():
            assert count == 8, (key, name)
            assert fractions == ([1 / 8] if name in split else [1.0]), (key, name, spec)
        assert entry["call_error"] < 1e-5 and entry["jit_error"] < 1e-5, (key, entry)
        if key.endswith("inline"):
            np.testing.assert_allclose(entry["losses"], unsharded, atol=1e-5)
            assert entry["kept_shardings"], key
            assert entry["step_error"] < 1e-5, (key, entry["step_error"])
            assert entry["save_identical"], key
            assert entry["onnxruntime_error"] < 1e-5, key
            assert entry["auto_external"] and entry["auto_error"] < 1e-5, key
    assert (
        "P(None, 'data')"
        in report["tensor/inline"]["shards"]["inner.transformer.h.0.attn.c_attn.weight"]
    )
    assert report["tensor/inline"]["shards"]["inner.transformer.h.0.attn.c_proj.weight"][0] == (
        "P('data',)"
    )
    # Under fsdp every param of 1024 values or more that 8 divides along an axis is split.
    assert report["fsdp/inline"]["shards"]["inner.transformer.wte.weight"][0] == "P(None, 'data')"

    np.testing.assert_allclose(report["fit_losses"], unsharded, atol=1e-5)
    assert report["fit_error"] < 1e-5 and report["fit_kept"]
    np.testing.assert_allclose(*report["lora_losses"], atol=1e-5)
    assert report["lora_losses"][0][-1] < report["lora_losses"][0][0]
    assert report["lora_error"] < 1e-5
    assert report["restored_equal"] and report["restored_shardings"]
    assert min(report["restored_sharded"]) > 0

    specs = report["two_axis_specs"]
    assert specs["inner.transformer.h.0.mlp.c_fc.weight"] == "P(None, 'model')"
    assert specs["inner.transformer.h.0.mlp.c_proj.weight"] == "P('model',)"
    assert report["two_axis_error"] < 1e-5
    assert {k for k, v in report["rule_specs"].items() if v != "P()"} == {
        "inner.transformer.h.0.mlp.c_fc.weight",
        "inner.transformer.h.1.mlp.c_fc.weight",
    }
    assert report["function_specs"]["inner.transformer.wte.weight"] == "P()"
    assert report["function_specs"]["inner.transformer.wpe.weight"] == "P('data',)"
    errors = report["errors"]
    assert "unknown sharding preset 'zero3'" in errors["preset"]
    assert "(pattern, PartitionSpec) pair" in errors["rule"]
    assert "not a jax.sharding.PartitionSpec" in errors["spec"]
    assert "names mesh axis 'model'" in errors["axis"]
    assert "axis 0 of size 100 into 8 parts" in errors["indivisible"]
    assert "not of type Auto" in errors["explicit"]


@pytest.mark.slow
def test_two_processes_fine_tune_as_one(gpt2: tuple[Path, Path], tmp_path: Path):
    """Two processes of four CPU devices joined by jax.distributed train a "fsdp" GPT-2 three
    steps on a batch split over all eight devices: the same losses and params as one process
    with eight devices; an orbax checkpoint both write restores the same shards."""
    inline = str(gpt2[0])
    logs = [tmp_path / f"log{i}.txt" for i in range(3)]
    one_file, ckpt = str(tmp_path / "one.npz"), str(tmp_path / "one-ckpt")
    single = _script("sharding_processes.py", inline, one_file, ckpt, devices=8, log=logs[2])
    _finished(single, logs[2])
    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    pair = [
        _script(
            "sharding_processes.py",
            *(inline, str(tmp_path / f"{i}.npz"), str(tmp_path / "ckpt"), str(i), "2", port),
            devices=4,
            log=logs[i],
        )
        for i in range(2)
    ]
    for process, log in zip(pair, logs, strict=False):
        _finished(process, log)
    one = np.load(tmp_path / "one.npz")
    held = set()
    for i in range(2):
        part = np.load(tmp_path / f"{i}.npz")
        np.testing.assert_allclose(part["losses"], one["losses"], atol=1e-5)
        assert part["restored_same"] and one["restored_same"]
        for key in part.files:
            np.testing.assert_allclose(part[key], one[key], atol=1e-5, err_msg=key)
            held.add(key)
    # Between them the two processes hold every shard of every param.
    assert held == set(one.files)
    # Each process wrote its own shards of the checkpoint (orbax's per-process stores).
    written = {p.name for p in (tmp_path / "ckpt" / "3" / "default").glob("ocdbt.process_*")}
    assert written == {"ocdbt.process_0", "ocdbt.process_1"}
    # The two processes' save holds exactly the shards they trained, and the one process's
    # save its own (the two trainings sum in different orders).
    for saved, parts in (("ckpt-saved", ["0.npz", "1.npz"]), ("one-ckpt-saved", ["one.npz"])):
        stored = onnx.load(str(tmp_path / saved / "tuned.onnx"))
        values = {t.name: numpy_helper.to_array(t) for t in stored.graph.initializer}
        for part in parts:
            shards = np.load(tmp_path / part)
            for key in shards.files:
                if "|" in key:
                    name, index = key.split("|")
                    np.testing.assert_array_equal(values[name][_slices(index)], shards[key])


def _slices(index: str) -> tuple[slice, ...]:
    """The slices sharding_processes.py wrote as ``start:stop;start:stop``."""
    return tuple(
        slice(*(None if v == "None" else int(v) for v in part.split(":")))
        for part in index.split(";")
    )
