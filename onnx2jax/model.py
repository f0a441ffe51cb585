"""The user-facing :class:`Model`: a pure ``apply`` function plus a pytree of weights."""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx

from onnx2jax import aot, export, native, ops, settings  # noqa: F401  (ops registers every op family)
from onnx2jax.convert import Interpreter
from onnx2jax.devices import place_inputs, replicate, split_devices
from onnx2jax.errors import DataDependentShapeError, InputError
from onnx2jax.fusion import fuse, fuse_attention
from onnx2jax.graph import (
    GraphPlan,
    TensorInfo,
    find_unsupported,
    model_opsets,
    plan_graph,
)
from onnx2jax.hostmem import release_free_memory
from onnx2jax.loader import ModelSource, read_model
from onnx2jax.segments import SegmentedRunner

Params = dict[str, jax.Array]


class Model:
    """An ONNX model compiled to JAX.

    ``params`` holds the trainable float initializers; ``apply`` is a pure function of them and
    the inputs; calling the model runs ``apply`` with ``params`` under ``jax.jit``.
    ``compiler_options`` are the XLA options that jit compiles with (on the CPU, XLA's YNNPACK
    fusion off); pass them to your own ``jax.jit`` for the same speed:
    ``jax.jit(model.apply, compiler_options=model.compiler_options)``.

    Example:
        >>> import numpy as np, onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> out = model(np.zeros((1, 1, 8, 8), np.float32))
        >>> out["logits"].shape
        (1, 10)
    """

    def __init__(self, proto: onnx.ModelProto | OwnedProto, base_dir: Path | None = None, *,
                 cache_dir: str | os.PathLike | None = None, precision: str = "float32",
                 float16_compute: str | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, "
                             f"got {precision!r}")
        if float16_compute is None:
            float16_compute = "float32" if jax.default_backend() == "cpu" else "float16"
        if float16_compute not in FLOAT16_COMPUTES:
            raise ValueError(f"float16_compute must be one of "
                             f"{', '.join(map(repr, FLOAT16_COMPUTES))}, got {float16_compute!r}")
        self._precision = precision
        self._float16_compute = float16_compute
        owns_proto = isinstance(proto, OwnedProto)
        if owns_proto:
            proto = proto.take()
        self.base_dir = base_dir
        self.opsets = model_opsets(proto)
        find_unsupported(proto.graph, self.opsets)
        self.plan: GraphPlan = plan_graph(proto.graph, self.opsets, base_dir)
        self._interpreter = Interpreter(self.opsets, base_dir, precision,
                                        widen_float16=float16_compute == "float32")
        # Names the graph types float16 (see _float16_tensors); found when first needed.
        self._float16_names: set[str] | None = None
        # A proto parsed by load() gives its weight bytes up (the params hold them exactly), so
        # the weights are not in memory twice; to_onnx() and save() put them back. A proto the
        # caller passed in is theirs and stays untouched. This comes before the device copies
        # so that the full proto (and the plan whose nodes belong to it) is freed first.
        released: Mapping[str, Any] = {}
        if owns_proto:
            as_params = {k: jax.ShapeDtypeStruct(v.shape, jax.dtypes.canonicalize_dtype(v.dtype))
                         for k, v in self.plan.param_values.items()}
            proto, released = export.release_weight_bytes(proto, as_params)
            if released:
                # Re-planned on the compact proto, reusing every value decoded already.
                self.plan = plan_graph(proto.graph, self.opsets, base_dir,
                                       decoded={**self.plan.constants, **self.plan.param_values})
                # The allocator keeps freed blocks (onnx2jax/hostmem.py): the file's and the
                # proto's bytes would stay resident under the device copies.
                release_free_memory()
        # Host copies go one by one as the device copies are made (peak: one tensor more).
        # jax.device_put, since jnp.asarray copied a read-only array twice on its first call
        # in a process (a 192 MB weight: 386 MB more resident), and device_put keeps an array
        # that happens to be aligned instead of copying it.
        host = self.plan.param_values
        self.params: Params = {k: jax.device_put(host.pop(k)) for k in list(host)}
        jax.block_until_ready(self.params)  # the copies run on XLA's threads; load trims after
        self.released_weights: Params = {k: self.params[k] for k in released}
        self.proto = proto
        self.compiler_options = default_compiler_options()
        self._jitted = jax.jit(self._apply_for_jit, static_argnames=("outputs",),
                               compiler_options=self.compiler_options or None)
        self._segmented: dict[tuple[str, ...] | None, SegmentedRunner] = {}
        # model(...) keeps Conv weights pre-transposed to the layout XLA's CPU convolution
        # reads (OIHW -> HWIO); the trace transposes them back, and XLA cancels the pair, so
        # no weight is transposed per call. Values are unchanged; apply() is unaffected.
        self._weight_layouts = _conv_weight_layouts(self.plan.nodes, self.params)
        # With native kernels, the weights they read (these Conv weights and MatMul matrices)
        # are kept in their blocked layout.
        self._native_weights = _native_weights(self.plan.nodes, self.params)
        # Of those, the weights of 3x3 Convs of stride and dilation 1 only, which the native
        # Winograd kernel may compute (native.winograd_applies) from weights kept transformed.
        self._winograd_candidates = _winograd_candidates(self.plan.nodes, self._native_weights)
        # (kinds of native kernels, outputs kept) -> the plan rewritten for them (fusion.py).
        self._fused_plans: dict[tuple[frozenset[str], tuple[str, ...]], GraphPlan] = {}
        # Attention chains that the native attention kernel computes as one node.
        self._has_attention = fuse_attention(self.plan) is not self.plan
        # More of the weights native kernels read are Conv weights than matrices.
        sizes = {kind: sum(int(np.size(self.params[k])) for k, v in self._native_weights.items()
                           if v == kind) for kind in native.KINDS}
        self._convolutional = sizes["conv"] > sizes["matrix"]
        # The kinds of native kernels used (native.KINDS; none: XLA's) -> (the params
        # prepared from, the prepared params).
        self._prepared: dict[frozenset[str], tuple[dict[str, Any], Params]] = {}
        # Kinds of native kernels -> options -> jitted function (see inference_function).
        self._inference_jits: dict[frozenset[str], dict[tuple, Any]] = {}
        # Devices -> (prepared params, their copies on those devices) for split batches.
        self._replicated: dict[tuple, tuple[Params, Params]] = {}
        # Compiled executables on disk (opt-in: cache_dir or $ONNX2JAX_CACHE_DIR).
        directory = aot.resolve_cache_dir(cache_dir)
        self._cache = aot.ExecutableCache(directory) if directory is not None else None

    # ---------------------------------------------------------------- description
    @property
    def precision(self) -> str:
        """How matrix products compute: ``"float32"`` (exact) or ``"bfloat16"`` (opt-in).

        Under ``"bfloat16"`` the float32 operands of MatMul, Gemm and Einsum are rounded to
        bfloat16 and their products accumulate in float32; every other op, convolutions
        included, stays float32. Fixed at load: ``onnx2jax.load(path, precision="bfloat16")``.
        """
        return self._precision

    @property
    def float16_compute(self) -> str:
        """How float16 graphs compute: ``"float32"`` or ``"float16"``.

        Under ``"float32"`` (the default on the CPU) every float16 value (weights, inputs,
        each op's result) is held in float32 between ops, as onnxruntime's CPU provider runs
        float16 models: its kernels are float32 and it removes the casts between them. Only
        the graph's own ``Cast`` nodes round, and outputs leave as float16. Under ``"float16"``
        (the default on GPUs and TPUs, as their runtimes do) each op rounds its result to
        float16. Fixed at load: ``onnx2jax.load(path, float16_compute="float16")``.
        """
        return self._float16_compute

    @property
    def inputs(self) -> list[TensorInfo]:
        return list(self.plan.inputs)

    @property
    def outputs(self) -> list[TensorInfo]:
        return list(self.plan.outputs)

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.plan.inputs]

    @property
    def output_names(self) -> list[str]:
        """The graph's outputs in their declared order, each name once (the results are dicts,
        so a name the graph declares twice is one entry, at its first place)."""
        return list(dict.fromkeys(v.name for v in self.plan.outputs))

    def tensor_names(self) -> list[str]:
        """Every tensor a node produces, in execution order: valid names for ``outputs=``."""
        return [out for node in self.plan.nodes for out in node.output if out]

    def __repr__(self) -> str:
        count = sum(int(np.prod(p.shape)) for p in self.params.values())
        size = sum(p.nbytes for p in self.params.values())
        opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(self.opsets.items()))
        lines = ["onnx2jax.Model("]
        lines += [f"  input  {v.describe()}" for v in self.plan.inputs]
        lines += [f"  output {v.describe()}" for v in self.plan.outputs]
        lines.append(f"  opsets {opsets}")
        lines.append(f"  nodes  {len(self.plan.nodes)}")
        lines.append(f"  params {len(self.params)} tensors, {count:,} values, "
                     f"{size / 1e6:.1f} MB")
        return "\n".join(lines) + "\n)"

    # ---------------------------------------------------------------- running
    def apply(self, params: Mapping[str, Any], *inputs: Any,
              outputs: Sequence[str] | None = None, **named_inputs: Any) -> dict[str, Any]:
        """Run the graph with ``params``: pure, so ``jax.jit``, ``jax.grad`` and ``jax.vmap`` work.

        Inputs are given by position (in :attr:`input_names` order) or by name. ``outputs``
        may name any tensor of the graph, intermediate ones included; by default the graph's
        outputs. Returns an ordered dict from output name to array, in the order of
        ``outputs`` (by default :attr:`output_names`), which ``jax.jit`` keeps.

        Example:
            >>> import jax, numpy as np, onnx2jax
            >>> model = onnx2jax.load(onnx2jax.example_path())
            >>> x = np.zeros((2, 1, 8, 8), np.float32)
            >>> jax.jit(model.apply)(model.params, x)["logits"].shape
            (2, 10)
        """
        self._check_params(params)
        bound = self.bind_inputs(inputs, named_inputs)
        return self._apply_bound(params, bound, _as_tuple(outputs))

    def __call__(self, *inputs: Any, outputs: Sequence[str] | None = None,
                 **named_inputs: Any) -> dict[str, Any]:
        """Run with :attr:`params`, jit-compiled and cached per input shapes and dtypes.

        A model whose graph needs values that depend on the data (NonZero, Unique, a Reshape
        to a computed shape...) is cut into jit-compiled segments around those nodes, which run
        outside jit; each segment is compiled once per signature and cached.

        Map outputs (ZipMap's list of dicts) hold Python ints, strings and floats, as in
        onnxruntime; :meth:`apply` keeps them JAX arrays, so it stays differentiable.
        """
        bound = self.bind_inputs(inputs, named_inputs)
        wanted = _as_tuple(outputs)
        runner = self._segmented.get(wanted)
        if runner is None and not any(_host_only(v) for v in bound.values()):
            try:
                if self._cache is not None:
                    return _runtime_types(aot.cached_call(self, self._cache, bound, wanted))
                function, _, kernels = self.inference_function(bound)
                params, placed, _ = self._placed(bound, kernels)
                return _runtime_types(function(params, placed, outputs=wanted))
            except DataDependentShapeError:
                pass
        if runner is None:
            names = list(wanted) if wanted else self.output_names
            runner = self._segmented[wanted] = SegmentedRunner(
                self.plan, self._interpreter, names, restore=self._restore_layouts)
        # The segments run the program model(...) would: prepared params, the same options.
        env = self._environment(self._inference_params(), bound, runner.wanted)
        options = inference_compiler_options(bound, self.compiler_options, self.precision)
        values = runner.run(env, options)
        return _runtime_types(OrderedDict(
            (name, self._in_onnx_dtype(name, _as_output(v)))
            for name, v in zip(runner.wanted, values, strict=True)))

    def _apply_bound(self, params: Mapping[str, Any], bound: Mapping[str, Any],
                     outputs: tuple[str, ...] | None,
                     kernels: frozenset[str] = frozenset()) -> dict[str, Any]:
        wanted = list(outputs) if outputs else self.output_names
        env = self._environment(params, bound, wanted)
        plan = self._fused_plan(kernels, tuple(wanted)) if kernels else self.plan
        values = self._interpreter.run(plan, env, wanted)
        # An OrderedDict, since jax.jit rebuilds a plain dict with its keys sorted: outputs
        # keep the declared (or asked) order through model(...) and the user's own jit.
        return OrderedDict((name, self._in_onnx_dtype(name, _as_output(v)))
                           for name, v in zip(wanted, values, strict=True))

    def _in_onnx_dtype(self, name: str, value: Any) -> Any:
        """An output held widened in float32 back in its ONNX type, float16."""
        if (getattr(value, "dtype", None) != np.float32 or not self._interpreter.widen_float16
                or not (name in self._interpreter.float16_names
                        or name in self._float16_tensors())):
            return value
        return value.astype(np.float16)

    def _float16_tensors(self) -> set[str]:
        """Names the graph types float16: declared, else found by ONNX's shape inference (an
        op computing in float32 on widened inputs no longer shows it)."""
        if self._float16_names is None:
            typed = {info.name: info.elem_type for info in (
                *self.plan.inputs, *self.plan.outputs, *self.plan.value_info.values())
                if info.elem_type}
            if any(name not in typed for name in self.tensor_names()):
                try:
                    graph = onnx.shape_inference.infer_shapes(self.proto).graph
                    inferred = [*graph.value_info, *graph.output]
                except Exception:  # a graph ONNX cannot type: the declared types only
                    inferred = []
                typed.update((v.name, v.type.tensor_type.elem_type) for v in inferred
                             if v.type.HasField("tensor_type") and v.name not in typed)
            self._float16_names = {name for name, elem in typed.items()
                                   if elem == onnx.TensorProto.FLOAT16}
        return self._float16_names

    def _environment(self, params: Mapping[str, Any], bound: Mapping[str, Any],
                     wanted: Sequence[str]) -> dict[str, Any]:
        """Constants, params and inputs by name; checks that ``wanted`` names real tensors."""
        widen = self._interpreter.widen
        env: dict[str, Any] = {k: widen(v, k) for k, v in self.plan.constants.items()}
        env.update({k: widen(jnp.asarray(v), k) for k, v in params.items()})
        env.update({k: widen(_as_jax(v), k) for k, v in bound.items()})
        unknown = [n for n in wanted if n not in env and n not in self.plan.producer]
        if unknown:
            raise InputError(
                f"no tensor named {unknown[0]!r} in the model; model.tensor_names() lists "
                "the names that can be read")
        return env

    # ---------------------------------------------------------------- export
    def to_onnx(self, params: Mapping[str, Any] | None = None) -> onnx.ModelProto:
        """The original proto with ``params`` written into its initializers (see onnx2jax.export).

        Example:
            >>> import onnx2jax
            >>> model = onnx2jax.load(onnx2jax.example_path())
            >>> model.to_onnx().graph.node[0].op_type
            'Conv'
        """
        return export.to_onnx(self, params)

    def save(self, path: str | os.PathLike, params: Mapping[str, Any] | None = None, *,
             external_data: bool = False, verify: bool | Mapping[str, Any] = False
             ) -> export.Verification | None:
        """Write the model with ``params`` to ``path`` atomically (see onnx2jax.export.save).

        With ``verify`` it returns an ``onnx2jax.export.Verification`` of the saved file.

        Example:
            >>> import os, tempfile, onnx2jax
            >>> model = onnx2jax.load(onnx2jax.example_path())
            >>> model.save(os.path.join(tempfile.mkdtemp(), "copy.onnx"), verify=True).worst < 1e-5
            True
        """
        return export.save(self, path, params, external_data=external_data, verify=verify)

    def _fused_plan(self, kernels: frozenset[str], wanted: tuple[str, ...]) -> GraphPlan:
        """The plan rewritten for these kinds of native kernels (onnx2jax.fusion), keeping
        ``wanted``."""
        plan = self._fused_plans.get((kernels, wanted))
        if plan is None:
            plan = self._fused_plans[kernels, wanted] = fuse(self.plan, kernels, wanted)
        return plan

    def _apply_for_jit(self, params: Mapping[str, Any], bound: Mapping[str, Any],
                       outputs: tuple[str, ...] | None,
                       kernels: frozenset[str] = frozenset()) -> dict[str, Any]:
        result = self._apply_bound(params, bound, outputs, kernels)
        for name, value in result.items():
            if _host_only(value):
                # A jitted function cannot return strings; __call__ reruns outside jit.
                kind = getattr(value, "dtype", type(value).__name__)
                raise DataDependentShapeError(
                    f"output {name!r} holds {kind} values, which XLA cannot return")
        return result

    def _inference_params(self, kernels: frozenset[str] = frozenset()) -> Params:
        """:attr:`params` with Conv weights in the layout ``model(...)``'s program reads (with
        these kinds of native ``kernels``); redone for the params that change."""
        cached = self._prepared.get(kernels)
        if (cached is None or cached[0].keys() != self.params.keys()
                or any(cached[0][k] is not v for k, v in self.params.items())):
            before, done = cached or ({}, {})
            layouts = self._layouts(kernels)
            prepared = {k: (done[k] if before.get(k) is v else _prepared_weight(v, layouts[k]))
                        if k in layouts else v for k, v in self.params.items()}
            cached = self._prepared[kernels] = (dict(self.params), prepared)
        return cached[1]

    def _layouts(self, kernels: frozenset[str]) -> dict[str, tuple[int, ...] | str]:
        """Weight -> its prepared layout: a permutation of a Conv's OIHW, or (for the kinds of
        native ``kernels`` used) "conv" or "matrix", onnx2jax.native's blocked layouts, or
        "winograd", its transformed 3x3 weights."""
        if not kernels:
            return self._weight_layouts
        layouts: dict[str, tuple[int, ...] | str] = dict(self._weight_layouts)
        for name, kind in self._native_weights.items():
            if kind not in kernels:
                continue
            shape = np.shape(self.params[name])
            if name in self._winograd_candidates and native.winograd_applies(
                    shape, (1, 1), (1, 1)):
                layouts[name] = "winograd"
            elif (native.weight_block(int(shape[0])) if kind == "conv"
                  else native.matrix_blocked(int(shape[1]))):
                layouts[name] = kind
        return layouts

    def split_devices(self, bound: Mapping[str, Any]) -> list[jax.Device]:
        """The CPU devices ``model(...)`` splits these inputs' batch over ([]: one device).

        Only inputs of many rows are split: few rows are little work, which a split program's
        dispatch to several devices costs more than it saves (the 8x8 example CNN at batch
        8: 0.99 ms a call on one device, 1.25 split over two). Nor is a convolutional network,
        or one with attention, where the native kernels run, which a split program cannot
        call: ResNet-50 b8 took 1.20x onnxruntime's time on one device, 1.31x split over two;
        MiniLM b32 0.96x against 1.03x, ViT-B/16 b8 0.95x against 1.02x.
        """
        native_wins = (self._convolutional or self._has_attention) and native.available()
        if input_rows(bound) <= FEW_ROWS or native_wins:
            return []
        return split_devices(bound)

    def _placed(self, bound: Mapping[str, Any], kernels: frozenset[str] = frozenset()
                ) -> tuple[Params, dict[str, Any], list[jax.Device]]:
        """The params and inputs ``model(...)`` passes to its jitted function (with these kinds
        of native ``kernels``), and the devices they are on: one device ([]), or several CPU
        devices splitting the batch (onnx2jax.devices)."""
        params = self._inference_params(kernels)
        devices = self.split_devices(bound)
        if not devices:
            return params, dict(bound), []
        cached = self._replicated.get(tuple(devices))
        if cached is None or cached[0] is not params:
            copies = replicate(params, devices, *(cached or ()))
            cached = self._replicated[tuple(devices)] = (params, copies)
        return cached[1], place_inputs(bound, devices), devices

    def inference_function(self, bound: Mapping[str, Any]
                           ) -> tuple[Any, dict[str, Any], frozenset[str]]:
        """The jitted function ``model(...)`` uses for these inputs, its XLA options, and the
        kinds of native kernels it calls (onnx2jax/native.py): "conv", "matrix", "attention"."""
        options = inference_compiler_options(bound, self.compiler_options, self.precision)
        kernels: frozenset[str] = frozenset()
        # The kernels have no gradient, batching or sharding rule: inside someone's trace, or
        # for a batch split over devices, the program is XLA's alone.
        if (native.available() and not self.split_devices(bound)
                and not any(isinstance(v, jax.core.Tracer) for v in bound.values())):
            # Native convolutions with their epilogues fused measured faster at every batch
            # (paired with onnxruntime: ResNet-50 b1 1.27x against XLA's 1.61x, b8 1.31x
            # against 1.43x), and so did native attention (MiniLM b32 0.92x against 1.05x, b1
            # 1.14x against 1.19x); native matrix products only for few rows (MiniLM and GPT-2
            # b1).
            used = set(self._native_weights.values())
            if self._has_attention:
                used.add("attention")
            kernels = frozenset(kind for kind in used
                                if kind != "matrix" or input_rows(bound) <= FEW_ROWS)
        function = jit_with_options(
            self._inference_jits.setdefault(kernels, {}),
            functools.partial(self._apply_prepared, native_kernels=kernels), options,
            static_argnames=("outputs",))
        return function, options, kernels

    def _apply_prepared(self, prepared: Mapping[str, Any], bound: Mapping[str, Any],
                        outputs: tuple[str, ...] | None,
                        native_kernels: frozenset[str] = frozenset()) -> dict[str, Any]:
        with native.kernels(native_kernels):
            return self._apply_for_jit(self._restore_layouts(prepared, native_kernels), bound,
                                       outputs, native_kernels)

    def _restore_layouts(self, values: Mapping[str, Any],
                         kernels: frozenset[str] = frozenset()) -> dict[str, Any]:
        """``values`` with prepared weights back in ONNX's layout (under jit, XLA cancels the
        pair with the preparation, or the native kernel reads the prepared weights itself:
        onnx2jax.native._remember)."""
        layouts = self._layouts(kernels)
        return {k: _restored_weight(v, layouts[k], np.shape(self.params[k])) if k in layouts
                else v for k, v in values.items()}

    # ---------------------------------------------------------------- checks
    def _check_params(self, params: Mapping[str, Any]) -> None:
        if not isinstance(params, Mapping):
            raise InputError("apply() takes the params dict first, e.g. "
                             "model.apply(model.params, x)")
        missing = [k for k in self.params if k not in params]
        unknown = [k for k in params if k not in self.params]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} (first: {missing[:3]})")
            if unknown:
                parts.append(f"unknown {len(unknown)} (first: {unknown[:3]})")
            raise InputError("params do not match the model: " + "; ".join(parts)
                             + ". Pass a dict with the same keys as model.params.")

    def bind_inputs(self, inputs: Sequence[Any], named: Mapping[str, Any]) -> dict[str, Any]:
        """Match positional and named inputs to the graph's inputs and check them."""
        infos = self.plan.inputs
        if len(inputs) > len(infos):
            raise InputError(f"the model takes {len(infos)} input(s) {self.input_names}, "
                             f"got {len(inputs)} positional")
        bound = {info.name: value for info, value in zip(infos, inputs, strict=False)}
        for name, value in named.items():
            if name not in self.input_names:
                raise InputError(f"unknown input {name!r}; the model's inputs are "
                                 f"{self.input_names}")
            if name in bound:
                raise InputError(f"input {name!r} given both by position and by name")
            bound[name] = value
        missing = [n for n in self.input_names if n not in bound]
        if missing:
            expected = ", ".join(i.describe() for i in infos if i.name in missing)
            raise InputError(f"missing input(s): {expected}")
        return {info.name: check_input(info, bound[info.name]) for info in infos}


def _prepared_weight(value: Any, layout: tuple[int, ...] | str) -> Any:
    """``value`` in ``layout`` (see Model._layouts); by NumPy when it is in host memory. An XLA
    transpose per weight shape is a compilation each: ResNet-50's 53 Conv weights took 1.22 s
    on its first call, NumPy 0.16 s."""
    def arrange(array: Any) -> Any:
        if layout == "conv":
            return native.blocked_weights(array)
        if layout == "matrix":
            return native.blocked_matrix(array)
        if layout == "winograd":
            return native.winograd_weights(array)
        return array.transpose(layout)

    if not isinstance(value, jax.Array):
        return jnp.asarray(np.ascontiguousarray(arrange(np.asarray(value))))
    (device, *others) = value.devices()
    if device.platform == "cpu" and not others:
        return jax.device_put(np.ascontiguousarray(arrange(np.asarray(value))), device)
    return arrange(value)


def _restored_weight(value: Any, layout: tuple[int, ...] | str, shape: Sequence[int]) -> Any:
    """``value`` of ``layout`` (_prepared_weight's) back as the param of ``shape``."""
    if layout == "conv":
        return native.unblocked_weights(value)
    if layout == "matrix":
        return native.restored_matrix(value, shape[1])
    if layout == "winograd":
        return native.restored_winograd_weights(value)
    return jnp.transpose(value, np.argsort(layout))


def _conv_weight_layouts(nodes: Sequence[onnx.NodeProto], params: Mapping[str, Any]
                         ) -> dict[str, tuple[int, ...]]:
    """Params used as the weight of an ai.onnx Conv, with the permutation OIHW... -> HW...IO."""
    layouts = {}
    for node in nodes:
        if node.op_type == "Conv" and node.domain in ("", "ai.onnx") and len(node.input) > 1:
            weight = params.get(node.input[1])
            if weight is not None and weight.ndim >= 3:
                layouts[node.input[1]] = (*range(2, weight.ndim), 1, 0)
    return layouts


def _native_weights(nodes: Sequence[onnx.NodeProto], params: Mapping[str, Any]
                    ) -> dict[str, str]:
    """Float32 params that native kernels read, and how: "conv" (the weights of 2-D, one-group
    Convs) or "matrix" (the right operand of MatMul, or of Gemm without transposes or alpha).
    A param with any other use is left out: a blocked weight would be laid out again on every
    call."""
    kinds: dict[str, str] = {}
    other = set()
    for node in nodes:
        attributes = {a.name: a for a in node.attribute}
        for index, name in enumerate(node.input):
            if name not in params:
                continue
            weight = params[name]
            kind = None
            conv = ((node.op_type == "Conv" and node.domain in ("", "ai.onnx"))
                    or (node.op_type == "FusedConv" and node.domain == "com.microsoft"))
            if index == 1 and weight.dtype == np.float32 and (
                    conv or node.domain in ("", "ai.onnx")):
                if (conv and weight.ndim == 4
                        and attributes.get("group", onnx.AttributeProto(i=1)).i == 1):
                    kind = "conv"
                elif weight.ndim == 2 and (node.op_type == "MatMul" or (
                        node.op_type == "Gemm"
                        and not any(attributes[a].i for a in ("transA", "transB")
                                    if a in attributes)
                        and attributes.get("alpha", onnx.AttributeProto(f=1.0)).f == 1.0)):
                    kind = "matrix"
            if kind is None or kinds.get(name, kind) != kind:
                other.add(name)
            else:
                kinds[name] = kind
    return {name: kind for name, kind in kinds.items() if name not in other}


def _winograd_candidates(nodes: Sequence[onnx.NodeProto], native_weights: Mapping[str, str]
                         ) -> set[str]:
    """The "conv" ``native_weights`` that only 3x3 Convs of stride and dilation 1 read."""
    candidates, other = set(), set()
    for node in nodes:
        if len(node.input) < 2 or native_weights.get(node.input[1]) != "conv":
            continue
        attributes = {a.name: list(a.ints) for a in node.attribute}
        if (list(attributes.get("kernel_shape", [3, 3])) == [3, 3]
                and all(v == 1 for v in attributes.get("strides", []))
                and all(v == 1 for v in attributes.get("dilations", []))):
            candidates.add(node.input[1])
        else:
            other.add(node.input[1])
    return candidates - other


def default_compiler_options() -> dict[str, Any]:
    """XLA options for the models' own jit (never JAX's global configuration).

    On CPU, XLA 0.10 hands dots and convolutions to YNNPACK by default; XLA's own kernels
    (Eigen) are faster on whole models (measured in benchmarks/: MiniLM b32 s128 853 -> 667 ms,
    ResNet-50 b8 737 -> 562 ms on 2 AMD EPYC cores, same outputs), so the YNNPACK fusion is
    turned off. ``ONNX2JAX_TUNE_XLA=0`` keeps XLA's defaults.
    """
    if not settings.tune_xla() or jax.default_backend() != "cpu":
        return {}
    return {"xla_cpu_experimental_ynn_fusion_type": ""}


# How matrix products may compute (Model.precision); the first is the default.
PRECISIONS = ("float32", "bfloat16")
# How float16 graphs compute (Model.float16_compute).
FLOAT16_COMPUTES = ("float32", "float16")

# Inputs with at most this many rows run their matmuls through YNNPACK: measured faster for
# few rows (GPT-2 b1 s128) and slower for many (MiniLM b32 s128), see benchmarks/README.md.
# Only inputs of more rows split their batch over several CPU devices. Rows: input_rows.
FEW_ROWS = 1024


def input_rows(bound: Mapping[str, Any]) -> int:
    """The most rows a matrix product of these inputs may have: the tokens of an integer input
    (every element), else all dimensions of an input but the last."""
    rows = [int(np.prod(v.shape if np.issubdtype(v.dtype, np.integer) else v.shape[:-1]))
            for v in bound.values() if hasattr(v, "shape") and hasattr(v, "dtype")]
    return max(rows, default=0)


def inference_compiler_options(bound: Mapping[str, Any], options: dict[str, Any],
                               precision: str = "float32") -> dict[str, Any]:
    """``options``, with YNNPACK dots switched on for few rows or bfloat16 products.

    XLA's own (Eigen) dots compute bfloat16 no faster than float32; YNNPACK's run it at about
    twice the speed (measured in benchmarks/README.md).
    """
    if options.get("xla_cpu_experimental_ynn_fusion_type") != "":
        return options
    if precision == "bfloat16" or input_rows(bound) <= FEW_ROWS:
        return {**options,
                "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    return options


def jit_with_options(cache: dict[tuple, Any], function: Any, options: Mapping[str, Any],
                     **jit_kwargs: Any) -> Any:
    """``jax.jit(function)`` compiled with ``options``: one per distinct set, kept in ``cache``."""
    key = tuple(sorted(options.items()))
    jitted = cache.get(key)
    if jitted is None:
        jitted = cache[key] = jax.jit(function, compiler_options=dict(options) or None,
                                      **jit_kwargs)
    return jitted


def options_outside_traces(options: Mapping[str, Any], *arguments: Any) -> dict[str, Any]:
    """``options``, or none when an argument is a tracer: the call is then inside someone's jit,
    grad or vmap, where JAX refuses a nested jit with ``compiler_options``."""
    traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(arguments))
    return {} if traced else dict(options)


def check_input(info: TensorInfo, value: Any) -> Any:
    """Validate ``value`` against the declared type of input ``info``; cast within a kind."""
    if info.kind != "tensor":
        return value
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        try:
            value = np.asarray(value)
        except (ValueError, TypeError) as exc:  # ragged nested lists, mixed types
            raise InputError(f"input {info.name!r} ({info.describe()}) cannot be read as an "
                             f"array: {exc}") from None
    expected = info.dtype
    if expected is not None and value.dtype != expected:
        if _dtype_kind(value.dtype) != _dtype_kind(expected):
            raise InputError(f"input {info.name!r} expects {info.describe()}, got dtype "
                             f"{value.dtype}")
        if isinstance(value, np.ndarray):
            value = value.astype(expected)
        elif value.dtype != jax.dtypes.canonicalize_dtype(expected):
            value = jnp.asarray(value).astype(jax.dtypes.canonicalize_dtype(expected))
    if info.shape is not None:
        if len(value.shape) != len(info.shape):
            raise InputError(f"input {info.name!r} expects {len(info.shape)} dims "
                             f"({info.describe()}), got shape {tuple(value.shape)}")
        for axis, (want, got) in enumerate(zip(info.shape, value.shape, strict=True)):
            if isinstance(want, int) and want > 0 and want != got:
                raise InputError(f"input {info.name!r} expects size {want} on axis {axis} "
                                 f"({info.describe()}), got shape {tuple(value.shape)}")
    return value


def _dtype_kind(dtype: Any) -> str:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return "bool"
    if np.issubdtype(dtype, np.integer):
        return "int"
    if np.issubdtype(dtype, np.complexfloating):
        return "complex"
    if dtype.kind in "fV" or np.issubdtype(dtype, np.floating) or "float" in dtype.name:
        return "float"
    return dtype.kind


def _as_jax(value: Any) -> Any:
    if isinstance(value, list):
        return [_as_jax(v) for v in value]
    if value is None or isinstance(value, str | dict):
        return value
    if isinstance(value, np.ndarray) and value.dtype == object:
        return value
    return jnp.asarray(value)


# NumPy dtypes that XLA has no type for (converting them aborts inside XLA, so never try).
_HOST_ONLY_DTYPE_NAMES = {"float6_e2m3fn", "float6_e3m2fn"}


def _host_only(value: Any) -> bool:
    """True for static values JAX cannot hold: strings and types XLA lacks."""
    if isinstance(value, list):
        return any(_host_only(v) for v in value)
    if isinstance(value, dict):  # ONNX maps (ai.onnx.ml CastMap, DictVectorizer)
        return True
    return isinstance(value, np.ndarray) and (
        value.dtype == object or value.dtype.kind in "SU"
        or value.dtype.name in _HOST_ONLY_DTYPE_NAMES)


def _as_output(value: Any) -> Any:
    if isinstance(value, list):
        return [_as_output(v) for v in value]
    if isinstance(value, np.ndarray) and not _host_only(value):
        return jnp.asarray(value)
    return value


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
    if (isinstance(value, np.ndarray | np.generic | jax.Array) and np.ndim(value) == 0
            and not isinstance(value, jax.core.Tracer)):
        value = np.asarray(value).item()
    return value.decode() if isinstance(value, bytes) else value


def _as_tuple(outputs: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if outputs is None:
        return None
    if isinstance(outputs, str):
        return (outputs,)
    return tuple(outputs)


def load(source: ModelSource | os.PathLike, *,
         cache_dir: str | os.PathLike | None = None, precision: str = "float32",
         float16_compute: str | None = None) -> Model:
    """Load an ONNX model from a path, bytes or ``onnx.ModelProto``.

    With ``cache_dir`` (or the ``ONNX2JAX_CACHE_DIR`` environment variable) calling the model
    keeps its compiled executables in that folder, so a later process with the same model and
    input shapes skips tracing and compiling (see :mod:`onnx2jax.aot`). JAX's own
    configuration is left alone.

    Every operator the model needs is checked at once: a model using ops onnx2jax lacks raises
    :class:`~onnx2jax.errors.UnsupportedOpError` listing them all with the nodes that use them.

    ``precision="bfloat16"`` is an opt-in trade of accuracy for speed: matrix products (MatMul,
    Gemm, Einsum) round their float32 operands to bfloat16 and accumulate in float32, which
    XLA's CPU runs at about twice the speed (see :attr:`Model.precision`). The default,
    ``"float32"``, computes every op in the model's own dtypes.

    ``float16_compute`` says how float16 models compute (see :attr:`Model.float16_compute`):
    by default as onnxruntime does on the same device, in float32 on the CPU.

    Example:
        >>> import onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> model.input_names
        ['image']
        >>> onnx2jax.load(onnx2jax.example_path(), precision="bfloat16").precision
        'bfloat16'
    """
    proto, base_dir = read_model(source)
    if isinstance(source, onnx.ModelProto):
        return Model(proto, base_dir, cache_dir=cache_dir, precision=precision,
                     float16_compute=float16_compute)
    owned = OwnedProto(proto)
    del proto
    model = Model(owned, base_dir, cache_dir=cache_dir, precision=precision,
                  float16_compute=float16_compute)
    # The weights' host copies are garbage now, and so are the file's bytes and the full
    # proto where Model did not trim them already: hand their pages back.
    release_free_memory()
    return model


class OwnedProto:
    """A proto parsed by onnx2jax itself, handed to :class:`Model` as its only reference.

    Model frees it (its weight bytes most of all) as soon as the params are decoded, before
    their device copies are made; any reference left in the caller's frame would keep it.
    """

    def __init__(self, proto: onnx.ModelProto):
        self._proto: onnx.ModelProto | None = proto

    def take(self) -> onnx.ModelProto:
        proto, self._proto = self._proto, None
        if proto is None:
            raise ValueError("this OwnedProto was already taken by a Model")
        return proto
