"""Per-call time of small models: ``model(...)`` against onnxruntime's ``run``, interleaved.

Run as ``python -m benchmarks.overhead [CASE ...] [--calls N] [--rounds R] [--profile CASE]``.
Cases: ``mlp`` (MatMul, Add, Relu, MatMul, Add; batch 1, 64 features), ``cnn`` (the example
digits CNN, batch 1), ``trees`` (a scikit-learn random forest through skl2onnx), ``svm`` (an
SVC through skl2onnx), ``decoder`` (one KV-cache decode step of
``benchmarks/models/llama_h64_l2_v100_cache.onnx``, past length 16). Each round times
``--calls`` calls of each runtime back to back; the medians over rounds are printed in
microseconds per call, with their ratio. ``--profile CASE`` prints cProfile's top functions
of 10,000 ``model(...)`` calls instead.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from benchmarks.models import build_mlp5, vector_inputs

MODELS_DIR = Path(__file__).parent / "models"


def mlp_case() -> tuple[bytes, dict[str, np.ndarray]]:
    """The 5-node MLP of ``benchmarks.models`` (MatMul, Add, Relu, MatMul, Add) on a (1, 64)
    input."""
    with tempfile.TemporaryDirectory() as folder:
        path = build_mlp5(Path(folder) / "mlp5.onnx")
        return path.read_bytes(), vector_inputs(1)


def cnn_case() -> tuple[bytes, dict[str, np.ndarray]]:
    """The example digits CNN at batch 1."""
    import onnx2jax

    path = onnx2jax.example_path()
    feeds = {"image": np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)}
    return Path(path).read_bytes(), feeds


def _sklearn_case(estimator) -> tuple[bytes, dict[str, np.ndarray]]:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    estimator.fit(x, y)
    proto = to_onnx(estimator, x[:1], options={"zipmap": False}, target_opset=17)
    return proto.SerializeToString(), {"X": x[:1]}


def trees_case() -> tuple[bytes, dict[str, np.ndarray]]:
    """A 20-tree random forest on the digits, one row."""
    from sklearn.ensemble import RandomForestClassifier

    return _sklearn_case(RandomForestClassifier(n_estimators=20, max_depth=8, random_state=0))


def svm_case() -> tuple[bytes, dict[str, np.ndarray]]:
    """An RBF SVC on the digits, one row."""
    from sklearn.svm import SVC

    return _sklearn_case(SVC())


def decoder_case() -> tuple[bytes, dict[str, np.ndarray]]:
    """One decode step of the tiny Llama with a KV cache of 16 positions."""
    path = MODELS_DIR / "llama_h64_l2_v100_cache.onnx"
    rng = np.random.default_rng(0)
    past = 16
    feeds = {
        "input_ids": np.array([[5]], np.int64),
        "attention_mask": np.ones((1, past + 1), np.int64),
        "position_ids": np.array([[past]], np.int64),
    }
    for layer in range(2):
        for part in ("key", "value"):
            feeds[f"past_key_values.{layer}.{part}"] = rng.standard_normal((1, 2, past, 16)).astype(
                np.float32
            )
    return path.read_bytes(), feeds


CASES: dict[str, Callable[[], tuple[bytes, dict[str, np.ndarray]]]] = {
    "mlp": mlp_case,
    "cnn": cnn_case,
    "trees": trees_case,
    "svm": svm_case,
    "decoder": decoder_case,
}


def _per_call_us(run: Callable[[], object], calls: int) -> tuple[float, float]:
    """Wall and calling-thread CPU microseconds per call (the second is less sensitive to a
    busy host: it leaves out time the thread waits)."""
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        run()
    wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
    return wall / calls * 1e6, cpu / calls * 1e6


def measure(name: str, calls: int, rounds: int) -> dict[str, float]:
    """Median microseconds per call (wall, and the calling thread's CPU time) of onnxruntime
    and of ``model(...)`` on case ``name``."""
    import jax
    import onnxruntime as ort

    import onnx2jax

    data, feeds = CASES[name]()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    model = onnx2jax.load(onnx.load_from_string(data))
    expected = session.run(None, feeds)
    got = model(**feeds)
    for want, have in zip(expected, got.values(), strict=True):
        np.testing.assert_allclose(np.asarray(have), want, rtol=1e-4, atol=1e-4)

    def ours() -> object:
        return jax.block_until_ready(model(**feeds))

    def theirs() -> object:
        return session.run(None, feeds)

    for _ in range(3):
        ours(), theirs()
    times: dict[str, list[tuple[float, float]]] = {"ort": [], "onnx2jax": []}
    for _ in range(rounds):
        times["ort"].append(_per_call_us(theirs, calls))
        times["onnx2jax"].append(_per_call_us(ours, calls))
    result = {}
    for column, index in (("us", 0), ("cpu_us", 1)):
        theirs_us = statistics.median(t[index] for t in times["ort"])
        ours_us = statistics.median(t[index] for t in times["onnx2jax"])
        result[f"ort_{column}"], result[f"onnx2jax_{column}"] = theirs_us, ours_us
    result["ratio"] = result["onnx2jax_us"] / result["ort_us"]
    return result


def profile(name: str, calls: int = 10_000, top: int = 30) -> None:
    """Print cProfile's ``top`` functions by own time over ``calls`` calls of ``model(...)``."""
    import jax

    import onnx2jax

    data, feeds = CASES[name]()
    model = onnx2jax.load(onnx.load_from_string(data))
    jax.block_until_ready(model(**feeds))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        jax.block_until_ready(model(**feeds))
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(CASES))
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--profile", choices=list(CASES))
    args = parser.parse_args()
    if args.profile:
        profile(args.profile)
        return
    header = ("ort us", "onnx2jax us", "ratio", "ort cpu us", "onnx2jax cpu us")
    print(f"{'case':<10}" + "".join(f"{h:>17}" for h in header))
    for name in args.cases:
        result = measure(name, args.calls, args.rounds)
        columns = ("ort_us", "onnx2jax_us", "ratio", "ort_cpu_us", "onnx2jax_cpu_us")
        print(f"{name:<10}" + "".join(f"{result[c]:>17.2f}" for c in columns), flush=True)


if __name__ == "__main__":
    main()
