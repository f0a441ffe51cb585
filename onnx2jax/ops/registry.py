"""The one operator registry: ``(domain, op_type, since_version) -> op function``.

An op function takes an :class:`~onnx2jax.convert.OpContext` and the node's inputs (``None`` for
an absent optional input) and returns one value, or a ``tuple`` with one value per output.
Values are NumPy arrays when static (known at trace time), JAX arrays when traced, Python lists
for ONNX sequences.

The model's opset picks the newest registered version at or below it, so a model of opset 17
runs the implementation registered ``since=13`` until the semantics change again.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

OpFunction = Callable[..., Any]

DEFAULT_DOMAIN = ""
_DOMAIN_ALIASES = {"ai.onnx": DEFAULT_DOMAIN}


def canonical_domain(domain: str) -> str:
    return _DOMAIN_ALIASES.get(domain, domain)


@dataclass(frozen=True)
class OpSpec:
    """One registered implementation of an operator."""

    function: OpFunction
    domain: str
    op_type: str
    since: int
    # Input positions that must be static (shapes, axes, sizes). A float initializer feeding one
    # of these is kept a constant rather than made a trainable parameter.
    static_inputs: tuple[int, ...] = ()
    note: str = ""


@dataclass
class _Versions:
    since: list[int] = field(default_factory=list)
    specs: list[OpSpec] = field(default_factory=list)


_REGISTRY: dict[tuple[str, str], _Versions] = {}


def register(
    op_type: str,
    since: int = 1,
    domain: str = DEFAULT_DOMAIN,
    static_inputs: tuple[int, ...] = (),
    note: str = "",
) -> Callable[[OpFunction], OpFunction]:
    """Register the decorated function as ``op_type`` from opset ``since`` of ``domain``.

    Stack the decorator to register one function for several versions.
    """

    def decorate(function: OpFunction) -> OpFunction:
        key = (canonical_domain(domain), op_type)
        versions = _REGISTRY.setdefault(key, _Versions())
        if since in versions.since:
            raise ValueError(f"{domain or 'ai.onnx'}::{op_type} since {since} registered twice")
        index = bisect.bisect(versions.since, since)
        versions.since.insert(index, since)
        spec = OpSpec(function, key[0], op_type, since, tuple(static_inputs), note)
        versions.specs.insert(index, spec)
        return function

    return decorate


def lookup(domain: str, op_type: str, opset: int) -> OpSpec | None:
    """The implementation of ``op_type`` for a model importing ``domain`` at ``opset``."""
    versions = _REGISTRY.get((canonical_domain(domain), op_type))
    if versions is None:
        return None
    index = bisect.bisect(versions.since, opset)
    return versions.specs[index - 1] if index else None


def registered_ops() -> list[OpSpec]:
    """Every registered implementation, sorted by domain, op type and version."""
    return [spec for key in sorted(_REGISTRY) for spec in _REGISTRY[key].specs]
