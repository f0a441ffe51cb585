"""Attention and RotaryEmbedding."""

from __future__ import annotations
