"""The loader fuzzer (onnx2jax/fuzz/loader.py) and the loader bugs it found.

A fixed seed of 500 mutants of the seed models must give only onnx2jax errors or results;
the regression tests below are hostile files the fuzzer produced, each with the clear error it
must now get.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx2jax
from onnx2jax.core.errors import ModelLoadError
from onnx2jax.fuzz import loader as fuzz_loader_module
from onnx2jax.fuzz.loader import MODEL_FILE, Worker, fuzz_loader, make_mutant, seed_models

# Findings in files the loader's maintainers do not own, reported with repros; each entry is
# removed when its fix lands, so a new kind of finding always fails this test. Patterns, so
# that a module moving (onnx2jax/a.py -> onnx2jax/core/a.py) keeps them.
KNOWN_FINDINGS: list[str] = []


def _known(key: str) -> bool:
    return any(re.match(pattern, key) for pattern in KNOWN_FINDINGS)


def test_fixed_seed_of_500_mutants_gives_only_onnx2jax_errors_or_results(tmp_path):
    report = fuzz_loader(2026, 500, tmp_path, workers=2)
    assert report.mutants == 500
    unexpected = {k: f for k, f in report.findings.items() if not _known(k)}
    assert not unexpected, "\n".join(
        f"{k}: mutant {f.index} ({'; '.join(f.steps)}): {f.message} -> {f.path}"
        for k, f in unexpected.items()
    )
    # The mutants reach every stage: refused at load, loaded, and run to a result.
    rejected = sum(n for k, n in report.outcomes.items() if k.startswith("rejected"))
    assert rejected > 100 and report.outcomes["ran"] > 50, report.outcomes
    assert "loader fuzz seed 2026: 500 mutants" in report.summary()


def test_mutants_are_reproducible_from_seed_and_number(tmp_path):
    seeds = seed_models(tmp_path)
    assert {s.name for s in seeds} == {"cnn", "transformer", "control", "typed", "sklearn"}
    first = [make_mutant(seeds, 7, i) for i in range(40)]
    again = [make_mutant(seeds, 7, i) for i in range(40)]
    assert [m.files for m in first] == [m.files for m in again]
    assert [m.steps for m in first] == [m.steps for m in again]
    originals = {s.name: s.files for s in seeds}
    assert all(m.files != originals[m.seed] for m in first)


def test_seed_models_load_and_run(tmp_path):
    for seed in seed_models(tmp_path / "seeds"):
        path = fuzz_loader_module.Mutant(seed.name, dict(seed.files)).write(tmp_path / seed.name)
        model = onnx2jax.load(path)
        feeds = fuzz_loader_module._inputs(model, np.random.default_rng(0))
        assert isinstance(feeds, dict)
        out = model(**feeds)
        assert set(out) == {o.name for o in model.outputs}


def test_a_mutant_past_its_time_limit_is_a_timeout_finding(tmp_path):
    seed = seed_models(tmp_path / "seeds")[0]
    path = fuzz_loader_module.Mutant(seed.name, dict(seed.files)).write(tmp_path / "m")
    worker = Worker(tmp_path / "worker.log", fuzz_loader_module.MEMORY_LIMIT)
    try:
        result = worker.check(path, 0, compare=False, timeout=0.001)
    finally:
        worker.stop()
    assert result["status"] == "finding" and result["error"] == "Timeout", result


def test_main_exit_status_and_summary(tmp_path, capsys):
    status = fuzz_loader_module.main(
        ["--seed", "3", "--count", "12", "--out", str(tmp_path), "--workers", "1"]
    )
    printed = capsys.readouterr().out
    assert "loader fuzz seed 3: 12 mutants" in printed
    assert status == (1 if "FINDING" in printed else 0)


# --------------------------------------------------------------------------- regressions


def _save(model: onnx.ModelProto, folder) -> str:
    path = folder / MODEL_FILE
    onnx.save(model, str(path))
    return str(path)


def _add_model(
    initializer: onnx.TensorProto | None = None,
    sparse: list[onnx.SparseTensorProto] | None = None,
    second: str = "w",
) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", second], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[initializer] if initializer is not None else [],
        sparse_initializer=sparse or [],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _external(name: str, location: str) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(np.ones(4, np.float32), name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


@pytest.mark.parametrize("location", ["a" * 300, "w.data\x00tail"])
def test_external_data_name_the_file_system_refuses_is_a_clear_error(tmp_path, location):
    # Found by the fuzzer: a 300-byte file name raised OSError (ENAMETOOLONG) from is_file().
    path = _save(_add_model(_external("w", location)), tmp_path)
    with pytest.raises(ModelLoadError, match="external data|missing"):
        onnx2jax.load(path)


def _sparse(values, indices, dims) -> onnx.SparseTensorProto:
    return helper.make_sparse_tensor(
        numpy_helper.from_array(np.asarray(values, np.float32), "w"),
        numpy_helper.from_array(np.asarray(indices, np.int64), "w_idx"),
        dims,
    )


def test_sparse_initializer_of_the_main_graph_loads_and_runs(tmp_path):
    # Found by the fuzzer: any sparse initializer raised AttributeError (SparseTensorProto has
    # no name; its values tensor does).
    model = onnx2jax.load(_save(_add_model(sparse=[_sparse([1.5, -2.0], [1, 3], [4])]), tmp_path))
    out = model(x=np.zeros(4, np.float32))["y"]
    np.testing.assert_array_equal(np.asarray(out), [0, 1.5, 0, -2.0])


@pytest.mark.parametrize(
    "values, indices, dims, message",
    [
        ([1.0], [4], [4], "outside its shape"),
        ([1.0], [-1], [4], "outside its shape"),
        ([1.0, 2.0], [0], [4], "do not fit"),
        ([1.0], [[0, 9]], [2, 2], "outside its shape"),
        ([1.0], [0], [2**40, 2**20], "too large|outside"),
        ([1.0], [0], [-4], "negative dimension"),
    ],
)
def test_hostile_sparse_initializer_is_a_clear_error(tmp_path, values, indices, dims, message):
    model = _add_model(sparse=[_sparse(values, indices, dims)])
    with pytest.raises(ModelLoadError, match=message):
        onnx2jax.load(_save(model, tmp_path))


def test_main_graph_reading_an_undefined_tensor_is_refused_at_load(tmp_path):
    # Found by the fuzzer: names the main graph reads but nothing defines were taken as coming
    # from an enclosing scope, which only subgraphs have; the model loaded and failed later.
    model = _add_model(second="nowhere")
    with pytest.raises(ModelLoadError, match="never defined.*nowhere"):
        onnx2jax.load(_save(model, tmp_path))


def test_external_data_location_that_is_not_utf8_is_a_clear_error(tmp_path):
    # Found by the fuzzer: protobuf hands over a location that is not UTF-8 as bytes, and
    # Path / bytes raised TypeError.
    (tmp_path / "w.data").write_bytes(np.ones(4, np.float32).tobytes())
    data = _add_model(_external("w", "w.data")).SerializeToString()
    assert data.count(b"w.data") == 1
    (tmp_path / MODEL_FILE).write_bytes(data.replace(b"w.data", b"\xff.data"))
    with pytest.raises(ModelLoadError, match="not valid UTF-8"):
        onnx2jax.load(tmp_path / MODEL_FILE)


def test_the_fuzzers_command_runs_the_loader_fuzzer(tmp_path, capsys):
    from onnx2jax.fuzz.__main__ import main

    assert main(["--loader", "--seed", "3", "--count", "6", "--out", str(tmp_path)]) == 0
    assert "loader fuzz seed 3: 6 mutants" in capsys.readouterr().out


def test_an_if_branch_with_too_few_outputs_is_an_op_error():
    """Found by the loader fuzzer: model(...) raised a bare KeyError from the segments."""
    empty = helper.make_graph([], "empty", [], [])
    then = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["positive"]),
            helper.make_node("If", ["positive"], ["y"], then_branch=then, else_branch=empty),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.float32(0), "zero")],
    )
    model = onnx2jax.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(onnx2jax.OpError, match="else_branch gives 0 output"):
        model(x=-np.ones((2, 3), np.float32))


def test_a_one_input_mul_inside_an_attention_pattern_loads():
    """Found by the loader fuzzer: fuse_attention indexed the missing second input."""
    nodes = [
        helper.make_node("MatMul", ["q", "k"], ["scores"]),
        helper.make_node("Mul", ["scores"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("q", TensorProto.FLOAT, [2, 4]),
            helper.make_tensor_value_info("k", TensorProto.FLOAT, [4, 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
    )
    model = onnx2jax.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(onnx2jax.Onnx2JaxError):
        model(q=np.ones((2, 4), np.float32), k=np.ones((4, 2), np.float32))
