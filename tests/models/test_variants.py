"""Real models in the variants people deploy (quantized, float16, onnxruntime-optimized),
compared with onnxruntime on the same inputs. The matrix is tests/models/variants.py's VARIANTS
and docs/variants.md; each base export is built once per session.

How each kind of variant is judged:

- ``fp32``: every float output within 1e-4 of onnxruntime on the same file, relative to the
  output's largest magnitude (elementwise relative error means nothing where values cross
  zero); integer outputs (labels) exactly equal; ZipMap outputs with the same keys.
- ``fp16``: onnx2jax's distance from onnxruntime's result on the float32 base is at most 1.2x
  onnxruntime's own distance on the float16 variant.
- ``quant``: against onnxruntime with graph optimizations off, which computes the graph as
  written. Every integer tensor a quantizing node writes is at most one quantization step (1)
  from onnxruntime's result for that node alone on onnx2jax's own inputs; every
  MatMulInteger/ConvInteger result is exactly what integer arithmetic gives on
  onnx2jax's own inputs (onnx.reference computes it; onnxruntime's AVX2 u8 x s8 kernel may
  saturate 16-bit sums); float outputs within one step of the output's quantization scale
  (the scale of the DequantizeLinear nodes nearest upstream) or 1e-4 relative, whichever is
  larger. Against onnxruntime with its default optimizations, whose fused QLinear kernels
  requantize in integer arithmetic and so depart from the unfused graph, onnx2jax may differ by
  no more than onnxruntime's own fused-versus-unfused distance plus that tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

import onnx2jax
from onnx2jax.cli import commands as cli
from tests.models.variants import VARIANTS, Feeds, Variant, build_base

# Exports and runs real models: after the fast tests (tests/conftest.py).
pytestmark = pytest.mark.slow

#: Variants whose float16 error exceeds 1.2x onnxruntime's, by id, with the root cause found
#: (none since float16 graphs compute as onnxruntime's CPU provider does). Strict: a mark
#: makes the test fail once the cause is gone, so it can be removed.
FP16_XFAIL: dict[str, str] = {}

#: ``onnx2jax check`` failures, by id, with the root cause (strict, as above).
CLI_XFAIL: dict[str, str] = {}


def _params(variants: list[Variant], xfail: dict[str, str]) -> list:
    return [
        pytest.param(
            v,
            id=v.id,
            marks=[pytest.mark.xfail(strict=True, reason=xfail[v.id])] if v.id in xfail else [],
        )
        for v in variants
    ]


Built = tuple[Path, Feeds, Path]


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Callable[[Variant], Built]:
    """Builds (once per session) a variant's file; returns it, its feeds and its base's file."""
    folder = tmp_path_factory.mktemp("variants")
    bases: dict[str, tuple[Path, Feeds]] = {}
    variants: dict[str, Path] = {}

    def build(variant: Variant) -> Built:
        if variant.base not in bases:
            path = folder / f"{variant.base}.onnx"
            bases[variant.base] = path, build_base(variant.base, path)
        base, feeds = bases[variant.base]
        if variant.id not in variants:
            out = folder / f"{variant.base}--{variant.name}.onnx"
            variants[variant.id] = variant.make(base, out, feeds)
        return variants[variant.id], feeds, base

    return build


def _session(model: Path | onnx.ModelProto, optimize: bool = True) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    if not optimize:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _feeds_for(session: onnxruntime.InferenceSession, feeds: Feeds) -> Feeds:
    """The feeds a model takes, float inputs cast to float16 where it declares them so."""
    types = {i.name: i.type for i in session.get_inputs()}
    return {
        k: v.astype(np.float16) if types[k] == "tensor(float16)" else v
        for k, v in feeds.items()
        if k in types
    }


def _ort(model: Path | onnx.ModelProto, feeds: Feeds, optimize: bool = True) -> dict:
    session = _session(model, optimize)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, _feeds_for(session, feeds)), strict=True))


def _max_error(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())


def _assert_zipmap(name: str, got, want, tol: float) -> None:
    """ZipMap outputs (lists of {label: probability}) with the same keys and close values."""
    assert len(got) == len(want), name
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w), (name, g, w)
        worst = max(abs(float(g[k]) - float(w[k])) for k in w)
        assert worst <= tol, f"{name}: error {worst} above {tol}"


def _check_fp32(got: dict, want: dict) -> None:
    for name, expected in want.items():
        actual = got[name]
        if isinstance(expected, list):
            _assert_zipmap(name, actual, expected, 1e-4)
            continue
        actual = np.asarray(actual)
        assert actual.shape == expected.shape, name
        if expected.dtype.kind in "iub":
            np.testing.assert_array_equal(actual, expected, err_msg=name)
            continue
        bound = 1e-4 * float(np.abs(expected).max())
        assert _max_error(actual, expected) <= bound, (
            f"{name}: worst error {_max_error(actual, expected):.3g}, allowed {bound:.3g}"
        )


def _check_fp16(got: dict, want16: dict, want32: dict) -> None:
    for name, expected in want16.items():
        actual = np.asarray(got[name])
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
        ours, theirs = _max_error(actual, want32[name]), _max_error(expected, want32[name])
        assert ours <= 1.2 * theirs, (
            f"{name}: onnx2jax is {ours:.3g} from the float32 result, onnxruntime's float16 "
            f"{theirs:.3g} ({ours / theirs:.2f}x)"
        )


_QUANTIZING = {
    "QuantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "QLinearAdd",
    "QLinearMul",
    "QLinearSoftmax",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "QLinearConcat",
    "QLinearLeakyRelu",
    "QLinearSigmoid",
    "QGemm",
    "QAttention",
}
_INTEGER_PRODUCTS = {"MatMulInteger", "ConvInteger"}


def _output_step(graph: onnx.GraphProto, name: str) -> float:
    """The largest scale of the DequantizeLinear nodes nearest upstream of tensor ``name``."""
    producer = {o: n for n in graph.node for o in n.output}
    scales = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    steps, todo, seen = [0.0], [name], set()
    while todo:
        node = producer.get(todo.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "DequantizeLinear" and node.input[1] in scales:
            steps.append(float(np.max(scales[node.input[1]])))
        else:
            todo.extend(i for i in node.input if i)
    return max(steps)


def _one_node(node: onnx.NodeProto, values: dict, opsets) -> tuple[onnx.ModelProto, dict]:
    """``node`` as a model of its own, and its inputs from ``values``."""
    inputs = [i for i in node.input if i]
    graph = onnx.helper.make_graph(
        [node],
        "one",
        [
            onnx.helper.make_tensor_value_info(
                i, onnx.helper.np_dtype_to_tensor_dtype(values[i].dtype), values[i].shape
            )
            for i in inputs
        ],
        [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o],
    )
    return onnx.helper.make_model(graph, opset_imports=opsets), {i: values[i] for i in inputs}


def _exact_integer_product(node: onnx.NodeProto, values: dict, opsets) -> np.ndarray:
    """``node`` alone, evaluated by onnx.reference in exact integer arithmetic."""
    from onnx.reference import ReferenceEvaluator

    model, feeds = _one_node(node, values, opsets)
    return ReferenceEvaluator(model).run(None, feeds)[0]


def _ort_node(node: onnx.NodeProto, values: dict, opsets) -> list[np.ndarray]:
    """``node`` alone in onnxruntime, on onnx2jax's values of its inputs."""
    model, feeds = _one_node(node, values, opsets)
    return _session(model, optimize=False).run(None, feeds)


def _check_quant(model: onnx2jax.Model, path: Path, feeds: Feeds) -> None:
    proto = onnx.load(str(path))
    graph = proto.graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    inner = [o for n in graph.node for o in n.output if o]
    outputs = [o.name for o in graph.output]
    # onnxruntime with optimizations off and every tensor an output: nothing fused away.
    everything = onnx.ModelProto()
    everything.CopyFrom(proto)
    del everything.graph.output[:]
    everything.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in inner)
    plain = _ort(everything, feeds, optimize=False)
    ours = model(**feeds, outputs=inner)
    values = {
        **feeds,
        **initializers,
        **{k: np.asarray(v) for k, v in ours.items() if not isinstance(v, list)},
    }
    for node in graph.node:
        if node.op_type in _QUANTIZING:
            # On the same inputs: a one-step difference upstream may grow through a product.
            expected = _ort_node(node, values, proto.opset_import)
            for out, want in zip([o for o in node.output if o], expected, strict=True):
                if want.dtype.kind in "iu":
                    steps = np.abs(values[out].astype(np.int64) - want.astype(np.int64))
                    assert steps.max() <= 1, (
                        f"{node.op_type} {node.name!r}: {int((steps > 1).sum())} elements "
                        f"more than one step from onnxruntime (worst {int(steps.max())})"
                    )
        elif node.op_type in _INTEGER_PRODUCTS:
            exact = _exact_integer_product(node, values, proto.opset_import)
            np.testing.assert_array_equal(
                values[node.output[0]], exact, err_msg=f"{node.op_type} {node.name!r}"
            )
    fused = _ort(path, feeds)
    for name in outputs:
        if isinstance(plain[name], list):
            tol = max(1e-4, _output_step(graph, name))
            _assert_zipmap(name, ours[name], plain[name], tol)
            apart = max(
                abs(float(f[k]) - float(p[k]))
                for f, p in zip(fused[name], plain[name], strict=True)
                for k in p
            )
            _assert_zipmap(name, ours[name], fused[name], tol + apart)
            continue
        want = np.asarray(plain[name])
        if want.dtype.kind in "iub":
            np.testing.assert_array_equal(values[name], want, err_msg=name)
            continue
        tol = max(1e-4 * float(np.abs(want).max()), _output_step(graph, name))
        error = _max_error(values[name], want)
        assert error <= tol, f"{name}: {error:.3g} from onnxruntime unfused, allowed {tol:.3g}"
        allowed = tol + _max_error(fused[name], want)
        error = _max_error(values[name], fused[name])
        assert error <= allowed, f"{name}: {error:.3g} from onnxruntime, allowed {allowed:.3g}"


@pytest.fixture(scope="session")
def ours(built) -> Callable[[Variant], dict]:
    """onnx2jax's outputs for a variant's feeds (compiled once per session)."""
    cache: dict[str, dict] = {}

    def run(variant: Variant) -> dict:
        if variant.id not in cache:
            path, feeds, _ = built(variant)
            cache[variant.id] = onnx2jax.load(path)(**_feeds_for(_session(path), feeds))
        return cache[variant.id]

    return run


@pytest.mark.parametrize("variant", _params(VARIANTS, {}))
def test_variant_matches_onnxruntime(variant: Variant, built, ours) -> None:
    path, feeds, _ = built(variant)
    if variant.check == "quant":
        _check_quant(onnx2jax.load(path), path, feeds)
    elif variant.check == "fp32":
        _check_fp32(ours(variant), _ort(path, feeds))
    else:
        # The float16 result itself: within four float16 epsilons of the output's scale from
        # onnxruntime's (test_float16_error_as_onnxruntime's holds the 1.2x criterion).
        for name, want in _ort(path, feeds).items():
            got = np.asarray(ours(variant)[name])
            assert got.shape == want.shape and got.dtype == want.dtype, name
            bound = 4 * float(np.finfo(np.float16).eps) * float(np.abs(want).max())
            assert _max_error(got, want) <= bound, (
                f"{name}: {_max_error(got, want):.3g} from onnxruntime, allowed {bound:.3g}"
            )


@pytest.mark.parametrize("variant", _params([v for v in VARIANTS if v.check == "fp16"], FP16_XFAIL))
def test_float16_error_as_onnxruntime(variant: Variant, built, ours) -> None:
    path, feeds, base = built(variant)
    _check_fp16(ours(variant), _ort(path, feeds), _ort(base, feeds))


#: Every variant through the command users try first (it makes its own random inputs).
@pytest.mark.parametrize("variant", _params(VARIANTS, CLI_XFAIL))
def test_cli_check_passes(variant: Variant, built, capsys) -> None:
    path, _, _ = built(variant)
    status = cli.main(["check", str(path), "--quiet"])
    report = capsys.readouterr().out
    assert status == 0, report
    assert "OK: all" in report
