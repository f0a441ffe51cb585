"""Tests of onnx2jax/core/: loading, the Model API, export, safety."""
