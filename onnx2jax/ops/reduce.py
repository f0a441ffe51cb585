"""Reductions (Reduce*, ArgMax, ArgMin)."""

from __future__ import annotations
