"""Where each param lives on a JAX mesh: presets, rules and callables to ``PartitionSpec``s.

``onnx2jax.load(path, mesh=mesh, sharding=...)`` reads the model's params straight into
sharded ``jax.Array``s: :func:`param_specs` decides each param's ``PartitionSpec`` and
:func:`place_params` builds the arrays with ``jax.make_array_from_callback``, so each device's
shard is read from the host value (a memory map of the external data when the model has one)
without gathering the whole param anywhere. JAX's own sharding does the rest: ``jax.jit``
propagates the params' shardings through ``model.apply``.

``sharding`` is one of

- a preset: ``"replicated"`` (every param whole on every device); ``"fsdp"`` (every param of
  at least :data:`FSDP_MIN_ELEMENTS` values split along its largest axis that the data axis's
  size divides); ``"tensor"`` (Megatron-style: in each pair of weight matrix products found in
  the graph, the first weight is split on its output axis, with its bias, and the second on its
  input axis, over the model axis; see :func:`tensor_parallel_specs`);
- a list of ``(pattern, PartitionSpec | None)`` rules over param names: a string is a glob
  (``fnmatch``), a compiled ``re`` pattern is searched in the name; the first rule that matches
  wins, and a param no rule matches is replicated;
- a callable ``(name, shape, dtype) -> PartitionSpec | None`` (``None``: replicated);
- a dict of param name -> ``PartitionSpec | None`` (a param it lacks is replicated).

Without ``sharding`` (``None``), a model that carries ONNX's own sharding annotations
(``ShardingSpecProto``) is loaded with the specs :func:`annotated_sharding` reads from them.

The data axis of a mesh is its axis named ``"data"``, else its first; the model axis is its
axis named ``"model"``, else its last (one axis for both on a 1-D mesh). The mesh's axes must
be of type ``Auto`` (``jax.make_mesh`` makes ``Explicit`` ones unless told otherwise): XLA
propagates the params' shardings through the graph.

Example:
    >>> import jax, numpy as np, onnx2jax
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> model = onnx2jax.load(onnx2jax.example_path(), mesh=mesh, sharding=[("10.*", P())])
    >>> model.params["10.weight"].sharding.spec
    P()
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import jax
import numpy as np
import onnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from onnx2jax.core.errors import ShardingError
from onnx2jax.core.graph import GraphPlan
from onnx2jax.core.loader import aligned_empty, read_block

Rule = tuple[str | re.Pattern[str], PartitionSpec | None]
SpecFunction = Callable[[str, tuple[int, ...], np.dtype], PartitionSpec | None]
Sharding = str | Sequence[Rule] | SpecFunction | Mapping[str, PartitionSpec | None]
PRESETS = ("replicated", "fsdp", "tensor")
# Params smaller than this stay whole on every device under "fsdp": splitting a bias or a norm's
# scale saves nothing and costs a gather per use.
FSDP_MIN_ELEMENTS = 1024
AUTO = AxisType.Auto


def default_mesh() -> Mesh:
    """A one-axis mesh named ``"data"`` over every device JAX has.

    Example:
        >>> default_mesh().axis_names
        ('data',)
    """
    return Mesh(np.array(jax.devices()), ("data",))


def data_axis(mesh: Mesh) -> str:
    """The mesh axis batches and ``"fsdp"`` split over: ``"data"``, else the first axis.

    Example:
        >>> data_axis(default_mesh())
        'data'
    """
    names = tuple(mesh.axis_names)
    return "data" if "data" in names else names[0]


def model_axis(mesh: Mesh) -> str:
    """The mesh axis ``"tensor"`` splits weights over: ``"model"``, else the last axis.

    Example:
        >>> model_axis(default_mesh())
        'data'
    """
    names = tuple(mesh.axis_names)
    return "model" if "model" in names else names[-1]


def param_specs(
    plan: GraphPlan,
    params: Mapping[str, Any],
    mesh: Mesh,
    sharding: Sharding,
) -> dict[str, PartitionSpec]:
    """The checked ``PartitionSpec`` of every param (``params``: name -> array or anything with
    ``shape`` and ``dtype``) under ``sharding`` on ``mesh``; see the module's docstring.

    Example:
        >>> import numpy as np, onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> specs = param_specs(model.plan, model.params, default_mesh(), "replicated")
        >>> set(specs.values())
        {P()}
    """
    if not isinstance(mesh, Mesh):
        raise ShardingError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    explicit = [n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t != AUTO]
    if explicit:
        # Explicit axes put shardings in the types, and ops would have to say each result's.
        raise ShardingError(
            f"mesh axes {explicit} are not of type Auto; onnx2jax lets XLA propagate shardings: "
            "make the mesh with axis_types=(jax.sharding.AxisType.Auto,) * rank"
        )
    shapes = {k: (tuple(int(d) for d in np.shape(v)), np.dtype(v.dtype)) for k, v in params.items()}
    if isinstance(sharding, str):
        if sharding == "replicated":
            chosen: dict[str, PartitionSpec | None] = {}
        elif sharding == "fsdp":
            size = mesh.shape[data_axis(mesh)]
            chosen = {k: fsdp_spec(s, size, data_axis(mesh)) for k, (s, _) in shapes.items()}
        elif sharding == "tensor":
            chosen = dict(tensor_parallel_specs(plan, shapes, mesh))
        else:
            raise ShardingError(
                f"unknown sharding preset {sharding!r}; the presets are "
                f"{', '.join(map(repr, PRESETS))}, or pass (pattern, PartitionSpec) rules or a "
                "function of (name, shape, dtype)"
            )
    elif callable(sharding):
        chosen = {k: sharding(k, s, d) for k, (s, d) in shapes.items()}
    elif isinstance(sharding, Mapping):
        chosen = {k: sharding.get(k) for k in shapes}
    elif isinstance(sharding, Sequence):
        rules = _checked_rules(sharding)
        chosen = {k: _first_match(rules, k) for k in shapes}
    else:
        raise ShardingError(
            f"sharding must be a preset name, a list of (pattern, PartitionSpec) rules or a "
            f"function of (name, shape, dtype), got {type(sharding).__name__}"
        )
    return {k: checked_spec(k, shapes[k][0], chosen.get(k), mesh) for k in shapes}


def fsdp_spec(shape: tuple[int, ...], size: int, axis: str) -> PartitionSpec | None:
    """``"fsdp"``'s spec for a param of ``shape``: split over ``axis`` (of ``size`` devices)
    along its largest axis that ``size`` divides, when it has :data:`FSDP_MIN_ELEMENTS` values.

    Example:
        >>> fsdp_spec((100, 32), 8, "data")
        P(None, 'data')
        >>> fsdp_spec((32,), 8, "data") is None
        True
    """
    if math.prod(shape) < FSDP_MIN_ELEMENTS or size <= 1:
        return None
    divisible = [i for i, d in enumerate(shape) if d % size == 0]
    if not divisible:
        return None
    best = max(divisible, key=lambda i: (shape[i], -i))
    return PartitionSpec(*(axis if i == best else None for i in range(len(shape))))


def tensor_parallel_specs(
    plan: GraphPlan, shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]], mesh: Mesh
) -> dict[str, PartitionSpec]:
    """``"tensor"``'s specs: Megatron-style splits of the weights of paired matrix products.

    A weight matrix product is a MatMul or Gemm whose second input is a param. Going through
    the graph in order, one that is not already paired looks downstream (through any nodes but
    other weight products) for the nearest weight product its result feeds as the first
    input: the first weight is split on its output axis (its bias, a Gemm's third input or the
    1-D param a following Add adds, with it), the second on its input axis, both over the model
    axis. Several products may feed one second (attention's query, key and value feed its
    output projection). A weight whose axis the model axis's size does not divide, and every
    other param, stays replicated.

    Example:
        >>> import onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> shapes = {k: (v.shape, v.dtype) for k, v in model.params.items()}
        >>> tensor_parallel_specs(model.plan, shapes, default_mesh())
        {}
    """
    axis = model_axis(mesh)
    size = mesh.shape[axis]
    products = {i: w for i, node in enumerate(plan.nodes) if (w := _weight_axes(node, shapes))}
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(plan.nodes):
        for name in node.input:
            readers.setdefault(name, []).append(i)
    firsts: dict[int, int] = {}
    seconds: set[int] = set()
    for i in products:
        if i in seconds or i in firsts:
            continue
        second = _next_product(plan, i, products, readers)
        if second is not None and second not in firsts:
            firsts[i] = second
            seconds.add(second)
    specs: dict[str, PartitionSpec] = {}

    def split(name: str, dim: int) -> None:
        shape = shapes[name][0]
        if name not in specs and shape[dim] % size == 0 and size > 1:
            specs[name] = PartitionSpec(*(axis if d == dim else None for d in range(len(shape))))

    for i in firsts:
        weight, out_axis, _ = products[i]
        split(weight, out_axis)
        for bias in _biases(plan, i, shapes[weight][0][out_axis], shapes, readers):
            split(bias, 0)
    for i in seconds:
        weight, _, in_axis = products[i]
        split(weight, in_axis)
    return specs


def _weight_axes(
    node: onnx.NodeProto, shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]]
) -> tuple[str, int, int] | None:
    """(weight, output axis, input axis) of a MatMul or Gemm whose second input is a param."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        return None
    if len(node.input) < 2 or node.input[1] not in shapes:
        return None
    rank = len(shapes[node.input[1]][0])
    if rank < 2:
        return None
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (node.input[1], 0, 1) if trans_b else (node.input[1], 1, 0)
    return node.input[1], rank - 1, rank - 2


def _next_product(
    plan: GraphPlan, start: int, products: Mapping[int, Any], readers: Mapping[str, list[int]]
) -> int | None:
    """The nearest weight product downstream of node ``start`` that reads the flow as its first
    input, not passing through another weight product."""
    queue = deque(o for o in plan.nodes[start].output if o)
    seen = set(queue)
    while queue:
        tensor = queue.popleft()
        for reader in readers.get(tensor, ()):
            node = plan.nodes[reader]
            if reader in products:
                if node.input[0] == tensor:
                    return reader
                continue
            for out in node.output:
                if out and out not in seen:
                    seen.add(out)
                    queue.append(out)
    return None


def _biases(
    plan: GraphPlan,
    index: int,
    width: int,
    shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    readers: Mapping[str, list[int]],
) -> list[str]:
    """The 1-D params of ``width`` values added to weight product ``index``'s result."""
    node = plan.nodes[index]
    candidates = list(node.input[2:3]) if node.op_type == "Gemm" else []
    for reader in readers.get(node.output[0], ()):
        add = plan.nodes[reader]
        if add.op_type == "Add" and add.domain in ("", "ai.onnx"):
            candidates.extend(n for n in add.input if n != node.output[0])
    return [n for n in candidates if n in shapes and shapes[n][0] == (width,)]


def _checked_rules(rules: Sequence[Any]) -> list[Rule]:
    checked = []
    for position, rule in enumerate(rules):
        if not isinstance(rule, tuple | list) or len(rule) != 2:
            raise ShardingError(
                f"sharding rule {position} is {rule!r}; each rule is a (pattern, PartitionSpec) "
                "pair"
            )
        pattern, spec = rule
        if not isinstance(pattern, str | re.Pattern):
            raise ShardingError(
                f"sharding rule {position}: the pattern {pattern!r} is neither a glob string "
                "nor a compiled regex"
            )
        if spec is not None and not isinstance(spec, PartitionSpec):
            raise ShardingError(
                f"sharding rule {position} ({pattern!r}): {spec!r} is not a "
                "jax.sharding.PartitionSpec (or None for replicated)"
            )
        checked.append((pattern, spec))
    return checked


def _first_match(rules: Sequence[Rule], name: str) -> PartitionSpec | None:
    for pattern, spec in rules:
        if isinstance(pattern, str):
            if fnmatch.fnmatchcase(name, pattern):
                return spec
        elif pattern.search(name):
            return spec
    return None


def checked_spec(
    name: str, shape: tuple[int, ...], spec: PartitionSpec | None, mesh: Mesh
) -> PartitionSpec:
    """``spec`` for param ``name`` of ``shape`` (``None``: replicated), refused with a
    :class:`ShardingError` when it names an axis the mesh lacks, uses an axis twice, has more
    entries than the param has axes, or splits an axis into unequal parts. Trailing ``None``
    entries are dropped.

    Example:
        >>> checked_spec("w", (8, 4), PartitionSpec("data", None), default_mesh())
        P('data',)
    """
    if spec is None:
        return PartitionSpec()
    if not isinstance(spec, PartitionSpec):
        raise ShardingError(
            f"param {name!r}: the sharding gave {spec!r}, not a jax.sharding.PartitionSpec"
        )
    if len(spec) > len(shape):
        raise ShardingError(
            f"param {name!r} of shape {list(shape)} has {len(shape)} axes, but its spec {spec} "
            f"names {len(spec)}"
        )
    used: list[str] = []
    for dim, entry in enumerate(spec):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        for axis in names:
            if axis not in mesh.axis_names:
                raise ShardingError(
                    f"param {name!r}: spec {spec} names mesh axis {axis!r}, but the mesh's axes "
                    f"are {list(mesh.axis_names)}"
                )
            if axis in used:
                raise ShardingError(f"param {name!r}: spec {spec} uses mesh axis {axis!r} twice")
            used.append(axis)
        parts = math.prod(mesh.shape[a] for a in names)
        if shape[dim] % parts:
            raise ShardingError(
                f"param {name!r} of shape {list(shape)}: spec {spec} splits axis {dim} of size "
                f"{shape[dim]} into {parts} parts, which does not divide it"
            )
    # Without trailing Nones, as JAX writes the specs of the arrays jit returns, so that a
    # param's sharding compares equal before and after a train step.
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def place_params(
    host: MutableMapping[str, np.ndarray], specs: Mapping[str, PartitionSpec], mesh: Mesh
) -> dict[str, jax.Array]:
    """Sharded ``jax.Array``s of the host values, each device's shard read from its slice.

    The host values are popped one by one, so only one is referenced at a time. A memory map
    of external data (``np.memmap``) has each shard read from the file alone
    (:func:`~onnx2jax.core.loader.read_block`), only the shards this process holds; every
    shard lands in an aligned array that XLA's CPU client takes as the device buffer itself,
    so a param is in host memory once, not twice while it is copied.

    Example:
        >>> import numpy as np
        >>> mesh = default_mesh()
        >>> out = place_params({"w": np.ones((8, 2), np.float32)}, {"w": PartitionSpec()}, mesh)
        >>> out["w"].sharding.spec
        P()
    """
    placed = {}
    for name in list(host):
        value = host.pop(name)
        dtype = np.dtype(jax.dtypes.canonicalize_dtype(value.dtype))
        shape = tuple(value.shape)
        from_file = isinstance(value, np.memmap) and value.dtype == dtype
        placed[name] = jax.make_array_from_callback(
            shape, NamedSharding(mesh, specs[name]), _shard_reader(value, shape, dtype, from_file)
        )
        del value
    return placed


def _shard_reader(
    value: np.ndarray, shape: tuple[int, ...], dtype: np.dtype, from_file: bool
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    if from_file:
        path, offset = value.filename, value.offset
        return lambda index: read_block(path, offset, shape, dtype, index)

    def copied(index: tuple[slice, ...]) -> np.ndarray:
        part = value[index]
        out = aligned_empty(np.shape(part), dtype)
        out[...] = part
        return out

    return copied


def annotated_sharding(
    proto: onnx.ModelProto, mesh: Mesh | None
) -> tuple[Mesh, dict[str, PartitionSpec]] | None:
    """The mesh and the params' specs that the model's own sharding annotations give (ONNX's
    ``ModelProto.configuration``, ``NodeProto.device_configurations`` and their
    ``ShardingSpecProto``s on initializer inputs), or ``None`` when it has none.

    On ``mesh``, the configuration used is the one of ``mesh.size`` devices; without one, the
    first whose device count JAX has, on a one-axis ``"data"`` mesh of that many devices (with
    too few devices the annotations are ignored, with a warning, as ONNX allows). A
    param axis the annotation splits into ``k`` shards goes over the first unused mesh axis of
    size ``k`` (or all mesh axes, when they make ``k`` together and no other axis is split);
    the placement of each shard follows the mesh's device order, not the annotation's device
    ids. Annotations on activations are left to XLA, pipeline stages ignored. Anything that
    does not fit raises :class:`ShardingError`.

    Example:
        >>> from onnx import helper, numpy_helper
        >>> w = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
        >>> node = helper.make_node("MatMul", ["x", "w"], ["y"])
        >>> spec = node.device_configurations.add(configuration_id="one").sharding_spec.add()
        >>> spec.tensor_name, spec.device[:] = "w", [0]
        >>> spec.sharded_dim.add(axis=0).simple_sharding.add(dim_value=4, num_shards=1)
        ... # doctest: +ELLIPSIS
        dim_value: 4...
        >>> model = helper.make_model(helper.make_graph([node], "g", [], [], initializer=[w]))
        >>> model.configuration.add(name="one", num_devices=1)  # doctest: +ELLIPSIS
        name: "one"...
        >>> annotated_sharding(model, None)[1]
        {'w': P()}
    """
    params = {t.name: tuple(int(d) for d in t.dims) for t in proto.graph.initializer}
    annotations = [
        (node, config)
        for node in proto.graph.node
        for config in node.device_configurations
        if any(spec.tensor_name in params for spec in config.sharding_spec)
    ]
    if not annotations:
        return None
    configurations = {c.name: c.num_devices for c in proto.configuration}
    for node, config in annotations:
        if config.configuration_id not in configurations:
            raise ShardingError(
                f"node {node.name or node.op_type!r} has a sharding annotation for device "
                f"configuration {config.configuration_id!r}, which the model does not declare "
                f"(its configurations: {sorted(configurations)})"
            )
    used = list(dict.fromkeys(config.configuration_id for _, config in annotations))
    if mesh is None:
        count = len(jax.devices())
        fitting = [c for c in used if configurations[c] <= count]
        if not fitting:
            # ONNX lets a backend ignore annotations for devices it does not have; the
            # layout changes no number, so the model loads whole instead.
            warnings.warn(
                f"the model's sharding annotations are for "
                f"{', '.join(f'{c!r} ({configurations[c]} devices)' for c in used)}, but JAX "
                f"has {count} device(s): they are ignored; pass a mesh to use them",
                stacklevel=3,
            )
            return None
        chosen = fitting[0]
        mesh = Mesh(np.array(jax.devices()[: configurations[chosen]]), ("data",))
    else:
        matching = [c for c in used if configurations[c] == mesh.size]
        if not matching:
            raise ShardingError(
                f"the model's sharding annotations are for "
                f"{', '.join(f'{c!r} ({configurations[c]} devices)' for c in used)}, which do "
                f"not fit the mesh of {mesh.size} devices"
            )
        chosen = matching[0]
    specs: dict[str, PartitionSpec] = {}
    for node, config in annotations:
        if config.configuration_id != chosen:
            continue
        for annotation in config.sharding_spec:
            name = annotation.tensor_name
            where = f"node {node.name or node.op_type!r}: the sharding annotation of {name!r}"
            if name not in node.input and name not in node.output:
                raise ShardingError(f"{where} names a tensor the node neither reads nor writes")
            if name not in params:
                continue
            spec = _annotation_spec(annotation, params[name], mesh, configurations[chosen], where)
            if specs.setdefault(name, spec) != spec:
                raise ShardingError(
                    f"{where} asks for {spec} on the mesh, but another node's annotation asks "
                    f"for {specs[name]}"
                )
    return mesh, specs


def _annotation_spec(
    annotation: onnx.ShardingSpecProto,
    shape: tuple[int, ...],
    mesh: Mesh,
    devices: int,
    where: str,
) -> PartitionSpec:
    """The ``PartitionSpec`` on ``mesh`` of one ``ShardingSpecProto`` of a param of ``shape``."""
    splits: dict[int, int] = {}
    for dim in annotation.sharded_dim:
        if not -len(shape) <= dim.axis < len(shape):
            raise ShardingError(f"{where} names axis {dim.axis} of a param of shape {list(shape)}")
        if len(dim.simple_sharding) != 1:
            raise ShardingError(
                f"{where} shards axis {dim.axis} in {len(dim.simple_sharding)} parts (axes "
                "fused by a reshape); onnx2jax reads one simple sharding per axis"
            )
        shards = dim.simple_sharding[0].num_shards
        axis = dim.axis % len(shape)
        if shards < 1 or axis in splits or shape[axis] % shards:
            raise ShardingError(
                f"{where} splits axis {axis} of size {shape[axis]} into {shards} shards"
                + (" twice" if axis in splits else "")
            )
        if shards > 1:
            splits[axis] = shards
    groups = {entry.key: list(entry.value) for entry in annotation.index_to_device_group_map}
    ids = [d for v in annotation.device for d in groups.get(v, [v])]
    if len(annotation.device) != math.prod(splits.values()) or any(
        not 0 <= d < devices for d in ids
    ):
        raise ShardingError(
            f"{where} places {math.prod(splits.values())} shard(s) on devices "
            f"{list(annotation.device)} (groups {groups}), not one device or group per shard "
            f"among the configuration's {devices} devices"
        )
    free = list(mesh.axis_names)
    entries: list[Any] = [None] * len(shape)
    for axis, shards in splits.items():
        if len(splits) == 1 and mesh.size == shards and len(free) > 1:
            entries[axis] = tuple(free)
            continue
        found = next((a for a in free if mesh.shape[a] == shards), None)
        if found is None:
            raise ShardingError(
                f"{where} splits axis {axis} into {shards} shards, but no unused axis of the "
                f"mesh ({dict(mesh.shape)}) has {shards} devices"
            )
        free.remove(found)
        entries[axis] = found
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)
