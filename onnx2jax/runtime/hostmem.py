"""Host memory settings that keep XLA:CPU's per-call buffers mapped between calls.

XLA:CPU allocates every call's intermediate buffers with the C library's ``malloc`` and frees
them when the call ends. With glibc's defaults, buffers of more than 32 MB (and any buffer
above 64 MB allocated on a worker thread, whose arenas are capped at 64 MB) are ``mmap``-ed and
given back to the kernel on ``free``, so the next call touches fresh pages and pays a page fault
for every 4 KB of them, on every call (ResNet-50 at batch 8: benchmarks/LOG.md). onnxruntime
keeps its own arena instead.

:func:`keep_call_buffers` raises glibc's thresholds so that freed buffers of up to 1 GiB
stay in the heap for reuse; onnx2jax never calls it by itself: :func:`onnx2jax.tune_process`
does, at the user's request (the command line and the benchmarks ask). The number of malloc
arenas is left alone, so buffers above 64 MB allocated on a worker thread are still
``mmap``-ed. Other C libraries are left alone. :func:`release_free_memory` hands a load's
parsing garbage back when the thresholds are in force.

Example:
    >>> import os, sys
    >>> import onnx2jax.runtime.hostmem as hostmem
    >>> glibc = sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    >>> hostmem.keep_call_buffers() == glibc
    True
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import sys

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

KEPT_BYTES = 1 << 30

_applied: bool | None = None


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return ctypes.CDLL("libc.so.6")
    except (OSError, ValueError):
        return None


def keep_call_buffers() -> bool:
    """Make glibc keep large freed buffers for reuse; True where the settings are in force.

    Applied once per process; False on other C libraries.
    """
    global _applied
    if _applied is None:
        libc = _glibc()
        _applied = (
            libc is not None
            and bool(libc.mallopt(_M_MMAP_THRESHOLD, KEPT_BYTES))
            and bool(libc.mallopt(_M_TRIM_THRESHOLD, KEPT_BYTES))
        )
    return _applied


def release_free_memory() -> None:
    """Give the kernel back the free memory the allocator keeps (after a load, say)."""
    libc = _glibc() if _applied else None
    if libc is not None:
        # Small objects freed only by the cycle collector can pin the heap's top above large
        # free blocks (a large weight's parse buffers stayed resident until then).
        gc.collect()
        libc.malloc_trim(0)
