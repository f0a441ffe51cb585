"""Tests of onnx2jax/cli/: the onnx2jax command."""
