"""The native kernels' custom calls, from JAX arrays.

Each function calls its kernel (``jax.ffi.ffi_call``); the weights come in one of the layouts
of :mod:`onnx2jax.native.layouts`, prepared by the caller. The ops of the native nodes
(onnx2jax/ops/native_calls.py) call them; the kernels must be registered first
(:func:`onnx2jax.native.available`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from onnx2jax import native
from onnx2jax.native import layouts


def conv2d_shape(
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    dilations: Sequence[int],
) -> tuple[int, int, int, int]:
    """The NCHW shape of a 2-D Conv's output (``w_shape``: OIHW).

    Example:
        >>> from onnx2jax.native import calls
        >>> calls.conv2d_shape((1, 3, 8, 8), (16, 3, 3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1))
        (1, 16, 4, 4)
    """
    n, _, h, width = x_shape
    out_channels, _, kh, kw = w_shape
    (top, bottom), (left, right) = padding
    oh = (h + top + bottom - (kh - 1) * dilations[0] - 1) // strides[0] + 1
    ow = (width + left + right - (kw - 1) * dilations[1] - 1) // strides[1] + 1
    return n, out_channels, oh, ow


def addend_applies(addend: Any | None, shape: Sequence[int]) -> bool:
    """Whether the kernel can add ``addend`` to its result of ``shape``: none, or float32
    and broadcasting to that shape.

    Example:
        >>> import numpy as np
        >>> from onnx2jax.native import calls
        >>> calls.addend_applies(np.zeros((1, 16, 1, 1), np.float32), (2, 16, 4, 4))
        True
        >>> calls.addend_applies(np.zeros((4, 16, 4, 4), np.float32), (2, 16, 4, 4))
        False
    """
    if addend is None:
        return True
    if getattr(addend, "dtype", None) != np.float32:
        return False
    try:
        return np.broadcast_shapes(np.shape(addend), tuple(shape)) == tuple(shape)
    except ValueError:
        return False


def conv2d(
    x: Any,
    weights: Any,
    layout: str,
    bias: Any | None,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    dilations: Sequence[int],
    *,
    residual: Any | None = None,
    relu: bool = False,
    backend: str = "native",
    groups: int = 1,
) -> jax.Array:
    """ONNX Conv of float32 NCHW ``x`` by ``weights`` in ``layout`` (one of
    ``layouts.CONV_LAYOUTS``; "winograd" for 3x3 weights of stride and dilation 1 only),
    optionally followed by ``+ residual`` (see :func:`addend_applies`) and a ReLU, in the
    kernel's registers. ``backend`` "onednn" computes it by oneDNN (kernels/onednn.cc) from
    "hwio" weights, of any number of ``groups``; "native" by the hand-written kernels, of one.

    The kernels read NHWC: the transposes here cancel against XLA's layout of the
    neighbouring ops.

    Example:
        >>> import numpy as np
        >>> from onnx2jax import native
        >>> from onnx2jax.native import calls, layouts
        >>> x, w = np.ones((1, 8, 5, 5), np.float32), np.ones((16, 8, 1, 1), np.float32)
        >>> if native.available():
        ...     pads = ((0, 0), (0, 0))
        ...     y = calls.conv2d(x, w.transpose(2, 3, 1, 0), "hwio", None, (1, 1), pads, (1, 1))
        ...     assert y.shape == (1, 16, 5, 5) and float(y[0, 3, 2, 2]) == 8.0
    """
    w_shape = layouts.conv_shape(np.shape(weights), layout)
    n, out_channels, oh, ow = conv2d_shape(np.shape(x), w_shape, strides, padding, dilations)
    (top, bottom), (left, right) = padding
    x = jnp.transpose(x, (0, 2, 3, 1))
    if residual is not None:
        residual = jnp.transpose(
            jnp.broadcast_to(residual, (n, out_channels, oh, ow)), (0, 2, 3, 1)
        )
    if backend == "onednn":
        if layout != "hwio":
            raise ValueError(f"oneDNN's convolution takes hwio weights, not {layout!r}")
        call = jax.ffi.ffi_call(
            native.ONEDNN_CONV_TARGET,
            jax.ShapeDtypeStruct((n, oh, ow, out_channels), jnp.float32),
        )
        empty = jnp.zeros((0,), jnp.float32)  # no bias, no residual
        y = call(
            x,
            weights,
            empty if bias is None else jnp.asarray(bias, jnp.float32),
            empty if residual is None else jnp.asarray(residual, jnp.float32),
            stride_h=np.int64(strides[0]),
            stride_w=np.int64(strides[1]),
            dilation_h=np.int64(dilations[0]),
            dilation_w=np.int64(dilations[1]),
            pad_top=np.int64(top),
            pad_left=np.int64(left),
            pad_bottom=np.int64(bottom),
            pad_right=np.int64(right),
            groups=np.int64(groups),
            relu=relu,
            add_residual=residual is not None,
        )
    elif groups != 1:
        raise ValueError("the hand-written convolution kernels compute one group only")
    elif layout == "winograd":
        if tuple(strides) != (1, 1) or tuple(dilations) != (1, 1):
            raise ValueError("Winograd weights are for Convs of stride and dilation 1 only")
        bias, addend = _bias_and_addend(bias, residual, out_channels)
        call = jax.ffi.ffi_call(
            native.WINOGRAD_TARGET, jax.ShapeDtypeStruct((n, oh, ow, out_channels), jnp.float32)
        )
        y = call(
            x,
            weights,
            bias,
            addend,
            pad_h=np.int64(top),
            pad_w=np.int64(left),
            relu=relu,
            add_residual=residual is not None,
        )
    else:
        y = _kernel(
            x,
            weights,
            layout == "blocked",
            bias,
            (n, oh, ow, out_channels),
            strides,
            dilations,
            (top, left),
            residual,
            relu,
        )
    return jnp.transpose(y, (0, 3, 1, 2))


def matmul(a: Any, weights: Any, layout: str, columns: int, bias: Any | None = None) -> jax.Array:
    """``a @ b (+ bias)`` for float32 ``a`` of at least 2 dimensions and a matrix ``b`` [K, N]
    of ``columns`` N, given in ``layout`` (one of ``layouts.MATRIX_LAYOUTS``), by the
    convolution kernel as a 1x1 convolution of one row of ``a``'s rows. For the 128 rows of
    MiniLM's and GPT-2's products it is closer to onnxruntime than XLA's Eigen or YNNPACK
    dots (benchmarks/LOG.md).

    Example:
        >>> import numpy as np
        >>> from onnx2jax import native
        >>> from onnx2jax.native import calls
        >>> a, b = np.ones((2, 4), np.float32), np.ones((4, 16), np.float32)
        >>> y = calls.matmul(a, b, "matrix", 16) if native.available() else a @ b
        >>> float(y[1, 5])
        4.0
    """
    *lead, k = np.shape(a)
    rows = int(np.prod(lead))
    if rows == 0:
        return jnp.zeros((*lead, columns), jnp.float32) + (0 if bias is None else bias)
    blocked = layout == "blocked_matrix"
    if not blocked:
        weights = jnp.reshape(weights, (1, 1, k, columns))
    y = _kernel(jnp.reshape(a, (1, 1, rows, k)), weights, blocked, bias, (1, 1, rows, columns))
    return jnp.reshape(y, (*lead, columns))


def _bias_and_addend(
    bias: Any | None, residual: Any | None, channels: int
) -> tuple[jax.Array, jax.Array]:
    """The convolution kernels' bias (zeros when none) and residual (empty when none)."""
    bias = jnp.zeros((channels,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    addend = (
        jnp.zeros((0,), jnp.float32) if residual is None else jnp.asarray(residual, jnp.float32)
    )
    return bias, addend


def _kernel(
    x: Any,
    weights: Any,
    blocked: bool,
    bias: Any | None,
    shape: tuple[int, ...],
    strides: Sequence[int] = (1, 1),
    dilations: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0),
    residual: Any | None = None,
    relu: bool = False,
) -> jax.Array:
    """The custom call: NHWC ``x`` (``pads`` = zero rows above it, zero columns left of it),
    weights HWIO or blocked, an NHWC result of ``shape``, plus ``residual`` (NHWC) and a ReLU
    if asked. Blocked weights may have more columns than the result (a padded matrix): the
    bias is padded to them."""
    columns = np.shape(weights)[0] * np.shape(weights)[-1] if blocked else shape[-1]
    if bias is not None and np.shape(bias)[0] < columns:
        bias = jnp.pad(jnp.asarray(bias, jnp.float32), (0, columns - np.shape(bias)[0]))
    bias, addend = _bias_and_addend(bias, residual, columns)
    call = jax.ffi.ffi_call(native.TARGET, jax.ShapeDtypeStruct(shape, jnp.float32))
    return call(
        x,
        weights,
        bias,
        addend,
        stride_h=np.int64(strides[0]),
        stride_w=np.int64(strides[1]),
        dilation_h=np.int64(dilations[0]),
        dilation_w=np.int64(dilations[1]),
        pad_h=np.int64(pads[0]),
        pad_w=np.int64(pads[1]),
        blocked=blocked,
        relu=relu,
        add_residual=residual is not None,
    )


def attention_applies(q: Any, kt: Any, v: Any, mask: Any | None, scale: Any) -> bool:
    """Whether :func:`attention` computes ``softmax(scale * (q @ kt) + mask) @ v``: float32
    operands of 3 or 4 dimensions with the same leading ones (no broadcasting between them),
    values a multiple of the vector width wide, a scalar scale and a mask that broadcasts to
    the scores along whole dimensions.

    Example:
        >>> import numpy as np
        >>> from onnx2jax import native
        >>> from onnx2jax.native import calls
        >>> q = np.zeros((2, 8, 16), np.float32)
        >>> calls.attention_applies(q, q.swapaxes(1, 2), q, None, 1.0) == native.available()
        True
    """
    lanes = native.lanes()
    operands = (q, kt, v) if mask is None else (q, kt, v, mask)
    if (
        lanes is None
        or np.ndim(q) not in (3, 4)
        or not np.ndim(q) == np.ndim(kt) == np.ndim(v)
        or any(getattr(x, "dtype", None) != np.float32 for x in operands)
        or np.size(scale) != 1
    ):
        return False
    *lead, s, d = np.shape(q)
    *kt_lead, kt_d, t = np.shape(kt)
    *v_lead, v_t, e = np.shape(v)
    # No keys: the softmax is empty and the product zero, which the graph's own ops give.
    if lead != kt_lead or lead != v_lead or kt_d != d or v_t != t or e % lanes or not e or not t:
        return False
    if mask is None:
        return True
    scores = (*lead, s, t)
    try:
        return np.broadcast_shapes(np.shape(mask), scores) == scores
    except ValueError:
        return False


def attention(q: Any, kt: Any, v: Any, mask: Any | None, scale: Any) -> jax.Array:
    """``softmax(scale * (q @ kt) + mask, axis=-1) @ v`` by the native kernel, which keeps each
    query row's scores in cache (kernels/attention.cc); see :func:`attention_applies`.
    ``q`` [..., S, D], ``kt`` the keys transposed [..., D, T], ``v`` [..., T, E].

    Example:
        >>> import numpy as np
        >>> from onnx2jax import native
        >>> from onnx2jax.native import calls
        >>> q = np.ones((1, 4, 16), np.float32)
        >>> y = calls.attention(q, q.swapaxes(1, 2), q, None, 1.0) if native.available() else q
        >>> float(y[0, 2, 3])
        1.0
    """
    q, kt, v = jnp.asarray(q), jnp.asarray(kt), jnp.asarray(v)
    three_d = q.ndim == 3
    if three_d:
        q, kt, v = q[None], kt[None], v[None]
    b, h, s, _ = q.shape
    t, e = v.shape[-2:]
    if mask is None:
        addend = jnp.zeros((0, 0, 0, 0), jnp.float32)
    else:
        addend = jnp.asarray(mask)
        addend = jnp.reshape(addend, (1,) * (4 - addend.ndim) + addend.shape)
        if addend.shape[-1] != t:  # a mask constant along the keys
            addend = jnp.broadcast_to(addend, (*addend.shape[:3], t))
    call = jax.ffi.ffi_call(
        native.ATTENTION_TARGET, jax.ShapeDtypeStruct((b, h, s, e), jnp.float32)
    )
    out = call(
        q,
        kt,
        v,
        addend,
        jnp.reshape(jnp.asarray(scale, jnp.float32), (1,)),
        masked=mask is not None,
    )
    return out[0] if three_d else out


def matmul_nbits(
    a: Any, packed: Any, scales: Any, zero_points: Any | None, columns: int, block: int
) -> jax.Array:
    """``a @ dequantize(packed).T`` for float32 ``a`` [M, K] and MatMulNBits' 4-bit weight:
    ``packed`` uint8 [N, blocks, block / 2] (low nibble first, K padded to whole blocks),
    float32 ``scales`` [N, blocks] and packed uint8 ``zero_points`` [N, ceil(blocks / 2)] or
    None (8), by the native kernel (kernels/nbits.cc), which dequantizes in registers and never
    holds the float weight; ``block`` is 16, 32, 64 or 128. Under ``vmap`` it runs once per
    batch element.

    Example:
        >>> import numpy as np
        >>> from onnx2jax import native
        >>> from onnx2jax.native import calls
        >>> a = np.ones((1, 32), np.float32)
        >>> packed = np.full((2, 1, 16), 0x99, np.uint8)  # every value 9: weights (9 - 8) * 0.5
        >>> scales = np.full((2, 1), 0.5, np.float32)
        >>> if native.available() and native.lanes() is not None:
        ...     assert calls.matmul_nbits(a, packed, scales, None, 2, 32).tolist() == [[16.0, 16.0]]
    """
    rows = np.shape(a)[0]
    zeros = jnp.zeros((0,), jnp.uint8) if zero_points is None else jnp.asarray(zero_points)
    call = jax.ffi.ffi_call(
        native.NBITS_TARGET,
        jax.ShapeDtypeStruct((rows, columns), jnp.float32),
        vmap_method="sequential",
    )
    return call(
        jnp.asarray(a, jnp.float32),
        jnp.asarray(packed),
        jnp.asarray(scales, jnp.float32),
        zeros,
        block=np.int64(block),
    )
