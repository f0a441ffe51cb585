"""Activation functions (Relu, Sigmoid, Gelu, Softplus, ...)."""

from __future__ import annotations
