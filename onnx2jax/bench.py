"""Side-by-side latency of onnx2jax (under jit, after warm-up) and onnxruntime on the same inputs.

The numbers come from one process and one set of inputs, so their ratio is meaningful on that
machine; absolute times depend on it. ``onnx2jax bench MODEL`` prints them.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import jax
import numpy as np

from onnx2jax.errors import Onnx2JaxError
from onnx2jax.model import Model


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
        return {"onnx2jax": asdict(self.onnx2jax), "onnxruntime": asdict(self.onnxruntime),
                "ratio": self.ratio, "device": str(jax.devices()[0])}


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


def onnxruntime_session(model: Model, path: str | os.PathLike | None = None) -> Any:
    """An onnxruntime CPU session of ``model``, from ``path`` when given (external data needs it).

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
    source = str(path) if path is not None else model.proto.SerializeToString()
    try:
        return onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise Onnx2JaxError(f"onnxruntime cannot load the model: {exc}") from None


def compare(model: Model, feeds: Mapping[str, np.ndarray], runs: int = 20, warmup: int = 3,
            path: str | os.PathLike | None = None) -> Comparison:
    """Median latency of ``model(**feeds)`` under jit and of onnxruntime on the same ``feeds``.

    Both take host (NumPy) inputs and return results ready to use. ``path`` is the model's file,
    for onnxruntime to find external data.

    Example:
        >>> import numpy as np, onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> result = compare(model, {"image": np.zeros((4, 1, 8, 8), np.float32)}, runs=3)
        >>> result.ratio > 0
        True
    """
    session = onnxruntime_session(model, path)
    feeds = {k: np.asarray(v) for k, v in feeds.items()}
    ours = time_calls("onnx2jax", lambda: jax.block_until_ready(model(**feeds)), runs, warmup)
    theirs = time_calls("onnxruntime", lambda: session.run(None, feeds), runs, warmup)
    return Comparison(ours, theirs)
