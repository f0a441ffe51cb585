"""RNN, GRU and LSTM.

The input projection of every time step is one matmul; the recurrence is a ``lax.scan`` over
time (reverse-differentiable). ``sequence_lens`` masks finished batch entries: their state stops
changing and their outputs are zero; the reverse direction starts at each entry's last step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from onnx2jax.ops.registry import register

# name (lower case) -> (function of x, alpha, beta; default alpha; default beta)
_ACTIVATIONS = {
    "relu": (lambda x, a, b: jnp.maximum(x, 0), None, None),
    "tanh": (lambda x, a, b: jnp.tanh(x), None, None),
    "sigmoid": (lambda x, a, b: jax.nn.sigmoid(x), None, None),
    "affine": (lambda x, a, b: a * x + b, 1.0, 0.0),
    "leakyrelu": (lambda x, a, b: jnp.where(x >= 0, x, a * x), 0.01, None),
    "thresholdedrelu": (lambda x, a, b: jnp.where(x > a, x, 0), 1.0, None),
    "scaledtanh": (lambda x, a, b: a * jnp.tanh(b * x), 1.0, 1.0),
    "hardsigmoid": (lambda x, a, b: jnp.clip(a * x + b, 0, 1), 0.2, 0.5),
    "elu": (lambda x, a, b: jnp.where(x >= 0, x, a * jnp.expm1(jnp.minimum(x, 0))), 1.0, None),
    "softsign": (lambda x, a, b: x / (1 + jnp.abs(x)), None, None),
    "softplus": (lambda x, a, b: jnp.logaddexp(x, 0), None, None),
}

_DEFAULT_ACTIVATIONS = {
    "RNN": ("Tanh",),
    "GRU": ("Sigmoid", "Tanh"),
    "LSTM": ("Sigmoid", "Tanh", "Tanh"),
}
_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def cell_activations(ctx, kind, num_dir):
    """Per direction, the activation functions with their alpha/beta bound."""
    names = ctx.attr("activations")
    per_dir = len(_DEFAULT_ACTIVATIONS[kind])
    if names is None:
        names = list(_DEFAULT_ACTIVATIONS[kind]) * num_dir
    if len(names) != per_dir * num_dir:
        raise ctx.error(f"{kind} takes {per_dir} activation(s) per direction, got {names}")
    alphas = list(ctx.attr("activation_alpha", []))
    betas = list(ctx.attr("activation_beta", []))
    functions = []
    for name in names:
        entry = _ACTIVATIONS.get(name.lower())
        if entry is None:
            raise ctx.error(f"unsupported activation {name!r}")
        function, alpha, beta = entry
        if alpha is not None and alphas:
            alpha = alphas.pop(0)
        if beta is not None and betas:
            beta = betas.pop(0)
        functions.append(lambda x, f=function, a=alpha, b=beta: f(x, a, b))
    return [functions[d * per_dir : (d + 1) * per_dir] for d in range(num_dir)]


def _recurrent(ctx, kind, x, w, r, b, seq_lens, init_h, init_c=None, peep=None):
    x = jnp.asarray(x)
    dtype = x.dtype
    layout = ctx.attr("layout", 0)
    order = "[batch, seq, input]" if layout else "[seq, batch, input]"
    if x.ndim != 3:
        raise ctx.error(f"X has shape {x.shape}, expected rank 3 {order}")
    if np.ndim(w) != 3 or np.ndim(r) != 3:
        raise ctx.error(f"W and R must have rank 3, got shapes {np.shape(w)} and {np.shape(r)}")
    if layout:
        x = jnp.swapaxes(x, 0, 1)
    seq, batch = x.shape[:2]
    direction = ctx.attr("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise ctx.error(f"unknown direction {direction!r}")
    num_dir = 2 if direction == "bidirectional" else 1
    gates = _GATES[kind]
    hidden = ctx.attr("hidden_size", np.shape(r)[-1])
    if np.shape(w)[0] != num_dir or np.shape(w)[1] != gates * hidden:
        raise ctx.error(
            f"W has shape {np.shape(w)}, expected [{num_dir}, {gates * hidden}, "
            f"{x.shape[-1]}] for direction {direction!r}"
        )
    clip = ctx.attr("clip")
    acts = cell_activations(ctx, kind, num_dir)

    def state(value, name):
        if value is None:
            return jnp.zeros((num_dir, batch, hidden), dtype)
        given = jnp.asarray(value, dtype)
        value = jnp.swapaxes(given, 0, 1) if given.ndim == 3 and layout else given
        if value.shape != (num_dir, batch, hidden):
            expected = [batch, num_dir, hidden] if layout else [num_dir, batch, hidden]
            raise ctx.error(f"{name} has shape {given.shape}, expected {expected}")
        return value

    init_h = state(init_h, "initial_h")
    init_c = state(init_c, "initial_c") if kind == "LSTM" else None
    mask = None
    if seq_lens is not None:
        lens = jnp.asarray(seq_lens)
        mask = (jnp.arange(seq)[:, None] < lens[None, :])[:, :, None]

    ys, hs, cs = [], [], []
    for d in range(num_dir):
        reverse = direction == "reverse" or d == 1
        w_d = jnp.asarray(w[d], dtype)
        r_d = jnp.asarray(r[d], dtype)
        if b is None:
            wb = rb = jnp.zeros((gates * hidden,), dtype)
        else:
            wb, rb = jnp.split(jnp.asarray(b[d], dtype), 2)
        p_d = None if peep is None else jnp.split(jnp.asarray(peep[d], dtype), 3)
        cell = _cell(ctx, kind, r_d, rb, p_d, acts[d], clip, hidden)
        xw = jnp.einsum("tbi,gi->tbg", x, w_d) + wb
        if reverse:
            xw = reverse_by_length(xw, seq_lens)
        carry = (init_h[d], init_c[d] if init_c is not None else None)
        (h, c), y = lax.scan(
            lambda carry, inputs, cell=cell: masked_step(cell, carry, inputs), carry, (xw, mask)
        )
        if reverse:
            y = reverse_by_length(y, seq_lens)
        ys.append(y)
        hs.append(h)
        cs.append(c)

    y = jnp.stack(ys, axis=1)
    y_h = jnp.stack(hs)
    outputs = [
        jnp.transpose(y, (2, 0, 1, 3)) if layout else y,
        jnp.swapaxes(y_h, 0, 1) if layout else y_h,
    ]
    if kind == "LSTM":
        y_c = jnp.stack(cs)
        outputs.append(jnp.swapaxes(y_c, 0, 1) if layout else y_c)
    return tuple(outputs)


def masked_step(cell, carry, inputs):
    h, c = carry
    xw_t, mask_t = inputs
    h_new, c_new = cell(xw_t, h, c)
    if mask_t is None:
        return (h_new, c_new), h_new
    h_out = jnp.where(mask_t, h_new, h)
    c_out = None if c is None else jnp.where(mask_t, c_new, c)
    return (h_out, c_out), jnp.where(mask_t, h_new, 0).astype(h_new.dtype)


def reverse_by_length(values, seq_lens):
    """Reverse time (axis 0) within each batch entry's valid steps; padding stays in place."""
    if seq_lens is None:
        return jnp.flip(values, 0)
    steps = jnp.arange(values.shape[0])[:, None]
    lens = jnp.asarray(seq_lens)[None, :]
    order = jnp.where(steps < lens, lens - 1 - steps, steps)
    return jnp.take_along_axis(values, order[:, :, None], axis=0)


def _cell(ctx, kind, r, rb, peep, acts, clip, hidden):
    def pre(v):
        return v if clip is None else jnp.clip(v, -clip, clip)

    if kind == "RNN":
        (f,) = acts

        def rnn_cell(xw, h, c):
            return f(pre(xw + h @ r.T + rb)), None

        return rnn_cell
    if kind == "GRU":
        f, g = acts
        linear_before_reset = ctx.attr("linear_before_reset", 0)
        r_zr, r_h = r[: 2 * hidden], r[2 * hidden :]
        rb_zr, rb_h = rb[: 2 * hidden], rb[2 * hidden :]

        def gru_cell(xw, h, c):
            x_z, x_r, x_h = jnp.split(xw, 3, axis=-1)
            h_z, h_r = jnp.split(h @ r_zr.T + rb_zr, 2, axis=-1)
            z = f(pre(x_z + h_z))
            reset = f(pre(x_r + h_r))
            if linear_before_reset:
                candidate = g(pre(x_h + reset * (h @ r_h.T + rb_h)))
            else:
                candidate = g(pre(x_h + (reset * h) @ r_h.T + rb_h))
            return (1 - z) * candidate + z * h, None

        return gru_cell
    f, g, act_h = acts
    input_forget = ctx.attr("input_forget", 0)

    def lstm_cell(xw, h, c):
        return lstm_update(xw + h @ r.T + rb, c, peep, (f, g, act_h), input_forget, pre)

    return lstm_cell


def lstm_update(gates, c, peep, acts, input_forget, pre):
    """One LSTM step from its gates' pre-activations (ONNX's i, o, f, c order) and the cell
    state: ``(h, c)`` after the step. DynamicQuantizeLSTM shares it (ops/qlinear.py)."""
    f, g, act_h = acts
    x_i, x_o, x_f, x_c = jnp.split(gates, 4, axis=-1)
    if peep is not None:
        x_i = x_i + peep[0] * c
        x_f = x_f + peep[2] * c
    i = f(pre(x_i))
    forget = 1 - i if input_forget else f(pre(x_f))
    c_new = forget * c + i * g(pre(x_c))
    if peep is not None:
        x_o = x_o + peep[1] * c_new
    return f(pre(x_o)) * act_h(c_new), c_new


@register("RNN", since=(1, 7, 14, 22))
def rnn(ctx, x, w, r, b=None, sequence_lens=None, initial_h=None):
    return _recurrent(ctx, "RNN", x, w, r, b, sequence_lens, initial_h)


@register("GRU", since=(1, 3, 7, 14, 22))
def gru(ctx, x, w, r, b=None, sequence_lens=None, initial_h=None):
    return _recurrent(ctx, "GRU", x, w, r, b, sequence_lens, initial_h)


@register("LSTM", since=(1, 7, 14, 22))
def lstm(ctx, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None):
    return _recurrent(ctx, "LSTM", x, w, r, b, sequence_lens, initial_h, initial_c, p)
