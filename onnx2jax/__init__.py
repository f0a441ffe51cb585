"""onnx2jax: ONNX models as pure, jittable, differentiable JAX functions.

Example:
    >>> import numpy as np, onnx2jax
    >>> model = onnx2jax.load(onnx2jax.example_path())
    >>> sorted(model(np.zeros((1, 1, 8, 8), np.float32)))
    ['logits']
"""

from pathlib import Path

from onnx2jax.hostmem import keep_call_buffers

# Before any JAX computation starts XLA's threads: see onnx2jax/hostmem.py.
keep_call_buffers()

from onnx2jax.errors import (  # noqa: E402
    DataDependentShapeError,
    InputError,
    ModelLoadError,
    Onnx2JaxError,
    OpError,
    UnsupportedOpError,
)
from onnx2jax.hub import from_hub  # noqa: E402
from onnx2jax.model import Model, load  # noqa: E402
from onnx2jax.text import SentenceEncoder  # noqa: E402

__version__ = "0.1.0"


def example_path() -> Path:
    """Path of the example model shipped with the package: a CNN for 8x8 digit images."""
    return Path(__file__).parent / "examples" / "digits_cnn.onnx"


__all__ = [
    "DataDependentShapeError",
    "InputError",
    "Model",
    "ModelLoadError",
    "Onnx2JaxError",
    "OpError",
    "SentenceEncoder",
    "UnsupportedOpError",
    "example_path",
    "from_hub",
    "load",
]
