"""Moved to :mod:`onnx2jax.cli.coverage`; this old import path keeps working."""

from onnx2jax.cli import coverage as _moved


def __getattr__(name: str) -> object:
    return getattr(_moved, name)


if __name__ == "__main__":  # python -m onnx2jax.coverage, as the docs say
    _moved.main()
