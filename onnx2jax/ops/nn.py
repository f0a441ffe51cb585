"""Convolutions, pooling, Dropout, LRN, DepthToSpace and other neural-network layers."""

from __future__ import annotations
