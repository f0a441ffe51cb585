"""Activation functions (Relu, Sigmoid, Gelu, Softplus, ...).

Each is written once against jax.numpy; ``jax_on`` keeps the rare static input static.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from onnx2jax.core.convert import is_static
from onnx2jax.ops.elementwise import jax_on
from onnx2jax.ops.registry import OpFunction, register


def _apply(function, *values):
    """``function`` (written with jax) on ``values``; static when they all are."""
    if all(is_static(v) for v in values):
        # Under the caller's jit, jax ops on static values would be staged into the trace
        # and jax_on could not read the result back: evaluate them now.
        with jax.ensure_compile_time_eval():
            return jax_on(function, *values)
    return function(*values)


def _activation(make: Callable[[Any], Callable[[Any], Any]]) -> OpFunction:
    """The unary op ``(ctx, x) -> make(ctx)(x)``: ``make`` reads the attributes and returns the
    activation written with jax; a static ``x`` gives a static result."""

    def op(ctx, x):
        return _apply(make(ctx), x)

    op.__name__ = op.__qualname__ = make.__name__
    return op


@register("Relu", since=(1, 6, 13, 14))
@_activation
def relu(ctx):
    return jax.nn.relu


@register("LeakyRelu", since=(1, 6, 16))
@_activation
def leaky_relu(ctx):
    alpha = ctx.attr("alpha", 0.01)
    return lambda x: jnp.where(x >= 0, x, x * alpha)


@register("Elu", since=(1, 6, 22))
@_activation
def elu(ctx):
    alpha = ctx.attr("alpha", 1.0)
    return lambda x: jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0)))


@register("Selu", since=(1, 6, 22))
@_activation
def selu(ctx):
    alpha = ctx.attr("alpha", 1.67326319217681884765625)
    gamma = ctx.attr("gamma", 1.05070102214813232421875)
    return lambda x: gamma * jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0)))


@register("Celu", since=(12, 28))
@_activation
def celu(ctx):
    alpha = ctx.attr("alpha", 1.0)
    return lambda x: jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0) / alpha))


@register("Sigmoid", since=(1, 6, 13))
@_activation
def sigmoid(ctx):
    return jax.nn.sigmoid


@register("HardSigmoid", since=(1, 6, 22))
@_activation
def hard_sigmoid(ctx):
    alpha = ctx.attr("alpha", 0.2)
    beta = ctx.attr("beta", 0.5)
    return lambda x: jnp.clip(alpha * x + beta, 0, 1)


@register("HardSwish", since=(14, 22))
@_activation
def hard_swish(ctx):
    return lambda x: x * jnp.clip(x / 6 + 0.5, 0, 1)


@register("Softplus", since=(1, 22))
@_activation
def softplus(ctx):
    return jax.nn.softplus


@register("Softsign", since=(1, 22))
@_activation
def softsign(ctx):
    return lambda x: x / (1 + jnp.abs(x))


@register("ThresholdedRelu", since=(10, 22))
@_activation
def thresholded_relu(ctx):
    alpha = ctx.attr("alpha", 1.0)
    return lambda x: jnp.where(x > alpha, x, 0)


@register("Tanh", since=(1, 6, 13))
@_activation
def tanh(ctx):
    return jnp.tanh


@register("Mish", since=(18, 22))
@_activation
def mish(ctx):
    return lambda x: x * jnp.tanh(jax.nn.softplus(x))


@register("Swish", since=24)
@_activation
def swish(ctx):
    alpha = ctx.attr("alpha", 1.0)
    return lambda x: x * jax.nn.sigmoid(alpha * x)


@register("SwiGLU", since=28)
def swiglu(ctx, gate, value):
    if np.shape(gate) != np.shape(value):
        raise ctx.error(
            f"A and B must have the same shape, got {np.shape(gate)} and {np.shape(value)}"
        )
    alpha = ctx.attr("alpha", 1.0)
    return _apply(lambda a, b: a * jax.nn.sigmoid(alpha * a) * b, gate, value)


@register("Gelu", since=20)
@_activation
def gelu(ctx):
    approximate = ctx.attr("approximate", "none")
    if approximate == "tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if approximate == "none":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ctx.error(f"approximate must be 'none' or 'tanh', got {approximate!r}")


@register("PRelu", since=(1, 6, 7, 9, 16))
def prelu(ctx, x, slope):
    if ctx.opset < 7 and np.ndim(slope) == 1 and np.ndim(x) > 2 and np.shape(slope)[0] > 1:
        # Before opset 7 a 1-D slope holds one value per channel (axis 1), not per last axis.
        slope = slope.reshape(slope.shape + (1,) * (np.ndim(x) - 2))
    return _apply(lambda v, s: jnp.where(v >= 0, v, v * s).astype(v.dtype), x, slope)
