"""XLA:CPU's worker threads are pinned one to a CPU, unless told not to or already placed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="thread affinities need Linux and two CPUs",
)

# Prints each worker's CPUs after a model is loaded and run, and what pin_xla_workers says.
# Runs in a fresh process so that no earlier Model of this test session has pinned them.
REPORT = """
import json, os, sys
import jax
import numpy as np
import onnx2jax
from onnx2jax.runtime.cputhreads import pin_xla_workers, xla_workers
jax.devices()  # starts XLA:CPU and its worker pool
allowed = sorted(os.sched_getaffinity(0))
if sys.argv[1] == "placed":  # the user puts the first worker on the last CPU first
    os.sched_setaffinity(xla_workers()[0], {allowed[-1]})
model = onnx2jax.load(onnx2jax.example_path())
model(np.zeros((1, 1, 8, 8), np.float32))
untouched = [sorted(os.sched_getaffinity(t)) for t in xla_workers()]
tune = sys.argv[2] == "1"
pinned = onnx2jax.tune_process(keep_call_buffers=False)["pinned_threads"] if tune else 0
print(json.dumps({"allowed": allowed, "pinned": pinned, "untouched": untouched,
                  "workers": [sorted(os.sched_getaffinity(t)) for t in xla_workers()]}))
"""


def _report(mode: str = "", tune: bool = True) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", REPORT, mode, "1" if tune else "0"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_each_worker_gets_its_own_cpu():
    report = _report()
    workers = report["workers"]
    assert len(workers) > 1
    assert all(len(cpus) == 1 for cpus in workers)
    placed = [cpus[0] for cpus in workers]
    assert len(set(placed)) == len(placed) and set(placed) <= set(report["allowed"])
    assert report["pinned"] == len(workers)


def test_loading_and_running_a_model_pins_nothing():
    report = _report(tune=False)
    assert report["pinned"] == 0
    assert report["untouched"] and all(
        cpus == report["allowed"] for cpus in report["untouched"] + report["workers"]
    )


def test_a_worker_placed_by_the_user_is_left_alone():
    report = _report("placed")
    first, *others = report["workers"]
    assert first == [report["allowed"][-1]]
    assert all(len(cpus) == 1 and cpus != first for cpus in others)
    assert len({cpus[0] for cpus in others}) == len(others)
    assert report["pinned"] == len(report["workers"])


def test_more_workers_than_allowed_cpus_changes_nothing():
    # Restricted to one CPU after XLA sized its pool for all of them.
    script = REPORT.replace(
        "allowed = sorted",
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\nallowed = sorted",
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "", "1"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["pinned"] == 0
    assert all(len(cpus) > 1 for cpus in report["workers"])
