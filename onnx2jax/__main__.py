"""``python -m onnx2jax``: the same as the ``onnx2jax`` command."""

from onnx2jax.cli import main

raise SystemExit(main())
