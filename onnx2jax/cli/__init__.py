"""The command line and the tools behind it.

- :mod:`~onnx2jax.cli.commands`: the ``onnx2jax`` command (``info``, ``run``, ``check``,
  ``bench``, ``compile``); its :func:`main` is the console script ``onnx2jax.cli:main``;
- :mod:`~onnx2jax.cli.bench`: side-by-side timing with onnxruntime (``onnx2jax bench``,
  ``benchmarks/``);
- :mod:`~onnx2jax.cli.coverage`: the generated operator table and suite count
  (``python -m onnx2jax.cli.coverage``).
"""

from onnx2jax.cli.commands import main, make_inputs, parse_assignments

__all__ = ["main", "make_inputs", "parse_assignments"]
