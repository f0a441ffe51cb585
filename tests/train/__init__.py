"""Tests of onnx2jax/train/: fine-tuning."""
