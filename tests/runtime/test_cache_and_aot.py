"""The benchmark harness, the executable cache and ahead-of-time artifacts (correctness only)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import onnx2jax
from onnx2jax.cli import main
from onnx2jax.cli.bench import interleaved, max_errors, run_case
from onnx2jax.core.errors import InputError
from onnx2jax.runtime import aot

ROOT = Path(__file__).resolve().parents[2]
IMAGES = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)


def test_harness_quick_run_writes_every_field(tmp_path):
    from benchmarks.run import main as bench_main

    output = tmp_path / "quick.json"
    assert (
        bench_main(
            [
                "--quick",
                "--model",
                str(onnx2jax.example_path()),
                "--dim",
                "batch=4",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    document = json.loads(output.read_text())
    assert {"machine", "settings", "cases", "date", "command"} <= set(document)
    assert {"cpu", "cores", "versions"} <= set(document["machine"])
    assert document["machine"]["versions"]["onnxruntime"]
    (case,) = document["cases"].values()
    for engine in ("onnx2jax", "onnxruntime"):
        timing = case[engine]
        assert timing["runs"] == 2 and len(timing["samples_ms"]) == 2
        assert 0 < timing["min_ms"] <= timing["median_ms"]
        assert timing["throughput_per_s"] > 0 and timing["first_call_s"] > 0
    assert case["ratio"] == pytest.approx(
        case["onnx2jax"]["median_ms"] / case["onnxruntime"]["median_ms"]
    )
    assert case["max_abs_error"] < 1e-4 and case["max_rel_error"] < 1e-4
    assert case["inputs"]["image"]["shape"] == [4, 1, 8, 8]
    assert case["threads"] >= 1 and case["items"] == 4
    if os.path.exists("/proc/stat"):
        assert 0 <= case["steal_percent"] <= 100


def test_kernel_groups_check_outputs_and_time_both_engines(tmp_path, capsys):
    from benchmarks.kernels import GROUPS
    from benchmarks.kernels import main as kernels_main

    output = tmp_path / "kernels.json"
    assert kernels_main(["--runs", "2", "--output", str(output)]) == 0
    groups = json.loads(output.read_text())["groups"]
    assert [g["group"] for g in groups] == list(GROUPS)
    for group in groups:
        assert group["rows"]
        for row in group["rows"]:
            assert row["onnx2jax_ms"] > 0 and row["onnxruntime_ms"] > 0
            assert row["rel_error"] < 1e-4 and row["count"] >= 1
        assert group["total_onnx2jax_ms"] == pytest.approx(
            sum(r["onnx2jax_ms"] * r["count"] for r in group["rows"])
        )
    printed = capsys.readouterr().out
    assert printed.count("| total (x count) |") == len(GROUPS)


def test_layers_match_convolutions_across_the_engines(tmp_path, capsys):
    from benchmarks.layers import main as layers_main

    output = tmp_path / "layers.json"
    assert (
        layers_main(
            [
                str(onnx2jax.example_path()),
                "--dim",
                "batch=4",
                "--runs",
                "2",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    rows = {r["layer"]: r for r in json.loads(output.read_text())["rows"]}
    convolutions = [r for label, r in rows.items() if label.startswith("conv 3x3 ")]
    assert convolutions, rows
    # The example CNN's two convolutions, read from both profilers under the same label.
    for row in convolutions:
        assert row["onnxruntime_ms"] > 0 and row["onnxruntime_count"] == 1
        if onnx2jax.native.available():
            assert row["onnx2jax_ms"] > 0 and row["onnx2jax_count"] == 1
    assert "| total |" in capsys.readouterr().out


def _quick_example_run(tmp_path: Path, *options: str) -> dict:
    """The results document of a --quick harness run of the example model at batch 4."""
    from benchmarks.run import main as bench_main

    output = tmp_path / "quick.json"
    assert (
        bench_main(
            [
                "--quick",
                *options,
                "--model",
                str(onnx2jax.example_path()),
                "--dim",
                "batch=4",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    return json.loads(output.read_text())


def test_harness_times_an_opt_in_precision_apart(tmp_path):
    document = _quick_example_run(tmp_path, "--precision", "bfloat16")
    assert document["settings"]["precision"] == "bfloat16"
    assert not document["settings"]["memory"] and not document["settings"]["startup"]
    (case,) = document["cases"].values()
    # The example's Gemm and MatMul products round to bfloat16: off float32's onnxruntime,
    # but by bfloat16's few significant bits only.
    assert 1e-5 < case["max_rel_error"] < 0.05


def test_harness_gives_the_children_cpu_devices(tmp_path):
    from benchmarks.run import table

    document = _quick_example_run(tmp_path, "--cpu-devices", "2")
    assert document["settings"]["cpu_devices"] == 2 and not document["settings"]["startup"]
    (case,) = document["cases"].values()
    assert case["jax_devices"] == 2 and case["max_rel_error"] < 1e-5
    assert "JAX with 2 CPU devices, the batch split over them" in table(document)
    assert "JAX_NUM_CPU_DEVICES" not in os.environ


def test_table_lists_cases_and_startup():
    from benchmarks.run import table

    timing = {
        "median_ms": 2.0,
        "min_ms": 1.5,
        "runs": 3,
        "throughput_per_s": 500.0,
        "first_call_s": 1.0,
        "gflop_per_s": 10.0,
        "memory": {"peak_increase_mb": 12.0},
    }
    startup = {"import_s": 0.5, "load_s": 0.1, "first_call_s": 0.4, "total_s": 0.9}
    document = {
        "cases": {
            "tiny_b4": {
                "onnx2jax": timing,
                "onnxruntime": timing,
                "ratio": 1.0,
                "unit": "img",
                "max_abs_error": 1e-7,
                "max_rel_error": 1e-7,
            }
        },
        "startup": {
            "case": "tiny_b4",
            "plain": startup,
            "cache_second_process": startup,
            "aot": startup,
            "aot_compile_s": 1.0,
            "aot_artifact_mb": 2.0,
        },
        "machine": {
            "cpu": "cpu",
            "cores": 2,
            "memory_gib": 8,
            "os": "linux",
            "versions": {"jax": "x"},
        },
        "settings": {"runs": 3, "warmup": 1},
        "date": "today",
    }
    text = table(document)
    assert "| tiny_b4 |" in text and "**1.00**" in text
    assert "cache_dir, second process" in text and "AOT artifact, no cache" in text
    assert "steal time" not in text
    document["cases"]["tiny_b4"]["steal_percent"] = 3.25
    assert "The hypervisor took 3.2-3.2% of the CPUs' time" in table(document)


def test_steal_time_is_read_where_linux_reports_it():
    from benchmarks.run import cpu_steal_s

    steal = cpu_steal_s()
    assert (steal is None) == (not os.path.exists("/proc/stat"))
    assert steal is None or steal >= 0


def test_startup_figures_are_medians_of_fresh_processes():
    from benchmarks.run import _medians, table

    processes = [
        {"import_s": 0.5, "load_s": 0.1, "first_call_s": f, "total_s": f + 0.5}
        for f in (5.4, 1.2, 1.3)
    ]
    median = _medians(processes)
    assert median["first_call_s"] == 1.3 and median["total_s"] == 1.8
    assert median["processes"] == processes
    timing = {
        "median_ms": 2.0,
        "min_ms": 1.5,
        "runs": 3,
        "throughput_per_s": 500.0,
        "first_call_s": 1.0,
    }
    document = {
        "cases": {
            "tiny_b4": {
                "onnx2jax": timing,
                "onnxruntime": timing,
                "ratio": 1.0,
                "max_abs_error": 0.0,
                "max_rel_error": 0.0,
            }
        },
        "startup": {
            "case": "tiny_b4",
            "plain": median,
            "aot_compile_s": 1.0,
            "aot_artifact_mb": 2.0,
        },
        "machine": {"cpu": "cpu", "cores": 2, "memory_gib": 8, "os": "linux", "versions": {}},
        "settings": {"runs": 3, "warmup": 1},
        "date": "today",
    }
    text = table(document)
    assert "medians of 3 processes" in text
    assert "| onnx2jax.load, no cache | 0.50 | 0.10 | **1.30** (1.20-5.40) | 1.80 |" in text


def test_run_case_reports_errors_and_flops():
    case = run_case(onnx2jax.example_path(), {"image": IMAGES}, runs=2, warmup=1)
    assert case["max_abs_error"] < 1e-5
    assert case["gflop"] is None or case["gflop"] > 0
    assert case["onnx2jax"]["load_s"] <= case["onnx2jax"]["first_call_s"]
    assert max_errors({"y": np.ones(2)}, {"y": np.ones(2)}) == {
        "max_abs_error": 0.0,
        "max_rel_error": 0.0,
    }


def _spin_after_return(seconds: float) -> threading.Thread:
    """A thread that keeps a CPU busy after its call returned, as onnxruntime's workers do."""

    def spin():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    thread = threading.Thread(target=spin)
    thread.start()
    return thread


@pytest.mark.parametrize("settle", [True, False])
def test_interleaved_calls_wait_for_the_other_engines_threads(settle):
    spinners: list[threading.Thread] = []
    overlapped = []
    calls = {
        "spins": lambda: spinners.append(_spin_after_return(0.1)),
        "next": lambda: overlapped.append(any(t.is_alive() for t in spinners)),
    }
    interleaved(calls, runs=3, warmup=0, settle=settle)
    for thread in spinners:
        thread.join()
    # Settled, no call ever starts while the other's thread still runs; back to back, each does.
    assert overlapped == [not settle] * 3


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
