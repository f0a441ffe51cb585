"""Moved to :mod:`onnx2jax.runtime.aot` (artifacts) and :mod:`onnx2jax.runtime.cache` (the
executable cache); this old import path keeps working."""

from onnx2jax.runtime.aot import (  # noqa: F401
    ARTIFACT_FORMAT,
    AotModel,
    cached_call,
    export_model,
    load_artifact,
)
from onnx2jax.runtime.cache import (  # noqa: F401
    CACHE_ENV,
    ENTRY_MAGIC,
    ExecutableCache,
    environment_key,
    model_digest,
    resolve_cache_dir,
    signature_key,
)
