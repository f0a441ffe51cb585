"""Random ops, seeded and reproducible."""

from __future__ import annotations
