"""Run one graph in onnx2jax and in a reference engine, compare, and shrink a failing graph.

onnx2jax runs twice: ``model(...)`` (its own jit-compiled program) and ``jax.jit(model.apply)``.
The reference is onnxruntime, or ``onnx.reference.ReferenceEvaluator`` where onnxruntime has
no kernel for the node. When onnx2jax differs from onnxruntime but equals the reference
evaluator, onnxruntime departs from the spec there: that is reported, not failed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jax
import numpy as np
import onnx
from onnx import helper, numpy_helper

import onnx2jax
from onnx2jax.errors import DataDependentShapeError, UnsupportedOpError

# (rtol, atol) per float dtype; atol scales with the largest finite reference value so that
# cancellation in a chain does not read as an error.
# onnxruntime's float64 kernels of several ops (Erf, Gelu, Cos) and the reference evaluator's
# Erf are only accurate to about 1e-8, so float64 is held to 1e-6.
TOLERANCES = {
    np.dtype(np.float16): (1e-2, 2e-3),
    np.dtype(np.float32): (2e-5, 2e-6),
    np.dtype(np.float64): (1e-6, 1e-7),
}


# Ops whose result for NaN inputs engines define differently: onnxruntime's max pooling and
# max/min reductions skip NaN, onnx2jax (like NumPy) propagates it. Outputs of such a node
# that reads a NaN, and everything computed from them, are not compared.
NAN_UNDEFINED = frozenset(
    {
        "MaxPool",
        "GlobalMaxPool",
        "ReduceMax",
        "ReduceMin",
        "ArgMax",
        "ArgMin",
        "Hardmax",
        "TopK",
        "LpPool",
    }
)


_QUICK_COMPILE = {"xla_backend_optimization_level": 0}


# Ops whose result for inf or NaN inputs engines define differently: onnx2jax's linear and
# cubic Resize multiply by interpolation matrices, where a zero weight times inf gives NaN;
# a convolution's padding times an infinite weight is NaN in the reference evaluator and
# skipped by XLA.
NONFINITE_UNDEFINED = frozenset({"Resize", "Conv"})

# Ops where an input that differs in its last bits (within tolerance) may change the output
# entirely (a step, a comparison, an order): their outputs are only compared when their float
# inputs are identical in both engines.
DISCONTINUOUS = frozenset(
    {
        "Mod",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "Equal",
        "Less",
        "Greater",
        "LessOrEqual",
        "GreaterOrEqual",
        "Cast",
        "CastLike",
        "ArgMax",
        "ArgMin",
        "Hardmax",
        "TopK",
        "ThresholdedRelu",
        "Shrink",
    }
)


class Skip(Exception):
    """The graph cannot be judged (no engine runs it, or onnx2jax reports the op unsupported)."""


@dataclass
class Outcome:
    """What checking one graph gave: ``ok``, ``skip``, ``departure`` or ``fail``."""

    kind: str
    message: str = ""
    category: str = ""  # for failures: "mismatch" or the onnx2jax exception's type name
    engine: str = ""


def _session_options():  # noqa: ANN202 - onnxruntime is imported lazily
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    # Its default graph optimizations, as users run it: they change results (float16 graphs,
    # for one, then hold their values in float32 between ops, as onnx2jax does on the CPU).
    options.log_severity_level = 4
    onnxruntime.set_default_logger_severity(4)
    return options


def run_onnxruntime(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(
        model.SerializeToString(), _session_options(), providers=["CPUExecutionProvider"]
    )
    return [np.asarray(v) for v in session.run(None, dict(feeds))]


def run_reference_evaluator(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]
) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return [np.asarray(v) for v in ReferenceEvaluator(model).run(None, dict(feeds))]


def _lacks_kernel(exc: Exception) -> bool:
    text = str(exc)
    return "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text


def _checked_reference(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The reference evaluator's outputs, where they agree with the model's declared types."""
    try:
        outputs = run_reference_evaluator(model, feeds)
    except Exception as exc:
        raise Skip(f"no engine runs it: {type(exc).__name__}: {str(exc)[:200]}") from exc
    # The reference evaluator has bugs of its own: trust it only where its dtypes and shapes
    # agree with ONNX shape inference.
    for info, value in zip(model.graph.output, outputs, strict=False):
        declared = info.type.tensor_type.elem_type
        if declared and np.asarray(value).dtype != helper.tensor_dtype_to_np_dtype(declared):
            raise Skip(
                f"reference evaluator's dtype {np.asarray(value).dtype} for "
                f"{info.name!r} contradicts the model"
            )
        dims = info.type.tensor_type.shape.dim
        if info.type.tensor_type.HasField("shape") and (
            len(dims) != np.ndim(value)
            or any(
                d.HasField("dim_value") and d.dim_value != n
                for d, n in zip(dims, np.shape(value), strict=False)
            )
        ):
            raise Skip(
                f"reference evaluator's shape {np.shape(value)} for {info.name!r} "
                "contradicts shape inference"
            )
    return outputs


def run_reference(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]
) -> tuple[list[np.ndarray], str]:
    """Outputs of onnxruntime; where it lacks a kernel for a node, the graph runs node by node,
    each node in onnxruntime when it can and in the reference evaluator otherwise."""
    try:
        return run_onnxruntime(model, feeds), "onnxruntime"
    except Exception as exc:
        if not _lacks_kernel(exc):
            raise Skip(f"onnxruntime: {str(exc).splitlines()[0][:200]}") from exc
    values: dict[str, np.ndarray] = {
        t.name: numpy_helper.to_array(t) for t in model.graph.initializer
    }
    values.update(feeds)
    static = static_names(model)
    for node in model.graph.node:
        single, single_feeds = submodel(model, [node], values, static)
        try:
            outputs = run_onnxruntime(single, single_feeds)
        except Exception as exc:
            if not _lacks_kernel(exc):
                raise Skip(f"onnxruntime: {str(exc).splitlines()[0][:200]}") from exc
            outputs = _checked_reference(single, single_feeds)
        values.update(zip((o for o in node.output if o), outputs, strict=True))
    return [values[o.name] for o in model.graph.output], "onnxruntime+reference"


def run_onnx2jax(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]
) -> dict[str, list[np.ndarray] | None]:
    """Outputs of ``model(...)`` and of ``jax.jit(model.apply)`` (None where that mode cannot
    run the graph by design: data-dependent shapes under the caller's jit)."""
    compiled = onnx2jax.load(model)
    names = compiled.output_names
    out = compiled(**feeds)
    results: dict[str, list[np.ndarray] | None] = {
        "model(...)": [np.asarray(out[n]) for n in names]
    }
    try:
        # This run checks the trace under a caller's jit (static versus traced values);
        # model(...) above runs the optimised program, so this one compiles unoptimised, in
        # half the time.
        applied = jax.jit(compiled.apply, compiler_options=_QUICK_COMPILE)(compiled.params, **feeds)
        results["jax.jit(apply)"] = [np.asarray(applied[n]) for n in names]
    except DataDependentShapeError:
        results["jax.jit(apply)"] = None
    return results


def compare(got: np.ndarray, want: np.ndarray) -> str | None:
    """None when ``got`` equals ``want`` (within the dtype's tolerance), else what differs."""
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} != {want.dtype}"
    if got.shape != want.shape:
        return f"shape {got.shape} != {want.shape}"
    if got.dtype.kind != "f":
        bad = got != want
        if not bad.any():
            return None
        where = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))
        return (
            f"{int(bad.sum())} of {bad.size} differ, first at {where}: {got[where]!r} != "
            f"{want[where]!r}"
        )
    g, w = got.astype(np.float64), want.astype(np.float64)
    nan_g, nan_w = np.isnan(g), np.isnan(w)
    inf_g, inf_w = np.isinf(g), np.isinf(w)
    bad = (nan_g != nan_w) | (inf_g != inf_w) | (inf_g & inf_w & (g != w))
    finite = ~(nan_g | nan_w | inf_g | inf_w)
    rtol, atol = TOLERANCES[got.dtype]
    scale = float(np.max(np.abs(w[finite]), initial=1.0))
    with np.errstate(invalid="ignore", over="ignore"):
        bad |= finite & (np.abs(g - w) > atol * scale + rtol * np.abs(w))
    if not bad.any():
        return None
    where = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))
    return (
        f"{int(bad.sum())} of {bad.size} differ, first at {where}: {g[where]!r} != "
        f"{w[where]!r} (rtol {rtol}, atol {atol} x {scale:g})"
    )


def _inner_ops(node: onnx.NodeProto) -> set[str]:
    ops = {node.op_type}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            for inner in attr.g.node:
                ops |= _inner_ops(inner)
    return ops


def _float_differs(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None or np.asarray(b).dtype.kind != "f":
        return False
    a, b = np.asarray(a), np.asarray(b)
    return a.shape != b.shape or not np.array_equal(a, b, equal_nan=True)


def unjudged(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    expected: Sequence[np.ndarray],
    actual: Sequence[Sequence[np.ndarray]] = (),
) -> set[str]:
    """Outputs not compared: those of a node that reads a NaN where engines define NaN
    differently (NAN_UNDEFINED; any non-finite value for NONFINITE_UNDEFINED), or whose float
    inputs already differ within tolerance where a tiny difference changes the result
    (DISCONTINUOUS); and everything computed from them."""
    names = [o.name for o in model.graph.output]
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values.update(feeds)
    values.update(zip(names, expected, strict=False))
    others = [dict(zip(names, got, strict=False)) for got in actual]
    out: set[str] = set()
    for node in model.graph.node:
        reads = node_reads(node)
        ops = _inner_ops(node)
        nan_in = any(
            np.asarray(values[n]).dtype.kind == "f" and np.isnan(values[n]).any()
            for n in reads
            if n in values
        )
        drift = ops & DISCONTINUOUS and any(
            _float_differs(other.get(n), values.get(n)) for other in others for n in reads
        )
        nonfinite_in = ops & NONFINITE_UNDEFINED and any(
            np.asarray(values[n]).dtype.kind == "f" and not np.isfinite(values[n]).all()
            for n in reads
            if n in values
        )
        if reads & out or (nan_in and ops & NAN_UNDEFINED) or drift or nonfinite_in:
            out |= set(node.output)
    return out


def _first_difference(
    actual: Sequence[np.ndarray],
    expected: Sequence[np.ndarray],
    names: Sequence[str],
    skip: set[str] = frozenset(),
) -> str | None:
    if len(actual) != len(expected):
        return f"{len(actual)} outputs != {len(expected)}"
    for name, got, want in zip(names, actual, expected, strict=True):
        if name in skip:
            continue
        problem = compare(got, want)
        if problem:
            return f"output {name!r}: {problem}"
    return None


def check(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> Outcome:
    """Run ``model`` in both engines (x64 on, as ONNX's int64 and double need) and judge it."""
    with jax.enable_x64(True):
        return _check(model, feeds)


def _check(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> Outcome:
    try:
        expected, engine = run_reference(model, feeds)
    except Skip as exc:
        return Outcome("skip", str(exc))
    try:
        results = run_onnx2jax(model, feeds)
    except UnsupportedOpError as exc:
        return Outcome("skip", f"unsupported: {str(exc).splitlines()[-1].strip()}")
    except Exception as exc:
        return Outcome(
            "fail", f"onnx2jax raised {type(exc).__name__}: {exc}", type(exc).__name__, engine
        )
    names = [o.name for o in model.graph.output]
    skip = unjudged(
        model, feeds, expected, [values for values in results.values() if values is not None]
    )
    problems = {
        mode: _first_difference(values, expected, names, skip)
        for mode, values in results.items()
        if values is not None
    }
    problems = {mode: p for mode, p in problems.items() if p}
    if not problems:
        return Outcome("ok", engine=engine)
    message = "; ".join(f"{mode} vs {engine}: {p}" for mode, p in problems.items())
    try:
        spec = run_reference_evaluator(model, feeds)
    except Exception:
        spec = None
    if spec is not None and all(
        _first_difference(values, spec, names, skip) is None
        for values in results.values()
        if values is not None
    ):
        return Outcome(
            "departure",
            f"onnx2jax equals onnx.reference, onnxruntime differs: {message}",
            engine=engine,
        )
    return Outcome("fail", message, "mismatch", engine)


# ---------------------------------------------------------------- shrinking
def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used |= node_reads(node) - defined
        defined |= set(node.output)
    used |= {v.name for v in graph.output} - defined
    return used


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Every name ``node`` reads, including those its subgraphs read from outer scopes."""
    names = {n for n in node.input if n}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            names |= _outer_names(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                names |= _outer_names(g)
    return names


def static_names(model: onnx.ModelProto) -> set[str]:
    """Tensors onnx2jax knows at trace time: initializers that are not params (float ones
    are, unless an op needs them static) and what nodes compute from those alone."""
    try:
        with jax.enable_x64(True):
            params = set(onnx2jax.load(model).params)
    except Exception:
        params = {
            t.name
            for t in model.graph.initializer
            if np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).kind == "f"
        }
    static = {t.name for t in model.graph.initializer if t.name not in params}
    for node in model.graph.node:
        reads = node_reads(node)
        if reads <= static and node.op_type not in ("If", "Loop", "Scan"):
            static |= set(node.output)
    return static


def submodel(
    model: onnx.ModelProto,
    nodes: Sequence[onnx.NodeProto],
    values: Mapping[str, np.ndarray],
    static: set[str],
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A model of ``nodes`` alone; what they read from elsewhere becomes inputs (initializers
    where it was static) holding ``values``."""
    produced: set[str] = set()
    external: list[str] = []
    for node in nodes:
        for name in sorted(node_reads(node)):
            if name not in produced and name not in external:
                external.append(name)
        produced |= {o for o in node.output if o}
    inputs, initializers, feeds, constants = [], [], {}, []
    original = {t.name for t in model.graph.initializer}
    for name in external:
        array = np.asarray(values[name])
        if name in original and name not in static:
            initializers.append(numpy_helper.from_array(array, name))
        elif name in static:  # a Constant node keeps it static (a float initializer would not)
            constants.append(
                helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array))
            )
        else:
            inputs.append(
                helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape
                )
            )
            feeds[name] = array
    declared = {v.name: v for v in model.graph.output}
    outputs = [
        declared[o]
        if o in declared
        else helper.make_tensor_value_info(
            o, helper.np_dtype_to_tensor_dtype(np.asarray(values[o]).dtype), None
        )
        if o in values
        else helper.make_value_info(o, onnx.TypeProto())
        for n in nodes
        for o in n.output
        if o
    ]
    graph = helper.make_graph(
        constants + list(nodes), "repro", inputs, outputs, initializer=initializers
    )
    small = helper.make_model(
        graph, opset_imports=list(model.opset_import), ir_version=model.ir_version
    )
    return small, feeds


def _unwrapped(node: onnx.NodeProto) -> onnx.NodeProto | None:
    """The one node an If/Loop wrapper of the fuzzer runs, at the top level."""
    if node.op_type not in ("If", "Loop"):
        return None
    body = next(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
    inner = [n for n in body.node if n.op_type != "Identity" or n.input[0] != "cond_in"]
    if len(inner) != 1:
        return None
    plain = onnx.NodeProto()
    plain.CopyFrom(inner[0])
    del plain.output[:]
    plain.output.extend(f"{o}_plain" for o in inner[0].output)
    return plain


def shrink(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], outcome: Outcome, budget: int = 40
) -> tuple[onnx.ModelProto, dict[str, np.ndarray], Outcome]:
    """The smallest run of consecutive nodes that still fails the same way (at most ``budget``
    graphs tried); intermediate values come from the reference engine."""
    try:
        with jax.enable_x64(True):
            expected, _ = run_reference(model, feeds)
    except Skip:
        return model, dict(feeds), outcome
    values: dict[str, np.ndarray] = {
        t.name: numpy_helper.to_array(t) for t in model.graph.initializer
    }
    values.update(feeds)
    values.update(zip((o.name for o in model.graph.output), expected, strict=True))
    static = static_names(model)
    nodes = list(model.graph.node)
    tried = 0
    best = (model, dict(feeds), outcome)
    for length in range(1, len(nodes)):
        for start in range(len(nodes) - length + 1):
            if tried >= budget:
                return best
            window = nodes[start : start + length]
            candidate, cfeeds = submodel(model, window, values, static)
            tried += 1
            result = check(candidate, cfeeds)
            # A piece that computes a differing output and, alone, shows onnxruntime departing
            # from the spec explains the difference (the reference evaluator could not run the
            # whole graph to tell).
            departs = result.kind == "departure" and any(
                f"output {o!r}" in outcome.message for n in window for o in n.output
            )
            if departs or (result.kind == "fail" and result.category == outcome.category):
                best = (candidate, cfeeds, result)
                break
        if best[0] is not model:
            break
    if len(best[0].graph.node) == 1:
        plain = _unwrapped(best[0].graph.node[0])
        if plain is not None:
            candidate, cfeeds = submodel(best[0], [plain], {**values, **best[1]}, static)
            result = check(candidate, cfeeds)
            # The node alone may show onnxruntime departing from the spec, which the wrapper
            # hid (the reference evaluator cannot run every If/Loop).
            if result.kind == "departure" or (
                result.kind == "fail" and result.category == outcome.category
            ):
                best = (candidate, cfeeds, result)
    return best
