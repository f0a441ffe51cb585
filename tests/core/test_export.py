"""Writing params back into ONNX: same graph, original dtypes, atomic writes, external data."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx2jax
from onnx2jax.core import export
from onnx2jax.core.errors import InputError


def tiny_model(dtype: type = np.float32, size: int = 4) -> onnx.ModelProto:
    """y = reshape((x * w + b) - w, [-1, 2, size // 2]); w is used by two nodes; int shape."""
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [
        numpy_helper.from_array(rng.standard_normal(size).astype(dtype), "w"),
        numpy_helper.from_array(rng.standard_normal(size).astype(dtype), "b"),
        numpy_helper.from_array(np.array([-1, 2, size // 2], np.int64), "shape"),
        numpy_helper.from_array(np.full(size, 0.5, dtype), "scale"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["xw"], name="mul"),
        helper.make_node("Add", ["xw", "b"], ["xwb"], name="add"),
        helper.make_node("Sub", ["xwb", "w"], ["d"], name="sub"),
        helper.make_node("Mul", ["d", "scale"], ["ds"], name="mul_scale"),
        helper.make_node("Reshape", ["ds", "shape"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", elem, ["n", size])],
        [helper.make_tensor_value_info("y", elem, None)],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
        producer_name="tests",
        doc_string="tiny test model",
    )
    helper.set_model_props(model, {"author": "onnx2jax tests"})
    return model


def ort_run(path_or_proto, feeds: dict) -> list[np.ndarray]:
    source = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def initializer_bytes(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in model.graph.initializer}


def test_unchanged_params_give_identical_proto():
    proto = tiny_model()
    model = onnx2jax.load(proto)
    assert sorted(model.params) == ["b", "scale", "w"]
    assert model.to_onnx().SerializeToString() == proto.SerializeToString()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_loaded_file_keeps_weights_once_and_exports_them_byte_for_byte(tmp_path, dtype):
    proto = tiny_model(dtype)
    path = tmp_path / "tiny.onnx"
    path.write_bytes(proto.SerializeToString())
    for source in (path, proto.SerializeToString()):
        model = onnx2jax.load(source)
        stored = {t.name: t for t in model.proto.graph.initializer}
        # float64 params compute as float32 under x64 off: their bytes stay in the proto.
        exact = np.dtype(dtype) == np.dtype(model.params["w"].dtype)
        assert sorted(model.released_weights) == (["b", "scale", "w"] if exact else [])
        assert all(stored[k].HasField("raw_data") != exact for k in ("b", "scale", "w"))
        assert stored["shape"].HasField("raw_data")  # constants keep their bytes
        if exact:
            assert model.to_onnx().SerializeToString() == proto.SerializeToString()
        tuned = {k: v + 1 for k, v in model.params.items()}
        np.testing.assert_allclose(
            numpy_helper.to_array(model.to_onnx(tuned).graph.initializer[0]),
            numpy_helper.to_array(proto.graph.initializer[0]) + 1,
            rtol=1e-3,
        )
        x = np.ones((3, 4), dtype)
        np.testing.assert_allclose(
            np.asarray(model(x)["y"]), ort_run(model.to_onnx(), {"x": x})[0], rtol=1e-3
        )


# The peak of this process's own memory (VmHWM; getrusage's maxrss would carry over the size
# of the pytest process that started it).
PEAK_OF_LOAD = """
import json, sys
import jax.numpy as jnp
import onnx2jax
jnp.zeros(1).block_until_ready()
def status_mb(key):
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024
before = status_mb("VmRSS")
model = onnx2jax.load(sys.argv[1])
peak = status_mb("VmHWM")
print(json.dumps({"peak_mb": peak - before, "params": sorted(model.released_weights)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_load_frees_the_parsed_file_before_copying_weights_to_the_device(tmp_path):
    # One 192 MiB weight. Parsing needs the file's bytes and the proto (2x), decoding the proto
    # and the array (2x), copying to the device the array and its copy (2x); holding the proto
    # until the device copy exists would take 3x.
    weight = np.ones((6144, 8192), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8192])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    path = tmp_path / "big.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    done = subprocess.run(
        [sys.executable, "-c", PEAK_OF_LOAD, str(path)], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["params"] == ["w"]
    assert result["peak_mb"] < 2.5 * weight.nbytes / 2**20, result


def test_a_proto_passed_in_is_left_untouched():
    proto = tiny_model()
    before = proto.SerializeToString()
    model = onnx2jax.load(proto)
    assert model.released_weights == {} and model.proto is proto
    assert proto.SerializeToString() == before
    assert model.to_onnx({}).SerializeToString() == proto.SerializeToString()


def test_changed_params_keep_graph_and_other_bytes(tmp_path: Path):
    proto = tiny_model()
    model = onnx2jax.load(proto)
    params = dict(model.params, w=model.params["w"] + 1.0)
    path = tmp_path / "tuned.onnx"
    report = model.save(path, params, verify=True)
    assert report is not None and report.worst < 1e-6, report
    saved = onnx.load(str(path))
    assert [n.SerializeToString() for n in saved.graph.node] == [
        n.SerializeToString() for n in proto.graph.node
    ]
    assert [t.name for t in saved.graph.initializer] == [t.name for t in proto.graph.initializer]
    assert saved.opset_import == proto.opset_import
    assert saved.metadata_props == proto.metadata_props
    assert (saved.producer_name, saved.doc_string, saved.ir_version) == (
        proto.producer_name,
        proto.doc_string,
        proto.ir_version,
    )
    before, after = initializer_bytes(proto), initializer_bytes(saved)
    assert [k for k in before if before[k] != after[k]] == ["w"]
    np.testing.assert_array_equal(
        numpy_helper.to_array(saved.graph.initializer[0]), np.asarray(params["w"])
    )
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    (got,) = ort_run(str(path), {"x": x})
    np.testing.assert_allclose(got, np.asarray(model.apply(params, x)["y"]), atol=1e-6)
    # The saved file loads back in onnx2jax with the new values.
    reloaded = onnx2jax.load(path)
    np.testing.assert_array_equal(np.asarray(reloaded.params["w"]), np.asarray(params["w"]))


def test_float16_stays_float16():
    proto = tiny_model(np.float16)
    model = onnx2jax.load(proto)
    assert model.params["w"].dtype == jnp.float16
    # Training in float32 and handing float32 values back still writes float16.
    params = {k: v.astype(jnp.float32) * 3 for k, v in model.params.items()}
    params["b"] = model.params["b"]
    saved = model.to_onnx(params)
    by_name = {t.name: t for t in saved.graph.initializer}
    assert by_name["w"].data_type == TensorProto.FLOAT16
    np.testing.assert_array_equal(
        numpy_helper.to_array(by_name["w"]), np.asarray(params["w"]).astype(np.float16)
    )
    before, after = initializer_bytes(proto), initializer_bytes(saved)
    assert before["b"] == after["b"] and before["shape"] == after["shape"]
    x = np.ones((2, 4), np.float16)
    (got,) = ort_run(saved, {"x": x})
    assert got.dtype == np.float16


def test_a_change_of_sign_of_zero_is_a_change():
    """Values are compared bit for bit: -0.0 equals 0.0 as a number, yet is other bytes."""
    proto = tiny_model()
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros(4, np.float32), "w"))
    model = onnx2jax.load(proto)
    saved = model.to_onnx({"w": jnp.array([-0.0, 0.0, -0.0, 0.0], jnp.float32)})
    w = numpy_helper.to_array(saved.graph.initializer[0])
    assert np.signbit(w).tolist() == [True, False, True, False]
    assert model.to_onnx({"w": jnp.zeros(4)}).SerializeToString() == proto.SerializeToString()


def test_bad_params_are_rejected():
    model = onnx2jax.load(tiny_model())
    with pytest.raises(InputError, match="shape"):
        model.to_onnx({"w": jnp.zeros((5,))})
    with pytest.raises(InputError, match="not params"):
        model.to_onnx({"shape": jnp.zeros((3,))})
    with pytest.raises(InputError, match="holds <U1 values"):
        model.to_onnx({"w": np.array(["a", "b", "c", "d"])})


def data_files(folder: Path, name: str) -> list[Path]:
    """The external-data files save() wrote for ``name`` in ``folder``."""
    return sorted(folder.glob(f"{name}.*.data"))


def test_external_data_reloads_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(export, "EXTERNAL_THRESHOLD", 100)
    model = onnx2jax.load(tiny_model(size=64))
    params = {k: v * 2 for k, v in model.params.items()}
    path = tmp_path / "ext.onnx"
    model.save(path, params, external_data=True)
    assert len(data_files(tmp_path, "ext.onnx")) == 1
    stored = onnx.load(str(path), load_external_data=False)
    assert all(
        t.data_location == TensorProto.EXTERNAL
        for t in stored.graph.initializer
        if t.name != "shape"
    )
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    want = np.asarray(model.apply(params, x)["y"])
    reloaded = onnx2jax.load(path)
    np.testing.assert_array_equal(np.asarray(reloaded.apply(reloaded.params, x)["y"]), want)
    np.testing.assert_allclose(ort_run(str(path), {"x": x})[0], want, atol=1e-6)
    # A model read with external data saves again, inline, elsewhere.
    again = tmp_path / "sub" / "inline.onnx"
    assert reloaded.save(again, verify=True).worst < 1e-6
    assert not data_files(tmp_path / "sub", "inline.onnx")
    again_model = onnx2jax.load(again)
    np.testing.assert_array_equal(np.asarray(again_model.apply(again_model.params, x)["y"]), want)


def test_interrupted_save_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    model = onnx2jax.load(tiny_model(size=512))
    path = tmp_path / "model.onnx"
    model.save(path)
    old = path.read_bytes()

    def broken(graph, handle, location):
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_move_to_external", broken)
    params = {k: v + 1 for k, v in model.params.items()}
    with pytest.raises(KeyboardInterrupt):
        model.save(path, params, external_data=True)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(export.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        model.save(path, params)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_saving_again_never_mixes_graph_and_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A save killed between writing the new data and replacing the .onnx leaves the old .onnx
    reading the old weights; a finished save removes the data file it superseded."""
    monkeypatch.setattr(export, "EXTERNAL_THRESHOLD", 100)
    model = onnx2jax.load(tiny_model(size=64))
    path = tmp_path / "model.onnx"
    model.save(path, external_data=True)
    x = np.ones((2, 64), np.float32)
    want_old = np.asarray(model.apply(model.params, x)["y"])
    params = {k: v * 3 for k, v in model.params.items()}
    real_replace = os.replace

    def killed_before_onnx(src, dst):
        if str(dst).endswith(".onnx"):
            raise KeyboardInterrupt  # the process dies between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", killed_before_onnx)
    with pytest.raises(KeyboardInterrupt):
        model.save(path, params, external_data=True)
    monkeypatch.setattr(export.os, "replace", real_replace)
    old = onnx2jax.load(path)
    np.testing.assert_array_equal(np.asarray(old.apply(old.params, x)["y"]), want_old)
    assert len(data_files(tmp_path, "model.onnx")) == 1

    model.save(path, params, external_data=True)
    new = onnx2jax.load(path)
    np.testing.assert_array_equal(
        np.asarray(new.apply(new.params, x)["y"]), np.asarray(model.apply(params, x)["y"])
    )
    assert len(data_files(tmp_path, "model.onnx")) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_killed_saves_temporaries_are_removed_by_the_next_save(tmp_path: Path):
    """A save killed with SIGKILL leaves a temporary the size of the model; the next save of the
    same path deletes it, while a temporary another process still writes (locked) stays."""
    model = onnx2jax.load(tiny_model(size=64))
    path = tmp_path / "model.onnx"
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
import os, signal, onnx2jax
from onnx2jax.core import export
from tests.core.test_export import tiny_model
model = onnx2jax.load(tiny_model(size=64))
def die(graph, handle, location):
    handle.write(b"x" * 4096)
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
export._move_to_external = die
model.save({str(path)!r}, external_data=True)
""",
        ],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -9, child.stderr
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers, "the killed save should have left its temporary"
    busy = tmp_path / ".model.onnx.busy.onnx2jax-tmp"
    with open(busy, "wb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        model.save(path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [busy.name, "model.onnx"]


def test_example_cnn_roundtrip(tmp_path: Path):
    model = onnx2jax.load(onnx2jax.example_path())
    original = onnx.load(str(onnx2jax.example_path()))
    assert model.to_onnx().SerializeToString() == original.SerializeToString()
    params = {k: v * 1.5 for k, v in model.params.items()}
    report = model.save(tmp_path / "cnn.onnx", params, verify=True)
    assert report.worst < 1e-4, report


def test_large_models_get_external_data_automatically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Over the protobuf limit (2 GB, lowered here) the tensors go to a .data file."""
    monkeypatch.setattr(export, "PROTO_LIMIT", 1000)
    model = onnx2jax.load(tiny_model(size=512))
    path = tmp_path / "big.onnx"
    model.save(path, {"w": model.params["w"] * 3})
    [data] = data_files(tmp_path, "big.onnx")
    assert data.stat().st_size >= 3 * 512 * 4
    assert path.stat().st_size < 1000
    x = np.ones((2, 512), np.float32)
    reloaded = onnx2jax.load(path)
    np.testing.assert_allclose(
        ort_run(str(path), {"x": x})[0],
        np.asarray(reloaded.apply(reloaded.params, x)["y"]),
        atol=1e-6,
    )
