"""NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss.

Both pick, for every sample (and every position of the extra dimensions), the score of its
target class along axis 1 with one gather, so they trace, jit and differentiate like any other
op. Targets equal to ``ignore_index`` weigh zero; the mean divides by the total weight of the
kept targets (by their count without ``weight``), as PyTorch and the ONNX function bodies do.
"""

from __future__ import annotations

import jax
import numpy as np

from onnx2jax.ops.registry import register

_REDUCTIONS = ("none", "sum", "mean")
# Half-precision inputs are reduced in float32 and rounded once at the end.
_HALF = ("float16", "bfloat16")


@register("NegativeLogLikelihoodLoss", since=(12, 13, 22))
def negative_log_likelihood_loss(ctx, x, target, weight=None):
    _check(ctx, x, target, weight)
    dtype = x.dtype
    return _nll(ctx, _widen(x), target, weight).astype(dtype)


@register("SoftmaxCrossEntropyLoss", since=(12, 13))
def softmax_cross_entropy_loss(ctx, scores, labels, weight=None):
    _check(ctx, scores, labels, weight)
    dtype = scores.dtype
    wide = _widen(scores)
    if ctx.xp(scores) is np:
        shifted = wide - wide.max(axis=1, keepdims=True)
        log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    else:
        log_prob = jax.nn.log_softmax(wide, axis=1)
    loss = _nll(ctx, log_prob, labels, weight).astype(dtype)
    if ctx.has_output(1):
        return loss, log_prob.astype(dtype)
    return loss


def _check(ctx, x, target, weight):
    if x.ndim < 2:
        raise ctx.error(f"the input needs shape (N, C, ...), got {tuple(x.shape)}")
    if tuple(target.shape) != (x.shape[0],) + tuple(x.shape[2:]):
        raise ctx.error(
            f"target of shape {tuple(target.shape)} does not match input of shape "
            f"{tuple(x.shape)} (expected (N, d1, ...))"
        )
    if weight is not None and tuple(weight.shape) != (x.shape[1],):
        raise ctx.error(f"weight of shape {tuple(weight.shape)} does not match C={x.shape[1]}")
    if ctx.attr("reduction", "mean") not in _REDUCTIONS:
        raise ctx.error(f"unsupported reduction {ctx.attr('reduction')!r}")


def _widen(x):
    return x.astype(np.float32) if np.dtype(x.dtype).name in _HALF else x


def _nll(ctx, log_prob, target, weight):
    """The reduced loss of ``-log_prob[n, target[n, ...], ...]``, weighted and ignoring."""
    xp = ctx.xp(log_prob, target, weight)
    reduction = ctx.attr("reduction", "mean")
    ignore_index = ctx.attr("ignore_index")
    classes = log_prob.shape[1]
    # Out-of-range targets (ignore_index among them) are clipped so the gather stays in bounds;
    # the ignored ones are then zeroed by their weight.
    index = xp.clip(target, 0, max(classes - 1, 0)).astype(np.int32)
    picked = xp.take_along_axis(log_prob, xp.expand_dims(index, 1), axis=1)
    loss = -xp.squeeze(picked, 1)
    if weight is None and ignore_index is None:
        if reduction == "mean":
            return xp.mean(loss)
        return xp.sum(loss) if reduction == "sum" else loss
    weights = (
        xp.ones(target.shape, log_prob.dtype)
        if weight is None
        else xp.take(weight.astype(log_prob.dtype), index)
    )
    if ignore_index is not None:
        # where() rather than a zero weight alone: an ignored position may hold -inf.
        ignored = target == ignore_index
        weights = xp.where(ignored, xp.zeros_like(weights), weights)
        loss = xp.where(ignored, xp.zeros_like(loss), loss)
    loss = loss * weights
    if reduction == "mean":
        return xp.sum(loss) / xp.sum(weights)
    return xp.sum(loss) if reduction == "sum" else loss
