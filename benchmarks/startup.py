"""Start-up of a fresh process: time to the first result, with and without caches.

Run as ``python -m benchmarks.startup MODE MODEL FEEDS.npz [CACHE_DIR]``; prints one JSON line
with ``import_s`` (importing onnx2jax and JAX), ``load_s`` (reading the model or artifact),
``first_call_s`` (from the start of loading to the first result on the host, i.e. load +
trace + compile + run, whatever of these the mode does) and ``total_s`` (all of it, imports
included). MODE is ``onnx`` (an .onnx file through ``onnx2jax.load``) or ``aot`` (an artifact
of ``onnx2jax compile``); with CACHE_DIR the compiled executable cache is used.
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402


def measure(mode: str, model_path: str, feeds_path: str, cache_dir: str | None) -> dict[str, Any]:
    """Load ``model_path`` in ``mode`` and run it once on the feeds; the times in seconds."""
    import jax
    import numpy as np

    import onnx2jax
    from onnx2jax import aot

    imported = time.perf_counter()
    with np.load(feeds_path) as data:
        feeds = {k: data[k] for k in data.files}
    begin = time.perf_counter()
    if mode == "onnx":
        model = onnx2jax.load(model_path, cache_dir=cache_dir)
        loaded = time.perf_counter()
        outputs = model(**feeds)
    elif mode == "aot":
        model = aot.load_artifact(model_path, cache_dir=cache_dir)
        loaded = time.perf_counter()
        outputs = model(**feeds)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    first = {k: np.asarray(v) for k, v in jax.block_until_ready(outputs).items()}
    done = time.perf_counter()
    return {
        "mode": mode,
        "cache": cache_dir is not None,
        "import_s": imported - _START,
        "load_s": loaded - begin,
        "first_call_s": done - begin,
        "total_s": done - _START,
        "outputs": {k: list(v.shape) for k, v in first.items()},
    }


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if len(arguments) not in (3, 4):
        raise SystemExit("usage: python -m benchmarks.startup MODE MODEL FEEDS.npz [CACHE_DIR]")
    print(
        json.dumps(
            measure(
                arguments[0],
                arguments[1],
                arguments[2],
                arguments[3] if len(arguments) == 4 else None,
            )
        )
    )
