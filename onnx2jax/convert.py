"""Moved to :mod:`onnx2jax.core.convert`; this old import path keeps working."""

from onnx2jax.core import convert as _moved


def __getattr__(name: str) -> object:
    return getattr(_moved, name)
