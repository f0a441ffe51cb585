"""A batch split over several CPU devices.

Some of XLA:CPU's kernels use one thread however many the machine has: the batched matrix
products of attention (MiniLM b32's 384 heads ran on one CPU of two), and its
convolutions and element-wise passes gain little from a second thread. When JAX has several
CPU devices, ``model(...)`` splits the batch over them instead: each device runs its share as
its own program, at the same time as the others, on the same pool of worker threads. Give JAX
the devices before its first computation, with ``jax.config.update("jax_num_cpu_devices", 2)``
or ``XLA_FLAGS=--xla_force_host_platform_device_count=2``.

On this project's 2-core machines that made MiniLM b32 s128 and ResNet-50 b8 faster, back when
they ran on XLA's kernels (benchmarks/LOG.md, "Opt-in: the batch split over CPU devices"). The
weights are copied to every device the batch uses, once: N devices hold N copies in host
memory. Inputs whose leading dimension is the batch are split along it; the rest, and the
weights, are replicated. XLA partitions the program from those placements, so it computes
what one device would, whatever the inputs' dimensions mean.

The batch is split over as many devices as divide it evenly, for inputs of many rows
(``Model.split_devices``); a batch of one, few rows, a single device, another backend, or
``ONNX2JAX_SPLIT_BATCH=0`` leave ``model(...)`` on one device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from onnx2jax.core import settings

BATCH_AXIS = "batch"


def split_devices(inputs: Mapping[str, Any]) -> list[jax.Device]:
    """The CPU devices to split these inputs' batch over; [] to run on one device.

    The batch is the leading dimension of the first input; it is split over the most devices
    (at most all of JAX's local CPU devices) that divide it evenly.

    Example:
        >>> import numpy as np
        >>> split_devices({"x": np.zeros((1, 3))})  # a batch of one stays on one device
        []
    """
    if not settings.split_batch() or jax.default_backend() != "cpu":
        return []
    devices = jax.local_devices()
    arrays = list(inputs.values())
    if len(devices) < 2 or not arrays or not all(_is_array(v) and v.ndim for v in arrays):
        return []
    batch = arrays[0].shape[0]
    count = max(n for n in range(1, len(devices) + 1) if batch % n == 0)
    return devices[:count] if count > 1 else []


def place_inputs(inputs: Mapping[str, Any], devices: list[jax.Device]) -> dict[str, Any]:
    """``inputs`` on ``devices``: split along the batch where their leading dimension is it."""
    mesh = Mesh(np.array(devices), (BATCH_AXIS,))
    split = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    whole = NamedSharding(mesh, PartitionSpec())
    batch = next(iter(inputs.values())).shape[0]
    return {
        k: jax.device_put(canonical_input(v), split if v.ndim and v.shape[0] == batch else whole)
        for k, v in inputs.items()
    }


def replicate(
    values: Mapping[str, Any],
    devices: list[jax.Device],
    before: Mapping[str, Any] | None = None,
    copies: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``values`` copied to every device in ``devices``.

    ``copies``, an earlier result for the same devices made from ``before``, lends the copies
    of the values that are still the same objects: changing a few weights copies only those.
    """
    whole = NamedSharding(Mesh(np.array(devices), (BATCH_AXIS,)), PartitionSpec())
    before, copies = before or {}, copies or {}
    return {
        k: copies[k] if k in copies and before.get(k) is v else jax.device_put(v, whole)
        for k, v in values.items()
    }


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray | jax.Array) and value.dtype != object


def canonical_input(value: Any) -> Any:
    """NumPy inputs in the dtype jit would give them (int64 -> int32 without x64)."""
    if isinstance(value, np.ndarray):
        dtype = jax.dtypes.canonicalize_dtype(value.dtype)
        if dtype != value.dtype:
            return value.astype(dtype)
    return value
