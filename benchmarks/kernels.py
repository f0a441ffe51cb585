"""Kernel-level timings behind benchmarks/README.md: whole attention blocks, and the operations
where onnx2jax was or is slower.

    python -m benchmarks.kernels                    # every group: about 20 s on 2 cores
    python -m benchmarks.kernels --group conv3x3_b1 --runs 50
    ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.kernels --group conv_b8 --no-avx512  # AVX2 host

Each group times one kind of operation at the shapes of a benchmark model. Every row is a
small ONNX model (the operation with its bias, activation or mask) run by onnx2jax (the program
``model(...)`` compiles, on inputs already on the device) and by onnxruntime (CPU, every
optimization, the same thread count), in five turns of back-to-back calls per engine
(``onnx2jax.cli.bench.interleaved`` with ``block``); the outputs must agree first. A row's
``count`` is how often the shape occurs in the model, and the total weighs by it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnx2jax
from onnx2jax import native
from onnx2jax.cli.bench import default_threads, interleaved, onnxruntime_session

OPSET = 17


@dataclass(frozen=True)
class Row:
    """One shape of a group: its ONNX model, inputs, and how often the model uses it."""

    label: str
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    count: int = 1


def _model(
    nodes: Sequence[onnx.NodeProto], inputs: dict[str, np.ndarray], weights: dict[str, np.ndarray]
) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes),
        "kernel",
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, value.shape)
            for name, value in inputs.items()
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _random(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def softmax_rows(batch: int = 32) -> list[Row]:
    """MiniLM's attention scores (b32 s128): scaled, masked, Softmax over the keys."""
    rng = np.random.default_rng(0)
    scores = _random(rng, batch, 12, 128, 128, scale=4.0)
    mask = np.where(rng.random((batch, 1, 1, 128)) < 0.1, -1e4, 0).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["y"], axis=-1),
    ]
    model = _model(nodes, {"x": scores, "mask": mask}, {"scale": np.array(0.1767767, np.float32)})
    return [Row(f"{batch}x12x128x128", model, {"x": scores, "mask": mask}, 6)]


def attention_matmul_rows(batch: int = 32) -> list[Row]:
    """MiniLM's attention products (b32 s128): Q K^T and scores times V, batched over heads."""
    rng = np.random.default_rng(0)
    q, kt = _random(rng, batch, 12, 128, 32), _random(rng, batch, 12, 32, 128)
    probs, v = _random(rng, batch, 12, 128, 128), _random(rng, batch, 12, 128, 32)
    node = [helper.make_node("MatMul", ["a", "b"], ["y"])]
    return [
        Row(
            f"QK^T {batch}x12 of 128x32x128",
            _model(node, {"a": q, "b": kt}, {}),
            {"a": q, "b": kt},
            6,
        ),
        Row(
            f"PV {batch}x12 of 128x128x32",
            _model(node, {"a": probs, "b": v}, {}),
            {"a": probs, "b": v},
            6,
        ),
    ]


def attention_rows() -> list[Row]:
    """Whole attention blocks as exported (MatMul, scale, mask, Softmax, MatMul), which
    ``model(...)`` runs as one native kernel: MiniLM b32 and b1 (12 heads of 128x32, a padding
    mask), GPT-2 b1 (12 heads of 128x64, a causal mask), ViT-B/16 b8 (12 heads of 197x64)."""
    rng = np.random.default_rng(0)
    rows = []
    for label, batch, seq, size, mask_kind, count in (
        ("MiniLM b32", 32, 128, 32, "padding", 6),
        ("MiniLM b1", 1, 128, 32, "padding", 6),
        ("GPT-2 b1", 1, 128, 64, "causal", 12),
        ("ViT-B/16 b8", 8, 197, 64, None, 12),
    ):
        feeds = {
            "q": _random(rng, batch, 12, seq, size),
            "kt": _random(rng, batch, 12, size, seq),
            "v": _random(rng, batch, 12, seq, size),
        }
        nodes = [
            helper.make_node("MatMul", ["q", "kt"], ["scores"]),
            helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        ]
        probabilities = "scaled"
        if mask_kind == "padding":
            feeds["mask"] = np.where(rng.random((batch, 1, 1, seq)) < 0.1, -3.4e38, 0).astype(
                np.float32
            )
        elif mask_kind == "causal":
            feeds["mask"] = np.triu(np.full((seq, seq), -3.4e38, np.float32), 1)[None, None]
        if mask_kind:
            nodes.append(helper.make_node("Add", ["scaled", "mask"], ["masked"]))
            probabilities = "masked"
        nodes += [
            helper.make_node("Softmax", [probabilities], ["p"], axis=-1),
            helper.make_node("MatMul", ["p", "v"], ["y"]),
        ]
        model = _model(nodes, feeds, {"scale": np.array(size**-0.5, np.float32)})
        rows.append(Row(f"{label}: {batch}x12 of {seq}x{size}", model, feeds, count))
    return rows


def _dense_rows(tokens: int, shapes: Sequence[tuple[int, int, int, bool]]) -> list[Row]:
    """``tokens`` rows times each (k, n) weight, plus the bias where the layer has one."""
    rng = np.random.default_rng(0)
    rows = []
    for k, n, count, bias in shapes:
        x = _random(rng, tokens, k)
        weights = {"w": _random(rng, k, n, scale=k**-0.5)}
        nodes = [helper.make_node("MatMul", ["x", "w"], ["xw" if bias else "y"])]
        if bias:
            weights["b"] = _random(rng, n)
            nodes.append(helper.make_node("Add", ["xw", "b"], ["y"]))
        rows.append(Row(f"{tokens}x{k}x{n}", _model(nodes, {"x": x}, weights), {"x": x}, count))
    return rows


def matmul_b1_rows() -> list[Row]:
    """MiniLM b1's dense layers: 128 tokens times a weight, plus the bias."""
    return _dense_rows(128, ((384, 384, 24, True), (384, 1536, 6, True), (1536, 384, 6, True)))


def matmul_gpt2_rows() -> list[Row]:
    """GPT-2 b1 s128's dense layers (with their bias) and its LM head over the vocabulary."""
    return _dense_rows(
        128,
        (
            (768, 2304, 12, True),
            (768, 768, 12, True),
            (768, 3072, 12, True),
            (3072, 768, 12, True),
            (768, 50257, 1, False),
        ),
    )


def conv3x3_b1_rows(batch: int = 1) -> list[Row]:
    """ResNet-50's 3x3 convolutions (b1, 224x224 input) with their bias and ReLU."""
    rng = np.random.default_rng(0)
    rows = []
    for channels, size, stride, count in (
        (64, 56, 1, 3),
        (128, 56, 2, 1),
        (128, 28, 1, 3),
        (256, 28, 2, 1),
        (256, 14, 1, 5),
        (512, 14, 2, 1),
        (512, 7, 1, 2),
    ):
        x = _random(rng, batch, channels, size, size)
        nodes = [
            helper.make_node(
                "Conv",
                ["x", "w", "b"],
                ["c"],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
            ),
            helper.make_node("Relu", ["c"], ["y"]),
        ]
        weights = {
            "w": _random(rng, channels, channels, 3, 3, scale=(9 * channels) ** -0.5),
            "b": _random(rng, channels),
        }
        label = f"{channels}ch {size}x{size}" + (" stride 2" if stride == 2 else "")
        rows.append(Row(label, _model(nodes, {"x": x}, weights), {"x": x}, count))
    return rows


def conv_b8_rows() -> list[Row]:
    """ResNet-50's convolutions at batch 8 with what follows them there: the bias and a ReLU,
    and for the 1x1 expansions the residual Add before it (one of each shape)."""
    rng = np.random.default_rng(0)
    rows = []
    for in_channels, size, out_channels, kernel, stride, residual in (
        (3, 224, 64, 7, 2, False),
        (64, 56, 64, 3, 1, False),
        (256, 56, 64, 1, 1, False),
        (64, 56, 256, 1, 1, True),
        (128, 28, 128, 3, 1, False),
        (256, 14, 256, 3, 1, False),
        (512, 7, 512, 3, 1, False),
        (1024, 14, 256, 1, 1, False),
    ):
        out_size = (size + 2 * (kernel // 2) - kernel) // stride + 1
        x = _random(rng, 8, in_channels, size, size)
        feeds = {"x": x}
        nodes = [
            helper.make_node(
                "Conv",
                ["x", "w", "b"],
                ["c"],
                kernel_shape=[kernel, kernel],
                pads=[kernel // 2] * 4,
                strides=[stride, stride],
            )
        ]
        if residual:
            feeds["r"] = _random(rng, 8, out_channels, out_size, out_size)
            nodes.append(helper.make_node("Add", ["c", "r"], ["s"]))
        nodes.append(helper.make_node("Relu", ["s" if residual else "c"], ["y"]))
        weights = {
            "w": _random(
                rng,
                out_channels,
                in_channels,
                kernel,
                kernel,
                scale=(kernel * kernel * in_channels) ** -0.5,
            ),
            "b": _random(rng, out_channels),
        }
        label = f"{in_channels}->{out_channels}ch {kernel}x{kernel} {size}x{size}"
        label += (f" stride {stride}" if stride > 1 else "") + (" +residual" if residual else "")
        rows.append(Row(label, _model(nodes, feeds, weights), feeds))
    return rows


GROUPS: dict[str, Callable[[], list[Row]]] = {
    "attention": attention_rows,
    "softmax": softmax_rows,
    "attention_matmul": attention_matmul_rows,
    "matmul_b1": matmul_b1_rows,
    "matmul_gpt2": matmul_gpt2_rows,
    "conv3x3_b1": conv3x3_b1_rows,
    "conv_b8": conv_b8_rows,
}


def time_row(row: Row, runs: int) -> dict[str, float]:
    """Median ms of both engines on ``row`` and the worst relative error between them."""
    model = onnx2jax.load(row.model)
    session = onnxruntime_session(model, threads=default_threads())
    ours = np.asarray(model(**row.feeds)["y"])
    (theirs,) = session.run(None, row.feeds)
    error = float(np.max(np.abs(ours - theirs)) / max(float(np.max(np.abs(theirs))), 1e-30))
    if not error < 1e-4:
        raise AssertionError(f"{row.label}: onnx2jax differs from onnxruntime by {error:.1e}")
    # The compiled program model(...) runs, on inputs already on the device: the kernel, without
    # model(...)'s per-call checks and input copies (which take longer than the smallest rows).
    function, _, kernels = model.inference_function(model.bind_inputs((), row.feeds))
    params = model.engine.prepared_params(kernels)
    inputs = {name: jax.device_put(value) for name, value in row.feeds.items()}
    # Five turns per engine, each of back-to-back calls (see interleaved's ``block``).
    samples = interleaved(
        {
            "onnx2jax": lambda: jax.block_until_ready(function(params, inputs, outputs=None)),
            "onnxruntime": lambda: session.run(None, row.feeds),
        },
        runs,
        warmup=0,
        block=max(runs // 5, 1),
    )
    return {
        **{f"{engine}_ms": statistics.median(times) for engine, times in samples.items()},
        "rel_error": error,
    }


def run_group(name: str, rows: Sequence[Row], runs: int) -> dict[str, object]:
    timed = [{"shape": row.label, "count": row.count, **time_row(row, runs)} for row in rows]
    totals = {
        engine: sum(r[f"{engine}_ms"] * r["count"] for r in timed)
        for engine in ("onnx2jax", "onnxruntime")
    }
    return {
        "group": name,
        "rows": timed,
        "total_onnx2jax_ms": totals["onnx2jax"],
        "total_onnxruntime_ms": totals["onnxruntime"],
    }


def table(result: dict[str, object]) -> str:
    lines = [
        f"{result['group']}:",
        "",
        "| shape | count | onnx2jax ms | onnxruntime ms | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['shape']} | {r['count']} | {r['onnx2jax_ms']:.2f} | "
            f"{r['onnxruntime_ms']:.2f} | {r['onnx2jax_ms'] / r['onnxruntime_ms']:.2f} |"
        )
    ours, theirs = result["total_onnx2jax_ms"], result["total_onnxruntime_ms"]
    lines.append(f"| total (x count) | | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kernels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--group",
        action="append",
        choices=sorted(GROUPS),
        default=[],
        help="a group to time (repeatable; default: all)",
    )
    parser.add_argument("--runs", type=int, default=50, help="timed calls per engine (50)")
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--no-avx512",
        action="store_true",
        help="time as on a CPU without AVX-512: the hand-written kernels are not used, so "
        "oneDNN computes the convolutions (with ONEDNN_MAX_CPU_ISA=AVX2: its AVX2 kernels)",
    )
    args = parser.parse_args(argv)
    if args.no_avx512:
        native.cpu_problem = lambda: "benchmarks.kernels --no-avx512"
    print(f"kernels: {native.status()['backends']}", flush=True)
    onnx2jax.tune_process()  # what the command line does; see onnx2jax/runtime/process.py
    results = []
    for name in args.group or list(GROUPS):
        results.append(run_group(name, GROUPS[name](), args.runs))
        print(table(results[-1]) + "\n", flush=True)
    if args.output:
        args.output.write_text(
            json.dumps({"threads": default_threads(), "groups": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
