"""Moved to :mod:`onnx2jax.runtime.hostmem`; this old import path keeps working."""

from onnx2jax.runtime import hostmem as _moved


def __getattr__(name: str) -> object:
    return getattr(_moved, name)
