"""The ai.onnx.ml domain (scikit-learn exports)."""

from __future__ import annotations
