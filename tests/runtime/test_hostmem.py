"""The host allocator settings: XLA:CPU's per-call buffers are reused, not faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from onnx2jax.runtime import hostmem

ROOT = Path(__file__).resolve().parents[2]

glibc_only = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION")),
    reason="the settings are glibc's",
)

# A model whose input, intermediate and output are 48 MB each: over glibc's 32 MB mmap
# threshold, under the 64 MB cap of thread arenas. Prints the page faults of each call after
# the first two (the second still grows the heap).
CALLS = """
import json, resource, sys, time
import numpy as np, onnx
from onnx import TensorProto, helper
import onnx2jax
from onnx2jax.runtime import hostmem
if sys.argv[1] == "1":
    onnx2jax.tune_process(pin_threads=False)
nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["r"], ["s"]),
         helper.make_node("Mul", ["s", "x"], ["y"])]
shape = [3072, 4096]
graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", 1, shape)],
                          [helper.make_tensor_value_info("y", 1, shape)])
model = onnx2jax.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = np.asarray(model(x)["y"])
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del y
    time.sleep(0.05)  # PjRt frees the call's buffers on its own threads
print(json.dumps({"applied": hostmem._applied is True, "faults": faults[2:]}))
"""

PAGES_PER_BUFFER = 3072 * 4096 * 4 // 4096


def run_calls(keep: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CALLS, keep], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc_only
def test_call_buffers_are_reused_between_calls():
    kept = run_calls("1")
    assert kept["applied"] is True
    # Every call allocates at least two such buffers (its input's device copy and its
    # output). Kept, they are reused once the heap has settled (when depends on the order
    # of PjRt's frees), and such calls fault in almost none of their pages.
    assert min(kept["faults"]) < PAGES_PER_BUFFER // 4, kept
    plain = run_calls("0")
    assert plain["applied"] is False
    assert min(plain["faults"]) > PAGES_PER_BUFFER, plain


def test_keep_call_buffers_is_idempotent():
    first = hostmem.keep_call_buffers()
    assert hostmem.keep_call_buffers() is first
    hostmem.release_free_memory()


# Prints the resident memory after a NumPy program frees 512 MB it had touched, having
# imported onnx2jax and run a model (or not): onnx2jax must not change the allocator.
FREED = """
import sys
import numpy as np
if sys.argv[1] == "import":
    import onnx2jax
    onnx2jax.load(onnx2jax.example_path())(np.zeros((1, 1, 8, 8), np.float32))
def resident_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20
before = resident_mb()
blocks = [np.ones(2**26, np.float32) for _ in range(2)]
del blocks
print(resident_mb() - before)
"""


@glibc_only
def test_importing_onnx2jax_leaves_the_allocator_alone():
    grown = {
        mode: float(
            subprocess.run(
                [sys.executable, "-c", FREED, mode],
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
            ).stdout.split()[-1]
        )
        for mode in ("plain", "import")
    }
    assert grown["plain"] < 64, grown
    assert grown["import"] < 64, grown
