"""Moved to :mod:`onnx2jax.cli.bench`; this old import path keeps working."""

from onnx2jax.cli import bench as _moved


def __getattr__(name: str) -> object:
    return getattr(_moved, name)
