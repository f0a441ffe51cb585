"""Moved to :mod:`onnx2jax.core.export`; this old import path keeps working."""

from onnx2jax.core import export as _moved


def __getattr__(name: str) -> object:
    return getattr(_moved, name)
