"""The weight layouts the native kernels read, and back to ONNX's.

``model(...)`` keeps the weights its native nodes read in these layouts between calls
(onnx2jax/runtime/layouts.py), so that no weight is rearranged per call:

- "blocked" Conv weights, ``[O / B, KH, KW, I, B]`` (B: :func:`onnx2jax.native.block`), and
  blocked matrices, the 1x1 case of them, their columns padded with zeros to whole blocks;
- "winograd" weights of 3x3 Convs, ``U = G w G^T`` laid out ``[O / B, 16, I, B]``.

Every function takes NumPy or JAX arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from onnx2jax import native

# Winograd F(2x2, 3x3) for 3x3 convolutions of stride and dilation 1 with at most this many input
# channels (a multiple of the vector width): with more, a block's transformed weights leave L2
# and the direct kernel is the faster one (conv2d.cc; the measurements in benchmarks/LOG.md).
WINOGRAD_MAX_CHANNELS = 256


def weight_block(out_channels: int) -> int | None:
    """B when the kernel takes weights of this many output channels (columns of a matrix)
    blocked, ``[O / B, KH, KW, I, B]``: when B divides them. Otherwise it takes them HWIO.

    Example:
        >>> from onnx2jax import native
        >>> from onnx2jax.native import layouts
        >>> layouts.weight_block(3 * (native.block() or 1)) == native.block()
        True
    """
    block = native.block()
    return block if block and out_channels % block == 0 else None


def conv_applies(w_shape: Sequence[int], group: int) -> bool:
    """Whether the convolution kernel computes a Conv of these OIHW weights: 2-D, and for the
    hand-written kernels one group and output channels a multiple of the vector width; oneDNN
    takes any (the caller checks the dtype: float32).

    Example:
        >>> from onnx2jax import native
        >>> from onnx2jax.native import layouts
        >>> layouts.conv_applies((64, 3, 7, 7), 1) == (native.backend("conv") is not None)
        True
        >>> layouts.conv_applies((64, 3, 7), 1)
        False
    """
    if len(w_shape) != 4:
        return False
    if native.backend("conv") == "onednn":
        return True
    lanes = native.lanes()
    return lanes is not None and group == 1 and w_shape[0] % lanes == 0


def blocked_weights(w: Any) -> Any:
    """OIHW Conv weights in the kernel's blocked layout (see :func:`weight_block`).

    Example:
        >>> import numpy as np
        >>> from onnx2jax import native
        >>> from onnx2jax.native import layouts
        >>> w = np.zeros((2 * (native.block() or 64), 3, 1, 1), np.float32)
        >>> native.block() is None or layouts.blocked_weights(w).shape[:-1] == (2, 1, 1, 3)
        True
    """
    o, i, kh, kw = np.shape(w)
    block = native.block()
    return w.reshape(o // block, block, i, kh, kw).transpose(0, 3, 4, 2, 1)


def unblocked_weights(w: Any) -> Any:
    """The inverse of :func:`blocked_weights`: OIHW.

    Example:
        >>> import numpy as np
        >>> from onnx2jax.native import layouts
        >>> layouts.unblocked_weights(np.zeros((2, 3, 3, 8, 16))).shape
        (32, 8, 3, 3)
    """
    blocks, kh, kw, i, block = np.shape(w)
    return w.transpose(0, 4, 3, 1, 2).reshape(blocks * block, i, kh, kw)


def winograd_applies(
    w_shape: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> bool:
    """Whether a Conv of these OIHW weights is computed by Winograd F(2x2, 3x3): 3x3 of stride
    and dilation 1, input channels a multiple of the vector width up to
    WINOGRAD_MAX_CHANNELS, output channels a multiple of the weight block.

    Example:
        >>> from onnx2jax.native import layouts
        >>> layouts.winograd_applies((64, 64, 3, 3), (2, 2), (1, 1))
        False
    """
    lanes, block = native.lanes(), native.block()
    o, i, kh, kw = w_shape
    return (
        lanes is not None
        and block is not None
        and (kh, kw) == (3, 3)
        and tuple(strides) == (1, 1)
        and tuple(dilations) == (1, 1)
        and i % lanes == 0
        and i <= WINOGRAD_MAX_CHANNELS
        and o % block == 0
    )


# G of F(2x2, 3x3), and its exact left inverse (rows 0, 1 - 2 and 3 of G g give g).
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_WINOGRAD_G_INVERSE = np.array([[1, 0, 0, 0], [0, 1, -1, 0], [0, 0, 0, 1]], np.float32)
# G w G^T of every flattened 3x3 kernel at once: a product with kron(G, G)^T, [9, 16] (and
# back, [16, 9]), one BLAS call where a three-operand einsum loops unblocked and made start-up
# slow (ResNet-50: benchmarks/LOG.md). The entries are 0, +-1/4, +-1/2 and +-1: products exact.
_WINOGRAD_KRON = np.ascontiguousarray(np.kron(_WINOGRAD_G, _WINOGRAD_G).T)
_WINOGRAD_KRON_INVERSE = np.ascontiguousarray(np.kron(_WINOGRAD_G_INVERSE, _WINOGRAD_G_INVERSE).T)


def winograd_weights(w: Any) -> Any:
    """OIHW 3x3 weights as the Winograd kernel reads them: U = G w G^T, [O / B, 16, I, B].

    Example:
        >>> import numpy as np
        >>> from onnx2jax import native
        >>> from onnx2jax.native import layouts
        >>> w = np.zeros((native.block() or 64, 16, 3, 3), np.float32)
        >>> native.block() is None or layouts.winograd_weights(w).shape == (1, 16, 16, 64)
        True
    """
    o, i, _, _ = np.shape(w)
    block = native.block()
    xp = jnp if isinstance(w, jax.Array) else np
    u = xp.matmul(xp.reshape(w, (o * i, 9)), _WINOGRAD_KRON)
    return u.reshape(o // block, block, i, 16).transpose(0, 3, 2, 1)


def unwinograd_weights(u: Any) -> Any:
    """The OIHW weights of :func:`winograd_weights`' ``u`` (exactly: G has a left inverse).

    Example:
        >>> import numpy as np
        >>> from onnx2jax.native import layouts
        >>> layouts.unwinograd_weights(np.zeros((1, 16, 8, 64), np.float32)).shape
        (64, 8, 3, 3)
    """
    blocks, _, i, block = np.shape(u)
    xp = jnp if isinstance(u, jax.Array) else np
    flat = xp.transpose(u, (0, 3, 2, 1)).reshape(blocks * block * i, 16)
    return xp.matmul(flat, _WINOGRAD_KRON_INVERSE).reshape(blocks * block, i, 3, 3)


def matrix_blocked(columns: int) -> bool:
    """Whether the kernel reads a [K, N] matrix of this many columns blocked (by blocked_matrix):
    when the block divides them, or when the vector width does not, the last block then padded
    with zero columns (GPT-2's LM head of 50,257). Otherwise it reads the matrix as it is.

    Example:
        >>> from onnx2jax import native
        >>> from onnx2jax.native import layouts
        >>> layouts.matrix_blocked(50257) == (native.lanes() is not None)
        True
    """
    lanes = native.lanes()
    return weight_block(columns) is not None or (lanes is not None and columns % lanes != 0)


def blocked_matrix(b: Any) -> Any:
    """A [K, N] matrix in the blocked layout of a 1x1 convolution's weights, its columns padded
    with zeros to whole blocks.

    Example:
        >>> import numpy as np
        >>> from onnx2jax import native
        >>> from onnx2jax.native import layouts
        >>> b = np.zeros((8, (native.block() or 64) + 1), np.float32)
        >>> native.block() is None or layouts.blocked_matrix(b).shape[:4] == (2, 1, 1, 8)
        True
    """
    k, n = np.shape(b)
    block = native.block()
    blocks = -(-n // block)
    if blocks * block != n:
        xp = jnp if isinstance(b, jax.Array) else np
        b = xp.pad(b, ((0, 0), (0, blocks * block - n)))
    return b.reshape(k, blocks, block).transpose(1, 0, 2).reshape(blocks, 1, 1, k, block)


def unblocked_matrix(w: Any, columns: int | None = None) -> Any:
    """The inverse of :func:`blocked_matrix`: [K, N], the first ``columns`` (default all).

    Example:
        >>> import numpy as np
        >>> from onnx2jax.native import layouts
        >>> layouts.unblocked_matrix(np.zeros((2, 1, 1, 8, 64)), 100).shape
        (8, 100)
    """
    blocks, _, _, k, block = np.shape(w)
    return w.reshape(blocks, k, block).transpose(1, 0, 2).reshape(k, blocks * block)[:, :columns]


# How the kernels read a weight: Conv weights "blocked", "winograd" (3x3 ones) or "hwio";
# matrices "blocked_matrix" (padded to whole blocks) or "matrix" (as they are, [K, N]).
CONV_LAYOUTS = ("blocked", "winograd", "hwio")
MATRIX_LAYOUTS = ("blocked_matrix", "matrix")


def conv_layout(
    w_shape: Sequence[int], strides: Sequence[int] = (1, 1), dilations: Sequence[int] = (1, 1)
) -> str:
    """The layout the kernel reads a Conv's OIHW weights of this shape in (one of
    CONV_LAYOUTS), for a Conv of these strides and dilations.

    Example:
        >>> from onnx2jax import native
        >>> from onnx2jax.native import layouts
        >>> layouts.conv_layout((48, 64, 1, 1))
        'hwio'
    """
    if winograd_applies(w_shape, strides, dilations):
        return "winograd"
    return "blocked" if weight_block(int(w_shape[0])) else "hwio"


def matrix_layout(columns: int) -> str:
    """The layout the kernel reads a [K, N] matrix of ``columns`` N in (one of MATRIX_LAYOUTS).

    Example:
        >>> from onnx2jax import native
        >>> from onnx2jax.native import layouts
        >>> layouts.matrix_layout(3 * (native.block() or 64)) in layouts.MATRIX_LAYOUTS
        True
    """
    return "blocked_matrix" if matrix_blocked(columns) else "matrix"


def prepare(w: Any, layout: str) -> Any:
    """ONNX weights (OIHW, or a [K, N] matrix) in ``layout``.

    Example:
        >>> import numpy as np
        >>> from onnx2jax.native import layouts
        >>> layouts.prepare(np.zeros((32, 8, 3, 3)), "hwio").shape
        (3, 3, 8, 32)
    """
    if layout == "blocked":
        return blocked_weights(w)
    if layout == "winograd":
        return winograd_weights(w)
    if layout == "hwio":
        return w.transpose(2, 3, 1, 0)
    if layout == "blocked_matrix":
        return blocked_matrix(w)
    if layout == "matrix":
        return w
    raise ValueError(f"unknown native weight layout {layout!r}")


def restore(w: Any, layout: str, shape: Sequence[int]) -> Any:
    """The ONNX weights of ``shape`` that :func:`prepare` put in ``layout`` (the inverse).

    Example:
        >>> import numpy as np
        >>> from onnx2jax.native import layouts
        >>> w = np.arange(24.0).reshape(4, 3, 2, 1)
        >>> bool((layouts.restore(layouts.prepare(w, "hwio"), "hwio", w.shape) == w).all())
        True
    """
    if layout == "blocked":
        return unblocked_weights(w)
    if layout == "winograd":
        return unwinograd_weights(w)
    if layout == "hwio":
        return w.transpose(3, 2, 0, 1)
    if layout == "blocked_matrix":
        return unblocked_matrix(w, shape[1])
    if layout == "matrix":
        return w
    raise ValueError(f"unknown native weight layout {layout!r}")


def conv_shape(weights_shape: Sequence[int], layout: str) -> tuple[int, int, int, int]:
    """The OIHW shape of Conv weights of this shape in ``layout`` (one of CONV_LAYOUTS).

    Example:
        >>> from onnx2jax.native import layouts
        >>> layouts.conv_shape((2, 16, 8, 64), "winograd")
        (128, 8, 3, 3)
    """
    if layout == "blocked":
        blocks, kh, kw, i, block = weights_shape
        return blocks * block, i, kh, kw
    if layout == "winograd":
        blocks, _, i, block = weights_shape
        return blocks * block, i, 3, 3
    if layout == "hwio":
        kh, kw, i, o = weights_shape
        return o, i, kh, kw
    raise ValueError(f"unknown native Conv weight layout {layout!r}")
