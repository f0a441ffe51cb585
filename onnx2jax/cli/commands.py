"""The ``onnx2jax`` command: ``info``, ``run``, ``check``, ``bench`` and ``compile`` an ONNX model.

MODEL is a file path or ``hf://OWNER/NAME[@REVISION]/PATH/IN/REPO.onnx``. Results go to stdout
as plain text, or as one JSON document with ``--json``; progress goes to stderr (``--quiet``
silences it). Exit status: 0 success, 1 ``check`` found a mismatch, 2 an error (message on
stderr, no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx2jax.core.errors import InputError, Onnx2JaxError, UnsupportedOpError
from onnx2jax.core.graph import TensorInfo, find_unsupported, model_opsets, subgraphs, tensor_info
from onnx2jax.core.loader import read_model
from onnx2jax.core.model import PRECISIONS, Model, load
from onnx2jax.hub import HUB_PREFIX, describe, download_model, parse_hub_uri
from onnx2jax.runtime.process import tune_process

EXAMPLE_SAMPLES = Path(__file__).resolve().parents[1] / "examples" / "digits_samples.npz"


class Progress:
    """Progress of long steps on stderr: ``message ... done (1.2 s)``."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        if not enabled:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()

    @contextlib.contextmanager
    def step(self, message: str) -> Iterator[None]:
        if self.enabled:
            print(f"{message} ...", end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if self.enabled:
                print(" failed", file=sys.stderr, flush=True)
            raise
        if self.enabled:
            print(f" done ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)


# -------------------------------------------------------------------- models and inputs
def model_file(ref: str, progress: Progress) -> Path:
    """The local path of MODEL: the path itself, or the hub file (downloaded into the cache).

    Example:
        >>> model_file("model.onnx", Progress(enabled=True))
        PosixPath('model.onnx')
    """
    if not ref.startswith(HUB_PREFIX):
        return Path(ref)
    repo_id, filename, revision = parse_hub_uri(ref)
    with progress.step(f"fetching {describe(repo_id, filename, revision)}"):
        return download_model(repo_id, filename, revision)


def load_model(ref: str, progress: Progress, precision: str = "float32") -> tuple[Model, Path]:
    path = model_file(ref, progress)
    with progress.step(f"converting {path.name}"):
        return load(path, precision=precision), path


def parse_assignments(items: Sequence[str], what: str) -> dict[str, str]:
    """``["a=1", "b=x.npy"]`` -> ``{"a": "1", "b": "x.npy"}``.

    Example:
        >>> parse_assignments(["batch=4", "sequence=16"], "--dim")
        {'batch': '4', 'sequence': '16'}
    """
    parsed = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise InputError(f"{what} expects NAME=VALUE, got {item!r}")
        parsed[name] = value
    return parsed


def make_inputs(
    inputs: Sequence[TensorInfo],
    given: Mapping[str, np.ndarray],
    dims: Mapping[str, int],
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Inputs for a run: those ``given``, and random ones of the declared shapes for the rest.

    A named (symbolic) dimension takes its size from ``dims``, else 1. Floats are standard
    normal; integers are 1 in inputs whose name contains "mask" and 0 or 1 elsewhere (valid ids,
    indices and token types for almost any model); booleans are random.

    Example:
        >>> from onnx import TensorProto
        >>> info = TensorInfo("x", TensorProto.FLOAT, ("batch", 3))
        >>> make_inputs([info], {}, {"batch": 2})["x"].shape
        (2, 3)
    """
    rng = np.random.default_rng(seed)
    known = {d for info in inputs for d in (info.shape or ()) if isinstance(d, str)}
    unknown = sorted(set(dims) - known)
    if unknown:
        raise InputError(
            f"--dim names {unknown}, which no input has; the inputs' named "
            f"dimensions are {sorted(known) or 'none'}"
        )
    extra = sorted(set(given) - {i.name for i in inputs})
    if extra:
        raise InputError(
            f"--input names {extra}, which the model does not take; its inputs "
            f"are {[i.name for i in inputs]}"
        )
    feeds: dict[str, np.ndarray] = {}
    for info in inputs:
        if info.name in given:
            feeds[info.name] = given[info.name]
            continue
        if info.kind != "tensor" or info.shape is None or info.dtype is None:
            raise InputError(
                f"input {info.describe()} has no declared tensor shape and type; "
                f"pass it with --input {info.name}=FILE.npy"
            )
        shape = tuple(
            d if isinstance(d, int) and d > 0 else dims.get(str(d), 1) for d in info.shape
        )
        dtype = info.dtype
        if dtype == np.bool_:
            value = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            value = np.ones(shape) if "mask" in info.name.lower() else rng.integers(0, 2, shape)
        elif dtype.kind in "fcV" or "float" in dtype.name:
            value = rng.standard_normal(shape)
        else:
            raise InputError(
                f"cannot make a random {dtype.name} input {info.name!r}; pass it "
                f"with --input {info.name}=FILE.npy"
            )
        feeds[info.name] = np.asarray(value).astype(dtype)
    return feeds


def read_inputs(args: argparse.Namespace, model: Model) -> dict[str, np.ndarray]:
    given = {}
    for name, file in parse_assignments(args.input, "--input").items():
        try:
            given[name] = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read --input {name}={file}: {exc}") from None
    dims = {}
    for name, size in parse_assignments(args.dim, "--dim").items():
        if not size.isdigit() or int(size) < 1:
            raise InputError(f"--dim {name}={size}: the size must be a positive integer")
        dims[name] = int(size)
    return make_inputs(model.inputs, given, dims, args.seed)


def summary(value: Any) -> dict[str, Any]:
    """Shape, dtype and range of an array, for printing.

    Example:
        >>> summary(np.array([1.0, 3.0]))
        {'shape': [2], 'dtype': 'float64', 'min': 1.0, 'max': 3.0, 'mean': 2.0}
    """
    array = np.asarray(value)
    info: dict[str, Any] = {"shape": list(array.shape), "dtype": str(array.dtype)}
    if array.size and array.dtype.kind in "biuf":
        numbers = array.astype(np.float64)
        info.update(min=float(numbers.min()), max=float(numbers.max()), mean=float(numbers.mean()))
    return info


def emit(args: argparse.Namespace, document: Mapping[str, Any], lines: Sequence[str]) -> None:
    """Print the result: ``document`` as JSON with ``--json``, else the text ``lines``."""
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print("\n".join(lines))


def _shape_text(info: Mapping[str, Any]) -> str:
    return f"{info['dtype']}[{', '.join(str(d) for d in info['shape'])}]"


def _value_lines(values: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, info in values.items():
        stats = (
            f"  min {info['min']:.6g}  max {info['max']:.6g}  mean {info['mean']:.6g}"
            if "min" in info
            else ""
        )
        lines.append(f"  {name}  {_shape_text(info)}{stats}")
    return lines


# -------------------------------------------------------------------- info
def model_info(proto: onnx.ModelProto) -> dict[str, Any]:
    """What ``onnx2jax info`` reports: inputs, outputs, opsets, ops, parameters, unsupported ops.

    Example:
        >>> import onnx2jax
        >>> info = model_info(onnx.load(onnx2jax.example_path()))
        >>> info["inputs"][0]["name"], info["unsupported"]
        ('image', [])
    """
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    opsets = model_opsets(proto)
    ops: Counter[str] = Counter()

    def visit(g: onnx.GraphProto) -> None:
        for node in g.node:
            ops[f"{node.domain or 'ai.onnx'}::{node.op_type}"] += 1
            for sub in subgraphs(node):
                visit(sub)

    visit(graph)
    params = {"tensors": 0, "values": 0, "bytes": 0}
    constants = {"tensors": 0, "values": 0, "bytes": 0}
    for tensor in graph.initializer:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        count = int(np.prod(tensor.dims, dtype=np.int64))
        floating = dtype.kind == "f" or "float" in dtype.name
        target = params if floating else constants
        target["tensors"] += 1
        target["values"] += count
        target["bytes"] += count * dtype.itemsize
    try:
        find_unsupported(graph, opsets)
        unsupported = []
    except UnsupportedOpError as exc:
        unsupported = [
            {"op": f"{domain or 'ai.onnx'}::{op}", "opset": opset, "nodes": nodes}
            for (domain, op, opset), nodes in sorted(exc.missing.items())
        ]

    def describe_values(values: Sequence[onnx.ValueInfoProto]) -> list[dict[str, Any]]:
        described = []
        for value in values:
            info = tensor_info(value)
            described.append(
                {
                    "name": info.name,
                    "kind": info.kind,
                    "dtype": info.dtype.name if info.dtype is not None else None,
                    "shape": None if info.shape is None else list(info.shape),
                }
            )
        return described

    return {
        "inputs": describe_values([v for v in graph.input if v.name not in initializers]),
        "outputs": describe_values(graph.output),
        "opsets": {domain or "ai.onnx": version for domain, version in sorted(opsets.items())},
        "ir_version": proto.ir_version,
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "nodes": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "parameters": params,
        "constants": constants,
        "unsupported": unsupported,
    }


def _info_lines(ref: str, info: Mapping[str, Any]) -> list[str]:
    def value(v: Mapping[str, Any]) -> str:
        dims = (
            "?"
            if v["shape"] is None
            else "[" + ", ".join("?" if d is None else str(d) for d in v["shape"]) + "]"
        )
        kind = "" if v["kind"] == "tensor" else f"{v['kind']} of "
        return f"  {v['name']}: {kind}{v['dtype'] or '?'}{dims}"

    params, constants = info["parameters"], info["constants"]
    lines = [
        f"model     {ref}",
        f"producer  {info['producer'] or '?'}",
        f"ir        {info['ir_version']}",
        "opsets    " + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()),
        "inputs",
        *map(value, info["inputs"]),
        "outputs",
        *map(value, info["outputs"]),
        f"params    {params['tensors']} tensors, {params['values']:,} values, "
        f"{params['bytes'] / 1e6:.2f} MB",
        f"constants {constants['tensors']} tensors, {constants['values']:,} values, "
        f"{constants['bytes'] / 1e6:.2f} MB",
        f"ops       {info['nodes']} nodes, {len(info['ops'])} op types",
    ]
    lines += [f"  {count:6d}  {op}" for op, count in info["ops"].items()]
    if info["unsupported"]:
        lines.append(
            f"unsupported ({len(info['unsupported'])} op types; onnx2jax cannot run this model yet)"
        )
        for entry in info["unsupported"]:
            shown = ", ".join(entry["nodes"][:3]) + (" ..." if len(entry["nodes"]) > 3 else "")
            lines.append(
                f"  {entry['op']} (opset {entry['opset']}): {len(entry['nodes'])} node(s): {shown}"
            )
    else:
        lines.append("unsupported none: every op is supported")
    return lines


def cmd_info(args: argparse.Namespace, progress: Progress) -> int:
    path = model_file(args.model, progress)
    proto, _ = read_model(path)
    info = model_info(proto)
    emit(args, {"model": args.model, **info}, _info_lines(args.model, info))
    return 0


# -------------------------------------------------------------------- run
def _ascii_digits(images: np.ndarray, captions: Sequence[str]) -> list[str]:
    """8x8 images in [0, 1] drawn side by side as text, a caption under each."""
    shades = " .:-=+*#%@"
    lines = []
    for start in range(0, len(images), 8):
        block = images[start : start + 8, 0]
        for row in range(block.shape[1]):
            lines.append(
                "   ".join(
                    "".join(shades[min(int(v * len(shades)), len(shades) - 1)] for v in img[row])
                    for img in block
                )
            )
        lines.append("   ".join(f"{c:<8}" for c in captions[start : start + 8]).rstrip())
        lines.append("")
    return lines


def run_example(args: argparse.Namespace, progress: Progress) -> int:
    from onnx2jax import example_path

    samples = np.load(EXAMPLE_SAMPLES)
    images, labels = samples["images"], samples["labels"]
    with progress.step("converting the example digits CNN"):
        model = load(example_path(), precision=args.precision)
    with progress.step("compiling and running"):
        logits = np.asarray(model(image=images)["logits"])
    predicted = logits.argmax(axis=1)
    correct = int((predicted == labels).sum())
    document = {
        "model": str(example_path()),
        "samples": str(EXAMPLE_SAMPLES),
        "predicted": predicted.tolist(),
        "labels": labels.tolist(),
        "correct": correct,
        "total": len(labels),
    }
    lines = [
        f"Example: {example_path().name}, a small CNN for 8x8 handwritten digits, on "
        f"{len(labels)} held-out images ({EXAMPLE_SAMPLES.name})",
        "",
    ]
    lines += _ascii_digits(
        images,
        [
            f"{p} ({'ok' if p == t else f'true {t}'})"
            for p, t in zip(predicted, labels, strict=True)
        ],
    )
    lines += ["sample  predicted  true"]
    lines += [
        f"{i:6d}  {p:9d}  {t:4d}{'' if p == t else '  <- wrong'}"
        for i, (p, t) in enumerate(zip(predicted, labels, strict=True))
    ]
    lines += [f"{correct}/{len(labels)} correct"]
    emit(args, document, lines)
    return 0


def cmd_run(args: argparse.Namespace, progress: Progress) -> int:
    if args.model is None:
        if args.input or args.dim or args.output:
            raise InputError("--input, --dim and --output need a MODEL")
        return run_example(args, progress)
    model, _ = load_model(args.model, progress, args.precision)
    feeds = read_inputs(args, model)
    with progress.step("compiling and running"):
        outputs = {k: np.asarray(v) for k, v in model(**feeds).items()}
    if args.output:
        np.savez(args.output, **outputs)
    document = {
        "model": args.model,
        "inputs": {k: summary(v) for k, v in feeds.items()},
        "outputs": {k: summary(v) for k, v in outputs.items()},
    }
    if args.output:
        document["saved"] = str(args.output)
    lines = [
        "inputs",
        *_value_lines(document["inputs"]),
        "outputs",
        *_value_lines(document["outputs"]),
    ]
    if args.output:
        lines.append(f"saved outputs to {args.output}")
    emit(args, document, lines)
    return 0


# -------------------------------------------------------------------- check
def compare_outputs(
    ours: Mapping[str, Any], reference: Mapping[str, Any], rtol: float, atol: float
) -> dict[str, dict[str, Any]]:
    """Worst absolute and relative error of each output, and whether it is within tolerance.

    The relative error is ``|ours - ref| / (|ref| + atol)``; an output matches when
    ``|ours - ref| <= atol + rtol * |ref|`` everywhere (NaNs where the reference has NaNs).

    Example:
        >>> r = compare_outputs({"y": np.array([1.0, 2.0])}, {"y": np.array([1.0, 2.5])},
        ...                     rtol=1e-3, atol=1e-4)
        >>> r["y"]["max_abs_error"], r["y"]["match"]
        (0.5, False)
    """
    results = {}
    for name, want in reference.items():
        got, want, problem = _comparable(ours[name], want)
        entry: dict[str, Any] = {
            "shape": list(want.shape),
            "dtype": str(want.dtype),
            "onnx2jax_dtype": str(got.dtype),
        }
        if problem:
            entry.update(match=False, max_abs_error=None, max_rel_error=None, problem=problem)
        elif got.shape != want.shape:
            entry.update(
                match=False,
                max_abs_error=None,
                max_rel_error=None,
                problem=f"shape {list(got.shape)} instead of {list(want.shape)}",
            )
        elif want.dtype.kind not in "biufc":
            same = bool(np.array_equal(got, want))
            entry.update(match=same, max_abs_error=None, max_rel_error=None)
        else:
            a, b = (
                got.astype(np.complex128 if want.dtype.kind == "c" else np.float64),
                want.astype(np.complex128 if want.dtype.kind == "c" else np.float64),
            )
            nan_a, nan_b = np.isnan(a), np.isnan(b)
            both = nan_a & nan_b
            diff = np.where(both, 0.0, np.abs(a - b))
            diff = np.where(np.isnan(diff), np.inf, diff)
            bound = atol + rtol * np.abs(np.where(both, 0.0, b))
            rel = diff / (np.abs(np.where(both, 0.0, b)) + atol)
            entry.update(
                match=bool((diff <= bound).all()),
                max_abs_error=float(diff.max()) if diff.size else 0.0,
                max_rel_error=float(rel.max()) if rel.size else 0.0,
            )
        results[name] = entry
    return results


def _comparable(got: Any, want: Any) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Both outputs as arrays to compare, and what differs in their structure, if anything.

    A sequence of maps (ZipMap's rows) becomes a [rows, keys] array of its values, in the
    reference's key order, so probabilities compare with the tolerances like any tensor.
    """
    if isinstance(want, list) and want and all(isinstance(row, dict) for row in want):
        keys = list(want[0])
        if (
            not isinstance(got, list)
            or len(got) != len(want)
            or any(not isinstance(row, dict) or set(row) != set(keys) for row in got)
        ):
            return (
                np.zeros(0),
                np.zeros((len(want), len(keys))),
                "the maps' keys or the number of rows differ",
            )
        return (
            np.array([[np.asarray(row[k]) for k in keys] for row in got]),
            np.array([[row[k] for k in keys] for row in want]),
            None,
        )
    return np.asarray(got), np.asarray(want), None


def cmd_check(args: argparse.Namespace, progress: Progress) -> int:
    from onnx2jax.cli.bench import onnxruntime_session

    model, path = load_model(args.model, progress, args.precision)
    feeds = read_inputs(args, model)
    with progress.step("compiling and running onnx2jax"):
        ours = {k: v if isinstance(v, list) else np.asarray(v) for k, v in model(**feeds).items()}
    # onnxruntime's fused quantized kernels round differently from the graph they replace
    # (up to a quantization step): a quantized model is compared with the graph as written.
    quantized = _is_quantized(model.proto.graph)
    with progress.step("running onnxruntime"):
        session = onnxruntime_session(model, path, optimize=not quantized)
        names = [o.name for o in session.get_outputs()]
        reference = dict(zip(names, session.run(None, feeds), strict=True))
    half = _holds_half_floats(model.proto.graph)
    rtol = args.rtol if args.rtol is not None else (1e-2 if half else 1e-4)
    atol = (
        args.atol
        if args.atol is not None
        else max(1e-3 if half else 1e-5, _largest_step(model) if quantized else 0.0)
    )
    results = compare_outputs(ours, reference, rtol, atol)
    mismatched = [name for name, r in results.items() if not r["match"]]
    document = {
        "model": args.model,
        "rtol": rtol,
        "atol": atol,
        "onnxruntime_optimized": not quantized,
        "inputs": {k: summary(v) for k, v in feeds.items()},
        "outputs": results,
        "match": not mismatched,
    }
    against = (
        "onnxruntime without graph optimizations (a quantized model: the graph as written)"
        if quantized
        else "onnxruntime"
    )
    lines = [f"onnx2jax vs {against} on the same inputs (rtol {rtol:g}, atol {atol:g})"]
    for name, r in results.items():
        if r["max_abs_error"] is None:
            errors = r.get("problem", "compared exactly")
        else:
            errors = (
                f"max abs error {r['max_abs_error']:.3g}  max rel error {r['max_rel_error']:.3g}"
            )
        lines.append(
            f"  {'ok      ' if r['match'] else 'MISMATCH'}  {name}  {_shape_text(r)}  {errors}"
        )
    lines.append(
        f"MISMATCH in {len(mismatched)} of {len(results)} outputs"
        if mismatched
        else f"OK: all {len(results)} outputs match"
    )
    emit(args, document, lines)
    return 1 if mismatched else 0


_QUANTIZED_OPS = {
    "MatMulInteger",
    "ConvInteger",
    "QGemm",
    "QAttention",
    "MatMulNBits",
    "QEmbedLayerNormalization",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "DynamicQuantizeLSTM",
    "MatMulInteger16",
}


def _is_quantized(graph: onnx.GraphProto) -> bool:
    """Whether the graph (subgraphs included) computes with quantized integers."""
    for node in graph.node:
        if (
            "Quantize" in node.op_type
            or node.op_type.startswith("QLinear")
            or node.op_type in _QUANTIZED_OPS
        ):
            return True
        if any(_is_quantized(sub) for sub in subgraphs(node)):
            return True
    return False


def _largest_step(model: Model) -> float:
    """The largest DequantizeLinear scale stored in the model: one quantization step of a float
    output may separate two exact evaluations that round a value on either side of a tie."""
    stored = {**model.plan.constants, **model.params}
    steps = [
        float(np.max(np.abs(np.asarray(stored[node.input[1]]))))
        for node in model.proto.graph.node
        if node.op_type == "DequantizeLinear" and len(node.input) > 1 and node.input[1] in stored
    ]
    return max(steps, default=0.0)


def _holds_half_floats(graph: onnx.GraphProto) -> bool:
    """Whether the graph stores or declares float16/bfloat16 tensors (its outputs are then
    only as close as half precision allows)."""
    half = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    declared = (*graph.input, *graph.output, *graph.value_info)
    return (
        any(t.data_type in half for t in graph.initializer)
        or any(v.type.tensor_type.elem_type in half for v in declared)
        or any(a.name == "to" and a.i in half for n in graph.node for a in n.attribute)
    )


# -------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace, progress: Progress) -> int:
    from onnx2jax.cli.bench import compare

    model, path = load_model(args.model, progress, args.precision)
    feeds = read_inputs(args, model)
    with progress.step(f"timing {args.runs} runs each (after warm-up and compilation)"):
        result = compare(model, feeds, runs=args.runs, warmup=args.warmup, path=path)
    document = {
        "model": args.model,
        "inputs": {k: summary(v) for k, v in feeds.items()},
        **result.as_dict(),
    }
    lines = [
        f"{t.engine:<12} median {t.median_ms:9.3f} ms  min {t.min_ms:9.3f} ms  "
        f"first call {t.first_call_ms:9.1f} ms  ({t.runs} runs)"
        for t in (result.onnx2jax, result.onnxruntime)
    ]
    lines.append(
        f"ratio        onnx2jax / onnxruntime = {result.ratio:.2f}x (jax on {document['device']})"
    )
    emit(args, document, lines)
    return 0


# -------------------------------------------------------------------- compile
def cmd_compile(args: argparse.Namespace, progress: Progress) -> int:
    from onnx2jax.runtime.aot import export_model

    model, _ = load_model(args.model, progress)
    feeds = read_inputs(args, model)
    with progress.step("tracing and exporting (jax.export)"):
        start = time.perf_counter()
        path = export_model(model, feeds, args.output_file, outputs=args.output or None)
        seconds = time.perf_counter() - start
    document = {
        "model": args.model,
        "artifact": str(path),
        "bytes": path.stat().st_size,
        "seconds": seconds,
        "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()},
    }
    lines = [
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {seconds:.1f} s for inputs "
        + ", ".join(f"{k} {_shape_text(v)}" for k, v in document["inputs"].items()),
        "run it with onnx2jax.runtime.aot.load_artifact(path)(**inputs): "
        "no ONNX parsing, no tracing",
    ]
    emit(args, document, lines)
    return 0


# -------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``onnx2jax`` command."""
    parser = argparse.ArgumentParser(
        prog="onnx2jax",
        description="Inspect, run, check and time ONNX models with onnx2jax.",
        epilog="MODEL is a path or hf://OWNER/NAME[@REVISION]/FILE.onnx (Hugging Face hub; "
        "HF_TOKEN and HF_HUB_OFFLINE are honoured). Exit status: 0 ok, 1 check found "
        "a mismatch, 2 error.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--json", action="store_true", help="print one JSON document")
        sub.add_argument(
            "--quiet", "-q", action="store_true", help="no progress messages on stderr"
        )

    def precision(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--precision",
            choices=PRECISIONS,
            default=PRECISIONS[0],
            help="how matrix products compute: float32 (default) or bfloat16 "
            "(opt-in: rounded operands, float32 accumulation, faster)",
        )

    def inputs(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--input",
            action="append",
            default=[],
            metavar="NAME=FILE.npy",
            help="an input from a .npy file (repeatable); inputs not given are "
            "random, of the declared shapes",
        )
        sub.add_argument(
            "--dim",
            action="append",
            default=[],
            metavar="NAME=SIZE",
            help="size of a named dimension of the random inputs (default 1)",
        )
        sub.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
        sub.add_argument(
            "--x64",
            action="store_true",
            help="enable JAX 64-bit mode (int64/float64 kept, not narrowed)",
        )
        common(sub)

    info = commands.add_parser(
        "info",
        help="inputs, outputs, opsets, op histogram, parameters, unsupported ops",
        description="Describe a model without running it: inputs, outputs, opsets, op "
        "histogram, parameter count and size, and the ops onnx2jax lacks.",
    )
    info.add_argument("model", metavar="MODEL")
    common(info)
    info.set_defaults(handler=cmd_info)

    run = commands.add_parser(
        "run",
        help="run a model (without MODEL: the example digits CNN on its samples)",
        description="Run MODEL on inputs from .npy files or random ones and print the outputs' "
        "shapes and ranges. Without MODEL, run the example digits CNN shipped with "
        "onnx2jax on its sample images and print predictions next to the true "
        "labels.",
    )
    run.add_argument("model", metavar="MODEL", nargs="?")
    run.add_argument("--output", metavar="FILE.npz", help="save all outputs to FILE.npz")
    inputs(run)
    precision(run)
    run.set_defaults(handler=cmd_run)

    check = commands.add_parser(
        "check",
        help="compare onnx2jax with onnxruntime; exit 1 on a mismatch",
        description="Run onnx2jax and onnxruntime on the same inputs and print the worst "
        "error of each output. Exit status 1 when an output differs beyond the "
        "tolerance.",
    )
    check.add_argument("model", metavar="MODEL")
    check.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="relative tolerance (1e-4; 1e-2 for float16 models)",
    )
    check.add_argument(
        "--atol",
        type=float,
        default=None,
        help="absolute tolerance (1e-5; 1e-3 for float16 models; at least "
        "one quantization step for quantized models)",
    )
    inputs(check)
    precision(check)
    check.set_defaults(handler=cmd_check)

    bench = commands.add_parser(
        "bench",
        help="median latency of onnx2jax (jit) and onnxruntime, and their ratio",
        description="Time onnx2jax (under jit, after warm-up) and onnxruntime on the same "
        "inputs: median latency of each and their ratio.",
    )
    bench.add_argument("model", metavar="MODEL")
    bench.add_argument("--runs", type=int, default=20, help="timed runs per engine (20)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed runs first (3)")
    inputs(bench)
    precision(bench)
    bench.set_defaults(handler=cmd_bench)
    compile_ = commands.add_parser(
        "compile",
        help="ahead-of-time artifact (jax.export) for fixed input shapes",
        description="Trace MODEL once for the input shapes given by --dim (and --input) and "
        "write FILE: the exported StableHLO and the weights. "
        "onnx2jax.runtime.aot.load_artifact(FILE) runs it without parsing ONNX or tracing.",
    )
    compile_.add_argument("model", metavar="MODEL")
    compile_.add_argument(
        "-o", "--output-file", required=True, metavar="FILE", help="the artifact to write"
    )
    compile_.add_argument(
        "--output",
        action="append",
        default=[],
        metavar="NAME",
        help="a tensor to return (repeatable; default the graph's outputs)",
    )
    inputs(compile_)
    compile_.set_defaults(handler=cmd_compile)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``onnx2jax`` command; returns the exit status.

    Example:
        >>> main(["info", str(__import__("onnx2jax").example_path()), "--json",
        ...       "--quiet"])  # doctest: +ELLIPSIS
        {
          "model": ...
        0
    """
    args = build_parser().parse_args(argv)
    tune_process()  # the command line runs models for speed; see onnx2jax/runtime/process.py
    progress = Progress(enabled=not args.quiet)
    if getattr(args, "x64", False):
        import jax

        jax.config.update("jax_enable_x64", True)
    try:
        return args.handler(args, progress)
    except Onnx2JaxError as exc:
        print(f"onnx2jax: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. piped into head: stop quietly, as Unix tools do
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (Python flushes stdout at exit)
        return 0
