"""Tests of onnx2jax/runtime/: the compiled engine, its cache, AOT artifacts, devices."""
