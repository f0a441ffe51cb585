"""The ai.onnx.preview.training ops."""

from __future__ import annotations
