"""Gather and Scatter families, Slice, Split, Pad, Tile, Expand, TopK, NonZero, Unique."""

from __future__ import annotations
