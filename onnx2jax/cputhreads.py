"""Moved to :mod:`onnx2jax.runtime.cputhreads`; this old import path keeps working."""

from onnx2jax.runtime import cputhreads as _moved


def __getattr__(name: str) -> object:
    return getattr(_moved, name)
