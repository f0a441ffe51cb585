"""Exceptions raised by onnx2jax, each one carrying what a user needs to act on it."""

from __future__ import annotations


class Onnx2JaxError(Exception):
    """Base class of every error onnx2jax raises on purpose."""


class ModelLoadError(Onnx2JaxError):
    """The model file (or its external data) cannot be read or is not a valid ONNX model."""


class UnsupportedOpError(Onnx2JaxError):
    """The model uses operators (or operator versions) that onnx2jax does not implement.

    ``missing`` maps ``(domain, op_type, opset)`` to the names of the nodes that use it.
    """

    def __init__(self, missing: dict[tuple[str, str, int], list[str]]):
        self.missing = missing
        lines = []
        for (domain, op_type, opset), nodes in sorted(missing.items()):
            shown = ", ".join(repr(n) for n in nodes[:5])
            more = f" and {len(nodes) - 5} more" if len(nodes) > 5 else ""
            lines.append(
                f"  {domain or 'ai.onnx'}::{op_type} (opset {opset}), used by {len(nodes)} "
                f"node(s): {shown}{more}"
            )
        super().__init__(
            f"the model uses {len(missing)} operator(s) that onnx2jax does not support:\n"
            + "\n".join(lines)
        )


class InputError(Onnx2JaxError, ValueError):
    """A model input is missing, unknown, or has the wrong shape or dtype."""


class DataDependentShapeError(Onnx2JaxError):
    """An operator needs a concrete value (a shape, a count, an index) that depends on the data."""


class OpError(Onnx2JaxError):
    """An operator cannot run with the attributes or inputs it was given."""


class GenerationError(Onnx2JaxError, ValueError):
    """The model does not have the inputs and outputs of a decoder with a KV cache, or the
    generation's arguments do not fit it."""


class ShardingError(Onnx2JaxError, ValueError):
    """A sharding preset, rule or spec that cannot apply to the model's params on the mesh."""


class UnsafeCacheWarning(UserWarning):
    """A cache folder or file others could write (or one not owned by this user) was refused.

    Nothing is read from or written to it; the model still runs, compiled in this process.
    """
