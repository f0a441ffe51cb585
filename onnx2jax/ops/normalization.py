"""BatchNormalization, LayerNormalization, GroupNormalization, RMSNormalization and relatives."""

from __future__ import annotations
