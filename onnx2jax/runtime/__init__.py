"""The compiled engine behind ``model(...)``, apart from the model itself.

- :mod:`~onnx2jax.runtime.engine`: :class:`~onnx2jax.runtime.engine.Engine`, the program a
  model compiles (``model.engine``), with its public interface for tools and tests;
- :mod:`~onnx2jax.runtime.layouts`: weights kept in the layouts the program reads;
- :mod:`~onnx2jax.runtime.fusion`: the graph rewritten for the native kernels;
- :mod:`~onnx2jax.runtime.options`: XLA options, per model and per input signature;
- :mod:`~onnx2jax.runtime.devices`: a batch split over several CPU devices;
- :mod:`~onnx2jax.runtime.segments`: graphs with data-dependent shapes, run in segments;
- :mod:`~onnx2jax.runtime.cache`: compiled executables kept on disk;
- :mod:`~onnx2jax.runtime.aot`: ahead-of-time artifacts;
- :mod:`~onnx2jax.runtime.process`: :func:`onnx2jax.tune_process`, the process-wide speed
  settings made only when the user asks (:mod:`~onnx2jax.runtime.hostmem`, the allocator;
  :mod:`~onnx2jax.runtime.cputhreads`, XLA's worker threads).

This package imports the core (the graph, the interpreter, the ops, the native kernels) and
never :mod:`onnx2jax.core.model` or anything above it (tests/test_architecture.py checks it).
"""
