"""Limits and switches that onnx2jax reads from the environment, read here and nowhere else.

Each setting is read when it is used, so a test or a user can change it between calls.
"""

from __future__ import annotations

import os

from onnx2jax.errors import Onnx2JaxError

MAX_STATIC_BYTES_ENV = "ONNX2JAX_MAX_STATIC_BYTES"
MAX_STATIC_BYTES_DEFAULT = 64 * 2**20
MAX_UNROLL_ENV = "ONNX2JAX_MAX_UNROLL"
MAX_UNROLL_DEFAULT = 10_000


def _positive_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Onnx2JaxError(f"${name} must be a whole number, got {raw!r}") from None
    if value <= 0:
        raise Onnx2JaxError(f"${name} must be positive, got {value}")
    return value


def max_static_bytes() -> int:
    """The largest value (in bytes, counted as if materialized) computed at trace time.

    Shape arithmetic and constants are folded with NumPy while tracing; a larger value is handed
    to XLA instead, so a hostile ``Expand`` to 10^12 elements never fills memory or spins for
    minutes on the host. ``$ONNX2JAX_MAX_STATIC_BYTES`` sets it (default 64 MiB).

    Example:
        >>> max_static_bytes() >= 1
        True
    """
    return _positive_int(MAX_STATIC_BYTES_ENV, MAX_STATIC_BYTES_DEFAULT)


def max_unroll() -> int:
    """The most iterations a ``Loop`` is unrolled in Python when its state changes shape.

    A loop whose carried values keep their shapes compiles to one ``lax.while_loop``; one whose
    shapes change can only be unrolled at trace time, and past this many steps onnx2jax stops
    with a clear error. ``$ONNX2JAX_MAX_UNROLL`` sets it (default 10,000).

    Example:
        >>> max_unroll() >= 1
        True
    """
    return _positive_int(MAX_UNROLL_ENV, MAX_UNROLL_DEFAULT)
