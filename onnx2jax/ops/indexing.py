"""Gather/Scatter families, Slice, Split, Pad, Tile, Expand, TopK, NonZero, Unique and other indexing ops."""

from __future__ import annotations
