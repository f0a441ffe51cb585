"""Cast and CastLike between every ONNX type, float8 and 4-bit types included."""

from __future__ import annotations
