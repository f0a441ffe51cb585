"""The com.microsoft contrib ops that exporters and optimizers emit."""

from __future__ import annotations
