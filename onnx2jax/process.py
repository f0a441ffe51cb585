"""Moved to :mod:`onnx2jax.runtime.process`; this old import path keeps working."""

from onnx2jax.runtime import process as _moved


def __getattr__(name: str) -> object:
    return getattr(_moved, name)
