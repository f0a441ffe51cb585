"""onnx2jax: ONNX models as pure, jittable, differentiable JAX functions.

Example:
    >>> import numpy as np, onnx2jax
    >>> model = onnx2jax.load(onnx2jax.example_path())
    >>> sorted(model(np.zeros((1, 1, 8, 8), np.float32)))
    ['logits']
"""

from pathlib import Path

from onnx2jax.core.errors import (
    DataDependentShapeError,
    GenerationError,
    InputError,
    ModelLoadError,
    Onnx2JaxError,
    OpError,
    ShardingError,
    UnsupportedOpError,
)
from onnx2jax.core.model import Model, load
from onnx2jax.generation import TextGenerator, generate, generate_stream
from onnx2jax.hub import from_hub
from onnx2jax.runtime.process import tune_process
from onnx2jax.text import SentenceEncoder

__version__ = "0.1.0"


def example_path() -> Path:
    """Path of the example model shipped with the package: a CNN for 8x8 digit images."""
    return Path(__file__).parent / "examples" / "digits_cnn.onnx"


__all__ = [
    "DataDependentShapeError",
    "GenerationError",
    "InputError",
    "Model",
    "ModelLoadError",
    "Onnx2JaxError",
    "OpError",
    "SentenceEncoder",
    "ShardingError",
    "TextGenerator",
    "UnsupportedOpError",
    "example_path",
    "from_hub",
    "generate",
    "generate_stream",
    "load",
    "tune_process",
]
