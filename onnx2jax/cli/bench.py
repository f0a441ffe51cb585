"""Side-by-side latency of onnx2jax (under jit, after warm-up) and onnxruntime on the same inputs.

The numbers come from one process and one set of inputs, with the two engines' calls
interleaved (so a busy machine slows both alike; each call waits until the other engine's
threads have gone quiet), so their ratio is meaningful on that machine; absolute times depend
on it. ``onnx2jax bench MODEL`` prints them; :func:`run_case` adds the
first-call time, the worst error against onnxruntime, FLOP counts and peak memory, for
``benchmarks/run.py``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from onnx2jax.core.errors import Onnx2JaxError
from onnx2jax.core.model import Model, load


@dataclass(frozen=True)
class Timing:
    """Latencies of one engine, in milliseconds."""

    engine: str
    median_ms: float
    min_ms: float
    runs: int
    first_call_ms: float  # the first call: compilation for onnx2jax, session warm-up for ORT


@dataclass(frozen=True)
class Comparison:
    """onnx2jax against onnxruntime on the same inputs; ``ratio`` > 1 means onnx2jax is slower."""

    onnx2jax: Timing
    onnxruntime: Timing

    @property
    def ratio(self) -> float:
        return self.onnx2jax.median_ms / self.onnxruntime.median_ms

    def as_dict(self) -> dict[str, Any]:
        return {
            "onnx2jax": asdict(self.onnx2jax),
            "onnxruntime": asdict(self.onnxruntime),
            "ratio": self.ratio,
            "device": str(jax.devices()[0]),
        }


def time_calls(engine: str, call: Callable[[], Any], runs: int, warmup: int) -> Timing:
    """Time ``call`` (which must block until its result is ready) ``runs`` times after warm-up.

    Example:
        >>> timing = time_calls("noop", lambda: None, runs=5, warmup=1)
        >>> timing.runs, timing.median_ms >= 0
        (5, True)
    """
    start = time.perf_counter()
    call()
    first = (time.perf_counter() - start) * 1e3
    for _ in range(max(warmup - 1, 0)):
        call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing(engine, statistics.median(samples), min(samples), runs, first)


def default_threads() -> int:
    """The thread count both engines use: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def onnxruntime_session(
    model: Model | None,
    path: str | os.PathLike | None = None,
    *,
    threads: int | None = None,
    profile_prefix: str | None = None,
    optimize: bool = True,
) -> Any:
    """An onnxruntime CPU session of ``model``, from ``path`` when given (external data needs it).

    Every graph optimization is on (``ORT_ENABLE_ALL``, onnxruntime's default) unless
    ``optimize`` is false (the graph as written: no fused kernels); ``threads``
    sets the intra-op thread count (default: onnxruntime's own choice). With
    ``profile_prefix``, onnxruntime profiles every call into a JSON file whose name starts with
    it; ``session.end_profiling()`` returns that name.

    Example:
        >>> import onnx2jax
        >>> session = onnxruntime_session(onnx2jax.load(onnx2jax.example_path()))
        >>> [i.name for i in session.get_inputs()]
        ['image']
    """
    try:
        import onnxruntime
    except ImportError:
        raise Onnx2JaxError("this needs onnxruntime: pip install onnxruntime") from None
    if path is None and model is None:
        raise Onnx2JaxError("onnxruntime_session needs a model or a path")
    source = str(path) if path is not None else model.to_onnx().SerializeToString()
    options = onnxruntime.SessionOptions()
    level = onnxruntime.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    try:
        return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise Onnx2JaxError(f"onnxruntime cannot load the model: {exc}") from None


def wait_until_quiet(window_s: float = 0.02, busy: float = 0.1, limit_s: float = 1.0) -> float:
    """Sleep until this process's threads use under ``busy`` of one CPU; returns seconds waited.

    onnxruntime's workers keep spinning for a while after a call returns (one CPU fully busy:
    benchmarks/LOG.md), so an onnx2jax call made right after one ran with a CPU short. Linux
    accounts a running thread's CPU time at each scheduler tick (4-10 ms), so the process is
    quiet when a ``window_s`` spanning several ticks used less than ``busy`` of it. Gives up
    after ``limit_s``.

    Example:
        >>> wait_until_quiet() < 1.0
        True
    """
    start = time.perf_counter()
    while True:
        cpu, begun = time.process_time(), time.perf_counter()
        time.sleep(window_s)
        now = time.perf_counter()
        if time.process_time() - cpu < busy * (now - begun) or now - start > limit_s:
            return now - start


def interleaved(
    calls: Mapping[str, Callable[[], Any]],
    runs: int,
    warmup: int = 1,
    *,
    settle: bool = True,
    block: int = 1,
) -> dict[str, list[float]]:
    """Latencies in ms of each call, timed in turn (a, b, a, b, ...) after ``warmup`` rounds.

    Each call must block until its result is ready. With ``settle`` every turn waits until the
    previous one's threads have gone quiet (:func:`wait_until_quiet`), so that no engine is
    timed while another's threads still run; ``settle=False`` times the calls back to back.
    With ``block`` > 1 each turn times ``block`` calls in a row (``runs`` rounded up to whole
    turns), after an untimed call that pays for waking up from the quiet wait: calls of a
    millisecond or less are then timed as a busy server runs them (after an idle wait, both
    engines' small kernels ran slower).

    Example:
        >>> times = interleaved({"a": lambda: None, "b": lambda: None}, runs=3)
        >>> sorted(times), len(times["a"])
        (['a', 'b'], 3)
        >>> len(interleaved({"a": lambda: None}, runs=5, warmup=0, block=2)["a"])
        6
    """
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(-(-runs // block)):
        for name, call in calls.items():
            if settle:
                wait_until_quiet()
            if block > 1:
                call()
            for _ in range(block):
                start = time.perf_counter()
                call()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def compare(
    model: Model,
    feeds: Mapping[str, np.ndarray],
    runs: int = 20,
    warmup: int = 3,
    path: str | os.PathLike | None = None,
) -> Comparison:
    """Median latency of ``model(**feeds)`` under jit and of onnxruntime on the same ``feeds``.

    Both take host (NumPy) inputs and return results ready to use; their calls are interleaved.
    ``path`` is the model's file, for onnxruntime to find external data.

    Example:
        >>> import numpy as np, onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> result = compare(model, {"image": np.zeros((4, 1, 8, 8), np.float32)}, runs=3)
        >>> result.ratio > 0
        True
    """
    session = onnxruntime_session(model, path, threads=default_threads())
    feeds = {k: np.asarray(v) for k, v in feeds.items()}
    calls = {
        "onnx2jax": lambda: jax.block_until_ready(model(**feeds)),
        "onnxruntime": lambda: session.run(None, feeds),
    }
    first = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        first[name] = (time.perf_counter() - start) * 1e3
    samples = interleaved(calls, runs, max(warmup - 1, 0))
    ours, theirs = (
        Timing(name, statistics.median(samples[name]), min(samples[name]), runs, first[name])
        for name in calls
    )
    return Comparison(ours, theirs)


# ------------------------------------------------------------------ full benchmark cases
def max_errors(ours: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, float]:
    """Worst absolute error over all outputs, and worst error relative to each output's scale.

    The relative figure divides each output's worst absolute error by its largest magnitude,
    so it is meaningful for outputs near zero too.

    Example:
        >>> max_errors({"y": np.array([1.0, 2.0])}, {"y": np.array([1.0, 2.5])})
        {'max_abs_error': 0.5, 'max_rel_error': 0.2}
    """
    worst_abs = worst_rel = 0.0
    for name, want in reference.items():
        want = np.asarray(want, np.float64)
        diff = float(np.abs(np.asarray(ours[name], np.float64) - want).max()) if want.size else 0.0
        scale = float(np.abs(want).max()) if want.size else 0.0
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale if scale else diff)
    return {"max_abs_error": worst_abs, "max_rel_error": worst_rel}


def _read_through(path: str | os.PathLike, chunk: int = 1 << 24) -> None:
    """Read the file once, so that the page cache serves both engines' loads alike.

    The first engine to load a file the cache had dropped waited for the disk, and the second
    did not (GPT-2's ``load``: benchmarks/LOG.md).
    """
    with open(path, "rb") as file:
        while file.read(chunk):
            pass


def _summary(samples: Sequence[float], items: int, gflop: float | None) -> dict[str, Any]:
    median = statistics.median(samples)
    result = {
        "median_ms": median,
        "min_ms": min(samples),
        "runs": len(samples),
        "throughput_per_s": items / (median / 1e3),
    }
    if gflop:
        result["gflop_per_s"] = gflop / (median / 1e3)
    return result


def run_case(
    path: str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    *,
    runs: int = 10,
    warmup: int = 2,
    threads: int | None = None,
    items: int | None = None,
    load_options: Mapping[str, Any] | None = None,
    carry: Mapping[str, str] | None = None,
    block: int = 1,
    unoptimized_reference: bool = False,
) -> dict[str, Any]:
    """Benchmark one model on one set of inputs, both engines in this process.

    Measures each engine's first call (onnx2jax: ``load`` + trace + compile + run;
    onnxruntime: session creation + run), then ``runs`` interleaved timed calls after
    ``warmup`` rounds, then ``runs`` calls of each engine alone, back to back; also the worst
    output error of onnx2jax against onnxruntime (first call), and the FLOPs XLA counts for the
    program. ``items`` is what throughput counts (default: the batch size).

    ``carry`` maps outputs to the inputs each timed call feeds them back into (a stateful
    model's state: each engine keeps its own, as a caller's loop would, onnx2jax's on the
    device). ``block`` > 1 times calls in turns of ``block`` calls in a row (see
    :func:`interleaved`), for models that run in a millisecond or less.
    ``unoptimized_reference`` also gives the errors against onnxruntime with its graph
    optimizations off (``*_unoptimized``): its fused quantized kernels round differently from
    the graph as written.
    Returns a JSON-ready dict.

    Example:
        >>> import onnx2jax
        >>> case = run_case(onnx2jax.example_path(),
        ...                 {"image": np.zeros((2, 1, 8, 8), np.float32)}, runs=2, warmup=1)
        >>> case["ratio"] > 0 and case["max_abs_error"] < 1e-4
        True
    """
    threads = threads or default_threads()
    feeds = {k: np.asarray(v) for k, v in feeds.items()}
    items = items or int(next(iter(feeds.values())).shape[0])
    _read_through(path)

    start = time.perf_counter()
    model = load(path, **dict(load_options or {}))
    loaded = time.perf_counter()
    ours = jax.block_until_ready(model(**feeds))
    first_ours = time.perf_counter()

    session = onnxruntime_session(None, path, threads=threads)
    created = time.perf_counter()
    names = [o.name for o in session.get_outputs()]
    reference = dict(zip(names, session.run(None, feeds), strict=True))
    first_ort = time.perf_counter()

    gflop = None
    try:
        bound = model.bind_inputs((), feeds)
        cost = model.engine.lower_xla(bound).cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        gflop = float(cost["flops"]) / 1e9 if cost and cost.get("flops") else None
    except Exception:  # cost analysis is informative only
        gflop = None

    # With carry, each engine's calls update its own copy of the feeds.
    ours_feeds, their_feeds = dict(feeds), dict(feeds)
    calls = {
        "onnx2jax": _stepping(lambda f: jax.block_until_ready(model(**f)), ours_feeds, carry),
        "onnxruntime": _stepping(
            lambda f: dict(zip(names, session.run(None, f), strict=True)), their_feeds, carry
        )
        if carry
        else lambda: session.run(None, feeds),
    }
    samples = interleaved(calls, runs, warmup, block=block)
    # Each engine alone, calls back to back: what a busy server sees. Interleaved calls start
    # after a quiet wait (wait_until_quiet), with the other engine's data in the caches.
    alone = {
        name: interleaved({name: call}, runs, 1, settle=False)[name] for name, call in calls.items()
    }
    result: dict[str, Any] = {
        "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()},
        "threads": threads,
        "carry": dict(carry or {}),
        "block": block,
        "gflop": gflop,
        "onnx2jax": {
            **_summary(samples["onnx2jax"], items, gflop),
            "load_s": loaded - start,
            "first_call_s": first_ours - start,
            "samples_ms": samples["onnx2jax"],
            "back_to_back_median_ms": statistics.median(alone["onnx2jax"]),
            "back_to_back_samples_ms": alone["onnx2jax"],
        },
        "onnxruntime": {
            **_summary(samples["onnxruntime"], items, gflop),
            "session_s": created - first_ours,
            "first_call_s": first_ort - first_ours,
            "samples_ms": samples["onnxruntime"],
            "back_to_back_median_ms": statistics.median(alone["onnxruntime"]),
            "back_to_back_samples_ms": alone["onnxruntime"],
        },
    }
    result["ratio"] = result["onnx2jax"]["median_ms"] / result["onnxruntime"]["median_ms"]
    result["back_to_back_ratio"] = (
        result["onnx2jax"]["back_to_back_median_ms"]
        / result["onnxruntime"]["back_to_back_median_ms"]
    )
    ours = {k: np.asarray(v) for k, v in ours.items()}
    result.update(max_errors(ours, reference))
    if carry:
        # Both engines made as many calls: their states after them must agree as well.
        result["carried_state_errors"] = max_errors(
            {k: np.asarray(ours_feeds[k]) for k in carry.values()},
            {k: their_feeds[k] for k in carry.values()},
        )
        result["carried_state_change"] = max(
            float(np.abs(np.asarray(ours_feeds[k], np.float64) - feeds[k]).max(initial=0.0))
            for k in carry.values()
        )
    if unoptimized_reference:
        plain = onnxruntime_session(None, path, threads=threads, optimize=False)
        written = dict(zip(names, plain.run(None, feeds), strict=True))
        result.update({f"{k}_unoptimized": v for k, v in max_errors(ours, written).items()})
    return result


def _stepping(
    run: Callable[[dict[str, Any]], Mapping[str, Any]],
    feeds: dict[str, Any],
    carry: Mapping[str, str] | None,
) -> Callable[[], Any]:
    """A call of ``run`` on ``feeds`` that, with ``carry``, stores the outputs it names into
    their inputs in ``feeds`` for the next call."""
    if not carry:
        return lambda: run(feeds)

    def call() -> None:
        outputs = run(feeds)
        for output, name in carry.items():
            feeds[name] = outputs[output]

    return call


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _peak_rss_mb() -> float:
    """This process's own high-water resident size, in MB.

    Linux's VmHWM: getrusage's maxrss would carry over the size of the process that started
    this one (it is kept across exec).
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB on Linux


def _memory_child(engine: str, model_path: str, feeds_path: str, runs: int) -> dict[str, float]:
    """Run in a fresh process: load and run ``engine`` and report its peak memory."""
    with np.load(feeds_path) as data:
        feeds = {k: data[k] for k in data.files}
    if engine == "onnx2jax":
        jax.block_until_ready(jax.numpy.zeros(1) + 1)  # backend initialised before the baseline
    else:
        import onnxruntime  # noqa: F401
    baseline = _rss_mb()
    if engine == "onnx2jax":
        model = load(model_path)
        for _ in range(runs):
            jax.block_until_ready(model(**feeds))
    else:
        session = onnxruntime_session(None, model_path, threads=default_threads())
        for _ in range(runs):
            session.run(None, feeds)
    peak = _peak_rss_mb()
    return {"peak_rss_mb": peak, "baseline_rss_mb": baseline, "peak_increase_mb": peak - baseline}


def peak_memory(
    engine: str,
    path: str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    runs: int = 2,
    env: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Peak resident memory of ``engine`` ("onnx2jax" or "onnxruntime") on ``feeds``, in MB.

    Measured in a fresh process (the high-water mark of one process cannot be split between
    two engines): ``peak_increase_mb`` is the peak over the process's size after importing the
    engine, i.e. weights, compilation and activations.
    """
    with tempfile.TemporaryDirectory() as folder:
        feeds_path = os.path.join(folder, "feeds.npz")
        np.savez(feeds_path, **{k: np.asarray(v) for k, v in feeds.items()})
        command = [
            sys.executable,
            "-m",
            "onnx2jax.cli.bench",
            "--memory-child",
            engine,
            str(Path(path).resolve()),
            feeds_path,
            str(runs),
        ]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env={**os.environ, **dict(env or {})},
            check=False,
        )
    if done.returncode != 0:
        raise Onnx2JaxError(f"memory measurement of {engine} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # python -m onnx2jax.cli.bench --memory-child ENGINE MODEL FEEDS RUNS
    if len(sys.argv) == 6 and sys.argv[1] == "--memory-child":
        print(json.dumps(_memory_child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))))
    else:
        sys.exit("usage: python -m onnx2jax.cli.bench --memory-child ENGINE MODEL FEEDS.npz RUNS")
