"""``python -m onnx2jax.fuzz``: the differential fuzzer's command line (see onnx2jax.fuzz)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from onnx2jax.fuzz import fuzz
from onnx2jax.fuzz.judge import Outcome


def main(argv: list[str] | None = None) -> int:
    """Run the fuzzer; exit status 1 when a mismatch was found, 0 otherwise.

    ``--loader`` runs the loader's fuzzer instead (:mod:`onnx2jax.fuzz.loader`): mutated model
    files, each loaded and run in a child process; the other arguments are then its own.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--loader" in argv:
        from onnx2jax.fuzz import loader

        argv.remove("--loader")
        return loader.main(argv)
    parser = argparse.ArgumentParser(prog="python -m onnx2jax.fuzz", description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=500, help="graphs to check")
    parser.add_argument("--first", type=int, default=0, help="number of the first graph")
    parser.add_argument(
        "--out", type=Path, default=Path("fuzz-out"), help="folder for the repros of failing graphs"
    )
    parser.add_argument("--ops", default="", help="comma-separated op types to draw from")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds")
    parser.add_argument("--max-nodes", type=int, default=6)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="one line per graph that is not ok"
    )
    args = parser.parse_args(argv)

    def progress(index: int, outcome: Outcome) -> None:
        if outcome.kind != "ok" and (args.verbose or outcome.kind == "fail"):
            print(f"graph {index}: {outcome.kind}: {outcome.message[:300]}", flush=True)

    ops = [o.strip() for o in args.ops.split(",") if o.strip()] or None
    try:
        report = fuzz(
            args.seed,
            args.count,
            args.out,
            ops,
            args.time_limit,
            args.max_nodes,
            args.first,
            progress,
        )
    except ValueError as exc:  # an op without a generator
        parser.error(str(exc))
    for failure in report.failures:
        print(
            f"FAIL graph {failure.index} [{', '.join(failure.ops)}] -> {failure.path}: "
            f"{failure.message[:300]}"
        )
    if args.verbose:
        for line in report.departures:
            print(f"departure: {line[:300]}")
        for reason, n in report.skipped.most_common():
            print(f"skipped {n}: {reason}")
    print(report.summary())
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
