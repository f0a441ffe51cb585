"""Flax NNX: an imported ONNX model as an ``nnx.Module``, its weights held as ``nnx.Param``.

The module can be a submodule of any Flax model (a new head on an imported backbone) and
trains with ``nnx.Optimizer``; weights left out of ``trainable`` are :class:`OnnxFrozen`
variables, which ``nnx.Optimizer(..., wrt=nnx.Param)`` and ``nnx.grad`` leave alone.

Example:
    >>> import jax.numpy as jnp, optax, onnx2jax
    >>> from flax import nnx
    >>> from onnx2jax.train.nnx import OnnxModule
    >>> class Classifier(nnx.Module):
    ...     def __init__(self, rngs: nnx.Rngs):
    ...         self.backbone = OnnxModule(onnx2jax.load(onnx2jax.example_path()),
    ...                                    trainable="10.*")
    ...         self.head = nnx.Linear(10, 2, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.head(self.backbone(x)["logits"])
    >>> net = Classifier(nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(net, optax.adam(1e-3), wrt=nnx.Param)
    >>> def loss_fn(net, x, y):
    ...     return optax.softmax_cross_entropy_with_integer_labels(net(x), y).mean()
    >>> @nnx.jit
    ... def step(net, optimizer, x, y):
    ...     loss, grads = nnx.value_and_grad(loss_fn)(net, x, y)
    ...     optimizer.update(net, grads)
    ...     return loss
    >>> float(step(net, optimizer, jnp.ones((4, 1, 8, 8)), jnp.array([0, 1, 0, 1]))) > 0
    True
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
from flax import nnx

from onnx2jax.core.model import Model, Params
from onnx2jax.train import Selector, trainable_names


class OnnxFrozen(nnx.Variable):
    """A weight of an imported ONNX model that does not train."""


class OnnxModule(nnx.Module):
    """``model`` as an ``nnx.Module``: calling it runs ``model.apply`` with its own weights.

    ``trainable`` picks the weights that become ``nnx.Param`` (see
    :func:`onnx2jax.train.trainable_names`, node names included; default: all); the others are
    :class:`OnnxFrozen`.
    ``weights`` maps each ONNX initializer name to its variable.

    Example:
        >>> import numpy as np, onnx2jax
        >>> module = OnnxModule(onnx2jax.load(onnx2jax.example_path()), trainable="10.*")
        >>> sorted(k for k, v in module.weights.items() if isinstance(v, nnx.Param))
        ['10.bias', '10.weight']
        >>> module(np.zeros((1, 1, 8, 8), np.float32))["logits"].shape
        (1, 10)
    """

    def __init__(self, model: Model, trainable: Selector = None):
        self.model = model
        chosen = set(trainable_names(model.params, trainable, model=model))
        self.weights = nnx.Dict(
            {
                name: (nnx.Param if name in chosen else OnnxFrozen)(jnp.array(value))
                for name, value in model.params.items()
            }
        )

    def onnx_params(self) -> Params:
        """The current weights as a params dict for ``model.apply`` or ``model.save``."""
        return {name: variable[...] for name, variable in self.weights.items()}

    def __call__(self, *inputs: Any, outputs: Any = None, **named_inputs: Any) -> dict[str, Any]:
        return self.model.apply(self.onnx_params(), *inputs, outputs=outputs, **named_inputs)

    def save(self, path: str | os.PathLike, **kwargs: Any) -> Any:
        """Write the ONNX model with the current weights (see ``Model.save``)."""
        return self.model.save(path, self.onnx_params(), **kwargs)
