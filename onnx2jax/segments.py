"""Moved to :mod:`onnx2jax.runtime.segments`; this old import path keeps working."""

from onnx2jax.runtime.segments import Segment, SegmentedRunner  # noqa: F401
