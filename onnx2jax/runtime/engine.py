"""The program ``model(...)`` compiles and runs: :class:`Engine`.

A :class:`~onnx2jax.model.Model` is the graph, its params and the pure ``apply``; its engine is
everything that makes ``model(...)`` fast and nothing that changes its results:

- the params kept in the layouts the program reads (:mod:`onnx2jax.runtime.layouts`), for XLA
  and for the native kernels (onnx2jax/native/) the inputs call for, and the weights a QDQ
  model's DequantizeLinear nodes compute from fixed integers, dequantized once for the kernels
  that read them;
- the graph rewritten for those kernels (:mod:`onnx2jax.runtime.fusion`): explicit native
  nodes whose inputs are the weights in the kernels' layouts, fed from the prepared params;
- the XLA options of the model and of each input signature (:mod:`onnx2jax.runtime.options`)
  and one jitted function per set of them;
- the batch split over several CPU devices (:mod:`onnx2jax.runtime.devices`);
- the segmented runner for graphs with data-dependent shapes
  (:mod:`onnx2jax.runtime.segments`);
- the executable cache on disk (:mod:`onnx2jax.runtime.cache`).

The engine reads the model through the small interface of :class:`GraphModel` (the
model's public members), so this package never imports :mod:`onnx2jax.model`.
"""

from __future__ import annotations

import functools
import math
import operator
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import onnx

from onnx2jax import native
from onnx2jax.core import settings
from onnx2jax.core.convert import Interpreter
from onnx2jax.core.errors import DataDependentShapeError
from onnx2jax.core.graph import GraphPlan
from onnx2jax.native import layouts as native_layouts
from onnx2jax.ops.native_calls import PRECISION
from onnx2jax.runtime import cache as cache_module
from onnx2jax.runtime.cache import ExecutableCache, model_digest, signature_key
from onnx2jax.runtime.devices import canonical_input, place_inputs, replicate, split_devices
from onnx2jax.runtime.fusion import (
    NativeInput,
    fuse,
    fuse_attention,
    has_nbits_nodes,
    prepared_dequantizations,
)
from onnx2jax.runtime.layouts import (
    Layout,
    conv_weight_layouts,
    dequantized_weight,
    dequantized_weights,
    native_weight_kinds,
    prepared_weight,
    restored_weight,
    winograd_candidates,
)
from onnx2jax.runtime.options import (
    FEW_ROWS,
    default_compiler_options,
    inference_compiler_options,
    input_rows,
    jit_with_options,
    options_outside_traces,
)
from onnx2jax.runtime.segments import SegmentedRunner

Params = dict[str, jax.Array]

# Inputs of at most this many integer or bool elements may be fixed to their values at trace
# time (Engine.run), at most MAX_SPECIALIZATIONS sets of values per input signature.
SMALL_INPUT_SIZE = 8
MAX_SPECIALIZATIONS = 8


class GraphModel(Protocol):
    """What the engine reads of a model (:class:`onnx2jax.model.Model` provides it)."""

    plan: GraphPlan
    params: Params
    proto: onnx.ModelProto

    @property
    def precision(self) -> str: ...

    @property
    def float16_compute(self) -> str: ...

    @property
    def interpreter(self) -> Interpreter: ...

    @property
    def output_names(self) -> list[str]: ...

    def environment(
        self, params: Mapping[str, Any], bound: Mapping[str, Any], wanted: Sequence[str]
    ) -> dict[str, Any]: ...

    def apply_plan(
        self,
        plan: GraphPlan,
        params: Mapping[str, Any],
        bound: Mapping[str, Any],
        outputs: tuple[str, ...] | None,
    ) -> dict[str, Any]: ...

    def collect_outputs(self, names: Sequence[str], values: Sequence[Any]) -> dict[str, Any]: ...


class Engine:
    """The compiled side of a model: what ``model(...)`` runs, with which weights and options.

    Created by the model (``model.engine``). Its caches follow ``model.params``: assigning new
    params prepares their layouts again on the next call, for the params that changed.

    Example:
        >>> import numpy as np, onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> bound = model.bind_inputs((np.zeros((1, 1, 8, 8), np.float32),), {})
        >>> model.engine.run(bound)["logits"].shape
        (1, 10)
        >>> "HloModule" in model.engine.lower(bound).compile().as_text()
        True
    """

    def __init__(self, model: GraphModel, cache_dir: str | os.PathLike | None = None):
        self.model = model
        self.compiler_options: dict[str, Any] = default_compiler_options()
        params = model.params
        nodes = model.plan.nodes
        # model(...) keeps Conv weights pre-transposed to the layout XLA's CPU convolution
        # reads (OIHW -> HWIO); the trace transposes them back, and XLA cancels the pair, so
        # no weight is transposed per call.
        self.weight_layouts: dict[str, tuple[int, ...]] = conv_weight_layouts(nodes, params)
        # Weights that DequantizeLinear nodes compute from values fixed between calls (a QDQ
        # model's): where a native kernel reads one, model(...)'s program takes it dequantized
        # once, in the kernel's layout, and no longer runs the node.
        self.dequantized = dequantized_weights(model.plan, params)
        # Float32 stand-ins of their shape (no memory), for the questions asked of params.
        stand_ins = {
            k: np.broadcast_to(np.float32(0), w.shape) for k, w in self.dequantized.items()
        }
        # With native kernels, the weights they read (these Conv weights and MatMul matrices)
        # are kept in their layouts: name -> "conv" or "matrix".
        # A dequantized weight is held in float32, 4x its int8 source, for as long as the model
        # lives: only a convolution's (a network's weights are small), never a matrix (an int8
        # language model's every weight would be held again at float size).
        self.native_weights: dict[str, str] = {
            name: kind
            for name, kind in native_weight_kinds(model.plan, {**params, **stand_ins}).items()
            if kind == "conv" or name not in self.dequantized
        }
        # Of those, the weights of 3x3 Convs of stride and dilation 1 only, which the native
        # Winograd kernel may compute (native_layouts.winograd_applies) from weights kept
        # transformed.
        self._winograd_candidates = winograd_candidates(nodes, self.native_weights)
        # Every name in the graph: the values native nodes read get names of their own.
        self._names = {*params, *model.plan.constants, *(v.name for v in model.plan.inputs)}
        self._names.update(out for node in nodes for out in node.output)
        # (kinds of native kernels, outputs kept) -> the plan rewritten for them (fusion.py).
        self._fused_plans: dict[tuple[frozenset[str], tuple[str, ...]], GraphPlan] = {}
        # Attention chains that the native attention kernel computes as one node.
        self.has_attention = fuse_attention(model.plan) is not model.plan
        # 4-bit MatMulNBits nodes that the native 4-bit kernel computes.
        self.has_nbits = has_nbits_nodes(model.plan)
        # More of the weights native kernels read are Conv weights than matrices.
        sizes = {
            kind: sum(
                math.prod(self.weight_shape(k)) for k, v in self.native_weights.items() if v == kind
            )
            for kind in native.KINDS
        }
        self.convolutional = sizes["conv"] > sizes["matrix"]
        # The kinds of native kernels used (native.KINDS; none: XLA's) -> (the params
        # prepared from, the prepared params).
        self._prepared: dict[frozenset[str], tuple[dict[str, Any], Params]] = {}
        # Kinds of native kernels -> options -> jitted function (see inference_function).
        self._inference_jits: dict[frozenset[str], dict[tuple, Any]] = {}
        # (kinds of native kernels, fixed input values) -> options -> jitted function, for
        # the programs specialized on small inputs (see run).
        self._static_jits: dict[tuple, dict[tuple, Any]] = {}
        # Options -> the plain program: model.params as they are, XLA's kernels only.
        self._xla_jits: dict[tuple, Any] = {}
        # Devices -> (prepared params, their copies on those devices) for split batches.
        self._replicated: dict[tuple, tuple[Params, Params]] = {}
        # Outputs asked for -> the runner of a graph with data-dependent shapes.
        self._segmented: dict[tuple[str, ...] | None, SegmentedRunner] = {}
        # Per input signature (ready_key), the call run() chose and what it was chosen under,
        # so that a repeated call skips choosing again (see ReadyCall.current).
        self._ready: dict[tuple, ReadyCall] = {}
        # Signatures (ready_key) whose graph traced under jit only with their small inputs'
        # values fixed (control flow on a sample rate or a flag) -> the names of those inputs;
        # their programs in _ready are keyed by the signature and the values.
        self._specialized: dict[tuple, tuple[str, ...]] = {}
        # At most this many programs per such signature, one per set of values: beyond it (a
        # step counter changes every call) the outputs run as segments.
        self.max_specializations = MAX_SPECIALIZATIONS
        # Compiled executables on disk (opt-in: cache_dir or $ONNX2JAX_CACHE_DIR).
        directory = cache_module.resolve_cache_dir(cache_dir)
        self.cache: ExecutableCache | None = (
            ExecutableCache(directory) if directory is not None else None
        )
        self._digest: str | None = None

    # ---------------------------------------------------------------- running
    def run(
        self, bound: Mapping[str, Any], outputs: tuple[str, ...] | None = None
    ) -> dict[str, Any]:
        """What ``model(...)`` returns for checked inputs ``bound`` (see ``Model.bind_inputs``).

        Under jit when the graph allows it (through the executable cache if the model has
        one); else, once a node needs values that depend on the data, as jit-compiled segments
        around the nodes that run outside jit. A signature run under jit before goes straight
        to the same program while nothing it was chosen under changed (:class:`ReadyCall`).
        """
        key = ready_key(bound, outputs)
        small = self._specialized.get(key) if key is not None else None
        if small is not None:
            key = (*key, static_key(bound, small))
        ready = self._ready.get(key) if key is not None else None
        if (
            ready is not None
            and ready.cache is self.cache
            and ready.current(self.model.params, self.compiler_options)
        ):
            # A jitted program returns arrays and lists of them, which _runtime_types keeps.
            return ready(ready.place(bound), outputs)
        runner = self._segmented.get(outputs)
        if runner is None and not any(host_only(v) for v in bound.values()):
            result = self._run_jitted(bound, outputs, key, small)
            if result is not None:
                return _runtime_types(result)
        model = self.model
        if runner is None:
            names = list(outputs) if outputs else model.output_names
            runner = self._segmented[outputs] = SegmentedRunner(
                model.plan, model.interpreter, names, restore=self.restore_layouts
            )
            # These outputs run as segments from now on, whatever the signature.
            self._ready = {k: v for k, v in self._ready.items() if k[0] != outputs}
            self._specialized = {k: v for k, v in self._specialized.items() if k[0] != outputs}
        # The segments run the program model(...) would: prepared params, the same options.
        env = model.environment(self.prepared_params(), bound, runner.wanted)
        options = inference_compiler_options(bound, self.compiler_options, model.precision)
        values = runner.run(env, options)
        return _runtime_types(model.collect_outputs(runner.wanted, values))

    def _run_jitted(
        self,
        bound: Mapping[str, Any],
        outputs: tuple[str, ...] | None,
        key: tuple | None,
        small: tuple[str, ...] | None,
    ) -> dict[str, Any] | None:
        """:meth:`run` under jit, keeping the program for ``key``; None where the graph cannot
        run under jit, even with its small inputs ``small`` fixed to their values."""
        static = None
        if small is not None:
            signature = key[:-1]
            count = sum(1 for k in self._ready if k[:-1] == signature)
            if key not in self._ready and count >= self.max_specializations:
                return None
            static = {name: np.asarray(bound[name]) for name in small}
        try:
            ready, placed = self.ready_call(bound, outputs, static)
            result = ready(placed, outputs)
        except DataDependentShapeError:
            if small is not None or key is None or self.cache is not None:
                return None
            small = small_inputs(bound)
            if not small:
                return None
            # Control flow may test those values (silero-vad's If on its sample rate): each
            # set of them gets a program of its own, with the values fixed at trace time.
            self._specialized[key] = small
            return self._run_jitted(bound, outputs, (*key, static_key(bound, small)), small)
        if key is not None:
            self._ready[key] = ready
        return result

    def ready_call(
        self,
        bound: Mapping[str, Any],
        outputs: tuple[str, ...] | None = None,
        static: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[ReadyCall, dict[str, Any]]:
        """The program ``model(...)`` runs under jit for ``bound`` (compiled through the
        executable cache if the model has one), and ``bound`` placed as it takes them; raises
        :class:`DataDependentShapeError` where the graph cannot run under jit.

        With ``static`` (NumPy values of some inputs) the program is traced with those inputs
        fixed to them, so that control flow on them resolves at trace time; it then takes
        the other inputs' values only, and no executable cache."""
        function, options, kernels = self.inference_function(bound)
        params, placed, devices = self.placed(bound, kernels)
        if static:
            function = jit_with_options(
                self._static_jits.setdefault((kernels, static_key(static, tuple(static))), {}),
                functools.partial(self.apply_static, static=static, native_kernels=kernels),
                options,
                static_argnames=("outputs",),
            )
        elif self.cache is not None:
            function = self.cached_executable(self.cache, bound, outputs)
            placed = {k: canonical_input(v) for k, v in placed.items()}
        # Only inputs of many rows may be split over devices (Engine.split_devices): for few
        # rows the choice does not depend on $ONNX2JAX_SPLIT_BATCH, and a call need not read it.
        read = (settings.split_batch,) if input_rows(bound) > FEW_ROWS else ()
        ready = ReadyCall(
            function,
            params,
            devices,
            cache=self.cache,
            source=dict(self.model.params),
            options=dict(self.compiler_options),
            settings={setting: setting() for setting in read},
        )
        return ready, placed

    def segmented_runner(self, outputs: tuple[str, ...] | None = None) -> SegmentedRunner | None:
        """The segmented runner ``model(...)`` uses for ``outputs``, once a call needed one."""
        return self._segmented.get(outputs)

    def cached_run(
        self,
        cache: ExecutableCache,
        bound: Mapping[str, Any],
        outputs: tuple[str, ...] | None = None,
    ) -> dict[str, Any]:
        """:meth:`run` under jit with the executable read from (or written to) ``cache``."""
        _, _, kernels = self.inference_function(bound)
        params, placed, _ = self.placed(bound, kernels)
        compiled = self.cached_executable(cache, bound, outputs)
        return compiled(params, {k: canonical_input(v) for k, v in placed.items()})

    def cached_executable(
        self,
        cache: ExecutableCache,
        bound: Mapping[str, Any],
        outputs: tuple[str, ...] | None = None,
    ) -> Any:
        """The compiled executable :meth:`cached_run` calls with ``(params, inputs)``, read
        from (or written to) ``cache``."""
        model = self.model
        if self._digest is None:
            self._digest = model_digest(model)
        function, options, kernels = self.inference_function(bound)
        # What model(...) passes to its jitted function; a batch split over devices is a
        # program of its own.
        params, placed, devices = self.placed(bound, kernels)
        key = f"model:{self._digest}|{signature_key((model.params, bound))}|{outputs}|"
        key += str(sorted(options.items())) + "".join(f"|native {kind}" for kind in sorted(kernels))
        key = f"{key}|{signature_key(params)}" + (f"|split over {len(devices)}" if devices else "")
        return cache.compiled(
            key, lambda: function.lower(params, placed, outputs=outputs), devices or None
        )

    def inference_function(
        self, bound: Mapping[str, Any]
    ) -> tuple[Any, dict[str, Any], frozenset[str]]:
        """The jitted function ``model(...)`` uses for these inputs, its XLA options, and the
        kinds of native kernels it calls (onnx2jax/native/): "conv", "matrix", "attention",
        "nbits".

        It takes ``(params, inputs, outputs=...)`` with the params of :meth:`placed`.
        """
        # Inside someone's jit or grad, JAX refuses a nested jit with options.
        options = options_outside_traces(
            inference_compiler_options(bound, self.compiler_options, self.model.precision), bound
        )
        kernels: frozenset[str] = frozenset()
        # The kernels have no gradient, batching or sharding rule: inside someone's trace, or
        # for a batch split over devices, the program is XLA's alone.
        if (
            native.available()
            and not self.split_devices(bound)
            and not any(isinstance(v, jax.core.Tracer) for v in bound.values())
        ):
            # Native convolutions with their epilogues fused measured faster at every batch,
            # and so did native attention; native matrix products only for few rows
            # (benchmarks/LOG.md, "which native kernels model(...) uses"). The kernels compute
            # float32 products: under another precision products and attention are XLA's.
            # The 4-bit kernel's node takes XLA's path itself for more rows than it computes.
            used = set(self.native_weights.values())
            if self.has_attention:
                used.add("attention")
            if self.has_nbits:
                used.add("nbits")
            few_rows = input_rows(bound) <= FEW_ROWS
            float32 = self.model.precision == PRECISION
            kernels = frozenset(
                kind
                for kind in used
                if kind == "conv" or (float32 and (kind in ("attention", "nbits") or few_rows))
            )
        function = jit_with_options(
            self._inference_jits.setdefault(kernels, {}),
            functools.partial(self.apply_prepared, native_kernels=kernels),
            options,
            static_argnames=("outputs",),
        )
        return function, options, kernels

    def lower(self, bound: Mapping[str, Any], outputs: tuple[str, ...] | None = None) -> Any:
        """The :class:`jax.stages.Lowered` program ``model(...)`` runs on ``bound`` (its
        compiled HLO: ``.compile().as_text()``)."""
        function, _, kernels = self.inference_function(bound)
        params, placed, _ = self.placed(bound, kernels)
        return function.lower(params, placed, outputs=outputs)

    def lower_xla(self, bound: Mapping[str, Any], outputs: tuple[str, ...] | None = None) -> Any:
        """The :class:`jax.stages.Lowered` graph on ``model.params`` as they are, XLA's kernels
        only, compiled with :attr:`compiler_options` (for XLA's cost analysis: a native
        kernel's work is invisible to it)."""
        return self._xla_function().lower(self.model.params, bound, outputs=outputs)

    def run_xla(
        self, bound: Mapping[str, Any], outputs: tuple[str, ...] | None = None
    ) -> dict[str, Any]:
        """The graph on ``model.params`` where they are (sharded params stay sharded: XLA
        propagates their shardings), XLA's kernels only, with :attr:`compiler_options`."""
        return self._xla_function()(self.model.params, dict(bound), outputs=outputs)

    def _xla_function(self) -> Any:
        return jit_with_options(
            self._xla_jits, self.apply_for_jit, self.compiler_options, static_argnames=("outputs",)
        )

    def apply_for_jit(
        self,
        params: Mapping[str, Any],
        bound: Mapping[str, Any],
        outputs: tuple[str, ...] | None,
        kernels: frozenset[str] = frozenset(),
        static: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """The graph (rewritten for native ``kernels``) on ONNX-layout ``params``, with the
        values its native nodes read (:meth:`restore_layouts`) and the inputs in ``static``
        fixed to those NumPy values; raises :class:`DataDependentShapeError` for outputs that
        XLA cannot return."""
        model = self.model
        plan = self.fused_plan(kernels, outputs) if kernels else model.plan
        if static:
            wanted = list(outputs) if outputs else model.output_names
            # The environment holds inputs as JAX arrays; NumPy ones are known at trace time.
            env = {**model.environment(params, bound, wanted), **static}
            result = model.collect_outputs(wanted, model.interpreter.run(plan, env, wanted))
        else:
            result = model.apply_plan(plan, params, bound, outputs)
        for name, value in result.items():
            if host_only(value):
                # A jitted function cannot return strings; run() reruns outside jit.
                kind = getattr(value, "dtype", type(value).__name__)
                raise DataDependentShapeError(
                    f"output {name!r} holds {kind} values, which XLA cannot return"
                )
        return result

    def apply_prepared(
        self,
        prepared: Mapping[str, Any],
        bound: Mapping[str, Any],
        outputs: tuple[str, ...] | None,
        native_kernels: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        """The graph rewritten for ``native_kernels`` on params in their prepared layouts
        (:meth:`prepared_params` for those kernels): the body of ``model(...)``'s program."""
        return self.apply_for_jit(
            self.restore_layouts(prepared, native_kernels), bound, outputs, native_kernels
        )

    def apply_static(
        self,
        prepared: Mapping[str, Any],
        bound: Mapping[str, Any],
        outputs: tuple[str, ...] | None,
        static: Mapping[str, np.ndarray],
        native_kernels: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        """:meth:`apply_prepared` with the inputs in ``static`` fixed to those NumPy values
        (the traced ones of those names are not read)."""
        return self.apply_for_jit(
            self.restore_layouts(prepared, native_kernels), bound, outputs, native_kernels, static
        )

    def fused_plan(self, kernels: frozenset[str], outputs: tuple[str, ...] | None) -> GraphPlan:
        """The plan rewritten for these kinds of native kernels (onnx2jax.runtime.fusion),
        keeping ``outputs`` (None: the graph's): its native nodes read the values of
        :meth:`native_inputs`."""
        wanted = tuple(outputs) if outputs else tuple(self.model.output_names)
        plan = self._fused_plans.get((kernels, wanted))
        if plan is None:
            prepared = self.native_inputs(kernels).keys() & self.dequantized.keys()
            plan = self._fused_plans[kernels, wanted] = fuse(
                prepared_dequantizations(self.model.plan, prepared),
                kernels,
                wanted,
                self.native_inputs(kernels),
                self.model.precision,
            )
        return plan

    # ---------------------------------------------------------------- weights
    def prepared_params(self, kernels: frozenset[str] = frozenset()) -> Params:
        """``model.params`` with weights in the layouts ``model(...)``'s program reads (with
        these kinds of native ``kernels``), and the dequantized weights those kernels read
        (:attr:`dequantized`), computed from the params and constants they are dequantized
        from; redone for the params that changed."""
        current = self.model.params
        cached = self._prepared.get(kernels)
        if (
            cached is None
            or cached[0].keys() != current.keys()
            or any(cached[0][k] is not v for k, v in current.items())
        ):
            before, done = cached or ({}, {})
            layouts = self.layouts(kernels)
            prepared = {
                k: (done[k] if before.get(k) is v else prepared_weight(v, layouts[k]))
                if k in layouts
                else v
                for k, v in current.items()
            }
            for name in self.native_inputs(kernels).keys() & self.dequantized.keys():
                weight = self.dequantized[name]
                sources = [n for n in (weight.quantized, weight.scale, weight.zero_point) if n]
                if name in done and all(before.get(n) is current.get(n) for n in sources):
                    prepared[name] = done[name]
                    continue
                constants = self.model.plan.constants
                values = {n: current[n] if n in current else constants[n] for n in sources}
                value = dequantized_weight(weight, values)
                prepared[name] = (
                    prepared_weight(value, layouts[name]) if name in layouts else jnp.asarray(value)
                )
            cached = self._prepared[kernels] = (dict(current), prepared)
        return cached[1]

    def layouts(self, kernels: frozenset[str] = frozenset()) -> dict[str, Layout]:
        """Weight -> its prepared layout: a permutation of a Conv's OIHW, or (for the kinds of
        native ``kernels`` used) one of onnx2jax.native.layouts': "blocked" and "winograd"
        Conv weights, "blocked_matrix" matrices."""
        layouts: dict[str, Layout] = dict(self.weight_layouts)
        for name, native_input in self.native_inputs(kernels).items():
            if native_input.layout == "hwio":  # the permutation XLA's convolutions read too
                layouts[name] = (2, 3, 1, 0)
            elif native_input.layout != "matrix":
                layouts[name] = native_input.layout
        return layouts

    def native_inputs(self, kernels: frozenset[str] = frozenset()) -> dict[str, NativeInput]:
        """The weights the native nodes of these ``kernels`` read, each as the value that holds
        it in the kernel's layout (onnx2jax.runtime.fusion.NativeInput): a name of its own,
        unless the kernel reads the weight as it is (a matrix of whole vectors)."""
        found: dict[str, NativeInput] = {}
        for name, kind in self.native_weights.items():
            if kind not in kernels:
                continue
            shape = self.weight_shape(name)
            if kind == "conv":
                if not native_layouts.conv_applies(shape, 1):
                    continue
                layout = native_layouts.conv_layout(shape)
                if layout == "winograd" and name not in self._winograd_candidates:
                    layout = "blocked"
            else:
                layout = native_layouts.matrix_layout(shape[1])
            value = name if layout == "matrix" else self._own_name(f"{name}:{layout}")
            found[name] = NativeInput(value, layout, shape)
        return found

    def weight_shape(self, name: str) -> tuple[int, ...]:
        """The ONNX shape of a param, or of a weight in :attr:`dequantized`."""
        params = self.model.params
        if name in params:
            return tuple(int(d) for d in np.shape(params[name]))
        return self.dequantized[name].shape

    def _own_name(self, name: str) -> str:
        """``name``, or ``name`` with a suffix, that no value of the graph has."""
        own, count = name, 1
        while own in self._names:
            own, count = f"{name}.{count}", count + 1
        return own

    def restore_layouts(
        self, values: Mapping[str, Any], kernels: frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        """``values`` (prepared params) with prepared weights back in ONNX's layout, and the
        values the native nodes of ``kernels`` read as they are, under their own names
        (:meth:`native_inputs`). Under jit XLA cancels a transposition with the preparation,
        and drops a restored weight only native nodes read."""
        layouts = self.layouts(kernels)
        restored = {
            k: restored_weight(v, layouts[k], self.weight_shape(k)) if k in layouts else v
            for k, v in values.items()
        }
        for name, native_input in self.native_inputs(kernels).items():
            restored[native_input.value] = values[name]
        return restored

    # ---------------------------------------------------------------- devices
    def split_devices(self, bound: Mapping[str, Any]) -> list[jax.Device]:
        """The CPU devices ``model(...)`` splits these inputs' batch over ([]: one device).

        Only inputs of many rows are split: few rows are little work, which a split program's
        dispatch to several devices costs more than it saves. Nor is a model whose convolutions
        or attention a native backend computes, which a split program cannot call: one device
        with the kernels measured faster than a split without them (benchmarks/LOG.md).
        """
        native_wins = (self.convolutional and native.backend("conv") is not None) or (
            self.has_attention and native.backend("attention") is not None
        )
        if input_rows(bound) <= FEW_ROWS or native_wins:
            return []
        return split_devices(bound)

    def placed(
        self, bound: Mapping[str, Any], kernels: frozenset[str] = frozenset()
    ) -> tuple[Params, dict[str, Any], list[jax.Device]]:
        """The params and inputs ``model(...)`` passes to its jitted function (with these kinds
        of native ``kernels``), and the devices they are on: one device ([]), or several CPU
        devices splitting the batch (onnx2jax.runtime.devices)."""
        params = self.prepared_params(kernels)
        devices = self.split_devices(bound)
        if not devices:
            return params, dict(bound), []
        cached = self._replicated.get(tuple(devices))
        if cached is None or cached[0] is not params:
            copies = replicate(params, devices, *(cached or ()))
            cached = self._replicated[tuple(devices)] = (params, copies)
        return cached[1], place_inputs(bound, devices), devices

    def replicas(self) -> dict[tuple[jax.Device, ...], Params]:
        """Devices -> the copies of the prepared params on them, kept for split batches."""
        return {devices: copies for devices, (_, copies) in self._replicated.items()}


class ReadyCall:
    """A program ``model(...)`` chose for one input signature, ready to call again.

    It holds the jitted function (whose C++ dispatch checks the arguments) or the executable
    of ``cache`` (the engine's executable cache, if it has one), the params it takes, and what
    the choice was made under: the params they were prepared from, the model's XLA options and
    the values of the settings (functions of ``onnx2jax.core.settings``) it depended on beyond
    :func:`ready_key`'s, which :meth:`current` compares cheaply (params by identity, without
    hashing one), so that assigned params, options or changed settings are seen.

    Example:
        >>> import numpy as np, onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> bound = model.bind_inputs((np.zeros((1, 1, 8, 8), np.float32),), {})
        >>> ready, placed = model.engine.ready_call(bound)
        >>> ready(placed)["logits"].shape
        (1, 10)
        >>> ready.current(model.params, model.compiler_options)
        True
    """

    def __init__(
        self,
        function: Any,
        params: Params,
        devices: list[jax.Device],
        *,
        cache: ExecutableCache | None,
        source: Mapping[str, Any],
        options: Mapping[str, Any],
        settings: Mapping[Callable[[], Any], Any] | None = None,
    ):
        self.function = function
        self.params = params
        self.devices = devices
        self.cache = cache
        # An executable from the cache, which takes inputs in jit's dtypes only.
        self.compiled = cache is not None
        self.source = dict(source)
        self.options = dict(options)
        self.settings = tuple((settings or {}).items())

    def current(self, params: Mapping[str, Any], options: Mapping[str, Any]) -> bool:
        """Whether ``params`` (the model's now) are the very arrays, under the same names and
        in the same order, the program's params were prepared from, ``options`` the same, and
        the settings it depended on read as they did."""
        source = self.source
        return (
            options == self.options
            and len(params) == len(source)
            and all(map(operator.is_, params.values(), source.values()))
            and all(map(operator.eq, params, source))
            and all(read() == value for read, value in self.settings)
        )

    def place(self, bound: Mapping[str, Any]) -> Mapping[str, Any]:
        """Checked inputs as the program takes them: split over its devices, and in jit's
        dtypes for an executable (which, unlike jit, does not convert them)."""
        placed = place_inputs(bound, self.devices) if self.devices else bound
        if self.compiled:
            return {k: canonical_input(v) for k, v in placed.items()}
        return placed

    def __call__(
        self, placed: Mapping[str, Any], outputs: tuple[str, ...] | None = None
    ) -> dict[str, Any]:
        """Run on inputs from :meth:`place` (``outputs`` as the program was chosen for)."""
        if self.compiled:
            return self.function(self.params, placed)
        return self.function(self.params, placed, outputs=outputs)


def ready_key(bound: Mapping[str, Any], outputs: tuple[str, ...] | None) -> tuple | None:
    """What :meth:`Engine.run`'s choice of program depends on besides the model: the outputs,
    whether native kernels may run (read at each call), and each input's kind, shape and dtype;
    None for inputs that are not plain arrays (sequences, maps, tracers of someone's
    transformation). Settings only some choices depend on are :class:`ReadyCall`'s to check.

    Example:
        >>> import numpy as np
        >>> ready_key({"x": np.zeros((2, 3), np.float32)}, None)[2:]
        ((<class 'numpy.ndarray'>, (2, 3), dtype('float32')),)
    """
    signature = []
    for value in bound.values():
        if isinstance(value, np.ndarray):
            kind: type = np.ndarray
        elif isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
            kind = jax.Array
        else:
            return None
        signature.append((kind, value.shape, value.dtype))
    return (outputs, settings.native_kernels(), *signature)


def small_inputs(bound: Mapping[str, Any]) -> tuple[str, ...]:
    """The names of the inputs in ``bound`` that are small integer or bool arrays (at most
    :data:`SMALL_INPUT_SIZE` elements: a sample rate, a flag), which control flow may test.

    Example:
        >>> import numpy as np
        >>> small_inputs({"x": np.zeros((1, 512), np.float32), "sr": np.array(16000)})
        ('sr',)
    """
    return tuple(
        name
        for name, value in bound.items()
        if isinstance(value, np.ndarray | jax.Array)
        and not isinstance(value, jax.core.Tracer)
        and value.dtype.kind in "biu"
        and value.size <= SMALL_INPUT_SIZE
    )


def static_key(values: Mapping[str, Any], names: tuple[str, ...]) -> tuple[bytes, ...]:
    """The values of inputs ``names`` as a key (their shapes and dtypes are ready_key's).

    Example:
        >>> import numpy as np
        >>> static_key({"sr": np.array(16000, np.int64)}, ("sr",))
        (b'\\x80>\\x00\\x00\\x00\\x00\\x00\\x00',)
    """
    return tuple(np.asarray(values[name]).tobytes() for name in names)


# NumPy dtypes that XLA has no type for (converting them aborts inside XLA, so never try).
_HOST_ONLY_DTYPE_NAMES = {"float6_e2m3fn", "float6_e3m2fn"}


def host_only(value: Any) -> bool:
    """True for static values JAX cannot hold: strings and types XLA lacks (they stay NumPy
    values, computed outside jit)."""
    if isinstance(value, list):
        return any(host_only(v) for v in value)
    if isinstance(value, dict):  # ONNX maps (ai.onnx.ml CastMap, DictVectorizer)
        return True
    return isinstance(value, np.ndarray) and (
        value.dtype == object
        or value.dtype.kind in "SU"
        or value.dtype.name in _HOST_ONLY_DTYPE_NAMES
    )


def _runtime_types(outputs: dict[str, Any]) -> dict[str, Any]:
    """``outputs`` with the map values onnxruntime gives: a map (a ZipMap row, in a list) holds
    Python ints and strings as keys and Python scalars as values, not 0-d arrays. Tensors, and
    sequences of them (lists), stay arrays."""

    def convert(value: Any) -> Any:
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {_python_scalar(k): _python_scalar(v) for k, v in value.items()}
        return value

    if not any(isinstance(v, list | dict) for v in outputs.values()):
        return outputs
    return OrderedDict((name, convert(value)) for name, value in outputs.items())


def _python_scalar(value: Any) -> Any:
    # A tracer (model(...) called inside someone's jit) has no Python value: it stays.
    if (
        isinstance(value, np.ndarray | np.generic | jax.Array)
        and np.ndim(value) == 0
        and not isinstance(value, jax.core.Tracer)
    ):
        value = np.asarray(value).item()
    return value.decode() if isinstance(value, bytes) else value
