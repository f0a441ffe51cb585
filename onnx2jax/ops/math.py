"""Matrix products, Einsum, Softmax family, CumSum and other math ops."""

from __future__ import annotations
