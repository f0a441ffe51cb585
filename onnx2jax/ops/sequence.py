"""Sequence and Optional ops."""

from __future__ import annotations
