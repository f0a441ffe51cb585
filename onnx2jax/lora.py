"""Moved to :mod:`onnx2jax.train.lora`; this old import path keeps working."""

from onnx2jax.train import lora as _moved


def __getattr__(name: str) -> object:
    return getattr(_moved, name)
