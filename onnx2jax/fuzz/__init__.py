"""A differential fuzzer: random small graphs run in onnx2jax and in onnxruntime, compared.

``python -m onnx2jax.fuzz --seed S --count N --out DIR [--ops Add,MatMul] [--time-limit SEC]``
builds N random graphs (chains of 1-6 nodes, some inside If/Loop bodies), runs each in
onnx2jax (``model(...)`` and ``jax.jit(model.apply)``) and in onnxruntime (or the ONNX
reference evaluator where onnxruntime lacks a kernel), and writes every mismatch, shrunk to
the smallest failing run of nodes, to DIR as ``.onnx`` with its inputs in a ``.npz`` beside it.
See docs/fuzzing.md.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnx2jax.fuzz.generate import CORE_OPS, GENERATORS, Reject, random_case
from onnx2jax.fuzz.judge import Outcome, check, shrink


@dataclass
class Failure:
    """One failing graph: where its repro lies and what differed."""

    index: int
    message: str
    ops: list[str]
    path: Path | None = None


@dataclass
class Report:
    """What a fuzzing run did."""

    seed: int
    graphs: int = 0
    nodes: int = 0
    passed: int = 0
    skipped: Counter = field(default_factory=Counter)
    departures: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    ops: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def summary(self) -> str:
        """The one line the CLI ends with."""
        skipped = sum(self.skipped.values())
        return (
            f"fuzz seed {self.seed}: {self.graphs} graphs ({self.nodes} nodes, "
            f"{len(self.ops)} op types) in {self.seconds:.0f}s: {self.passed} passed, "
            f"{skipped} skipped, {len(self.departures)} onnxruntime departures, "
            f"{len(self.failures)} mismatches"
        )


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of graph ``index`` of a run with ``seed`` (each graph reproducible alone)."""
    return np.random.default_rng([seed, index])


def _ops_of(model: onnx.ModelProto) -> list[str]:
    out = []
    for node in model.graph.node:
        out.append(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out.extend(
                    f"{node.op_type}/{n.op_type}"
                    for n in attr.g.node
                    if n.op_type != "Identity" or n.output[0] != "cond_out"
                )
    return out


def write_repro(
    out: Path, stem: str, model: onnx.ModelProto, feeds: dict[str, np.ndarray], note: str
) -> Path:
    """``stem.onnx``, its inputs as ``stem.npz`` and what failed as ``stem.txt`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.onnx"
    onnx.save(model, str(path))
    np.savez(out / f"{stem}.npz", **feeds)
    (out / f"{stem}.txt").write_text(note + "\n")
    return path


def fuzz(
    seed: int,
    count: int,
    out: Path | None = None,
    ops: Sequence[str] | None = None,
    time_limit: float | None = None,
    max_nodes: int = 6,
    first: int = 0,
    progress: Callable[[int, Outcome], None] | None = None,
) -> Report:
    """Check ``count`` random graphs (fewer when ``time_limit`` seconds run out).

    Graphs are numbered from ``first``; failures are shrunk and written to ``out`` (when
    given). ``ops`` restricts the op types drawn (default: every op the generator knows).
    """
    ops = list(ops or CORE_OPS)
    unknown = sorted(set(ops) - set(GENERATORS))
    if unknown:
        raise ValueError(
            f"no generator for {', '.join(unknown)}; known: {', '.join(sorted(GENERATORS))}"
        )
    report = Report(seed)
    start = time.monotonic()
    for index in range(first, first + count):
        if time_limit is not None and time.monotonic() - start > time_limit:
            break
        try:
            case = random_case(case_rng(seed, index), ops, max_nodes=max_nodes)
        except Reject:
            report.skipped["generator"] += 1
            continue
        model = case.model()
        feeds = dict(case.inputs)
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as exc:
            report.skipped[f"checker: {str(exc)[:80]}"] += 1
            continue
        report.graphs += 1
        report.nodes += len(model.graph.node)
        report.ops.update(_ops_of(model))
        outcome = check(model, feeds)
        small, small_feeds = model, feeds
        if outcome.kind == "fail":
            small, small_feeds, small_outcome = shrink(model, feeds, outcome)
            if small_outcome.kind == "departure":
                model, outcome = small, small_outcome
        if progress is not None:
            progress(index, outcome)
        if outcome.kind == "ok":
            report.passed += 1
        elif outcome.kind == "skip":
            report.skipped[re.split(r"[:(']", outcome.message)[0].strip()] += 1
        elif outcome.kind == "departure":
            report.departures.append(
                f"graph {index} ({', '.join(_ops_of(model))}): {outcome.message}"
            )
        else:
            failure = Failure(index, outcome.message, _ops_of(model))
            if out is not None:
                stem = f"seed{seed}_graph{index}"
                write_repro(out, f"{stem}_full", model, feeds, outcome.message)
                failure.path = write_repro(
                    out,
                    stem,
                    small,
                    small_feeds,
                    f"{small_outcome.message}\nops: {', '.join(_ops_of(small))}\n"
                    f"reproduce: python -m onnx2jax.fuzz --seed {seed} --first {index} "
                    "--count 1",
                )
            failure.ops = _ops_of(small)
            failure.message = small_outcome.message
            report.failures.append(failure)
    report.seconds = time.monotonic() - start
    return report


__all__ = ["Failure", "Report", "check", "fuzz", "shrink", "write_repro"]
