"""Activation functions (Relu, Sigmoid, Gelu, Softplus, ...).

Each is written once against jax.numpy; ``jax_on`` keeps the rare static input static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from onnx2jax.convert import is_static
from onnx2jax.ops.elementwise import jax_on
from onnx2jax.ops.registry import register


def _apply(function, *values):
    """``function`` (written with jax) on ``values``; static when they all are."""
    if all(is_static(v) for v in values):
        # Under the caller's jit, jax ops on static values would be staged into the trace
        # and jax_on could not read the result back: evaluate them now.
        with jax.ensure_compile_time_eval():
            return jax_on(function, *values)
    return function(*values)


def _activation(op_type: str, versions: tuple[int, ...]):
    """Register ``make(ctx) -> (x -> y)`` as the unary activation ``op_type``."""

    def decorate(make):
        def op(ctx, x):
            return _apply(make(ctx), x)

        op.__name__ = op.__qualname__ = make.__name__
        for since in versions:
            register(op_type, since)(op)
        return make

    return decorate


@_activation("Relu", (1, 6, 13, 14))
def relu(ctx):
    return jax.nn.relu


@_activation("LeakyRelu", (1, 6, 16))
def leaky_relu(ctx):
    alpha = ctx.attr("alpha", 0.01)
    return lambda x: jnp.where(x >= 0, x, x * alpha)


@_activation("Elu", (1, 6, 22))
def elu(ctx):
    alpha = ctx.attr("alpha", 1.0)
    return lambda x: jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0)))


@_activation("Selu", (1, 6, 22))
def selu(ctx):
    alpha = ctx.attr("alpha", 1.67326319217681884765625)
    gamma = ctx.attr("gamma", 1.05070102214813232421875)
    return lambda x: gamma * jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0)))


@_activation("Celu", (12, 28))
def celu(ctx):
    alpha = ctx.attr("alpha", 1.0)
    return lambda x: jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0) / alpha))


@_activation("Sigmoid", (1, 6, 13))
def sigmoid(ctx):
    return jax.nn.sigmoid


@_activation("HardSigmoid", (1, 6, 22))
def hard_sigmoid(ctx):
    alpha = ctx.attr("alpha", 0.2)
    beta = ctx.attr("beta", 0.5)
    return lambda x: jnp.clip(alpha * x + beta, 0, 1)


@_activation("HardSwish", (14, 22))
def hard_swish(ctx):
    return lambda x: x * jnp.clip(x / 6 + 0.5, 0, 1)


@_activation("Softplus", (1, 22))
def softplus(ctx):
    return jax.nn.softplus


@_activation("Softsign", (1, 22))
def softsign(ctx):
    return lambda x: x / (1 + jnp.abs(x))


@_activation("ThresholdedRelu", (10, 22))
def thresholded_relu(ctx):
    alpha = ctx.attr("alpha", 1.0)
    return lambda x: jnp.where(x > alpha, x, 0)


@_activation("Tanh", (1, 6, 13))
def tanh(ctx):
    return jnp.tanh


@_activation("Mish", (18, 22))
def mish(ctx):
    return lambda x: x * jnp.tanh(jax.nn.softplus(x))


@_activation("Swish", (24,))
def swish(ctx):
    alpha = ctx.attr("alpha", 1.0)
    return lambda x: x * jax.nn.sigmoid(alpha * x)


@register("SwiGLU", 28)
def swiglu(ctx, gate, value):
    if np.shape(gate) != np.shape(value):
        raise ctx.error(f"A and B must have the same shape, got {np.shape(gate)} and "
                        f"{np.shape(value)}")
    alpha = ctx.attr("alpha", 1.0)
    return _apply(lambda a, b: a * jax.nn.sigmoid(alpha * a) * b, gate, value)


@_activation("Gelu", (20,))
def gelu(ctx):
    approximate = ctx.attr("approximate", "none")
    if approximate == "tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if approximate == "none":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ctx.error(f"approximate must be 'none' or 'tanh', got {approximate!r}")


@register("PRelu", 1)
@register("PRelu", 6)
@register("PRelu", 7)
@register("PRelu", 9)
@register("PRelu", 16)
def prelu(ctx, x, slope):
    if ctx.opset < 7 and np.ndim(slope) == 1 and np.ndim(x) > 2 and np.shape(slope)[0] > 1:
        # Before opset 7 a 1-D slope holds one value per channel (axis 1), not per last axis.
        slope = slope.reshape(slope.shape + (1,) * (np.ndim(x) - 2))
    return _apply(lambda v, s: jnp.where(v >= 0, v, v * s).astype(v.dtype), x, slope)
