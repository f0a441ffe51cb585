"""A thin training layer on optax: choose what trains, a jitted train step, evaluation, a loop.

Params are split into a *trainable* part, which the optimizer sees and gradients are taken
for, and a *frozen* part, which is passed to the jitted step as a separate argument (never
closed over, so it is not baked into the compiled program) and gets no gradient work. The loss
is a plain function of the merged params, so anything written with ``model.apply`` works here,
and a hand-written loop with ``jax.grad`` loses nothing.

Example:
    >>> import numpy as np, optax, onnx2jax
    >>> from onnx2jax import train
    >>> model = onnx2jax.load(onnx2jax.example_path())
    >>> trainable, frozen = train.split(model.params, "10.*")   # only the last Gemm trains
    >>> sorted(trainable)
    ['10.bias', '10.weight']
    >>> x, y = np.ones((4, 1, 8, 8), np.float32), np.arange(4)
    >>> def loss_fn(params, batch):
    ...     logits = model.apply(params, batch[0])["logits"]
    ...     return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
    >>> optimizer = optax.adam(1e-2)
    >>> state = train.init(trainable, optimizer)
    >>> step = train.make_train_step(loss_fn, optimizer)
    >>> state, metrics = step(state, frozen, (x, y))
    >>> int(state.step), sorted(metrics)
    (1, ['loss'])
"""

from __future__ import annotations

import fnmatch
import functools
import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from onnx2jax.core.errors import InputError
from onnx2jax.core.graph import is_trainable_dtype
from onnx2jax.runtime.options import (
    default_compiler_options,
    jit_with_options,
    options_outside_traces,
)

if TYPE_CHECKING:
    from onnx2jax.core.model import Model
    from onnx2jax.train.checkpoint import Checkpointer

Params = dict[str, jax.Array]
PyTree = Any
Batch = Any
# What trains: everything (None/True), a glob, a compiled regex, a predicate on (name, value),
# or a list of these (a param trains when any of them selects it).
Selector = (
    None
    | bool
    | str
    | re.Pattern[str]
    | Callable[[str, Any], bool]
    | Sequence[str | re.Pattern[str] | Callable[[str, Any], bool]]
)
LossFn = Callable[[PyTree, Batch], Any]


# ------------------------------------------------------------------------------ selection
def trainable_names(
    params: Mapping[str, Any], trainable: Selector = None, *, model: Model | None = None
) -> list[str]:
    """Names in ``params`` chosen by ``trainable``, in ``params`` order; non-floats never train.

    A string is a glob (``fnmatch``, ``*`` crosses dots and slashes), a compiled ``re`` pattern
    is searched in the name, a callable gets ``(name, value)``. With ``model``, globs and
    patterns also match the names of the nodes that read a param (exporters name some weights
    ``onnx::MatMul_717`` but their node ``/encoder/layer.5/attention/self/query/MatMul``). A
    glob or pattern that selects nothing raises :class:`~onnx2jax.core.errors.InputError`, as that
    is almost always a typo.

    Example:
        >>> import re, numpy as np
        >>> params = {"enc.0.w": np.ones(2, np.float32), "enc.0.b": np.ones(2, np.float32),
        ...           "head.w": np.ones(2, np.float32), "ids": np.ones(2, np.int64)}
        >>> trainable_names(params, "enc.*.w")
        ['enc.0.w']
        >>> trainable_names(params, re.compile(r"\\.b$"))
        ['enc.0.b']
        >>> trainable_names(params, lambda name, value: name.startswith("head"))
        ['head.w']
        >>> trainable_names(params)
        ['enc.0.w', 'enc.0.b', 'head.w']
        >>> import onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> trainable_names(model.params, "/4/*", model=model)   # by node name
        ['onnx::Conv_31', 'onnx::Conv_32']
    """
    floats = [k for k, v in params.items() if is_trainable_dtype(np.dtype(v.dtype))]
    if trainable is None or trainable is True:
        return floats
    if trainable is False:
        return []
    rules = (
        [trainable]
        if isinstance(trainable, str | re.Pattern) or callable(trainable)
        else list(trainable)
    )
    names = {k: [k] for k in floats}
    if model is not None:
        for node in model.plan.nodes:
            for name in node.input:
                if name in names and node.name:
                    names[name].append(node.name)
    chosen: set[str] = set()
    for rule in rules:
        if isinstance(rule, str):
            found = {k for k in floats if any(fnmatch.fnmatchcase(n, rule) for n in names[k])}
        elif isinstance(rule, re.Pattern):
            found = {k for k in floats if any(rule.search(n) for n in names[k])}
        elif callable(rule):
            found = {k for k in floats if rule(k, params[k])}
        else:
            raise TypeError(
                f"cannot select params with {rule!r}: use a glob string, a compiled "
                "regex, or a function of (name, value)"
            )
        if not found and not callable(rule):
            shown = ", ".join(repr(k) for k in floats[:5])
            raise InputError(f"{rule!r} selects no float param; names look like {shown}")
        chosen |= found
    return [k for k in floats if k in chosen]


def split(
    params: Mapping[str, Any], trainable: Selector = None, *, model: Model | None = None
) -> tuple[Params, Params]:
    """Split a flat params dict into ``(trainable, frozen)`` (see :func:`trainable_names`).

    Example:
        >>> import numpy as np
        >>> params = {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)}
        >>> trainable, frozen = split(params, "a")
        >>> list(trainable), list(frozen)
        (['a'], ['b'])
    """
    names = set(trainable_names(params, trainable, model=model))
    return (
        {k: v for k, v in params.items() if k in names},
        {k: v for k, v in params.items() if k not in names},
    )


def merge(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Union of two nested dicts (``trainable`` wins); the inverse of :func:`split`.

    Example:
        >>> merge({"onnx": {"w": 1}, "head": {"k": 2}}, {"onnx": {"b": 3}})
        {'onnx': {'b': 3, 'w': 1}, 'head': {'k': 2}}
    """
    if not isinstance(trainable, Mapping) or not isinstance(frozen, Mapping):
        return trainable
    merged = dict(frozen)
    for key, value in trainable.items():
        merged[key] = merge(value, merged[key]) if key in merged else value
    return merged


# ------------------------------------------------------------------------------ steps
class TrainState(NamedTuple):
    """What changes during training: the step count, trainable params, optimizer state."""

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState


def init(trainable: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh :class:`TrainState`. The params are copied, so the train step may donate them.

    Integer leaves (a quantized model's packed or int8 weights, frozen params) have no
    gradient: they are refused with an :class:`~onnx2jax.core.errors.InputError` saying to pass
    them as ``frozen`` (``train.split(model.params)`` does).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> state = init({"w": jnp.ones(3)}, optax.sgd(0.1))
        >>> int(state.step)
        0
    """
    integers = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(trainable)
        if hasattr(leaf, "dtype") and not is_trainable_dtype(np.dtype(leaf.dtype))
    ]
    if integers:
        raise InputError(
            f"{len(integers)} of the params to train hold integers (first: {integers[:3]}): "
            "a quantized model's packed or integer weights are frozen params, which have no "
            "gradient; train the floats and pass the rest as frozen: "
            "trainable, frozen = train.split(model.params)"
        )
    params = jax.tree.map(jnp.array, trainable)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def _metrics(result: Any, has_aux: bool) -> tuple[jax.Array, dict[str, Any]]:
    if not has_aux:
        return result, {}
    loss, aux = result
    return loss, dict(aux) if isinstance(aux, Mapping) else {"aux": aux}


def _jit(function: Callable, compiler_options: Mapping[str, Any] | None, **kwargs: Any) -> Callable:
    """``jax.jit`` with onnx2jax's XLA options (None) or the caller's (``{}``: XLA's own).

    Called inside the caller's own trace (a step under ``lax.scan`` in their jit), where JAX
    refuses a nested jit with options, it is a plain ``jax.jit``.
    """
    options = default_compiler_options() if compiler_options is None else dict(compiler_options)
    jits: dict[tuple, Any] = {}

    @functools.wraps(function)
    def call(*args: Any) -> Any:
        return jit_with_options(jits, function, options_outside_traces(options, args), **kwargs)(
            *args
        )

    outermost = jit_with_options(jits, function, options, **kwargs)
    call.lower = outermost.lower  # type: ignore[attr-defined]
    return call


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    donate: bool = True,
    compiler_options: Mapping[str, Any] | None = None,
) -> Callable[[TrainState, PyTree, Batch], tuple[TrainState, dict]]:
    """A jitted ``step(state, frozen, batch) -> (state, metrics)``.

    ``loss_fn(params, batch)`` gets ``merge(state.params, frozen)`` and returns the loss, or
    ``(loss, aux_dict)`` with ``has_aux``; ``metrics`` is ``{"loss": loss, **aux}``. Gradients are
    taken for ``state.params`` only. With ``donate`` the old state's buffers are reused for the
    new one (do not use ``state`` after the call).

    ``compiler_options`` are XLA options for this step's jit alone. By default they are
    ``model(...)``'s (``Model.compiler_options``): on the CPU, XLA's YNNPACK fusion off, which
    made full fine-tuning steps faster than XLA's defaults (benchmarks/LOG.md). ``{}`` keeps
    XLA's defaults.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> opt = optax.sgd(0.5)
        >>> step = make_train_step(lambda p, b: jnp.sum((p["w"] * p["s"] - b) ** 2), opt)
        >>> state, metrics = step(init({"w": jnp.ones(2)}, opt), {"s": jnp.ones(2)}, jnp.zeros(2))
        >>> state.params["w"].tolist(), float(metrics["loss"])
        ([0.0, 0.0], 2.0)
    """

    def step(state: TrainState, frozen: PyTree, batch: Batch) -> tuple[TrainState, dict]:
        def objective(params: PyTree) -> tuple[jax.Array, dict]:
            return _metrics(loss_fn(merge(params, frozen), batch), has_aux)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), {"loss": loss, **aux}

    donated = (0,) if donate else ()
    plain = _jit(step, compiler_options, donate_argnums=donated)
    # Sharded states: one jit per layout of the state, whose results keep it.
    pinned: dict[tuple, Callable] = {}

    @functools.wraps(step)
    def call(state: TrainState, frozen: PyTree, batch: Batch) -> tuple[TrainState, dict]:
        shardings = mesh_shardings(state)
        if shardings is None:
            return plain(state, frozen, batch)
        function = pinned.get(shardings)
        if function is None:
            function = pinned[shardings] = _jit(
                _keeping_shardings(step, shardings), compiler_options, donate_argnums=donated
            )
        return function(state, frozen, batch)

    call.lower = plain.lower  # type: ignore[attr-defined]
    return call


def mesh_shardings(tree: PyTree) -> tuple[NamedSharding | None, ...] | None:
    """The ``NamedSharding`` of each leaf of ``tree`` (``None`` for a leaf without one), or
    ``None`` when no leaf is spread over several devices or a leaf is traced.

    Example:
        >>> import jax.numpy as jnp
        >>> mesh_shardings({"w": jnp.ones(2)}) is None
        True
    """
    leaves = jax.tree.leaves(tree)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return None
    shardings = tuple(
        leaf.sharding
        if isinstance(leaf, jax.Array) and isinstance(leaf.sharding, NamedSharding)
        else None
        for leaf in leaves
    )
    if not any(s is not None and len(s.device_set) > 1 for s in shardings):
        return None
    return shardings


def _keeping_shardings(
    step: Callable[[TrainState, PyTree, Batch], tuple[TrainState, dict]],
    shardings: tuple[NamedSharding | None, ...],
) -> Callable[[TrainState, PyTree, Batch], tuple[TrainState, dict]]:
    """``step`` whose new state has the shardings of the state it was given: XLA's propagation
    may pick others (a bias split, a weight gathered), which would move the state each step."""

    def kept(state: TrainState, frozen: PyTree, batch: Batch) -> tuple[TrainState, dict]:
        new, metrics = step(state, frozen, batch)
        leaves, tree = jax.tree.flatten(new)
        leaves = [
            leaf if sharding is None else jax.lax.with_sharding_constraint(leaf, sharding)
            for leaf, sharding in zip(leaves, shardings, strict=True)
        ]
        return jax.tree.unflatten(tree, leaves), metrics

    return kept


def make_eval_step(
    metric_fn: LossFn, *, has_aux: bool = False, compiler_options: Mapping[str, Any] | None = None
) -> Callable[[PyTree, PyTree, Batch], dict]:
    """A jitted ``evaluate(trainable, frozen, batch) -> metrics`` (the train step's metrics).

    ``compiler_options`` as in :func:`make_train_step`.

    Example:
        >>> import jax.numpy as jnp
        >>> ev = make_eval_step(lambda p, b: jnp.mean(p["w"] * b))
        >>> float(ev({"w": jnp.ones(2)}, {}, jnp.arange(2.0))["loss"])
        0.5
    """

    def evaluate_batch(params: PyTree, frozen: PyTree, batch: Batch) -> dict:
        loss, aux = _metrics(metric_fn(merge(params, frozen), batch), has_aux)
        return {"loss": loss, **aux}

    return _jit(evaluate_batch, compiler_options)


def evaluate(
    eval_step: Callable[[PyTree, PyTree, Batch], dict],
    trainable: PyTree,
    frozen: PyTree,
    batches: Iterable[Batch],
) -> dict[str, float]:
    """Mean of each metric of ``eval_step`` (from :func:`make_eval_step`) over ``batches``.

    Example:
        >>> import jax.numpy as jnp
        >>> ev = make_eval_step(lambda p, b: jnp.mean(p["w"] * b))
        >>> evaluate(ev, {"w": jnp.ones(1)}, {}, [jnp.ones(1), 3 * jnp.ones(1)])
        {'loss': 2.0}
    """
    totals: dict[str, float] = {}
    count = 0
    for batch in batches:
        metrics = jax.device_get(eval_step(trainable, frozen, batch))
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value)
        count += 1
    if not count:
        raise InputError("evaluate() got no batches")
    return {k: v / count for k, v in totals.items()}


# ------------------------------------------------------------------------------ loop
@dataclass
class FitResult:
    """What :func:`fit` returns: the final state, merged params, and per-step metrics."""

    state: TrainState
    params: PyTree
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [m["loss"] for m in self.history]


def fit(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    trainable: PyTree,
    batches: Callable[[int], Batch] | Iterable[Batch],
    *,
    steps: int,
    frozen: PyTree | None = None,
    has_aux: bool = False,
    progress: bool = True,
    checkpointer: Checkpointer | None = None,
    compiler_options: Mapping[str, Any] | None = None,
) -> FitResult:
    """An example loop: ``steps`` train steps with a tqdm progress bar.

    ``batches`` is a function of the step number (which makes a resumed run see the same data)
    or an iterable. With a :class:`~onnx2jax.train.checkpoint.Checkpointer` the loop resumes
    from its latest checkpoint (skipping the batches already used) and saves as the manager's
    interval says, and at the end. ``result.params`` is ``merge(trained, frozen)``.
    ``compiler_options`` go to :func:`make_train_step`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> loss = lambda p, b: jnp.sum((p["w"] - b) ** 2)
        >>> result = fit(loss, optax.sgd(0.25), {"w": jnp.zeros(2)}, lambda i: jnp.ones(2),
        ...              steps=20, progress=False)
        >>> result.losses[0] > 100 * result.losses[-1]
        True
    """
    frozen = {} if frozen is None else frozen
    step_fn = make_train_step(
        loss_fn, optimizer, has_aux=has_aux, compiler_options=compiler_options
    )
    state = init(trainable, optimizer)
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state = checkpointer.restore(state)
    start = int(state.step)
    if callable(batches):
        source = (batches(i) for i in itertools.count(start))
    else:
        source = itertools.islice(iter(batches), start, None)
    history: list[dict[str, float]] = []
    bar = _progress(range(start, steps), progress)
    for _, batch in zip(bar, source, strict=False):
        state, metrics = step_fn(state, frozen, batch)
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
        if progress:
            bar.set_postfix(loss=f"{history[-1]['loss']:.4g}")
        if checkpointer is not None:
            checkpointer.save(int(state.step), state)
    if progress:
        bar.close()
    if checkpointer is not None:
        checkpointer.save(int(state.step), state, force=True)
        checkpointer.wait()
    return FitResult(state, merge(state.params, frozen), history)


def _progress(steps: range, enabled: bool) -> Any:
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, initial=steps.start, total=steps.stop, desc="train")
