"""The one operator registry: ``(domain, op_type, since_version) -> op function``.

An op function takes an :class:`~onnx2jax.core.convert.OpContext` and the node's inputs
(``None`` for an absent optional input) and returns one value, or a ``tuple`` with one value per
output. Values are NumPy arrays when static (known at trace time), JAX arrays when traced,
Python lists for ONNX sequences.

The model's opset picks the newest registered version at or below it, so a model of opset 17
runs the implementation registered ``since=13`` until the semantics change again.

One registration style, with the literal op name so ``grep 'register("Div"'`` finds it::

    @register("Div", since=(1, 6, 7, 13, 14))
    def div(ctx, a, b): ...

    @register("Gelu", since=1, domain=MS)
    def gelu(ctx, x): ...

See ``onnx2jax/ops/README.md`` for how to add an op.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

OpFunction = Callable[..., Any]

# The domains op files register in; import these rather than spelling the strings again.
ONNX = ""  # ai.onnx, the default domain (a model may also spell it "ai.onnx")
ML = "ai.onnx.ml"
MS = "com.microsoft"  # onnxruntime's contrib ops
PREVIEW = "ai.onnx.preview"
TRAINING = "ai.onnx.preview.training"
ONNX2JAX = "ai.onnx2jax"  # onnx2jax's own ops, made by its graph rewrites
DEFAULT_DOMAIN = ONNX
_DOMAIN_ALIASES = {"ai.onnx": ONNX}


def canonical_domain(domain: str) -> str:
    """``domain`` as the registry keys it (``"ai.onnx"`` is the default domain ``""``)."""
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
    # Input positions holding weights the op reads as traced arrays whatever their dtype (packed
    # or quantized integers): an integer initializer read only through these is kept a frozen
    # param, a device array passed to the program, rather than a constant compiled into it.
    # The int32-accumulating ops (MatMulInteger, QLinearConv, ...) declare none: XLA widens a
    # constant weight once, at compile time, and they ran slower widening it on every call.
    weight_inputs: tuple[int, ...] = ()
    note: str = ""


@dataclass
class _Versions:
    since: list[int] = field(default_factory=list)
    specs: list[OpSpec] = field(default_factory=list)


_REGISTRY: dict[tuple[str, str], _Versions] = {}


def register(
    op_type: str,
    since: int | tuple[int, ...] = 1,
    domain: str = ONNX,
    static_inputs: tuple[int, ...] = (),
    note: str = "",
    weight_inputs: tuple[int, ...] = (),
) -> Callable[[OpFunction], OpFunction]:
    """Register the decorated function as ``op_type`` of ``domain`` from each version in ``since``.

    ``since`` is one opset version or a tuple of them: the versions where the spec changed and
    this function implements the change (``since=(1, 6, 7, 13, 14)``). Registering a version
    of an op twice is an error, so two files cannot silently shadow each other.

    ``static_inputs`` are the input positions that must be known at trace time (shapes, axes);
    ``weight_inputs`` those the op reads as traced arrays even when they hold integers (packed
    or quantized weights, their zero points), so that such an initializer is passed to the
    program as a frozen param instead of being compiled into it. A position cannot be both.

    Example:
        >>> import onnx2jax.ops  # registers every op family
        >>> spec = lookup(MS, "MatMulNBits", 1)  # B, scales, zero_points, g_idx
        >>> spec.weight_inputs
        (1, 2, 3, 4)
    """
    if set(static_inputs) & set(weight_inputs):
        raise ValueError(
            f"{op_type}: inputs {sorted(set(static_inputs) & set(weight_inputs))} cannot be both "
            "static and weight inputs"
        )
    versions_given = (since,) if isinstance(since, int) else tuple(since)
    if not versions_given or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in versions_given
    ):
        raise ValueError(
            f"{op_type}: since must be a positive int or a tuple of them, got {since!r}"
        )
    if len(set(versions_given)) != len(versions_given):
        raise ValueError(f"{op_type}: since {since!r} repeats a version")

    def decorate(function: OpFunction) -> OpFunction:
        key = (canonical_domain(domain), op_type)
        versions = _REGISTRY.setdefault(key, _Versions())
        for version in versions_given:
            if version in versions.since:
                raise ValueError(
                    f"{domain or 'ai.onnx'}::{op_type} since {version} registered twice"
                )
        for version in versions_given:
            index = bisect.bisect(versions.since, version)
            versions.since.insert(index, version)
            spec = OpSpec(
                function,
                key[0],
                op_type,
                version,
                tuple(static_inputs),
                tuple(weight_inputs),
                note,
            )
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
