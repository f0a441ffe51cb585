"""Moved to :mod:`onnx2jax.runtime.devices`; this old import path keeps working."""

from onnx2jax.runtime.devices import (  # noqa: F401
    BATCH_AXIS,
    canonical_input,
    place_inputs,
    replicate,
    split_devices,
)
