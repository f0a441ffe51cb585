"""The onnx2jax command, run as a subprocess as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx2jax
from onnx2jax.cli import main
from tests.hub_cache import put_in_cache


def onnx2jax_command(
    *args: str, env: dict[str, str] | None = None, code: str | None = None, cwd: str | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m onnx2jax ARGS`` (or ``python -c CODE ARGS``) and capture its output."""
    command = (
        [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "onnx2jax", *args]
    )
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
    )


@pytest.fixture(scope="module")
def affine(tmp_path_factory):
    """y = x * w + b over a named batch dimension, and z = relu(y)."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
            helper.make_node("Relu", ["y"], ["z"]),
        ],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3]),
        ],
        initializer=[
            numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b"),
        ],
    )
    path = tmp_path_factory.mktemp("affine") / "affine.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_every_command_has_help(capsys):
    result = subprocess.run(
        [shutil.which("onnx2jax") or "onnx2jax", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    for command in ("info", "run", "check", "bench", "hf://"):
        assert command in result.stdout
    for command in ("info", "run", "check", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "--json" in capsys.readouterr().out


def test_info_reports_ops_params_and_unsupported_ops(tmp_path):
    proto = onnx.load(onnx2jax.example_path())
    result = onnx2jax_command("info", str(onnx2jax.example_path()), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["inputs"] == [
        {
            "name": "image",
            "kind": "tensor",
            "dtype": "float32",
            "shape": [
                proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param or None,
                1,
                8,
                8,
            ],
        }
    ]
    assert info["outputs"][0]["name"] == "logits"
    assert info["opsets"] == {"ai.onnx": 17}
    assert info["ops"]["ai.onnx::Conv"] == 2 and info["nodes"] == len(proto.graph.node)
    count = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    assert info["parameters"]["values"] == count and info["parameters"]["bytes"] == 4 * count
    assert info["unsupported"] == []

    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("FancyOp", ["r"], ["y"], domain="com.example", name="fancy"),
        ],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    custom = tmp_path / "custom.onnx"
    onnx.save(
        helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
        ),
        custom,
    )
    result = onnx2jax_command("info", str(custom))
    assert result.returncode == 0, result.stderr
    assert "com.example::FancyOp (opset 1): 1 node(s): fancy" in result.stdout
    assert "1  ai.onnx::Relu" in result.stdout and "x: float32[2]" in result.stdout


def test_run_without_a_model_shows_the_example_predictions():
    samples = np.load(onnx2jax.example_path().parent / "digits_samples.npz")
    result = onnx2jax_command("run")
    assert result.returncode == 0, result.stderr
    assert "sample  predicted  true" in result.stdout
    table = result.stdout.split("sample  predicted  true")[1].strip().splitlines()[:-1]
    rows = [line.split() for line in table]
    assert [int(r[2]) for r in rows] == samples["labels"].tolist()
    correct = sum(r[1] == r[2] for r in rows)
    assert f"{correct}/{len(rows)} correct" in result.stdout
    assert correct >= 0.8 * len(rows)

    document = json.loads(onnx2jax_command("run", "--json", "--quiet").stdout)
    assert document["labels"] == samples["labels"].tolist()
    assert document["correct"] == correct


def test_run_with_input_files_dims_and_output(tmp_path, affine):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(tmp_path / "x.npy", x)
    result = onnx2jax_command(
        "run",
        str(affine),
        "--input",
        f"x={tmp_path / 'x.npy'}",
        "--output",
        str(tmp_path / "out.npz"),
    )
    assert result.returncode == 0, result.stderr
    assert "y  float32[2, 3]" in result.stdout and "converting affine.onnx" in result.stderr
    model = onnx2jax.load(affine)
    saved = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(saved["y"], model(x)["y"], rtol=1e-6)
    np.testing.assert_allclose(saved["z"], np.maximum(saved["y"], 0))

    result = onnx2jax_command("run", str(affine), "--dim", "batch=5", "--json", "--quiet")
    assert result.returncode == 0 and result.stderr == ""
    document = json.loads(result.stdout)
    assert document["inputs"]["x"]["shape"] == [5, 3]
    assert document["outputs"]["z"]["shape"] == [5, 3] and document["outputs"]["z"]["min"] >= 0

    result = onnx2jax_command("run", str(affine), "--dim", "seq=5")
    assert result.returncode == 2 and "named dimensions are ['batch']" in result.stderr
    assert "Traceback" not in result.stderr


def test_errors_are_messages_not_tracebacks(tmp_path):
    result = onnx2jax_command("check", str(tmp_path / "missing.onnx"))
    assert result.returncode == 2
    assert "onnx2jax: error: model file not found" in result.stderr
    assert "Traceback" not in result.stderr

    empty_cache = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    result = onnx2jax_command("info", "hf://org/absent/onnx/model.onnx", env=empty_cache)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "'onnx/model.onnx' of hub repo 'org/absent' (revision main): it is not in the "
        "Hugging Face cache"
    ) in result.stderr


def test_run_and_info_from_a_hub_address_offline(tmp_path, affine):
    put_in_cache(
        tmp_path / "cache", "org/affine", {"onnx/affine.onnx": affine}, refs=("main", "v1")
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    result = onnx2jax_command("run", "hf://org/affine@v1/onnx/affine.onnx", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert "fetching 'onnx/affine.onnx' of hub repo 'org/affine' (revision v1)" in result.stderr
    assert json.loads(result.stdout)["outputs"]["y"]["shape"] == [1, 3]


BREAK_ADD = textwrap.dedent("""
    import dataclasses, sys
    from onnx2jax.ops import registry

    versions = registry._REGISTRY[("", "Add")]
    versions.specs = [dataclasses.replace(spec, function=lambda ctx, a, b: a + b + 1e-3)
                      for spec in versions.specs]
    from onnx2jax.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_check_passes_and_fails_on_a_broken_op(affine):
    result = onnx2jax_command("check", str(affine), "--dim", "batch=4")
    assert result.returncode == 0, result.stderr
    assert "OK: all 2 outputs match" in result.stdout
    assert "ok        y  float32[4, 3]  max abs error" in result.stdout

    result = onnx2jax_command("check", str(affine), "--dim", "batch=4", code=BREAK_ADD)
    assert result.returncode == 1, result.stderr
    assert "MISMATCH  y  float32[4, 3]  max abs error 0.001" in result.stdout
    assert "MISMATCH in" in result.stdout

    result = onnx2jax_command(
        "check", str(affine), "--json", "--quiet", "--atol", "1e-2", code=BREAK_ADD
    )
    assert result.returncode == 0  # within a looser tolerance
    document = json.loads(result.stdout)
    assert document["match"] and document["outputs"]["y"]["max_abs_error"] == pytest.approx(
        1e-3, rel=1e-2
    )


def test_bench_times_both_engines(affine):
    result = onnx2jax_command("bench", str(affine), "--runs", "5", "--dim", "batch=8", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["onnx2jax"]["runs"] == document["onnxruntime"]["runs"] == 5
    assert document["onnx2jax"]["median_ms"] > 0 and document["onnxruntime"]["median_ms"] > 0
    assert document["ratio"] == pytest.approx(
        document["onnx2jax"]["median_ms"] / document["onnxruntime"]["median_ms"]
    )
    text = onnx2jax_command("bench", str(affine), "--runs", "3", "--quiet").stdout
    assert "onnx2jax / onnxruntime =" in text and "median" in text


def test_check_with_bfloat16_products_reports_their_error():
    example = str(onnx2jax.example_path())
    exact = json.loads(onnx2jax_command("check", example, "--json", "--quiet").stdout)
    result = onnx2jax_command(
        "check",
        example,
        "--precision",
        "bfloat16",
        "--json",
        "--quiet",
        "--rtol",
        "0.1",
        "--atol",
        "0.1",
    )
    assert result.returncode == 0, result.stderr
    rounded = json.loads(result.stdout)
    error = rounded["outputs"]["logits"]["max_abs_error"]
    assert exact["outputs"]["logits"]["max_abs_error"] < 1e-4 < error < 0.1
    assert onnx2jax_command("run", "--precision", "float16").returncode == 2


def test_run_prints_outputs_in_the_declared_order(tmp_path, capsys):
    # jax.jit returns dicts with sorted keys; the outputs here are declared unsorted.
    graph = helper.make_graph(
        [
            helper.make_node("Neg", ["x"], ["b_early"]),
            helper.make_node("Relu", ["b_early"], ["z"]),
            helper.make_node("Shape", ["x"], ["a_shape"]),
        ],
        "order",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_value_info(n, onnx.TypeProto()) for n in ("z", "x", "a_shape", "b_early")],
    )
    path = tmp_path / "order.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path
    )
    declared = ["z", "x", "a_shape", "b_early"]
    assert main(["run", str(path), "--json", "--quiet"]) == 0
    assert list(json.loads(capsys.readouterr().out)["outputs"]) == declared
    assert main(["run", str(path), "--quiet"]) == 0
    text = capsys.readouterr().out
    printed = [line.split()[0] for line in text.split("outputs\n", 1)[1].splitlines()]
    assert printed == declared
