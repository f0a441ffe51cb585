"""Fine-tuning imported models.

- :mod:`~onnx2jax.train.steps`: choose what trains, jitted train and eval steps, a loop
  (its names are re-exported here: ``from onnx2jax import train; train.fit(...)``);
- :mod:`~onnx2jax.train.lora`: LoRA adapters, merged into the weights on save;
- :mod:`~onnx2jax.train.checkpoint`: orbax checkpoints that ``fit`` resumes from;
- :mod:`~onnx2jax.train.nnx`: a Flax NNX module holding the weights as ``nnx.Param``.
"""

from onnx2jax.train.steps import (
    Batch,
    FitResult,
    LossFn,
    Params,
    PyTree,
    Selector,
    TrainState,
    evaluate,
    fit,
    init,
    make_eval_step,
    make_train_step,
    merge,
    split,
    trainable_names,
)

__all__ = [
    "Batch",
    "FitResult",
    "LossFn",
    "Params",
    "PyTree",
    "Selector",
    "TrainState",
    "evaluate",
    "fit",
    "init",
    "make_eval_step",
    "make_train_step",
    "merge",
    "split",
    "trainable_names",
]
