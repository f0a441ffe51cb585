"""The core: reading an ONNX model, planning its graph and tracing it into JAX.

- :mod:`~onnx2jax.core.loader`: reading a model safely (paths, bytes, protos, external data);
- :mod:`~onnx2jax.core.graph`: the plan: topological order, params and constants, op lookup;
- :mod:`~onnx2jax.core.convert`: the interpreter that calls one op function per node;
- :mod:`~onnx2jax.core.model`: :func:`~onnx2jax.core.model.load` and
  :class:`~onnx2jax.core.model.Model` (graph, params, pure ``apply``), the public API;
- :mod:`~onnx2jax.core.export`: writing params back into the ONNX file;
- the small base modules everything imports: :mod:`~onnx2jax.core.errors`,
  :mod:`~onnx2jax.core.dtypes`, :mod:`~onnx2jax.core.settings` (every environment variable)
  and :mod:`~onnx2jax.core.safety` (checks on what is read back from disk).

The op functions live in :mod:`onnx2jax.ops`; the program ``model(...)`` compiles lives in
:mod:`onnx2jax.runtime`, which the model creates (tests/test_architecture.py checks the
direction of every import).
"""
