"""XLA:CPU's worker threads kept one to a CPU.

XLA:CPU runs each call on its pool of worker threads (``tf_XLAEigen``, one per CPU the process
may use). A worker sleeps whenever it runs out of work, and Linux picks a CPU for it each time
it is woken. After an idle spell, Linux woke both workers of this project's 2-core machine
onto the same CPU. They then took turns on it for the rest of the call while the other CPU
idled, and the threads spent much of each call waiting to run (``/proc/self/task/*/schedstat``).
Pinning worker *i* to CPU *i* keeps them apart. onnxruntime is not affected because its
workers spin instead of sleeping. The cost is on tiny programs, whose work a pinned worker may
have to wait for the CPU of the thread that dispatched it: the example CNN's calls and small
compilations are a little slower pinned. Figures for both: benchmarks/LOG.md.

:func:`pin_xla_workers` does that on Linux when JAX computes on the CPU. It leaves alone a
thread whose affinity someone else has set, and it does nothing if the pool has more workers
than allowed CPUs.
onnx2jax never calls it by itself: :func:`onnx2jax.tune_process` does, at the user's request.

Example (Linux, CPU):
    >>> import os, jax, onnx2jax
    >>> from onnx2jax.runtime.cputhreads import pin_xla_workers, xla_workers
    >>> model = onnx2jax.load(onnx2jax.example_path())
    >>> on = (jax.default_backend() == "cpu"
    ...       and 1 < len(xla_workers()) <= len(os.sched_getaffinity(0)))
    >>> pin_xla_workers() == (len(xla_workers()) if on else 0)
    True
"""

from __future__ import annotations

import os

import jax

WORKER_NAME = "tf_XLAEigen"
_TASKS = "/proc/self/task"


def xla_workers() -> list[int]:
    """Thread ids of XLA:CPU's worker threads in this process, oldest first ([] off Linux)."""
    try:
        tids = os.listdir(_TASKS)
    except OSError:
        return []
    workers = []
    for tid in tids:
        try:
            with open(f"{_TASKS}/{tid}/comm") as comm:
                if comm.read().strip() == WORKER_NAME:
                    workers.append(int(tid))
        except OSError:  # the thread ended meanwhile
            continue
    return sorted(workers)


def pin_xla_workers() -> int:
    """Pin each XLA:CPU worker thread to a CPU of its own; returns how many have one CPU.

    Returns 0 (and changes nothing) off Linux, when JAX's
    default backend is not the CPU, or when the pool has more workers than allowed CPUs.
    A worker whose affinity is no longer the whole allowed set is someone else's choice: it is
    left as it is, and a CPU it was given alone goes to no other worker.
    """
    if not hasattr(os, "sched_setaffinity") or jax.default_backend() != "cpu":
        return 0
    allowed = set(os.sched_getaffinity(0))
    affinities = {}
    for tid in xla_workers():
        try:
            affinities[tid] = os.sched_getaffinity(tid)
        except OSError:  # the thread ended meanwhile
            continue
    if not 1 < len(affinities) <= len(allowed):
        return 0
    taken = {next(iter(cpus)) for cpus in affinities.values() if len(cpus) == 1}
    free = iter(sorted(allowed - taken))
    for tid, cpus in affinities.items():
        if cpus != allowed:
            continue
        cpu = next(free, None)
        if cpu is None:
            break
        try:
            os.sched_setaffinity(tid, {cpu})
            affinities[tid] = {cpu}
        except OSError:  # the thread ended, or we may not change it
            continue
    return sum(len(cpus) == 1 for cpus in affinities.values())
