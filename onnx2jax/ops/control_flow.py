"""If, Loop and Scan.

A condition or trip count known at trace time runs as plain Python: If runs only its taken
branch, and a short Loop is unrolled, so shape arithmetic inside the body stays static and loop
state may change shape or be a growing sequence. Otherwise control flow becomes ``lax.cond``,
``lax.scan`` (static trip count; reverse-differentiable) or ``lax.while_loop`` (data-dependent
termination; forward-differentiable only), whose loop state must keep its shapes and dtypes.
An If whose condition is only known when the model runs (model(...) runs it outside jit) runs
its taken branch as one jitted function, compiled once per signature of what it reads.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from jax import lax

from onnx2jax.core.convert import Interpreter, OpContext, is_concrete, is_static
from onnx2jax.core.errors import DataDependentShapeError, OpError
from onnx2jax.core.graph import outer_names
from onnx2jax.core.settings import MAX_UNROLL_ENV, max_unroll
from onnx2jax.ops.registry import register

# Static trip counts up to this many iterations are unrolled in Python; longer loops are traced
# once as lax.scan (falling back to unrolling when the body cannot be a fixed-shape loop).
UNROLL_LIMIT = 16
# lax.scan's length is a C int; longer loops without scan outputs run as lax.while_loop.
_SCAN_MAX_LENGTH = 2**31 - 1


class _NotLoopable(Exception):
    """The body cannot run as a lax loop (its state changes shape or structure, or it needs
    a static iteration number)."""


class _NeedsWhile(Exception):
    """A Loop body's condition is not statically true: lax.scan cannot express early exit."""


# What tracing a body as a lax loop raises when only unrolling (or eager mode) can run it.
_LAX_FAILURES = (_NotLoopable, OpError, DataDependentShapeError, TypeError)


def _to_jax(tree):
    return jax.tree_util.tree_map(jnp.asarray, tree)


def _coerce_state(new, old, what):
    """``new`` loop state as JAX arrays of the same structure, shapes and dtypes as ``old``."""
    new_leaves, new_tree = jax.tree_util.tree_flatten(new)
    old_leaves, old_tree = jax.tree_util.tree_flatten(old)
    if new_tree != old_tree:
        raise _NotLoopable(f"{what} changes structure across iterations")
    out = []
    for a, b in zip(new_leaves, old_leaves, strict=True):
        a = jnp.asarray(a)
        if a.shape != b.shape:
            raise _NotLoopable(f"{what} changes shape from {b.shape} to {a.shape}")
        out.append(lax.convert_element_type(a, b.dtype))
    return jax.tree_util.tree_unflatten(old_tree, out)


def _flag(value) -> bool:
    array = np.asarray(value)
    if array.size != 1:
        raise OpError(f"a condition must hold one element, got shape {array.shape}")
    return bool(array.reshape(()))


def _stack(values):
    xp = np if all(is_static(v) for v in values) else jnp
    return xp.stack(values)


# ---------------------------------------------------------------------------------------- If
@register("If", since=(1, 11, 13, 16, 19, 21, 23, 24, 25))
def if_(ctx, cond):
    for branch in ("then_branch", "else_branch"):
        if ctx.attr(branch) is None:
            raise ctx.error(f"it has no {branch}")
        count = len(ctx.attr(branch).output)
        if count != ctx.num_outputs:
            raise ctx.error(
                f"its {branch} gives {count} output(s), but the node has {ctx.num_outputs}"
            )
    if is_concrete(cond):
        branch = "then_branch" if _flag(cond) else "else_branch"
        compiled = _EagerBranch.of(ctx, branch)
        if compiled.applies(ctx.scope):
            return tuple(compiled.run(ctx))
        return tuple(ctx.run_subgraph(branch, []))
    if np.size(cond) != 1:
        raise ctx.error(f"the condition must hold one element, got shape {np.shape(cond)}")
    pred = jnp.reshape(cond, ()).astype(bool)
    try:
        outputs = lax.cond(
            pred,
            lambda: _to_jax(ctx.run_subgraph("then_branch", [])),
            lambda: _to_jax(ctx.run_subgraph("else_branch", [])),
        )
    except TypeError as exc:
        # Differing branch outputs are fine in eager mode, where the condition is concrete.
        raise DataDependentShapeError(
            f"{ctx.name}: the condition depends on the model's inputs, so both branches run as "
            "lax.cond, which needs outputs of the same shapes, dtypes and structure; call the "
            f"model directly (model(...)) to run it eagerly. {exc}"
        ) from exc
    except (OpError, ValueError) as exc:
        # lax.cond traces the branch not taken too, on values it was never meant for (silero-vad
        # feeds its 8 kHz branch a 16 kHz frame, whose shape-dependent Squeeze then leaves the
        # LSTM input of rank 4). Eager mode runs only the taken branch.
        raise DataDependentShapeError(
            f"{ctx.name}: the condition depends on the model's inputs, so both branches run as "
            "lax.cond, and one of them cannot run on these inputs; call the model directly "
            f"(model(...)), which runs only the branch taken. {exc}"
        ) from exc
    return tuple(outputs)


class _EagerBranch:
    """An If branch taken outside any trace (model(...) runs a data-dependent If eagerly),
    compiled once per signature of the outer values it reads. Run op by op, each call would
    trace and compile again whatever the branch holds (an LSTM's lax.scan every time).

    A branch that needs data values at trace time keeps running op by op.
    """

    # Interpreter -> id(branch graph) -> its _EagerBranch (the graph kept alive with it).
    _cache: weakref.WeakKeyDictionary[Interpreter, dict[int, _EagerBranch]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, interpreter: Interpreter, graph: onnx.GraphProto):
        # A weak reference: the cache's values must not keep its key alive.
        self._interpreter = weakref.ref(interpreter)
        self.graph = graph
        self.reads = sorted(outer_names(graph))
        self.op_by_op = False
        # (signature of traced reads, content of static reads) -> (jitted run, static outputs)
        self._compiled: dict[tuple, tuple[Callable[..., Any], dict[int, Any]]] = {}

    @classmethod
    def of(cls, ctx: OpContext, branch: str) -> _EagerBranch:
        graph = ctx.attrs[branch]
        per_graph = cls._cache.setdefault(ctx.interpreter, {})
        found = per_graph.get(id(graph))
        if found is None or found.graph is not graph:
            found = per_graph[id(graph)] = cls(ctx.interpreter, graph)
        return found

    def applies(self, scope: Mapping[str, Any]) -> bool:
        """True when the branch reads a concrete JAX array and no tracer: eager mode. Static
        reads alone stay op by op, so that the branch's shape arithmetic stays static."""
        if self.op_by_op:
            return False
        leaves = jax.tree_util.tree_leaves([scope[n] for n in self.reads if n in scope])
        if any(isinstance(v, jax.core.Tracer) for v in leaves):
            return False
        return any(isinstance(v, jax.Array) for v in leaves)

    def run(self, ctx: OpContext) -> list[Any]:
        scope = ctx.scope
        reads = {n: scope[n] for n in self.reads if n in scope}
        static = {n: v for n, v in reads.items() if is_static(v) or isinstance(v, str)}
        dynamic = {n: v for n, v in reads.items() if n not in static}
        # The enclosing graph's constants never change: known by name, not hashed per call.
        constants = ctx.plan.constants
        fixed = tuple(sorted(n for n, v in static.items() if constants.get(n) is v))
        key = (
            _signature(dynamic),
            fixed,
            _content_key({n: v for n, v in static.items() if n not in fixed}),
        )
        entry = self._compiled.get(key)
        if entry is None:
            entry = self._compiled[key] = self._compile(static)
        function, recorded = entry
        try:
            traced = function(dynamic)
        except (DataDependentShapeError, TypeError):
            self.op_by_op = True
            del self._compiled[key]
            return ctx.interpreter.run_subgraph(self.graph, [], scope)
        return [recorded[i] if i in recorded else traced[i] for i in range(len(self.graph.output))]

    def _compile(self, static: dict[str, Any]) -> tuple[Callable[..., Any], dict[int, Any]]:
        recorded: dict[int, Any] = {}
        interpreter, graph = self._interpreter, self.graph

        def run(dynamic: dict[str, Any]) -> dict[int, Any]:
            outs = interpreter().run_subgraph(graph, [], {**static, **dynamic})
            traced = {}
            for index, value in enumerate(outs):
                # Static outputs depend only on the static reads and the shapes, both in the
                # cache key: recorded once at trace time.
                if is_static(value) or isinstance(value, str):
                    recorded[index] = value
                else:
                    traced[index] = value
            return traced

        return jax.jit(run), recorded


def _signature(values: Mapping[str, Any]) -> tuple:
    leaves, tree = jax.tree_util.tree_flatten(dict(values))
    return tree, tuple((np.shape(v), str(getattr(v, "dtype", type(v)))) for v in leaves)


def _content_key(values: Mapping[str, Any]) -> tuple:
    leaves, tree = jax.tree_util.tree_flatten(dict(values))
    digest = hashlib.sha1()
    for leaf in leaves:
        array = np.asarray(leaf)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes() if array.dtype != object else repr(array).encode())
    return tree, digest.hexdigest()


# -------------------------------------------------------------------------------------- Loop
@register("Loop", since=(1, 11, 13, 16, 19, 21, 23, 24, 25))
def loop(ctx, trip_count=None, cond=None, *initial):
    body = ctx.attr("body")
    n_state = len(initial)
    n_scan = len(body.output) - 1 - n_state
    if n_scan < 0 or len(body.input) != n_state + 2:
        raise ctx.error(
            f"the body takes {len(body.input)} inputs and gives {len(body.output)} "
            f"outputs, which does not fit {n_state} loop-carried values"
        )
    if trip_count is None and cond is None:
        raise ctx.error("a Loop with neither trip count nor condition never ends")
    runner = _LoopRunner(ctx, list(initial), n_scan, use_cond=cond is not None)
    if is_concrete(trip_count) and is_concrete(cond):
        limit = None if trip_count is None else int(np.asarray(trip_count).reshape(()))
        if cond is not None and not _flag(cond):
            limit = 0
        if limit is not None and limit <= UNROLL_LIMIT:
            return runner.unroll(limit, cond)
        try:
            return runner.traced(limit, cond)
        except _NotLoopable:
            return runner.unroll(limit, cond)
    try:
        return runner.traced(trip_count, cond)
    except _NotLoopable as exc:
        raise DataDependentShapeError(
            f"{ctx.name}: the trip count or condition depends on the model's inputs, so the "
            f"loop must run as a lax loop, which it cannot: {exc}. Call the model directly "
            "(model(...)), which runs such loops eagerly."
        ) from exc


_TRUE = np.asarray(True)


class _LoopRunner:
    """Runs a Loop node's body: unrolled in Python, or as lax.scan / lax.while_loop."""

    def __init__(self, ctx, initial, n_scan, use_cond):
        self.ctx = ctx
        self.initial = initial
        self.n_scan = n_scan
        # Without a cond input the body's condition output is ignored (a plain for loop).
        self.use_cond = use_cond

    def body(self, i, cond, state):
        outs = self.ctx.run_subgraph("body", [i, cond, *state])
        n_state = len(self.initial)
        return outs[0], list(outs[1 : 1 + n_state]), list(outs[1 + n_state :])

    def unroll(self, limit, cond):
        state = self.initial
        scans = [[] for _ in range(self.n_scan)]
        flag = _TRUE if cond is None else cond
        i = 0
        bound = max_unroll()
        while limit is None or i < limit:
            if i >= bound:
                raise self.ctx.error(
                    f"the loop would run {'an unknown number of' if limit is None else limit} "
                    f"times unrolled at trace time (its carried values change shape, so it "
                    f"cannot compile to one lax loop), past the limit of {bound} iterations "
                    f"(${MAX_UNROLL_ENV} raises it)"
                )
            if self.use_cond:
                if not is_concrete(flag):
                    try:
                        return self.while_loop(limit, flag, state, start=i)
                    except _LAX_FAILURES as exc:
                        raise DataDependentShapeError(
                            f"{self.ctx.name}: the loop's condition depends on the model's "
                            f"inputs, so the rest of the loop must run as lax.while_loop, "
                            f"which it cannot: {exc}. Call the model directly (model(...)), "
                            "which runs such loops eagerly."
                        ) from exc
                if not _flag(flag):
                    break
            flag, state, outs = self.body(np.asarray(i, dtype=np.int64), flag, state)
            if not self.use_cond:
                flag = _TRUE
            for acc, value in zip(scans, outs, strict=True):
                acc.append(value)
            i += 1
        if i == 0 and self.n_scan:
            return (*state, *self.empty_scans())
        return (*state, *(_stack(acc) for acc in scans))

    def empty_scans(self):
        """Scan outputs of a loop that ran zero times: shapes from tracing the body once."""
        try:
            shapes = jax.eval_shape(
                lambda: _to_jax(self.body(np.asarray(0, dtype=np.int64), _TRUE, self.initial)[2])
            )
        except (OpError, DataDependentShapeError, TypeError, ValueError) as exc:
            raise self.ctx.error(
                "the loop runs zero times and the shapes of its scan outputs "
                f"cannot be inferred from its body: {exc}"
            ) from exc
        return tuple(jnp.zeros((0, *s.shape), s.dtype) for s in shapes)

    def traced(self, limit, cond):
        if isinstance(limit, int) and limit > _SCAN_MAX_LENGTH:
            if self.n_scan:
                raise self.ctx.error(
                    f"a trip count of {limit} cannot stack scan outputs (at "
                    f"most {_SCAN_MAX_LENGTH} iterations)"
                )
            # The loop counter's type bounds the count (int32 unless x64 is on).
            widest = np.iinfo(np.int64 if jax.config.jax_enable_x64 else np.int32).max
            return self.while_loop(np.asarray(min(limit, widest)), cond, self.initial, start=0)
        try:
            if isinstance(limit, int):
                try:
                    return self.scan(limit)
                except _NeedsWhile:
                    if self.n_scan:
                        raise _NotLoopable(
                            "the loop may stop early, so the length of its "
                            "scan outputs depends on the data"
                        ) from None
            return self.while_loop(limit, cond, self.initial, start=0)
        except _LAX_FAILURES as exc:
            raise _NotLoopable(str(exc)) from exc

    def scan(self, limit):
        def step(carry, _):
            i, state = carry
            flag, new, outs = self.body(i, _TRUE, state)
            if self.use_cond and not (is_static(flag) and _flag(flag)):
                raise _NeedsWhile
            return (i + 1, _coerce_state(new, state, "a loop-carried value")), _to_jax(outs)

        init = (jnp.asarray(np.int64(0)), _to_jax(self.initial))
        (_, state), scans = lax.scan(step, init, length=limit)
        return (*state, *scans)

    def while_loop(self, limit, cond, state, start):
        if self.n_scan:
            raise _NotLoopable(
                "the loop may stop early, so the length of its scan outputs depends on the data"
            )
        counter = jnp.asarray(np.int64(start))
        if limit is not None:
            limit = jnp.minimum(
                jnp.reshape(jnp.asarray(limit), ()), np.iinfo(counter.dtype).max
            ).astype(counter.dtype)

        def keep_going(carry):
            i, flag, _ = carry
            return flag if limit is None else flag & (i < limit)

        def step(carry):
            i, flag, state = carry
            new_flag, new, _ = self.body(i, flag, state)
            if self.use_cond:
                flag = jnp.reshape(jnp.asarray(new_flag), ()).astype(bool)
            return i + 1, flag, _coerce_state(new, state, "a loop-carried value")

        flag = jnp.asarray(True) if cond is None else jnp.reshape(jnp.asarray(cond), ())
        _, _, state = lax.while_loop(keep_going, step, (counter, flag.astype(bool), _to_jax(state)))
        return tuple(state)


# -------------------------------------------------------------------------------------- Scan
def _scan_counts(ctx, inputs):
    """Scan's scan inputs, loop-carried states and scan outputs, counted from its attributes."""
    n_in = ctx.attr("num_scan_inputs")
    if n_in is None or not 0 < n_in <= len(inputs):
        raise ctx.error(f"num_scan_inputs={n_in} does not fit {len(inputs)} inputs")
    n_state = len(inputs) - n_in
    return n_in, n_state, len(ctx.attr("body").output) - n_state


@register("Scan", since=(9, 11, 16, 19, 21, 23, 24, 25))
def scan(ctx, *inputs):
    n_in, n_state, n_out = _scan_counts(ctx, inputs)
    in_axes = ctx.attr("scan_input_axes", [0] * n_in)
    in_dirs = ctx.attr("scan_input_directions", [0] * n_in)
    out_axes = ctx.attr("scan_output_axes", [0] * n_out)
    out_dirs = ctx.attr("scan_output_directions", [0] * n_out)
    if not len(in_axes) == len(in_dirs) == n_in or not len(out_axes) == len(out_dirs) == n_out:
        raise ctx.error("scan axes and directions must have one entry per scan input/output")
    xs = []
    for x, axis, reverse in zip(inputs[n_state:], in_axes, in_dirs, strict=True):
        xp = ctx.xp(x)
        x = xp.moveaxis(x, axis % np.ndim(x), 0)
        xs.append(xp.flip(x, 0) if reverse else x)
    states, ys = _scan_core(ctx, list(inputs[:n_state]), xs, n_out)
    outs = []
    for y, axis, reverse in zip(ys, out_axes, out_dirs, strict=True):
        xp = ctx.xp(y)
        y = xp.flip(y, 0) if reverse else y
        outs.append(xp.moveaxis(y, 0, axis % np.ndim(y)))
    return (*states, *outs)


@register("Scan", since=8)
def scan_v8(ctx, sequence_lens, *inputs):
    n_in, n_state, n_out = _scan_counts(ctx, inputs)
    dirs = ctx.attr("directions", [0] * n_in)
    batch, length = np.shape(inputs[n_state])[:2]
    lens = [length] * batch
    if sequence_lens is not None:
        lens = ctx.static_ints(sequence_lens, 0, "the sequence lengths")
        if len(lens) != batch or any(not 0 <= n <= length for n in lens):
            raise ctx.error(f"sequence_lens {lens} do not fit batch {batch}, length {length}")
    results = []
    for b in range(batch):
        n = lens[b]
        xs = [x[b, :n] for x in inputs[n_state:]]
        xs = [ctx.xp(x).flip(x, 0) if reverse else x for x, reverse in zip(xs, dirs, strict=True)]
        states, ys = _scan_core(ctx, [s[b] for s in inputs[:n_state]], xs, n_out)
        if n < length:
            ys = [ctx.xp(y).pad(y, [(0, length - n)] + [(0, 0)] * (np.ndim(y) - 1)) for y in ys]
        results.append((*states, *ys))
    return tuple(_stack(list(values)) for values in zip(*results, strict=True))


def _scan_core(ctx, states, xs, n_out):
    """Run the body over axis 0 of ``xs``; return the final states and the stacked outputs."""
    lengths = {np.shape(x)[0] for x in xs}
    if len(lengths) != 1:
        raise ctx.error(f"the scan inputs have different lengths along the scan axis: {lengths}")
    length = lengths.pop()
    n_state = len(states)
    if length and all(is_static(v) for v in (*states, *xs)):
        return _scan_unrolled(ctx, states, xs, n_out, length)

    def step(carry, x_t):
        outs = ctx.run_subgraph("body", [*carry, *x_t])
        return (_coerce_state(outs[:n_state], carry, "a scan state"), _to_jax(outs[n_state:]))

    try:
        states, ys = lax.scan(step, _to_jax(states), xs)
    except _LAX_FAILURES:
        return _scan_unrolled(ctx, states, xs, n_out, length)
    return list(states), list(ys)


def _scan_unrolled(ctx, states, xs, n_out, length):
    n_state = len(states)
    ys = [[] for _ in range(n_out)]
    for t in range(length):
        outs = ctx.run_subgraph("body", [*states, *(x[t] for x in xs)])
        states = outs[:n_state]
        for acc, value in zip(ys, outs[n_state:], strict=True):
            acc.append(value)
    return list(states), [_stack(acc) for acc in ys]
