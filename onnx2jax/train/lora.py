"""LoRA: low-rank adapters on chosen MatMul, Gemm and Conv weights of an imported model.

Each targeted weight ``W`` gets two small factors, ``a`` (inputs x rank, random) and ``b``
(rank x outputs, zero at the start), and the model runs with ``W + alpha / rank * a @ b``
(laid out as ``W``: transposed for ``Gemm(transB=1)``, reshaped for Conv). Only the factors
train. :meth:`LoRA.merge` folds them into the weights, so the saved model has the original
graph and no extra nodes.

Example:
    >>> import jax, numpy as np, onnx2jax
    >>> from onnx2jax.train.lora import LoRA
    >>> model = onnx2jax.load(onnx2jax.example_path())
    >>> lora = LoRA(model, targets="/4/*", rank=2)     # the second Conv, by node name
    >>> adapters = lora.init(jax.random.key(0))
    >>> sorted(adapters)
    ['onnx::Conv_31::lora_a', 'onnx::Conv_31::lora_b']
    >>> params = {**model.params, **adapters}
    >>> x = np.ones((1, 1, 8, 8), np.float32)
    >>> bool(np.allclose(lora.apply(params, x)["logits"], model(x)["logits"], atol=1e-5))
    True
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import onnx

from onnx2jax.core.errors import InputError
from onnx2jax.core.model import Model, Params

A_SUFFIX = "::lora_a"
B_SUFFIX = "::lora_b"
Targets = (
    str | re.Pattern[str] | Callable[[str, onnx.NodeProto], bool] | Sequence[str | re.Pattern[str]]
)


@dataclass(frozen=True)
class Target:
    """One adapted weight: its name, the node that uses it, and its layout."""

    weight: str
    node: str
    op_type: str
    shape: tuple[int, ...]
    fan_in: int
    fan_out: int
    transposed: bool  # the weight is laid out (outputs, inputs...) rather than (inputs, outputs)


class LoRA:
    """Low-rank adapters for the weights of ``model`` that ``targets`` picks.

    ``targets`` is a glob, a compiled regex (searched), a list of these, or a function of
    ``(weight_name, node)``; globs and regexes match the weight's initializer name or the name
    of the MatMul/Gemm/Conv node using it (exporters often give weights names like
    ``onnx::MatMul_717`` but nodes names like ``/encoder/layer.0/attention/self/query/MatMul``).
    The scale is ``alpha / rank`` (``alpha`` defaults to ``rank``).

    Example:
        >>> import onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> [t.op_type for t in LoRA(model, targets="*", rank=4).targets]
        ['Conv', 'Conv', 'Gemm']
    """

    def __init__(self, model: Model, targets: Targets, rank: int = 8, alpha: float | None = None):
        if rank < 1:
            raise InputError(f"LoRA rank must be at least 1, got {rank}")
        self.model = model
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.targets = [t for t in _eligible(model) if _matches(targets, t, model)]
        if not self.targets:
            names = [f"{t.weight} ({t.node})" for t in _eligible(model)[:5]]
            raise InputError(
                f"LoRA targets {targets!r} match no MatMul/Gemm/Conv weight; "
                f"eligible weights (and nodes) look like {names}"
            )

    @property
    def adapter_names(self) -> list[str]:
        """The names of the adapter params, two per target."""
        return [t.weight + s for t in self.targets for s in (A_SUFFIX, B_SUFFIX)]

    def init(self, key: jax.Array) -> Params:
        """Fresh adapters: ``a`` uniform in ``±1/sqrt(fan_in)``, ``b`` zero (so no change yet).

        The factors are float32 (float64 for float64 weights) whatever the weight's dtype.
        """
        adapters = {}
        for target, subkey in zip(
            self.targets, jax.random.split(key, len(self.targets)), strict=True
        ):
            dtype = jnp.promote_types(self.model.params[target.weight].dtype, jnp.float32)
            bound = 1.0 / math.sqrt(target.fan_in)
            adapters[target.weight + A_SUFFIX] = jax.random.uniform(
                subkey, (target.fan_in, self.rank), dtype, -bound, bound
            )
            adapters[target.weight + B_SUFFIX] = jnp.zeros((self.rank, target.fan_out), dtype)
        return adapters

    def merge(self, params: Mapping[str, Any]) -> Params:
        """The model's params with the adapters folded in: ready for ``model.apply``/``save``.

        ``params`` holds the model's params and the adapters (``{**model.params, **adapters}``);
        the result has exactly the model's keys, each weight in its original dtype.
        """
        merged = {k: v for k, v in params.items() if not k.endswith((A_SUFFIX, B_SUFFIX))}
        for target in self.targets:
            a = params[target.weight + A_SUFFIX]
            b = params[target.weight + B_SUFFIX]
            delta = self.scale * (a @ b)
            if target.transposed:
                delta = delta.T
            weight = merged[target.weight]
            merged[target.weight] = (weight + delta.reshape(target.shape)).astype(weight.dtype)
        return merged

    def apply(self, params: Mapping[str, Any], *inputs: Any, **kwargs: Any) -> dict[str, Any]:
        """``model.apply`` with the adapters of ``params`` merged in; pure and jittable."""
        return self.model.apply(self.merge(params), *inputs, **kwargs)

    def save(self, path: str | os.PathLike, params: Mapping[str, Any], **kwargs: Any) -> Any:
        """Merge and save: the original graph with updated weights (see ``Model.save``)."""
        return self.model.save(path, self.merge(params), **kwargs)


def _eligible(model: Model) -> list[Target]:
    """The 2-D MatMul/Gemm weights and Conv weights that are params, first use of each."""
    found: dict[str, Target] = {}
    for node in model.plan.nodes:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight not in model.params or weight in found:
            continue
        shape = tuple(model.params[weight].shape)
        if node.op_type == "Conv":
            if len(shape) < 3:
                continue
            fan_in, fan_out, transposed = math.prod(shape[1:]), shape[0], True
        elif len(shape) != 2:
            continue
        else:
            trans_b = node.op_type == "Gemm" and any(
                a.name == "transB" and a.i for a in node.attribute
            )
            fan_in, fan_out = (shape[1], shape[0]) if trans_b else shape
            transposed = trans_b
        found[weight] = Target(weight, node.name, node.op_type, shape, fan_in, fan_out, transposed)
    return list(found.values())


def _matches(targets: Targets, target: Target, model: Model) -> bool:
    if isinstance(targets, str):
        return any(fnmatch.fnmatchcase(n, targets) for n in _names(target, model))
    if isinstance(targets, re.Pattern):
        return any(targets.search(n) for n in _names(target, model))
    if callable(targets):
        node = next(n for n in model.plan.nodes if n.name == target.node)
        return bool(targets(target.weight, node))
    return any(_matches(t, target, model) for t in targets)


def _names(target: Target, model: Model) -> list[str]:
    """The weight's name and the names of every node that reads it."""
    return [target.weight] + [n.name for n in model.plan.nodes if target.weight in n.input]
