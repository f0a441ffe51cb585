"""oneDNN's convolutions in model(...) (onnx2jax/native/kernels/onednn.cc): the backend of the
"conv" kind where the hand-written kernels do not run (no AVX-512).

This machine may have AVX-512, so each test runs a child process that reports no AVX-512 to
onnx2jax.native (as an AVX2 host would) before anything is built; one child also caps oneDNN
at AVX2 (ONEDNN_MAX_CPU_ISA), the instruction set it would pick on such a host.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from onnx2jax import native

ROOT = Path(__file__).resolve().parents[2]

# Conv cases: (x shape, weight shape, group, strides, pads, dilations, bias, residual, relu).
CASES = [
    ((2, 8, 15, 15), (64, 8, 3, 3), 1, (1, 1), (1, 1, 1, 1), (1, 1), True, False, False),
    ((2, 8, 15, 15), (64, 8, 3, 3), 1, (2, 2), (1, 0, 1, 2), (1, 1), True, True, True),
    ((1, 16, 9, 11), (24, 16, 1, 1), 1, (1, 1), (0, 0, 0, 0), (1, 1), False, True, False),
    ((1, 16, 9, 11), (24, 16, 1, 1), 1, (2, 2), (0, 0, 0, 0), (1, 1), True, False, True),
    ((3, 3, 20, 20), (13, 3, 7, 7), 1, (2, 2), (3, 3, 3, 3), (1, 1), True, True, True),
    ((1, 12, 11, 11), (20, 12, 3, 3), 1, (1, 1), (2, 2, 2, 2), (2, 2), True, False, True),
    ((2, 12, 10, 10), (12, 4, 3, 3), 3, (1, 1), (1, 1, 1, 1), (1, 1), True, True, True),
    ((2, 32, 9, 9), (32, 1, 3, 3), 32, (2, 2), (1, 1, 1, 1), (1, 1), True, False, True),
    ((1, 5, 7, 6), (7, 5, 2, 3), 1, (3, 1), (0, 1, 0, 2), (1, 1), False, False, False),
]

CHILD = r"""
import json, sys
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import onnxruntime
import onnx2jax
from onnx2jax import native

native.cpu_problem = lambda: "this test reports no AVX-512 (an AVX2 host)"
state = native.status()
results = []
rng = np.random.default_rng(0)
for x_shape, w_shape, group, strides, pads, dilations, bias, residual, relu in json.loads(
    sys.argv[1]
):
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal(w_shape) * 0.2).astype(np.float32)
    weights = {"w": w}
    inputs = ["x", "w"]
    if bias:
        weights["b"] = rng.standard_normal(w_shape[0]).astype(np.float32)
        inputs.append("b")
    nodes = [helper.make_node("Conv", inputs, ["c"], group=group, strides=list(strides),
                              pads=list(pads), dilations=list(dilations))]
    feeds = {"x": x}
    last = "c"
    if residual:
        kh, kw = w_shape[2:]
        oh = (x_shape[2] + pads[0] + pads[2] - (kh - 1) * dilations[0] - 1) // strides[0] + 1
        ow = (x_shape[3] + pads[1] + pads[3] - (kw - 1) * dilations[1] - 1) // strides[1] + 1
        feeds["r"] = rng.standard_normal((x_shape[0], w_shape[0], oh, ow)).astype(np.float32)
        nodes.append(helper.make_node("Add", [last, "r"], ["s"]))
        last = "s"
    if relu:
        nodes.append(helper.make_node("Relu", [last], ["z"]))
        last = "z"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(
        nodes, "conv",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in feeds.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = onnx2jax.load(proto)
    hlo = model.engine.lower(model.bind_inputs((), feeds)).compile().as_text()
    got = np.asarray(model(**feeds)["y"])
    xla = np.asarray(model.apply(model.params, **feeds)["y"])
    (ort,) = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, feeds)
    scale = float(np.max(np.abs(xla))) or 1.0
    results.append({
        "onednn": "onnx2jax_onednn_conv" in hlo,
        "error_xla": float(np.max(np.abs(got - xla))) / scale,
        "error_ort": float(np.max(np.abs(got - ort))) / scale,
        "shape_ok": got.shape == xla.shape,
    })
print(json.dumps({"state": {k: str(v) for k, v in state.items()}, "results": results}))
"""


def _child(isa: str | None) -> dict:
    env = {**os.environ, "ONNX2JAX_NATIVE": "1"}
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa is not None:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(CASES)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=[None, "AVX2"], ids=["any-isa", "avx2"])
def child(request):
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "amd64"):
        pytest.skip("oneDNN is used on Linux x86-64 only")
    return request.param, _child(request.param)


def test_without_avx512_convolutions_are_onednns_and_match_xla_and_onnxruntime(child):
    isa, report = child
    backends = report["state"]["backends"]
    if "'conv': 'onednn'" not in backends:
        pytest.skip(f"oneDNN is not installed or does not build here: {report['state']}")
    assert "no AVX-512" in report["state"]["reason"]
    assert all(f"'{kind}': None" in backends for kind in ("matrix", "attention", "nbits"))
    if isa == "AVX2":
        assert "'isa': 'avx2'" in report["state"]["onednn"]
    for case, result in zip(CASES, report["results"], strict=True):
        assert result["onednn"], case
        assert result["shape_ok"], case
        assert result["error_xla"] < 1e-5, (case, result)
        assert result["error_ort"] < 1e-5, (case, result)


def test_status_names_a_backend_per_kind():
    state = native.status()
    assert set(state["backends"]) == set(native.KINDS)
    for kind, backend in state["backends"].items():
        assert backend in (*native.BACKENDS, None)
        assert native.backend(kind) == backend
    if "lanes" in state:  # the hand-written kernels, where they run, compute every kind
        assert set(state["backends"].values()) == {"native"}
    assert native.available() == any(state["backends"].values())


NO_ONEDNN_CHILD = r"""
from onnx2jax import native

def missing():
    raise native._NotSupported("onednn-cpu-gomp is not installed")

native.cpu_problem = lambda: "this test reports no AVX-512 (an AVX2 host)"
native._onednn_files = missing
state = native.status()
print(state["backends"], state["onednn"]["reason"], native.available())
"""


def test_without_avx512_or_onednn_xla_computes_everything():
    done = subprocess.run(
        [sys.executable, "-c", NO_ONEDNN_CHILD],
        env={**os.environ, "ONNX2JAX_NATIVE": "1"},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [
        "{'conv':",
        "None,",
        "'matrix':",
        "None,",
        "'attention':",
        "None,",
        "'nbits':",
        "None}",
        "onednn-cpu-gomp",
        "is",
        "not",
        "installed",
        "False",
    ]
