"""Resize, GridSample, RoiAlign, NonMaxSuppression and other image ops."""

from __future__ import annotations
