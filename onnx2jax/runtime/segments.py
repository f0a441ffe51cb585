"""Running graphs with data-dependent shapes: jit-compiled segments around host nodes.

A node whose output shape depends on input values (NonZero, Unique, a Reshape to a computed
shape...) cannot be traced. :class:`SegmentedRunner` learns which nodes those are (each raises
:class:`DataDependentShapeError` once), runs them eagerly on concrete arrays, and compiles every
maximal run of other nodes between them as one ``jax.jit`` function, cached per signature.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from onnx2jax.core.convert import Interpreter, is_static
from onnx2jax.core.errors import DataDependentShapeError
from onnx2jax.core.graph import GraphPlan


@dataclass(frozen=True)
class Segment:
    """Consecutive nodes run together: eagerly (``host``) or as one jitted function."""

    indices: tuple[int, ...]
    host: bool
    reads: tuple[str, ...]  # names read from before the segment
    writes: tuple[str, ...]  # names later segments or the caller need


class SegmentedRunner:
    """Runs ``wanted`` of a plan with host nodes outside jit and the rest in jitted segments."""

    def __init__(
        self,
        plan: GraphPlan,
        interpreter: Interpreter,
        wanted: Sequence[str],
        *,
        restore: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ):
        self.plan = plan
        self.interpreter = interpreter
        self.wanted = list(wanted)
        # Maps values read from the environment back to what the nodes expect (params that
        # model(...) keeps in another layout); identity by default.
        self.restore = restore or (lambda values: values)
        self.host_nodes: set[int] = set()
        self._segments: list[Segment] | None = None
        # (segment position, signature, static inputs, XLA options) -> (jitted function, static
        # outputs recorded at trace)
        self._compiled: dict[tuple, tuple[Any, dict[str, Any]]] = {}

    @property
    def segments(self) -> list[Segment]:
        """The graph's nodes cut into segments: runs of jitted nodes between host nodes."""
        if self._segments is None:
            self._segments = self._split()
        return self._segments

    def compiled_keys(self) -> list[tuple]:
        """The (segment position, signature, static inputs, XLA options) of every segment
        compiled so far, in compilation order."""
        return list(self._compiled)

    def run(
        self, env: dict[str, Any], compiler_options: Mapping[str, Any] | None = None
    ) -> list[Any]:
        """Evaluate ``wanted`` from ``env`` (inputs, params, constants), learning host nodes.

        Jitted segments compile with the XLA ``compiler_options``.
        """
        options = dict(compiler_options or {})
        while True:
            try:
                scope = dict(env)
                for position, segment in enumerate(self.segments):
                    self._run_segment(position, segment, scope, options)
                return [scope[n] for n in self.wanted]
            except DataDependentShapeError as exc:
                index = getattr(exc, "node_index", None)
                if getattr(exc, "plan", None) is not self.plan or index in self.host_nodes:
                    raise
                self.host_nodes.add(index)
                self._segments = None
                self._compiled.clear()

    def _split(self) -> list[Segment]:
        indices = self.plan.nodes_for(self.wanted)
        groups: list[tuple[bool, list[int]]] = []
        for index in indices:
            host = index in self.host_nodes
            if groups and groups[-1][0] == host and not host:
                groups[-1][1].append(index)
            else:
                groups.append((host, [index]))
        needed_later: set[str] = set(self.wanted)
        segments = []
        for host, group in reversed(groups):
            produced = {out for i in group for out in self.plan.nodes[i].output if out}
            reads = {n for i in group for n in self.plan.node_reads[i]} - produced
            writes = produced & needed_later
            needed_later = (needed_later - produced) | reads
            segments.append(
                Segment(tuple(group), host, tuple(sorted(reads)), tuple(sorted(writes)))
            )
        return segments[::-1]

    def _run_segment(
        self, position: int, segment: Segment, scope: dict[str, Any], options: dict[str, Any]
    ) -> None:
        if segment.host:
            local = self.restore({n: scope[n] for n in segment.reads if n in scope})
            self.interpreter.run_nodes(self.plan, local, segment.indices)
            scope.update({n: local[n] for n in segment.writes})
            return
        static = {n: scope[n] for n in segment.reads if n in scope and _is_host_value(scope[n])}
        dynamic = {n: scope[n] for n in segment.reads if n in scope and n not in static}
        key = (
            position,
            _signature(dynamic),
            _static_key(static, self.plan.constants),
            tuple(sorted(options.items())),
        )
        compiled = self._compiled.get(key)
        if compiled is None:
            recorded: dict[str, Any] = {}
            function = jax.jit(
                self._segment_function(segment, static, recorded), compiler_options=options or None
            )
            compiled = self._compiled[key] = (function, recorded)
        function, recorded = compiled
        scope.update(function(dynamic))
        scope.update(recorded)

    def _segment_function(
        self, segment: Segment, static: Mapping[str, Any], recorded: dict[str, Any]
    ):
        def run(dynamic: dict[str, Any]) -> dict[str, Any]:
            local = {**static, **self.restore(dynamic)}
            self.interpreter.run_nodes(self.plan, local, segment.indices)
            out = {}
            for name in segment.writes:
                value = local[name]
                # Static results depend only on shapes and constants, both fixed by the cache
                # key, so recording them once at trace time holds for every later call.
                if _is_host_value(value):
                    recorded[name] = value
                else:
                    out[name] = value
            return out

        return run


def _is_host_value(value: Any) -> bool:
    """Values that stay outside the jitted function: static arrays, strings, empty inputs."""
    return is_static(value) or isinstance(value, str)


def _signature(values: Mapping[str, Any]) -> tuple:
    leaves, tree = jax.tree_util.tree_flatten(values)
    return (tree, tuple((np.shape(v), str(getattr(v, "dtype", type(v)))) for v in leaves))


def _static_key(values: Mapping[str, Any], constants: Mapping[str, Any]) -> tuple:
    """Identify static inputs by content; the plan's own constants by name (they never change)."""
    key = []
    for name, value in sorted(values.items()):
        if constants.get(name) is value:
            key.append((name, "constant"))
            continue
        digest = hashlib.sha1()
        for leaf in jax.tree_util.tree_leaves(value):
            array = np.asarray(leaf)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes() if array.dtype != object else repr(array).encode())
        key.append((name, digest.hexdigest()))
    return tuple(key)
