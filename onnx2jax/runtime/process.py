"""Process-wide speed settings for the CPU, which onnx2jax never makes on its own.

Two settings help ``model(...)`` on the CPU but change the whole process, so they are the
user's call, made once, early (the command line and the benchmarks make it):

- **the allocator keeps call buffers** (:func:`onnx2jax.runtime.hostmem.keep_call_buffers`): glibc
  returns freed blocks above 32 MB to the kernel, so every call of a large model faults its
  buffers in again; raised thresholds keep them for reuse, as onnxruntime's arena does. Freed
  memory then stays resident (up to 1 GiB). The number of malloc arenas is left alone.
- **XLA's worker threads one to a CPU** (:func:`onnx2jax.runtime.cputhreads.pin_xla_workers`): Linux
  may wake two sleeping workers onto one CPU and leave the other idle.

The figures behind both are in benchmarks/LOG.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from onnx2jax.runtime import cputhreads, hostmem


def tune_process(
    *, keep_call_buffers: bool = True, pin_threads: bool = True
) -> dict[str, bool | int]:
    """Make this process faster for ``model(...)`` on the CPU; returns what was applied.

    Call it once, before loading models (the allocator setting helps the threads that
    allocate after it). Both settings are process-wide: leave them out of a server whose other
    threads or libraries need the allocator's defaults or their own thread placement.

    Example:
        >>> import onnx2jax
        >>> applied = onnx2jax.tune_process(pin_threads=False)
        >>> sorted(applied)
        ['keep_call_buffers', 'pinned_threads']
    """
    kept = hostmem.keep_call_buffers() if keep_call_buffers else False
    pinned = 0
    if pin_threads and jax.default_backend() == "cpu":
        jax.block_until_ready(jnp.zeros(8) + 1)  # starts XLA:CPU's worker pool
        pinned = cputhreads.pin_xla_workers()
    return {"keep_call_buffers": kept, "pinned_threads": pinned}
