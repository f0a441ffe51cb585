"""Moved to :mod:`onnx2jax.core.safety`; this old import path keeps working."""

from onnx2jax.core import safety as _moved


def __getattr__(name: str) -> object:
    return getattr(_moved, name)
