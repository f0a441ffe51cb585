"""The benchmark harness (benchmarks/ and onnx2jax/cli/bench.py): correctness only."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import onnx2jax
from onnx2jax.cli.bench import interleaved, max_errors, run_case

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


def test_vector_width_names_the_widest_unit_and_the_table_shows_it():
    from benchmarks.run import machine, vector_width

    assert vector_width({"sse2", "avx2"}, "x86_64") == {"isa": "AVX2", "float32_lanes": 8}
    assert vector_width({"asimd", "fp"}, "aarch64")["isa"] == "NEON"
    assert machine()["vector"]["isa"] in {"AVX-512", "AVX2", "NEON", "SSE", "unknown"}


def _accumulator(path: Path) -> Path:
    """A stateful model: ``total = state + x``, returned as ``y`` and as the new state."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Add", ["state", "x"], ["total"]),
            helper.make_node("Identity", ["total"], ["stateN"]),
            helper.make_node("ReduceSum", ["total"], ["y"], keepdims=0),
        ],
        "accumulator",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [4]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [4]),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_harness_runs_per_call_and_stateful_cases(tmp_path):
    """A per-call model timed in blocks of calls, a stateful one whose state each engine feeds
    back into its next call, and a model neither can load."""
    from benchmarks.models import vector_inputs
    from benchmarks.run import Case, run, table

    feeds = {"x": np.arange(4, dtype=np.float32), "state": np.zeros(4, np.float32)}
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    cases = [
        Case("mlp5_b1", "mlp5", lambda: vector_inputs(1), 1, "call", kind="per_call", block=3),
        Case(
            "accumulator",
            str(_accumulator(tmp_path / "accumulator.onnx")),
            lambda: feeds,
            1,
            "call",
            kind="per_call",
            carry=(("stateN", "state"),),
            block=2,
        ),
        Case("broken", str(broken), lambda: feeds, 1, "call"),
    ]
    document = run(cases, runs=2, warmup=1, memory=False, with_startup=False, models_dir=tmp_path)
    # A case whose child fails is listed with its error; the others' figures are kept.
    assert list(document["failed"]) == ["broken"] and "broken" not in document["cases"]
    mlp, accumulator = document["cases"]["mlp5_b1"], document["cases"]["accumulator"]
    assert mlp["block"] == 3 and len(mlp["onnx2jax"]["samples_ms"]) == 6
    assert mlp["max_rel_error"] < 1e-5
    assert accumulator["carry"] == {"stateN": "state"}
    # Every call added x to the state: equal after as many calls, 3 more for each one (four
    # timed calls at least).
    assert accumulator["carried_state_errors"]["max_abs_error"] == 0.0
    change = accumulator["carried_state_change"]
    assert change >= 4 * 3 and change % 3 == 0
    text = table(document)
    assert "Host: " in text and "float32 lanes" in text and "µs per call" in text
    assert "**broken failed**" in text


@pytest.mark.slow
def test_harness_times_training_steps_against_pytorch(tmp_path):
    """Fine-tuning steps of a tiny BERT (Adam) and ResNet (SGD), exported as the full run's
    MiniLM and ResNet-50 are, against the PyTorch modules they came from."""
    from benchmarks.models import image_inputs, text_inputs
    from benchmarks.run import Case, run, table

    cases = [
        Case(
            "train_bert",
            "tiny_bert",
            lambda: text_inputs(2, 8),
            2,
            "seq",
            kind="train",
            train="adam",
        ),
        Case(
            "train_resnet",
            "tiny_resnet",
            lambda: image_inputs(2, size=32),
            2,
            "img",
            kind="train",
            train="sgd",
        ),
    ]
    document = run(cases, runs=2, warmup=1, memory=False, with_startup=False, models_dir=tmp_path)
    for name in ("train_bert", "train_resnet"):
        step = document["cases"][name]
        # Same weights, same inputs, before any update: one function, two engines.
        assert step["kind"] == "train" and step["first_loss_rel_error"] < 1e-4, step["first_loss"]
        assert len(step["onnx2jax"]["samples_ms"]) == len(step["pytorch"]["samples_ms"]) == 2
        assert step["ratio"] == pytest.approx(
            step["onnx2jax"]["median_ms"] / step["pytorch"]["median_ms"]
        )
        assert step["threads"] == step["torch_threads"]
    assert document["cases"]["train_resnet"]["loss"] == "cross_entropy(logits)"
    assert document["cases"]["train_bert"]["loss"] == "mean(pooler_output)"
    assert "| train_bert |" in table(document).split("Fine-tuning steps")[1]
