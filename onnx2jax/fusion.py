"""Moved to :mod:`onnx2jax.runtime.fusion`; this old import path keeps working."""

from onnx2jax.runtime.fusion import fuse, fuse_attention, fuse_conv_epilogues  # noqa: F401
