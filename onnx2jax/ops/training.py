"""The ai.onnx.preview.training ops: the Adagrad/Adam/Momentum update rules and Gradient.

Gradient differentiates part of its own graph: the nodes between ``xs`` and ``y`` are rerun as a
subgraph under ``jax.grad``.
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import onnx

from onnx2jax.ops.registry import TRAINING, register


def _split_groups(ctx, inputs, groups):
    """(R, T, X1..Xn, G1..Gn, ...) -> R, T, one list per group of n tensors."""
    rest = inputs[2:]
    if len(rest) % groups:
        raise ctx.error(f"expected 2 + {groups}*n inputs, got {len(inputs)}")
    n = len(rest) // groups
    return inputs[0], inputs[1], [rest[i * n : (i + 1) * n] for i in range(groups)]


@register("Adagrad", since=1, domain=TRAINING)
def adagrad(ctx, *inputs):
    r, t, (xs, gs, hs) = _split_groups(ctx, inputs, 3)
    xp = ctx.xp(*inputs)
    decay = ctx.attr("decay_factor", 0.0)
    epsilon = ctx.attr("epsilon", 1e-6)
    norm = ctx.attr("norm_coefficient", 0.0)
    rate = r / (1 + t * decay)
    new_xs, new_hs = [], []
    for x, g, h in zip(xs, gs, hs, strict=True):
        g = norm * x + g
        h_new = h + g * g
        new_xs.append((x - rate * g / (xp.sqrt(h_new) + epsilon)).astype(x.dtype))
        new_hs.append(h_new.astype(h.dtype))
    return tuple(new_xs + new_hs)


@register("Adam", since=1, domain=TRAINING)
def adam(ctx, *inputs):
    r, t, (xs, gs, vs, hs) = _split_groups(ctx, inputs, 4)
    xp = ctx.xp(*inputs)
    alpha = ctx.attr("alpha", 0.9)
    beta = ctx.attr("beta", 0.999)
    epsilon = ctx.attr("epsilon", 1e-6)
    norm = ctx.attr("norm_coefficient", 0.0)
    norm_post = ctx.attr("norm_coefficient_post", 0.0)
    # Bias correction only from the first step on (T > 0).
    rate = xp.where(t > 0, r * xp.sqrt(1 - beta**t) / (1 - alpha**t), r)
    outputs: list[list] = [[], [], []]
    for x, g, v, h in zip(xs, gs, vs, hs, strict=True):
        g = norm * x + g
        v_new = alpha * v + (1 - alpha) * g
        h_new = beta * h + (1 - beta) * g * g
        x_new = x - rate * (v_new / (xp.sqrt(h_new) + epsilon))
        outputs[0].append(((1 - norm_post) * x_new).astype(x.dtype))
        outputs[1].append(v_new.astype(v.dtype))
        outputs[2].append(h_new.astype(h.dtype))
    return tuple(outputs[0] + outputs[1] + outputs[2])


@register("Momentum", since=1, domain=TRAINING)
def momentum(ctx, *inputs):
    r, t, (xs, gs, vs) = _split_groups(ctx, inputs, 3)
    xp = ctx.xp(*inputs)
    alpha = ctx.attr("alpha")
    beta = ctx.attr("beta")
    norm = ctx.attr("norm_coefficient")
    mode = ctx.attr("mode")
    if None in (alpha, beta, norm, mode):
        raise ctx.error("needs the alpha, beta, mode and norm_coefficient attributes")
    if mode not in ("standard", "nesterov"):
        raise ctx.error(f"unknown mode {mode!r}")
    # The gradient's coefficient is 1 at the first step (T == 0).
    beta_t = xp.where(t > 0, beta, 1.0)
    new_xs, new_vs = [], []
    for x, g, v in zip(xs, gs, vs, strict=True):
        g = norm * x + g
        v_new = alpha * v + beta_t * g
        step = g + alpha * v_new if mode == "nesterov" else v_new
        new_xs.append((x - r * step).astype(x.dtype))
        new_vs.append(v_new.astype(v.dtype))
    return tuple(new_xs + new_vs)


# Per interpreter, the subgraph computing ``y`` from ``xs`` for each Gradient node.
_GRADIENT_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forward_graph(ctx, xs, y):
    """The nodes of the enclosing graph that compute ``y`` from ``xs``, as a GraphProto."""
    graphs = _GRADIENT_GRAPHS.setdefault(ctx.interpreter, {})
    cached = graphs.get(id(ctx.node))
    if cached is not None and cached[0] is ctx.node:
        return cached[1]
    plan = ctx.plan
    if y not in plan.producer:
        raise ctx.error(f"y {y!r} is not computed by a node of this graph")
    needed, stack = set(), [plan.producer[y]]
    while stack:
        index = stack.pop()
        if index in needed:
            continue
        needed.add(index)
        stack.extend(
            plan.producer[name]
            for name in plan.node_reads[index]
            if name in plan.producer and name not in xs
        )
    if plan.nodes.index(ctx.node) in needed:
        raise ctx.error(f"y {y!r} depends on the Gradient node itself")
    graph = onnx.helper.make_graph(
        [plan.nodes[i] for i in sorted(needed)],
        f"gradient_{ctx.node.name}",
        [onnx.helper.make_value_info(name, onnx.TypeProto()) for name in xs],
        [onnx.helper.make_value_info(y, onnx.TypeProto())],
    )
    graphs[id(ctx.node)] = (ctx.node, graph)
    return graph


@register("Gradient", since=1, domain=TRAINING)
def gradient(ctx, *inputs):
    xs = list(ctx.attr("xs", []))
    y = ctx.attr("y")
    zs = list(ctx.attr("zs", []))
    if not xs or y is None:
        raise ctx.error("needs the xs and y attributes")
    if len(inputs) != len(xs) + len(zs):
        raise ctx.error(
            f"takes the {len(xs)} xs and {len(zs)} zs tensors as inputs, got {len(inputs)}"
        )
    graph = _forward_graph(ctx, xs, y)

    def forward(*values):
        (out,) = ctx.interpreter.run_subgraph(graph, list(values), ctx.scope)
        # Gradient seeds dY with ones, i.e. it differentiates the sum of y.
        return jnp.sum(jnp.asarray(out))

    grads = jax.grad(forward, argnums=tuple(range(len(xs))))(
        *[jnp.asarray(v) for v in inputs[: len(xs)]]
    )
    return tuple(grads)
