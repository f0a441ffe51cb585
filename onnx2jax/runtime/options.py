"""The XLA options of the programs ``model(...)`` compiles, and the jit that honours them.

Options are per program, never JAX's global configuration: :func:`default_compiler_options`
are a model's (``model.compiler_options``), :func:`inference_compiler_options` the variant for
given inputs, :func:`jit_with_options` the ``jax.jit`` compiled with a set of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from onnx2jax.core import settings


def default_compiler_options() -> dict[str, Any]:
    """XLA options for the models' own jit (never JAX's global configuration).

    On CPU, XLA 0.10 hands dots and convolutions to YNNPACK by default; XLA's own kernels
    (Eigen) are faster on whole models (measured in benchmarks/: MiniLM b32 s128 853 -> 667 ms,
    ResNet-50 b8 737 -> 562 ms on 2 AMD EPYC cores, same outputs), so the YNNPACK fusion is
    turned off. ``ONNX2JAX_TUNE_XLA=0`` keeps XLA's defaults.
    """
    if not settings.tune_xla() or jax.default_backend() != "cpu":
        return {}
    return {"xla_cpu_experimental_ynn_fusion_type": ""}


# Inputs with at most this many rows run their matmuls through YNNPACK: measured faster for
# few rows (GPT-2 b1 s128) and slower for many (MiniLM b32 s128), see benchmarks/README.md.
# Only inputs of more rows split their batch over several CPU devices. Rows: input_rows.
FEW_ROWS = 1024


def input_rows(bound: Mapping[str, Any]) -> int:
    """The most rows a matrix product of these inputs may have: the tokens of an integer input
    (every element), else all dimensions of an input but the last."""
    rows = [
        int(np.prod(v.shape if np.issubdtype(v.dtype, np.integer) else v.shape[:-1]))
        for v in bound.values()
        if hasattr(v, "shape") and hasattr(v, "dtype")
    ]
    return max(rows, default=0)


def inference_compiler_options(
    bound: Mapping[str, Any], options: dict[str, Any], precision: str = "float32"
) -> dict[str, Any]:
    """``options``, with YNNPACK dots switched on for few rows or bfloat16 products.

    XLA's own (Eigen) dots compute bfloat16 no faster than float32; YNNPACK's run it at about
    twice the speed (measured in benchmarks/README.md).
    """
    if options.get("xla_cpu_experimental_ynn_fusion_type") != "":
        return options
    if precision == "bfloat16" or input_rows(bound) <= FEW_ROWS:
        return {
            **options,
            "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
        }
    return options


def jit_with_options(
    cache: dict[tuple, Any], function: Any, options: Mapping[str, Any], **jit_kwargs: Any
) -> Any:
    """``jax.jit(function)`` compiled with ``options``: one per distinct set, kept in ``cache``."""
    key = tuple(sorted(options.items()))
    jitted = cache.get(key)
    if jitted is None:
        jitted = cache[key] = jax.jit(
            function, compiler_options=dict(options) or None, **jit_kwargs
        )
    return jitted


def options_outside_traces(options: Mapping[str, Any], *arguments: Any) -> dict[str, Any]:
    """``options``, or none when an argument is a tracer: the call is then inside someone's jit,
    grad or vmap, where JAX refuses a nested jit with ``compiler_options``."""
    traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(arguments))
    return {} if traced else dict(options)
