"""The executable cache (onnx2jax/runtime/cache.py) and ahead-of-time artifacts
(onnx2jax/runtime/aot.py, ``onnx2jax compile``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import onnx2jax
from onnx2jax.cli import main
from onnx2jax.core.errors import InputError
from onnx2jax.runtime import aot

ROOT = Path(__file__).resolve().parents[2]
IMAGES = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)


def test_artifact_matches_the_model_and_checks_shapes(tmp_path):
    model = onnx2jax.load(onnx2jax.example_path())
    file = aot.export_model(model, {"image": IMAGES}, tmp_path / "digits.o2j")
    loaded = aot.load_artifact(file)
    assert loaded.input_names == ["image"] and loaded.output_names == ["logits"]
    ours = np.asarray(loaded(IMAGES)["logits"])
    # The artifact runs XLA's convolutions, model(...) the native kernel: rounding differs.
    np.testing.assert_allclose(ours, np.asarray(model(IMAGES)["logits"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(loaded(image=IMAGES.astype(np.float64))["logits"]), ours, rtol=1e-5, atol=1e-5
    )
    with pytest.raises(InputError, match="compiled for"):
        loaded(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(InputError, match="missing"):
        loaded()


def test_artifact_runs_the_program_model_call_runs(tmp_path, monkeypatch):
    """Pre-transposed Conv weights and model(...)'s XLA options: before, the artifact
    transposed its weights on every call and compiled with XLA's defaults (ResNet-50 b1
    122 ms against model(...)'s 62). Artifacts keep XLA's convolutions (no native kernels)."""
    monkeypatch.setenv("ONNX2JAX_NATIVE", "0")
    model = onnx2jax.load(onnx2jax.example_path())
    loaded = aot.load_artifact(aot.export_model(model, {"image": IMAGES}, tmp_path / "d.o2j"))
    bound = model.bind_inputs((), {"image": IMAGES})
    function, options, _ = model.inference_function(bound)
    assert loaded.compiler_options == options

    def layout_changes(compiled_text: str) -> int:
        return len(re.findall(r"= \S+ (?:transpose|copy)\(", compiled_text))

    ours = loaded.lower(IMAGES).compile().as_text()
    theirs = model.engine.lower(bound).compile().as_text()
    assert layout_changes(ours) == layout_changes(theirs)


def test_compile_command_writes_a_runnable_artifact(tmp_path, capsys):
    file = tmp_path / "digits.o2j"
    assert (
        main(
            [
                "compile",
                str(onnx2jax.example_path()),
                "-o",
                str(file),
                "--dim",
                "batch=3",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    document = json.loads(capsys.readouterr().out)
    assert document["inputs"]["image"]["shape"] == [3, 1, 8, 8]
    assert document["bytes"] == file.stat().st_size
    model = onnx2jax.load(onnx2jax.example_path())
    np.testing.assert_allclose(
        np.asarray(aot.load_artifact(file)(IMAGES)["logits"]),
        np.asarray(model(IMAGES)["logits"]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_executable_cache_reuses_entries_across_instances(tmp_path):
    model = onnx2jax.load(onnx2jax.example_path())
    expected = np.asarray(model(IMAGES)["logits"])
    first = aot.ExecutableCache(tmp_path)
    np.testing.assert_allclose(
        np.asarray(aot.cached_call(model, first, {"image": IMAGES})["logits"]),
        expected,
        rtol=1e-5,
        atol=1e-5,
    )
    assert (first.hits, first.misses) == (0, 1)
    assert len(list(tmp_path.glob("*.jaxexec"))) == 1
    # A new cache object (as in a new process) and a new model object: read from disk.
    second = aot.ExecutableCache(tmp_path)
    again = onnx2jax.load(onnx2jax.example_path())
    out = aot.cached_call(again, second, {"image": IMAGES})
    np.testing.assert_allclose(np.asarray(out["logits"]), expected, rtol=1e-5, atol=1e-5)
    assert (second.hits, second.misses) == (1, 0)
    # Another shape is another entry.
    aot.cached_call(again, second, {"image": IMAGES[:2]})
    assert second.misses == 1 and len(list(tmp_path.glob("*.jaxexec"))) == 2


def test_corrupt_cache_entry_is_recompiled(tmp_path):
    model = onnx2jax.load(onnx2jax.example_path())
    aot.cached_call(model, aot.ExecutableCache(tmp_path), {"image": IMAGES})
    (entry,) = tmp_path.glob("*.jaxexec")
    entry.write_bytes(b"not an executable")
    cache = aot.ExecutableCache(tmp_path)
    out = aot.cached_call(model, cache, {"image": IMAGES})
    assert cache.misses == 1 and np.asarray(out["logits"]).shape == (3, 10)


def test_artifact_with_cache_in_a_second_process(tmp_path):
    model = onnx2jax.load(onnx2jax.example_path())
    file = aot.export_model(model, {"image": IMAGES}, tmp_path / "digits.o2j")
    np.savez(tmp_path / "feeds.npz", image=IMAGES)
    script = (
        "import json, sys, numpy as np; from onnx2jax.runtime import aot\n"
        "m = aot.load_artifact(sys.argv[1], cache_dir=sys.argv[2])\n"
        "y = np.asarray(m(np.load(sys.argv[3])['image'])['logits'])\n"
        "print(json.dumps({'hits': m.cache.hits, 'y': y.tolist()}))\n"
    )
    runs = []
    for _ in range(2):
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                script,
                str(file),
                str(tmp_path / "c"),
                str(tmp_path / "feeds.npz"),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert [r["hits"] for r in runs] == [0, 1]
    np.testing.assert_allclose(
        np.array(runs[1]["y"]), np.asarray(model(IMAGES)["logits"]), rtol=1e-5, atol=1e-5
    )


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(aot.CACHE_ENV, raising=False)
    assert aot.resolve_cache_dir() is None
    monkeypatch.setenv(aot.CACHE_ENV, str(tmp_path))
    assert aot.resolve_cache_dir() == tmp_path
    assert aot.resolve_cache_dir(tmp_path / "x") == tmp_path / "x"
    # The cache never touches JAX's own configuration.
    assert not jax.config.jax_compilation_cache_dir


def test_load_with_cache_dir_and_environment_variable(monkeypatch, tmp_path):
    expected = np.asarray(onnx2jax.load(onnx2jax.example_path())(IMAGES)["logits"])
    first = onnx2jax.load(onnx2jax.example_path(), cache_dir=tmp_path)
    np.testing.assert_allclose(np.asarray(first(IMAGES)["logits"]), expected, rtol=1e-5, atol=1e-6)
    assert first.engine.cache.misses == 1 and len(list(tmp_path.glob("*.jaxexec"))) == 1
    monkeypatch.setenv(aot.CACHE_ENV, str(tmp_path))
    second = onnx2jax.load(onnx2jax.example_path())
    np.testing.assert_allclose(
        np.asarray(second(image=IMAGES)["logits"]), expected, rtol=1e-5, atol=1e-5
    )
    assert (second.engine.cache.hits, second.engine.cache.misses) == (1, 0)
    monkeypatch.delenv(aot.CACHE_ENV)
    assert onnx2jax.load(onnx2jax.example_path()).engine.cache is None


def test_prepared_conv_weights_follow_param_changes():
    model = onnx2jax.load(onnx2jax.example_path())
    assert model.engine.weight_layouts  # the digits CNN has Conv weights
    reference = np.asarray(jax.jit(model.apply)(model.params, IMAGES)["logits"])
    np.testing.assert_allclose(np.asarray(model(IMAGES)["logits"]), reference, rtol=1e-5, atol=1e-6)
    name = next(iter(model.engine.weight_layouts))
    kernels = model.inference_function(model.bind_inputs((IMAGES,), {}))[2]
    before = model.engine.prepared_params(kernels)
    model.params[name] = model.params[name] * 0.5  # changed in place: re-prepared
    changed = np.asarray(jax.jit(model.apply)(model.params, IMAGES)["logits"])
    assert not np.allclose(changed, reference)
    np.testing.assert_allclose(np.asarray(model(IMAGES)["logits"]), changed, rtol=1e-5, atol=1e-6)
    # Only the changed weight is prepared again; it is the param in the layout the program
    # reads, which gives the param back.
    after = model.engine.prepared_params(kernels)
    assert all(after[k] is v for k, v in before.items() if k != name)
    np.testing.assert_array_equal(
        model.engine.restore_layouts(after, kernels)[name], np.asarray(model.params[name])
    )
