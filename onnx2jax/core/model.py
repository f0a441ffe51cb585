"""The user-facing :class:`Model`: a pure ``apply`` function plus a pytree of weights.

The model holds the graph, its params and ``apply``; the program ``model(...)`` compiles
(weight layouts, native-kernel rewrites, XLA options, devices, segments, the executable cache)
is its :attr:`Model.engine`, an :class:`onnx2jax.runtime.engine.Engine`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from jax.sharding import Mesh, NamedSharding

from onnx2jax import ops  # noqa: F401  (registers every op family)
from onnx2jax.core import export
from onnx2jax.core.convert import Interpreter
from onnx2jax.core.errors import InputError
from onnx2jax.core.graph import (
    GraphPlan,
    TensorInfo,
    find_unsupported,
    model_opsets,
    plan_graph,
)
from onnx2jax.core.loader import ModelSource, mapped_tensor, read_model
from onnx2jax.core.sharding import (
    Sharding,
    annotated_sharding,
    default_mesh,
    param_specs,
    place_params,
)
from onnx2jax.runtime.engine import Engine, host_only
from onnx2jax.runtime.hostmem import release_free_memory

# Kept importable from here, where they were first defined (docs and users name them so).
from onnx2jax.runtime.options import (  # noqa: F401
    FEW_ROWS,
    default_compiler_options,
    inference_compiler_options,
    input_rows,
    jit_with_options,
    options_outside_traces,
)

Params = dict[str, jax.Array]


class Model:
    """An ONNX model compiled to JAX.

    ``params`` holds the trainable float initializers; ``apply`` is a pure function of them and
    the inputs; calling the model runs ``apply`` with ``params`` under ``jax.jit``.
    ``compiler_options`` are the XLA options that jit compiles with (on the CPU, XLA's YNNPACK
    fusion off); pass them to your own ``jax.jit`` for the same speed:
    ``jax.jit(model.apply, compiler_options=model.compiler_options)``. ``engine`` is the
    compiled side of ``model(...)`` (onnx2jax/runtime/engine.py), for tools that inspect it.
    ``mesh`` is the ``jax.sharding.Mesh`` the params are sharded on when the model was loaded
    with ``mesh`` or ``sharding`` (else ``None``; see :attr:`shardings`, docs/sharding.md).

    Example:
        >>> import numpy as np, onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> out = model(np.zeros((1, 1, 8, 8), np.float32))
        >>> out["logits"].shape
        (1, 10)
    """

    def __init__(
        self,
        proto: onnx.ModelProto | OwnedProto,
        base_dir: Path | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        precision: str = "float32",
        float16_compute: str | None = None,
        mesh: Mesh | None = None,
        sharding: Sharding | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}"
            )
        if float16_compute is None:
            float16_compute = "float32" if jax.default_backend() == "cpu" else "float16"
        if float16_compute not in FLOAT16_COMPUTES:
            raise ValueError(
                f"float16_compute must be one of "
                f"{', '.join(map(repr, FLOAT16_COMPUTES))}, got {float16_compute!r}"
            )
        self._precision = precision
        self._float16_compute = float16_compute
        owns_proto = isinstance(proto, OwnedProto)
        if owns_proto:
            proto = proto.take()
        self.base_dir = base_dir
        self.opsets = model_opsets(proto)
        find_unsupported(proto.graph, self.opsets)
        if sharding is None:  # the model's own annotations (ShardingSpecProto), if any
            mesh, sharding = annotated_sharding(proto, mesh) or (mesh, None)
        sharded = mesh is not None or sharding is not None
        # The mesh params live on (None: each param whole on the default device).
        self.mesh: Mesh | None = (mesh or default_mesh()) if sharded else None
        # Sharded params are read from memory maps of the external data, a shard at a time.
        mapped = {}
        if sharded:
            for tensor in proto.graph.initializer:
                value = mapped_tensor(tensor, base_dir)
                if value is not None:
                    mapped[tensor.name] = value
        self.plan: GraphPlan = plan_graph(proto.graph, self.opsets, base_dir, decoded=mapped)
        # Only the plan holds the maps, so each param's closes once its shards are made.
        mapped_names = set(mapped)
        del mapped
        self._interpreter = Interpreter(
            self.opsets, base_dir, precision, widen_float16=float16_compute == "float32"
        )
        # A proto parsed by load() gives its weight bytes up (the params hold them exactly), so
        # the weights are not in memory twice; to_onnx() and save() put them back. A proto the
        # caller passed in is theirs and stays untouched. This comes before the device copies
        # so that the full proto (and the plan whose nodes belong to it) is freed first.
        released: Mapping[str, Any] = {}
        if owns_proto:
            as_params = {
                k: jax.ShapeDtypeStruct(v.shape, jax.dtypes.canonicalize_dtype(v.dtype))
                for k, v in self.plan.param_values.items()
            }
            proto, released = export.release_weight_bytes(proto, as_params)
            if released:
                # Re-planned on the compact proto, reusing every value decoded already.
                self.plan = plan_graph(
                    proto.graph,
                    self.opsets,
                    base_dir,
                    decoded={**self.plan.constants, **self.plan.param_values},
                )
                # The allocator keeps freed blocks (onnx2jax/runtime/hostmem.py): the file's and the
                # proto's bytes would stay resident under the device copies.
                release_free_memory()
        # Host copies go one by one as the device copies are made (peak: one tensor more).
        # jax.device_put, since jnp.asarray copied a read-only array twice on its first call
        # in a process (benchmarks/LOG.md), and device_put keeps an array that happens to be
        # aligned instead of copying it.
        host = self.plan.param_values
        if self.mesh is None:
            self.params: Params = {k: jax.device_put(host.pop(k)) for k in list(host)}
        else:
            specs = param_specs(self.plan, host, self.mesh, sharding or "replicated")
            self.params = place_params(host, specs, self.mesh)
            # Constants are read whole (shapes, indices); no map of the file stays open.
            for name in mapped_names & set(self.plan.constants):
                self.plan.constants[name] = np.array(self.plan.constants[name])
        jax.block_until_ready(self.params)  # the copies run on XLA's threads; load trims after
        self.released_weights: Params = {k: self.params[k] for k in released}
        self.proto = proto
        # What model(...) compiles and runs: weight layouts, XLA options, jitted functions,
        # devices, segments, the executable cache (onnx2jax/runtime/engine.py).
        self.engine = Engine(self, cache_dir)

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
    def compiler_options(self) -> dict[str, Any]:
        """The XLA options ``model(...)`` compiles with (``model.engine``'s), never JAX's global
        configuration; pass them to your own ``jax.jit`` for the same speed."""
        return self.engine.compiler_options

    @compiler_options.setter
    def compiler_options(self, options: dict[str, Any]) -> None:
        self.engine.compiler_options = options

    @property
    def shardings(self) -> dict[str, NamedSharding] | None:
        """Each param's ``NamedSharding`` on :attr:`mesh` as loaded (``None`` for a model
        loaded without ``mesh`` or ``sharding``); see onnx2jax/core/sharding.py.

        Example:
            >>> import onnx2jax
            >>> onnx2jax.load(onnx2jax.example_path()).shardings is None
            True
        """
        if self.mesh is None:
            return None
        return {k: v.sharding for k, v in self.params.items()}

    @property
    def interpreter(self) -> Interpreter:
        """The interpreter that runs the graph's nodes (onnx2jax/core/convert.py)."""
        return self._interpreter

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
        lines.append(f"  params {len(self.params)} tensors, {count:,} values, {size / 1e6:.1f} MB")
        return "\n".join(lines) + "\n)"

    # ---------------------------------------------------------------- running
    def apply(
        self,
        params: Mapping[str, Any],
        *inputs: Any,
        outputs: Sequence[str] | None = None,
        **named_inputs: Any,
    ) -> dict[str, Any]:
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
        return self.apply_plan(self.plan, params, bound, _as_tuple(outputs))

    def __call__(
        self, *inputs: Any, outputs: Sequence[str] | None = None, **named_inputs: Any
    ) -> dict[str, Any]:
        """Run with :attr:`params`, jit-compiled and cached per input shapes and dtypes.

        A model whose graph needs values that depend on the data (NonZero, Unique, a Reshape
        to a computed shape...) is cut into jit-compiled segments around those nodes, which run
        outside jit; each segment is compiled once per signature and cached.

        Map outputs (ZipMap's list of dicts) hold Python ints, strings and floats, as in
        onnxruntime; :meth:`apply` keeps them JAX arrays, so it stays differentiable.

        A model loaded with a ``mesh`` or ``sharding`` runs ``apply`` under ``jax.jit`` with
        its params where they are (the engine's native kernels and batch split have no
        sharding rule), with :attr:`compiler_options`.
        """
        bound = self.bind_inputs(inputs, named_inputs)
        if self.mesh is not None:
            return self.engine.run_xla(bound, _as_tuple(outputs))
        return self.engine.run(bound, _as_tuple(outputs))

    def apply_plan(
        self,
        plan: GraphPlan,
        params: Mapping[str, Any],
        bound: Mapping[str, Any],
        outputs: tuple[str, ...] | None,
    ) -> dict[str, Any]:
        """:meth:`apply` of checked inputs ``bound`` through ``plan``: :attr:`plan`, or the
        engine's rewrite of it (onnx2jax.runtime.fusion), which computes the same outputs."""
        wanted = list(outputs) if outputs else self.output_names
        env = self.environment(params, bound, wanted)
        values = self._interpreter.run(plan, env, wanted)
        return self.collect_outputs(wanted, values)

    def collect_outputs(self, names: Sequence[str], values: Sequence[Any]) -> dict[str, Any]:
        """The result dict of computed ``values`` of ``names``, each in its ONNX type."""
        # An OrderedDict, since jax.jit rebuilds a plain dict with its keys sorted: outputs
        # keep the declared (or asked) order through model(...) and the user's own jit.
        return OrderedDict(
            (name, self._in_onnx_dtype(name, _as_output(v)))
            for name, v in zip(names, values, strict=True)
        )

    def _in_onnx_dtype(self, name: str, value: Any) -> Any:
        """An output held widened in float32 back in its ONNX type, float16."""
        return self._interpreter.narrow(self.plan, name, value)

    def environment(
        self, params: Mapping[str, Any], bound: Mapping[str, Any], wanted: Sequence[str]
    ) -> dict[str, Any]:
        """Constants, params and inputs by name; checks that ``wanted`` names real tensors."""
        widen = self._interpreter.widen
        env: dict[str, Any] = {k: widen(v, k) for k, v in self.plan.constants.items()}
        env.update({k: widen(jnp.asarray(v), k) for k, v in params.items()})
        env.update({k: widen(_as_jax(v), k) for k, v in bound.items()})
        unknown = [n for n in wanted if n not in env and n not in self.plan.producer]
        if unknown:
            raise InputError(
                f"no tensor named {unknown[0]!r} in the model; model.tensor_names() lists "
                "the names that can be read"
            )
        return env

    # ---------------------------------------------------------------- export
    def to_onnx(self, params: Mapping[str, Any] | None = None) -> onnx.ModelProto:
        """The original proto with ``params`` written into its initializers (core/export.py).

        Example:
            >>> import onnx2jax
            >>> model = onnx2jax.load(onnx2jax.example_path())
            >>> model.to_onnx().graph.node[0].op_type
            'Conv'
        """
        return export.to_onnx(self, params)

    def save(
        self,
        path: str | os.PathLike,
        params: Mapping[str, Any] | None = None,
        *,
        external_data: bool = False,
        verify: bool | Mapping[str, Any] = False,
    ) -> export.Verification | None:
        """Write the model with ``params`` to ``path`` atomically (see onnx2jax.core.export.save).

        With ``verify`` it returns an ``onnx2jax.core.export.Verification`` of the saved file.

        Example:
            >>> import os, tempfile, onnx2jax
            >>> model = onnx2jax.load(onnx2jax.example_path())
            >>> model.save(os.path.join(tempfile.mkdtemp(), "copy.onnx"), verify=True).worst < 1e-5
            True
        """
        return export.save(self, path, params, external_data=external_data, verify=verify)

    # ---------------------------------------------------------------- compiled program
    def inference_function(
        self, bound: Mapping[str, Any]
    ) -> tuple[Any, dict[str, Any], frozenset[str]]:
        """The jitted function ``model(...)`` uses for these inputs, its XLA options and the
        kinds of native kernels it calls (see :meth:`Engine.inference_function
        <onnx2jax.runtime.engine.Engine.inference_function>`)."""
        return self.engine.inference_function(bound)

    def split_devices(self, bound: Mapping[str, Any]) -> list[jax.Device]:
        """The CPU devices ``model(...)`` splits these inputs' batch over ([]: one device; see
        :meth:`Engine.split_devices <onnx2jax.runtime.engine.Engine.split_devices>`)."""
        return self.engine.split_devices(bound)

    # ---------------------------------------------------------------- checks
    def _check_params(self, params: Mapping[str, Any]) -> None:
        if not isinstance(params, Mapping):
            raise InputError(
                "apply() takes the params dict first, e.g. model.apply(model.params, x)"
            )
        missing = [k for k in self.params if k not in params]
        unknown = [k for k in params if k not in self.params]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} (first: {missing[:3]})")
            if unknown:
                parts.append(f"unknown {len(unknown)} (first: {unknown[:3]})")
            raise InputError(
                "params do not match the model: "
                + "; ".join(parts)
                + ". Pass a dict with the same keys as model.params."
            )

    def bind_inputs(self, inputs: Sequence[Any], named: Mapping[str, Any]) -> dict[str, Any]:
        """Match positional and named inputs to the graph's inputs and check them."""
        infos = self.plan.inputs
        declared = self._declared_inputs()
        if not named and len(inputs) == len(declared) == len(infos):
            # Every input by position (the common call): nothing to match by name.
            return {
                name: _checked_input(info, dtype, value)
                for (name, (info, dtype)), value in zip(declared.items(), inputs, strict=True)
            }
        if len(inputs) > len(infos):
            raise InputError(
                f"the model takes {len(infos)} input(s) {self.input_names}, "
                f"got {len(inputs)} positional"
            )
        bound = {info.name: value for info, value in zip(infos, inputs, strict=False)}
        for name, value in named.items():
            if name not in declared:
                raise InputError(
                    f"unknown input {name!r}; the model's inputs are {self.input_names}"
                )
            if name in bound:
                raise InputError(f"input {name!r} given both by position and by name")
            bound[name] = value
        if len(bound) < len(declared):
            missing = [n for n in declared if n not in bound]
            expected = ", ".join(i.describe() for i in infos if i.name in missing)
            raise InputError(f"missing input(s): {expected}")
        return {
            name: _checked_input(info, dtype, bound[name])
            for name, (info, dtype) in declared.items()
        }

    def _declared_inputs(self) -> dict[str, tuple[TensorInfo, np.dtype | None]]:
        """Each graph input's name -> its info and declared dtype, worked out once per plan
        (TensorInfo.dtype converts the ONNX type at every read)."""
        infos = self.plan.inputs
        cached = getattr(self, "_declared", None)
        if cached is None or cached[0] is not infos:
            cached = self._declared = (infos, {i.name: (i, i.dtype) for i in infos})
        return cached[1]


# How matrix products may compute (Model.precision); the first is the default.
PRECISIONS = ("float32", "bfloat16")
# How float16 graphs compute (Model.float16_compute).
FLOAT16_COMPUTES = ("float32", "float16")


def check_input(info: TensorInfo, value: Any) -> Any:
    """Validate ``value`` against the declared type of input ``info``; cast within a kind.

    Example:
        >>> import numpy as np, onnx2jax
        >>> info = onnx2jax.load(onnx2jax.example_path()).inputs[0]
        >>> check_input(info, np.zeros((2, 1, 8, 8), np.float64)).dtype
        dtype('float32')
    """
    return _checked_input(info, info.dtype, value)


def _checked_input(info: TensorInfo, expected: np.dtype | None, value: Any) -> Any:
    """:func:`check_input` with the declared dtype ``expected`` (``info.dtype``) given."""
    if info.kind != "tensor":
        return value
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        try:
            value = np.asarray(value)
        except (ValueError, TypeError) as exc:  # ragged nested lists, mixed types
            raise InputError(
                f"input {info.name!r} ({info.describe()}) cannot be read as an array: {exc}"
            ) from None
    if expected is not None and value.dtype != expected:
        if _dtype_kind(value.dtype) != _dtype_kind(expected):
            raise InputError(
                f"input {info.name!r} expects {info.describe()}, got dtype {value.dtype}"
            )
        if isinstance(value, np.ndarray):
            value = value.astype(expected)
        elif value.dtype != jax.dtypes.canonicalize_dtype(expected):
            value = jnp.asarray(value).astype(jax.dtypes.canonicalize_dtype(expected))
    if info.shape is not None:
        if len(value.shape) != len(info.shape):
            raise InputError(
                f"input {info.name!r} expects {len(info.shape)} dims "
                f"({info.describe()}), got shape {tuple(value.shape)}"
            )
        for axis, (want, got) in enumerate(zip(info.shape, value.shape, strict=True)):
            if isinstance(want, int) and want > 0 and want != got:
                raise InputError(
                    f"input {info.name!r} expects size {want} on axis {axis} "
                    f"({info.describe()}), got shape {tuple(value.shape)}"
                )
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


def _as_output(value: Any) -> Any:
    if isinstance(value, list):
        return [_as_output(v) for v in value]
    if isinstance(value, np.ndarray) and not host_only(value):
        return jnp.asarray(value)
    return value


def _as_tuple(outputs: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if outputs is None:
        return None
    if isinstance(outputs, str):
        return (outputs,)
    return tuple(outputs)


def load(
    source: ModelSource | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    precision: str = "float32",
    float16_compute: str | None = None,
    mesh: Mesh | None = None,
    sharding: Sharding | None = None,
) -> Model:
    """Load an ONNX model from a path, bytes or ``onnx.ModelProto``.

    With ``cache_dir`` (or the ``ONNX2JAX_CACHE_DIR`` environment variable) calling the model
    keeps its compiled executables in that folder, so a later process with the same model and
    input shapes skips tracing and compiling (see :mod:`onnx2jax.runtime.cache`). JAX's own
    configuration is left alone.

    Every operator the model needs is checked at once: a model using ops onnx2jax lacks raises
    :class:`~onnx2jax.core.errors.UnsupportedOpError` listing them all with the nodes that use them.

    ``precision="bfloat16"`` is an opt-in trade of accuracy for speed: matrix products (MatMul,
    Gemm, Einsum) round their float32 operands to bfloat16 and accumulate in float32, which
    XLA's CPU runs at about twice the speed (see :attr:`Model.precision`). The default,
    ``"float32"``, computes every op in the model's own dtypes.

    ``float16_compute`` says how float16 models compute (see :attr:`Model.float16_compute`):
    by default as onnxruntime does on the same device, in float32 on the CPU.

    ``mesh`` and ``sharding`` load the params as sharded ``jax.Array``s on a
    ``jax.sharding.Mesh`` (by default a one-axis ``"data"`` mesh over every device):
    ``sharding`` is a preset (``"replicated"``, the default with a mesh; ``"fsdp"``;
    ``"tensor"``), a list of ``(pattern, PartitionSpec)`` rules over param names, or a function
    of ``(name, shape, dtype)``; each device's shard is read alone, from a memory map of the
    external data when the model has one (onnx2jax/core/sharding.py, docs/sharding.md).

    Example:
        >>> import onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> model.input_names
        ['image']
        >>> onnx2jax.load(onnx2jax.example_path(), precision="bfloat16").precision
        'bfloat16'
    """
    proto, base_dir = read_model(source)
    options = dict(
        cache_dir=cache_dir,
        precision=precision,
        float16_compute=float16_compute,
        mesh=mesh,
        sharding=sharding,
    )
    if isinstance(source, onnx.ModelProto):
        return Model(proto, base_dir, **options)
    owned = OwnedProto(proto)
    del proto
    model = Model(owned, base_dir, **options)
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
