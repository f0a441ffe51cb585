"""QuantizeLinear, DequantizeLinear and the integer and QLinear ops."""

from __future__ import annotations
