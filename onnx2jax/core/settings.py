"""Every environment variable onnx2jax reads, read here and nowhere else.

Each setting is read when it is used, so a test or a user can change it between calls.
``docs/settings.md`` lists them; :func:`table` is the list that page is checked against.
"""

from __future__ import annotations

import os
from pathlib import Path

from onnx2jax.core.errors import Onnx2JaxError

MAX_STATIC_BYTES_ENV = "ONNX2JAX_MAX_STATIC_BYTES"
MAX_STATIC_BYTES_DEFAULT = 64 * 2**20
MAX_UNROLL_ENV = "ONNX2JAX_MAX_UNROLL"
MAX_UNROLL_DEFAULT = 10_000
CACHE_DIR_ENV = "ONNX2JAX_CACHE_DIR"
CACHE_KEY_FILE_ENV = "ONNX2JAX_CACHE_KEY_FILE"
NATIVE_ENV = "ONNX2JAX_NATIVE"
NATIVE_DIR_ENV = "ONNX2JAX_NATIVE_DIR"
TUNE_XLA_ENV = "ONNX2JAX_TUNE_XLA"
SPLIT_BATCH_ENV = "ONNX2JAX_SPLIT_BATCH"


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


def _switch(name: str) -> bool:
    """An on/off setting that is on unless set to ``0``."""
    return os.environ.get(name, "1") != "0"


def _path(name: str) -> Path | None:
    raw = os.environ.get(name)
    return Path(raw) if raw else None


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
    """The most iterations a ``Loop`` is unrolled at trace time when its state changes shape.

    A loop whose carried values keep their shapes compiles to one ``lax.while_loop``; one whose
    shapes change can only be unrolled, and past this many steps onnx2jax stops with a clear
    error. ``$ONNX2JAX_MAX_UNROLL`` sets it (default 10,000).

    Example:
        >>> max_unroll() >= 1
        True
    """
    return _positive_int(MAX_UNROLL_ENV, MAX_UNROLL_DEFAULT)


def cache_dir() -> Path | None:
    """The executable cache's folder when none is passed to ``load``: ``$ONNX2JAX_CACHE_DIR``
    (unset: no cache)."""
    return _path(CACHE_DIR_ENV)


def cache_key_file() -> Path:
    """The per-user secret that signs cache entries and kernel manifests:
    ``$ONNX2JAX_CACHE_KEY_FILE``, else ``$XDG_CONFIG_HOME/onnx2jax/cache.key``."""
    configured = _path(CACHE_KEY_FILE_ENV)
    if configured is not None:
        return configured
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "onnx2jax" / "cache.key"


def native_kernels() -> bool:
    """Whether ``model(...)`` may use the native CPU kernels (``$ONNX2JAX_NATIVE=0``: never)."""
    return _switch(NATIVE_ENV)


def native_dir() -> Path:
    """Where built kernels are kept: ``$ONNX2JAX_NATIVE_DIR``, else
    ``$XDG_CACHE_HOME/onnx2jax/native``."""
    configured = _path(NATIVE_DIR_ENV)
    if configured is not None:
        return configured
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onnx2jax" / "native"


def compiler_candidates() -> list[str]:
    """C++ compilers to build the kernels with, in order: ``$CXX``, then the usual names."""
    return [name for name in (os.environ.get("CXX"), "c++", "g++", "clang++") if name]


def tune_xla() -> bool:
    """Whether the models' own jit gets onnx2jax's XLA options on the CPU
    (``$ONNX2JAX_TUNE_XLA=0`` keeps XLA's defaults)."""
    return _switch(TUNE_XLA_ENV)


def split_batch() -> bool:
    """Whether ``model(...)`` may split a batch over several CPU devices
    (``$ONNX2JAX_SPLIT_BATCH=0``: one device)."""
    return _switch(SPLIT_BATCH_ENV)


def table() -> list[tuple[str, str, str]]:
    """``(variable, default, meaning)`` of every setting, for ``docs/settings.md``.

    Example:
        >>> [row[0] for row in table()][:2]
        ['ONNX2JAX_CACHE_DIR', 'ONNX2JAX_CACHE_KEY_FILE']
    """
    return [
        (CACHE_DIR_ENV, "unset (no cache)", "folder of the compiled-executable cache"),
        (
            CACHE_KEY_FILE_ENV,
            "~/.config/onnx2jax/cache.key",
            "per-user secret that signs cache entries and kernel manifests",
        ),
        (
            MAX_STATIC_BYTES_ENV,
            str(MAX_STATIC_BYTES_DEFAULT),
            "largest value folded with NumPy at trace time; larger ones go to XLA",
        ),
        (
            MAX_UNROLL_ENV,
            str(MAX_UNROLL_DEFAULT),
            "most iterations a shape-changing Loop is unrolled at trace time",
        ),
        (NATIVE_ENV, "1", "0 turns the native CPU kernels off"),
        (NATIVE_DIR_ENV, "~/.cache/onnx2jax/native", "where built native kernels are kept"),
        (SPLIT_BATCH_ENV, "1", "0 keeps model(...) on one CPU device"),
        (TUNE_XLA_ENV, "1", "0 keeps XLA's default compiler options for the models' jit"),
    ]
