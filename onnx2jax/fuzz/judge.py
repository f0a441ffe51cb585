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
from onnx2jax.core.errors import DataDependentShapeError, UnsupportedOpError

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


# Elementwise ops ill-conditioned near a point (Acos, Asin and Atanh near +-1, Reciprocal near
# 0): |f'(x)| in float64. Where their input already differs within tolerance between the
# engines and that difference times |f'(x)| exceeds the output's tolerance, the output is not
# compared (nor what is computed from it): a last-bit difference upstream, amplified.
ILL_CONDITIONED = {
    "Acos": lambda x: 1 / np.sqrt(1 - x * x),
    "Asin": lambda x: 1 / np.sqrt(1 - x * x),
    "Atanh": lambda x: 1 / np.abs(1 - x * x),
    "Reciprocal": lambda x: 1 / (x * x),
}

# onnxruntime's max pooling starts from the lowest finite value, so a window of only -inf
# gives that value where the spec's max is -inf.
MAX_POOLS = frozenset({"MaxPool", "GlobalMaxPool"})


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
) -> tuple[list[np.ndarray], str, frozenset[str]]:
    """Outputs of onnxruntime; where it lacks a kernel for a node, the graph runs node by node,
    each node in onnxruntime when it can and in the reference evaluator otherwise. Also the
    engine(s) and the names of the values the reference evaluator computed."""
    try:
        return run_onnxruntime(model, feeds), "onnxruntime", frozenset()
    except Exception as exc:
        if not _lacks_kernel(exc):
            raise Skip(f"onnxruntime: {str(exc).splitlines()[0][:200]}") from exc
    values: dict[str, np.ndarray] = {
        t.name: numpy_helper.to_array(t) for t in model.graph.initializer
    }
    values.update(feeds)
    static = static_names(model)
    by_evaluator: set[str] = set()
    for node in model.graph.node:
        single, single_feeds = submodel(model, [node], values, static)
        try:
            outputs = run_onnxruntime(single, single_feeds)
        except Exception as exc:
            if not _lacks_kernel(exc):
                raise Skip(f"onnxruntime: {str(exc).splitlines()[0][:200]}") from exc
            outputs = _checked_reference(single, single_feeds)
            by_evaluator |= {o for o in node.output if o}
        values.update(zip((o for o in node.output if o), outputs, strict=True))
    outputs = [values[o.name] for o in model.graph.output]
    return outputs, "onnxruntime+reference", frozenset(by_evaluator)


def run_onnx2jax(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]
) -> dict[str, list[np.ndarray] | None]:
    """Outputs of ``model(...)`` and of ``jax.jit(model.apply)`` (None where that mode cannot
    run the graph by design: data-dependent shapes under the caller's jit)."""
    # float16 values held in float32 between ops, as onnxruntime's CPU provider runs them.
    compiled = onnx2jax.load(model, float16_compute="float32")
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


def _drops_nan_by_evaluator(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is (or wraps) an AveragePool that the reference evaluator computes with
    NaNs left out: without count_include_pad it pads with NaN and averages with ``nanmean``,
    which drops the input's own NaNs too (onnxruntime and onnx2jax propagate them)."""
    if node.op_type == "AveragePool":
        pad = next((a.i for a in node.attribute if a.name == "count_include_pad"), 0)
        return pad == 0
    return any(
        _drops_nan_by_evaluator(inner)
        for attr in node.attribute
        if attr.type == onnx.AttributeProto.GRAPH
        for inner in attr.g.node
    )


def _amplified(
    node: onnx.NodeProto,
    ops: set[str],
    values: Mapping[str, np.ndarray],
    others: Sequence[Mapping[str, np.ndarray]],
) -> bool:
    """Whether an ILL_CONDITIONED op turns its input's difference between the engines, times
    its derivative there, into more than its output's tolerance."""
    derivative = next((ILL_CONDITIONED[op] for op in ops if op in ILL_CONDITIONED), None)
    if derivative is None:
        return False
    outputs = [np.asarray(values[o]) for o in node.output if o in values]
    for name in node_reads(node):
        want = values.get(name)
        if want is None or np.asarray(want).dtype.kind != "f":
            continue
        want = np.asarray(want, np.float64)
        for other in others:
            got = other.get(name)
            if got is None or np.shape(got) != want.shape:
                continue
            with np.errstate(all="ignore"):
                spread = np.abs(derivative(want) * (np.asarray(got, np.float64) - want))
            spread = np.where(np.isfinite(want) & np.isfinite(got), spread, 0.0)
            for out in outputs:
                if out.dtype.kind != "f":
                    continue
                rtol, atol = TOLERANCES[out.dtype]
                size = np.where(np.isfinite(out), np.abs(out.astype(np.float64)), 0.0)
                # Element by element; for an output shaped otherwise (a Loop's), its smallest
                # tolerance.
                size = size if size.shape == spread.shape else np.min(size, initial=0.0)
                allowed = atol * float(np.max(size, initial=1.0)) + rtol * size
                if np.any(spread > allowed):
                    return True
    return False


@dataclass
class Judging:
    """How the outputs of one graph are compared (see :func:`unjudged`)."""

    skip: set[str]  # not compared
    # Compared after rounding onnx2jax's value to float16: casts of float16 values that
    # onnx2jax holds in float32 between ops (float16_compute="float32").
    as_float16: set[str]
    # onnxruntime's max pooling of only -inf: its lowest finite value there reads as -inf.
    lowest_as_minus_inf: set[str]


def unjudged(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    expected: Sequence[np.ndarray],
    actual: Sequence[Sequence[np.ndarray]] = (),
    by_evaluator: frozenset[str] = frozenset(),
) -> Judging:
    """Which outputs are not compared, or compared in a particular way (see docs/fuzzing.md,
    "How it is judged").

    Not compared: outputs of a node that reads a NaN where engines define NaN differently
    (NAN_UNDEFINED; any non-finite value for NONFINITE_UNDEFINED; an AveragePool the reference
    evaluator computed, see _drops_nan_by_evaluator); of a DISCONTINUOUS node whose float
    inputs already differ within tolerance, or are float16 values onnx2jax holds in float32;
    of an ILL_CONDITIONED node that amplifies its input's difference past the tolerance; and
    everything computed from all those, from ``as_float16`` and from ``lowest_as_minus_inf``.
    ``by_evaluator`` names the values the reference evaluator computed.
    """
    names = [o.name for o in model.graph.output]
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values.update(feeds)
    values.update(zip(names, expected, strict=False))
    others = [dict(zip(names, got, strict=False)) for got in actual]
    judging = Judging(set(), set(), set())
    # float16 values computed by a node: onnx2jax holds them in float32, unrounded, so the
    # nodes reading them may see a value other than the float16 output the engines compare.
    held: set[str] = set()
    for node in model.graph.node:
        reads = node_reads(node)
        ops = _inner_ops(node)
        floats = [n for n in reads if n in values and np.asarray(values[n]).dtype.kind == "f"]
        nan_in = any(np.isnan(values[n]).any() for n in floats)
        wide = {n for n in reads if n in held}
        wider: set[str] = set()
        drift = ops & DISCONTINUOUS and (
            bool(wide)
            or any(_float_differs(other.get(n), values.get(n)) for other in others for n in reads)
        )
        nonfinite_in = ops & NONFINITE_UNDEFINED and any(
            not np.isfinite(values[n]).all() for n in floats
        )
        evaluator_nan = (
            nan_in and bool(set(node.output) & by_evaluator) and _drops_nan_by_evaluator(node)
        )
        tainted = judging.skip | judging.as_float16 | judging.lowest_as_minus_inf
        outputs = {o for o in node.output if o}
        out_dtypes = {np.asarray(values[o]).dtype for o in outputs if o in values}
        if ops & {"Cast", "CastLike"} and wide:
            if out_dtypes <= {np.dtype(np.float16)}:  # rounds as the engines' outputs do
                drift = any(
                    _float_differs(other.get(n), values.get(n)) for other in others for n in reads
                )
            elif out_dtypes <= {np.dtype(np.float32), np.dtype(np.float64)}:
                wider = outputs
        if wider and not (reads & tainted):
            judging.as_float16 |= outputs
        elif (
            reads & tainted
            or (nan_in and ops & NAN_UNDEFINED)
            or drift
            or nonfinite_in
            or evaluator_nan
            or _amplified(node, ops, values, others)
        ):
            judging.skip |= outputs
        elif ops & MAX_POOLS:
            judging.lowest_as_minus_inf |= {
                o
                for o in outputs
                if o in values
                and others
                and np.asarray(values[o]).dtype.kind == "f"
                and _lowest_for_minus_inf(values[o], [other.get(o) for other in others])
            }
        if node.op_type != "Constant":
            held |= {o for o in outputs if np.asarray(values.get(o, 0)).dtype == np.float16}
    return judging


def _lowest_for_minus_inf(want: np.ndarray, gots: Sequence[np.ndarray | None]) -> bool:
    """Whether onnxruntime gives its lowest finite value where onnx2jax gives -inf."""
    lowest = np.asarray(want) == np.finfo(np.asarray(want).dtype).min
    return bool(lowest.any()) and all(
        got is not None
        and np.shape(got) == np.shape(want)
        and bool(np.all(np.asarray(got)[lowest] == -np.inf))
        for got in gots
    )


def _first_difference(
    actual: Sequence[np.ndarray],
    expected: Sequence[np.ndarray],
    names: Sequence[str],
    judging: Judging | None = None,
) -> str | None:
    if len(actual) != len(expected):
        return f"{len(actual)} outputs != {len(expected)}"
    judging = judging or Judging(set(), set(), set())
    for name, got, want in zip(names, actual, expected, strict=True):
        if name in judging.skip:
            continue
        want = np.asarray(want)
        if name in judging.as_float16 and got.dtype == want.dtype:
            got, want = got.astype(np.float16), want.astype(np.float16)
        elif name in judging.lowest_as_minus_inf and got.dtype == want.dtype:
            want = np.where(want == np.finfo(want.dtype).min, -np.inf, want).astype(want.dtype)
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
        expected, engine, by_evaluator = run_reference(model, feeds)
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
    judging = unjudged(
        model,
        feeds,
        expected,
        [values for values in results.values() if values is not None],
        by_evaluator,
    )
    problems = {
        mode: _first_difference(values, expected, names, judging)
        for mode, values in results.items()
        if values is not None
    }
    problems = {mode: p for mode, p in problems.items() if p}
    if not problems and judging.lowest_as_minus_inf:
        return Outcome(
            "departure",
            "onnxruntime's max pooling of only -inf gives the lowest finite value, onnx2jax "
            f"-inf (the spec's max): {', '.join(sorted(judging.lowest_as_minus_inf))}",
            engine=engine,
        )
    if not problems:
        return Outcome("ok", engine=engine)
    message = "; ".join(f"{mode} vs {engine}: {p}" for mode, p in problems.items())
    try:
        spec = run_reference_evaluator(model, feeds)
    except Exception:
        spec = None
    if spec is not None and all(
        _first_difference(values, spec, names, judging) is None
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
            expected, _, _ = run_reference(model, feeds)
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
    # One node, beside the Constant nodes that hold the static values it reads.
    core = [n for n in best[0].graph.node if n.op_type != "Constant"]
    if len(core) == 1:
        plain = _unwrapped(core[0])
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
