"""Moved to :mod:`onnx2jax.core.loader`; this old import path keeps working."""

from onnx2jax.core import loader as _moved


def __getattr__(name: str) -> object:
    return getattr(_moved, name)
