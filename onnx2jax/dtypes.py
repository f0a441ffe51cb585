"""Moved to :mod:`onnx2jax.core.dtypes`; this old import path keeps working."""

from onnx2jax.core import dtypes as _moved


def __getattr__(name: str) -> object:
    return getattr(_moved, name)
