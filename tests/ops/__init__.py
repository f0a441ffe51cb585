"""Tests of onnx2jax/ops/: one file per op family where one maps."""
