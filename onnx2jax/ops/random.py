"""Random ops, seeded and reproducible.

Each node draws from ``jax.random`` with a key made from its ``seed`` attribute, so a model gives
the same values on every run and under every jit (JAX's generator, so not NumPy's or
onnxruntime's numbers). A node without a seed gets a key derived from its output name: still
reproducible, and distinct between nodes. The model function is pure, so there is no hidden
generator state that would advance from one call to the next.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np

from onnx2jax.core.dtypes import numpy_dtype
from onnx2jax.ops.registry import register

_FLOATS = (np.float16, np.float32, np.float64, jnp.bfloat16)


def _key(ctx):
    seed = ctx.attr("seed")
    if seed is None:
        seed = zlib.crc32(ctx.node.output[0].encode("utf-8"))
    return jax.random.key(int(seed) % (1 << 32))


def _float_dtype(ctx, dtype):
    dtype = np.dtype(dtype)
    if dtype not in [np.dtype(d) for d in _FLOATS]:
        raise ctx.error(f"random values of type {dtype} are not supported; use a float type")
    return jax.dtypes.canonicalize_dtype(dtype)


def _output_dtype(ctx, like=None):
    dtype = ctx.attr("dtype")
    if dtype is not None:
        return numpy_dtype(dtype)
    return np.dtype(like.dtype) if like is not None else np.dtype(np.float32)


def _shape(ctx):
    shape = ctx.attr("shape")
    if shape is None:
        raise ctx.error("the shape attribute is required")
    return tuple(int(d) for d in shape)


def _normal(ctx, shape, dtype):
    dtype = _float_dtype(ctx, dtype)
    sample = jax.random.normal(_key(ctx), shape, dtype)
    return (sample * ctx.attr("scale", 1.0) + ctx.attr("mean", 0.0)).astype(dtype)


def _uniform(ctx, shape, dtype):
    dtype = _float_dtype(ctx, dtype)
    return jax.random.uniform(_key(ctx), shape, dtype, ctx.attr("low", 0.0), ctx.attr("high", 1.0))


@register("RandomNormal", since=(1, 22))
def random_normal(ctx):
    return _normal(ctx, _shape(ctx), _output_dtype(ctx))


@register("RandomUniform", since=(1, 22))
def random_uniform(ctx):
    return _uniform(ctx, _shape(ctx), _output_dtype(ctx))


@register("RandomNormalLike", since=(1, 22))
def random_normal_like(ctx, x):
    return _normal(ctx, np.shape(x), _output_dtype(ctx, x))


@register("RandomUniformLike", since=(1, 22))
def random_uniform_like(ctx, x):
    return _uniform(ctx, np.shape(x), _output_dtype(ctx, x))


@register("Multinomial", since=(7, 22))
def multinomial(ctx, logits):
    if np.ndim(logits) != 2:
        raise ctx.error(f"input of shape {np.shape(logits)} is not [batch, classes]")
    dtype = numpy_dtype(ctx.attr("dtype", 6))
    if dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise ctx.error(f"dtype {dtype} is not int32 or int64")
    samples = int(ctx.attr("sample_size", 1))
    batch = np.shape(logits)[0]
    # The input holds unnormalized log-probabilities, exactly categorical's logits.
    drawn = jax.random.categorical(_key(ctx), jnp.asarray(logits), axis=-1, shape=(samples, batch))
    return drawn.T.astype(jax.dtypes.canonicalize_dtype(dtype))


@register("Bernoulli", since=(15, 22))
def bernoulli(ctx, p):
    dtype = jax.dtypes.canonicalize_dtype(_output_dtype(ctx, p))
    return jax.random.bernoulli(_key(ctx), jnp.asarray(p)).astype(dtype)
