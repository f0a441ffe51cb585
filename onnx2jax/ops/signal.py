"""DFT, STFT, window functions and MelWeightMatrix.

ONNX carries complex tensors as real ones with a trailing axis of 1 (real) or 2 (real,
imaginary); the transforms run on jax.numpy.fft in complex64 (complex128 for float64 inputs).
Windows and the mel matrix depend only on static sizes, so they are computed in NumPy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from onnx2jax.core.dtypes import numpy_dtype
from onnx2jax.ops.registry import register


def _real_dtype(dtype):
    return jax.dtypes.canonicalize_dtype(
        np.float64 if np.dtype(dtype) == np.float64 else np.float32
    )


def _to_complex(x):
    """The complex signal of an ONNX ``[..., 1 or 2]`` tensor (real input stays real)."""
    x = jnp.asarray(x, _real_dtype(x.dtype))
    if x.shape[-1] == 1:
        return x[..., 0]
    return jax.lax.complex(x[..., 0], x[..., 1])


def _from_complex(y, dtype):
    """``[..., 2]`` (or ``[..., 1]`` for a real result) in the input's dtype."""
    parts = [jnp.real(y), jnp.imag(y)] if jnp.iscomplexobj(y) else [y]
    return jnp.stack(parts, axis=-1).astype(dtype)


def _dft(ctx, x, length, axis, inverse, onesided):
    rank = np.ndim(x)
    if x.shape[-1] not in (1, 2):
        raise ctx.error(
            f"the last axis holds (real, imaginary) and must be 1 or 2, not {x.shape[-1]}"
        )
    if not -rank <= axis <= rank - 2 or axis == -1:
        raise ctx.error(f"axis={axis} is not a signal axis of a rank-{rank} input")
    axis %= rank
    if length is None:
        length = 2 * (x.shape[axis] - 1) if inverse and onesided else x.shape[axis]
    if length < 1:
        raise ctx.error(f"dft_length={length} must be positive")
    signal = _to_complex(x)
    if inverse:
        if onesided:
            y = jnp.fft.irfft(signal, n=length, axis=axis)
        else:
            y = jnp.fft.ifft(signal, n=length, axis=axis)
    elif not jnp.iscomplexobj(signal):
        # A real signal's spectrum is conjugate-symmetric: the real FFT is half the work, and
        # mirroring it keeps the symmetry exact (imaginary parts of DC and Nyquist exactly 0).
        y = jnp.fft.rfft(signal, n=length, axis=axis)
        if not onesided:
            mirror = jax.lax.slice_in_dim(y, 1, length - length // 2, axis=axis)
            y = jnp.concatenate([y, jnp.conj(jnp.flip(mirror, axis=axis))], axis=axis)
    else:
        y = jnp.fft.fft(signal, n=length, axis=axis)
        if onesided:
            y = jax.lax.slice_in_dim(y, 0, length // 2 + 1, axis=axis)
    return _from_complex(y, x.dtype)


def _dft_length(ctx, value):
    if value is None:
        return None
    return ctx.static_ints(value, 1, "dft_length")[0]


@register("DFT", since=17, static_inputs=(1,))
def dft_v17(ctx, x, dft_length=None):
    return _dft(
        ctx,
        x,
        _dft_length(ctx, dft_length),
        int(ctx.attr("axis", 1)),
        bool(ctx.attr("inverse", 0)),
        bool(ctx.attr("onesided", 0)),
    )


@register("DFT", since=20, static_inputs=(1, 2))
def dft(ctx, x, dft_length=None, axis=None):
    axis = -2 if axis is None else ctx.static_ints(axis, 2, "the axis")[0]
    return _dft(
        ctx,
        x,
        _dft_length(ctx, dft_length),
        axis,
        bool(ctx.attr("inverse", 0)),
        bool(ctx.attr("onesided", 0)),
    )


@register("STFT", since=17, static_inputs=(1, 3))
def stft(ctx, signal, frame_step, window=None, frame_length=None):
    if np.ndim(signal) != 3 or signal.shape[-1] not in (1, 2):
        raise ctx.error(f"signal of shape {np.shape(signal)} is not [batch, length, 1 or 2]")
    step = ctx.static_ints(frame_step, 1, "frame_step")[0]
    if step < 1:
        raise ctx.error(f"frame_step={step} must be positive")
    length = signal.shape[1]
    if frame_length is not None:
        size = ctx.static_ints(frame_length, 3, "frame_length")[0]
    elif window is not None:
        size = window.shape[0]
    else:
        size = length
    if window is not None and window.shape[0] != size:
        raise ctx.error(f"window of length {window.shape[0]} != frame_length {size}")
    if not 0 < size <= length:
        raise ctx.error(f"frame_length={size} does not fit a signal of length {length}")
    frames = 1 + (length - size) // step
    index = np.arange(frames)[:, None] * step + np.arange(size)[None, :]
    pieces = jnp.take(jnp.asarray(signal), index, axis=1)
    if window is not None:
        pieces = pieces * jnp.asarray(window, signal.dtype)[:, None]
    return _dft(ctx, pieces, size, 2, False, bool(ctx.attr("onesided", 1)))


def _window(ctx, size, terms):
    """A generalized cosine window sum(c_k cos(2 pi k n / N)) as a static array."""
    size = ctx.static_ints(size, 0, "the window size")[0]
    periodic = int(ctx.attr("periodic", 1))
    dtype = numpy_dtype(ctx.attr("output_datatype", 1))
    denominator = size if periodic else size - 1
    if denominator == 0:
        # A symmetric window of one point is that point's peak, as in torch.
        return np.ones(size, dtype)
    phase = 2 * np.pi * np.arange(size) / denominator
    return sum(c * np.cos(k * phase) for k, c in enumerate(terms)).astype(dtype)


@register("HannWindow", since=17, static_inputs=(0,))
def hann_window(ctx, size):
    return _window(ctx, size, (0.5, -0.5))


@register("HammingWindow", since=17, static_inputs=(0,))
def hamming_window(ctx, size):
    return _window(ctx, size, (25 / 46, -21 / 46))


@register("BlackmanWindow", since=17, static_inputs=(0,))
def blackman_window(ctx, size):
    return _window(ctx, size, (0.42, -0.5, 0.08))


@register("MelWeightMatrix", since=17, static_inputs=(0, 1, 2, 3, 4))
def mel_weight_matrix(
    ctx, num_mel_bins, dft_length, sample_rate, lower_edge_hertz, upper_edge_hertz
):
    bins = ctx.static_ints(num_mel_bins, 0, "num_mel_bins")[0]
    length = ctx.static_ints(dft_length, 1, "dft_length")[0]
    rate = ctx.static_ints(sample_rate, 2, "sample_rate")[0]
    lower = np.asarray(ctx.static(lower_edge_hertz, 3, "lower_edge_hertz")).reshape(())
    upper = np.asarray(ctx.static(upper_edge_hertz, 4, "upper_edge_hertz")).reshape(())
    # Same arithmetic (and input precision) as the ONNX reference, so the integer bin edges agree.
    low_mel = 2595 * np.log1p(lower / 700) / np.log(10)
    high_mel = 2595 * np.log1p(upper / 700) / np.log(10)
    step = (high_mel - low_mel) / (bins + 2)
    hertz = 700 * np.expm1((np.arange(bins + 2) * step + low_mel) / 2595 * np.log(10))
    edges = (((length + 1) * hertz) // rate).astype(np.int64)
    out = np.zeros((length // 2 + 1, bins))
    for i in range(bins):
        left, center, right = edges[i], edges[i + 1], edges[i + 2]
        if center == left:
            out[center, i] = 1
        else:
            out[left : center + 1, i] = (np.arange(left, center + 1) - left) / (center - left)
        if right > center:
            out[center:right, i] = (right - np.arange(center, right)) / (right - center)
    return out.astype(numpy_dtype(ctx.attr("output_datatype", 1)))
