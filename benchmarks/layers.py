"""Where the time goes, layer by layer: onnx2jax and onnxruntime on one model, in one process.

    python -m benchmarks.layers benchmarks/models/resnet50.onnx --dim batch=8
    python -m benchmarks.layers MODEL --dim batch=8 --runs 10 --output layers.json

Both engines run the same random inputs, their calls interleaved (``--runs`` each, after
warm-up). onnx2jax's side is read from JAX's profiler: the time of every operation of the
compiled program ``model(...)`` runs (a native convolution, an XLA fusion). onnxruntime's comes
from its own profiler (every kernel's time, after its graph optimizations). Convolutions are
matched across the engines by kernel size and input and output shapes (channels x height x
width); other operations are listed by name. Rows are sorted by how much longer onnx2jax takes.
Profiling slows both engines a little, so the totals are not the benchmark's figures; compare
the rows.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import onnx2jax
from onnx2jax import native
from onnx2jax.cli import make_inputs, parse_assignments
from onnx2jax.cli.bench import default_threads, onnxruntime_session, wait_until_quiet

# An instruction of the compiled program: its name and its first (output) shape.
_HLO_OP = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = \(?\w+\[([\d,]*)\]")
_SHAPE = re.compile(r"f32\[([\d,]*)\]")


def _dims(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _conv_key(kernel: Sequence[int], x: Sequence[int], y: Sequence[int]) -> str:
    """``conv KHxKW CxHxW -> OxOHxOW`` for NCHW shapes ``x`` and ``y``."""
    return f"conv {kernel[0]}x{kernel[1]} {x[1]}x{x[2]}x{x[3]} -> {y[1]}x{y[2]}x{y[3]}"


def _nchw(nhwc: Sequence[int]) -> tuple[int, ...]:
    return (nhwc[0], nhwc[3], nhwc[1], nhwc[2])


def onnx2jax_operations(hlo: str) -> dict[str, str]:
    """A label for every instruction in the compiled program's text (JAX's profiler names
    each operation it runs after one): native convolutions by their shapes (their operands
    are NHWC, their weights blocked or, for Winograd, transformed), everything else by its
    HLO name without the number."""
    labels = {}
    for line in hlo.splitlines():
        match = _HLO_OP.match(line)
        if not match:
            continue
        name, out = match.group(1), _dims(match.group(2))
        target = re.search(r'custom_call_target="(\w+)"', line)
        if target and target.group(1) in (native.TARGET, native.WINOGRAD_TARGET):
            operands = line.split("operand_layout_constraints=")[1]
            x, w = (_dims(s) for s in _SHAPE.findall(operands)[:2])
            # Weights blocked [O/B, KH, KW, I, B] or HWIO [KH, KW, I, O]; Winograd's are 3x3.
            kernel = (
                (3, 3)
                if target.group(1) == native.WINOGRAD_TARGET
                else (w[1], w[2])
                if len(w) == 5
                else (w[0], w[1])
            )
            labels[name] = _conv_key(kernel, _nchw(x), _nchw(out))
        else:
            labels[name] = name.split(".")[0]
    return labels


def time_onnx2jax(
    labels: Mapping[str, str], trace_dir: str
) -> tuple[dict[str, float], dict[str, int]]:
    """Total ms per label over the calls in JAX's trace in ``trace_dir``, and the operations
    per label."""
    files = sorted(Path(trace_dir).rglob("*.xplane.pb"))
    profile = jax.profiler.ProfileData.from_file(str(files[-1]))
    totals: dict[str, float] = collections.defaultdict(float)
    names: dict[str, set[str]] = collections.defaultdict(set)
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in labels:
                    totals[labels[event.name]] += event.duration_ns / 1e6
                    names[labels[event.name]].add(event.name)
    return totals, {label: len(operations) for label, operations in names.items()}


def time_onnxruntime(trace_file: str) -> tuple[dict[str, float], dict[str, int], int]:
    """Total ms per label in onnxruntime's profile, its kernels per label, and how many calls
    the profile covers."""
    totals: dict[str, float] = collections.defaultdict(float)
    nodes: dict[str, set[str]] = collections.defaultdict(set)
    per_node: collections.Counter[str] = collections.Counter()
    for event in json.loads(Path(trace_file).read_text()):
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        args = event["args"]
        shapes = [next(iter(d.values())) for d in args["input_type_shape"]]
        out = next(iter(args["output_type_shape"][0].values()))
        label = (
            _conv_key(shapes[1][2:], shapes[0], out)
            if args["op_name"] == "Conv"
            else args["op_name"]
        )
        totals[label] += event["dur"] / 1e3
        nodes[label].add(event["name"])
        per_node[event["name"]] += 1
    return (
        totals,
        {label: len(names) for label, names in nodes.items()},
        max(per_node.values(), default=1),
    )


def compare_layers(path: str, feeds: Mapping[str, np.ndarray], runs: int) -> list[dict[str, Any]]:
    """Per-label ms per call of both engines, with how many operations of each the label
    covers."""
    model = onnx2jax.load(path)
    bound = model.bind_inputs((), feeds)
    compiled_text = model.engine.lower(bound).compile().as_text()
    labels = onnx2jax_operations(compiled_text)
    for _ in range(3):
        jax.block_until_ready(model(**feeds))
    with tempfile.TemporaryDirectory() as work:
        session = onnxruntime_session(
            None, path, threads=default_threads(), profile_prefix=str(Path(work) / "onnxruntime")
        )
        session.run(None, dict(feeds))
        with jax.profiler.trace(work):
            for _ in range(runs):
                # onnxruntime's workers spin on after a call: each engine starts on idle CPUs.
                wait_until_quiet()
                jax.block_until_ready(model(**feeds))
                wait_until_quiet()
                session.run(None, dict(feeds))
        ours, counts = time_onnx2jax(labels, work)
        theirs, their_counts, their_runs = time_onnxruntime(session.end_profiling())
    rows = []
    for label in set(ours) | set(theirs):
        a, b = ours.get(label, 0.0) / runs, theirs.get(label, 0.0) / their_runs
        rows.append(
            {
                "layer": label,
                "onnx2jax_count": counts.get(label, 0),
                "onnxruntime_count": their_counts.get(label, 0),
                "onnx2jax_ms": a,
                "onnxruntime_ms": b,
            }
        )
    return sorted(rows, key=lambda r: r["onnxruntime_ms"] - r["onnx2jax_ms"])


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| layer | count (onnx2jax / onnxruntime) | onnx2jax ms | onnxruntime ms | difference |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['onnx2jax_count']} / {r['onnxruntime_count']} | "
            f"{r['onnx2jax_ms']:.2f} | "
            f"{r['onnxruntime_ms']:.2f} | {r['onnx2jax_ms'] - r['onnxruntime_ms']:+.2f} |"
        )
    ours, theirs = (sum(r[k] for r in rows) for k in ("onnx2jax_ms", "onnxruntime_ms"))
    lines.append(f"| total | | {ours:.1f} | {theirs:.1f} | {ours - theirs:+.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.layers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="an ONNX file")
    parser.add_argument(
        "--dim",
        action="append",
        default=[],
        metavar="NAME=SIZE",
        help="size of a named input dimension (default 1)",
    )
    parser.add_argument("--runs", type=int, default=10, help="profiled calls per engine (10)")
    parser.add_argument("--output", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    onnx2jax.tune_process()  # what the command line does; see onnx2jax/runtime/process.py
    dims = {name: int(size) for name, size in parse_assignments(args.dim, "--dim").items()}
    feeds = make_inputs(onnx2jax.load(args.model).inputs, {}, dims)
    rows = compare_layers(args.model, feeds, args.runs)
    print(table(rows))
    if args.output:
        args.output.write_text(
            json.dumps(
                {"model": args.model, "dims": dims, "threads": default_threads(), "rows": rows},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
