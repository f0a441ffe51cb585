"""Writing tuned weights back into the ONNX model: same graph, new initializer values.

:func:`to_onnx` returns a copy of the model's proto in which every initializer named in
``params`` holds the new value, cast back to the initializer's original dtype; everything else
(graph, node order, initializer names and order, metadata, opsets) is the original proto, and a
tensor whose value did not change keeps its original bytes. :func:`save` writes that proto
atomically, with external data when asked or when the model is over 2 GB, and can check the
written file with onnxruntime.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
import onnx
from jax.experimental import multihost_utils

from onnx2jax.core.dtypes import numpy_dtype
from onnx2jax.core.errors import InputError
from onnx2jax.core.loader import (
    data_files_named,
    external_data_bytes,
    external_data_extent,
    external_data_path,
    graph_tensors,
    tensor_to_numpy,
)

try:
    import fcntl
except ImportError:  # Windows: killed saves' temporaries are not cleaned up there
    fcntl = None

# Protobuf cannot serialize a message of 2 GiB or more; leave room for the graph itself.
PROTO_LIMIT = 2**31 - 2**26
# Tensors smaller than this stay inside the .onnx file when external data is written.
EXTERNAL_THRESHOLD = 1024
_ALIGNMENT = 4096
# A param is written in blocks of rows of about this many bytes (_host_blocks).
_BLOCK = 2**24
_TEMPORARY_SUFFIX = ".onnx2jax-tmp"


class ModelLike(Protocol):
    """What this module reads of a model (:class:`onnx2jax.core.model.Model` provides it): typed
    here so that export, which the model imports, does not import the model back."""

    proto: onnx.ModelProto
    params: Mapping[str, Any]
    released_weights: Mapping[str, Any]
    base_dir: Path | None

    @property
    def inputs(self) -> list[Any]: ...

    def apply(
        self, params: Mapping[str, Any], *inputs: Any, **named_inputs: Any
    ) -> dict[str, Any]: ...


def to_onnx(model: ModelLike, params: Mapping[str, Any] | None = None) -> onnx.ModelProto:
    """The model's ONNX proto with the initializers in ``params`` replaced by their new values.

    ``params`` defaults to ``model.params`` and may hold any subset of the model's params. Each
    value is cast to its initializer's original dtype (a float16 model stays float16); an
    initializer whose value did not change keeps its original ``TensorProto`` byte for byte.
    External data is read in, so the returned proto stands alone.

    Example:
        >>> import onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> params = {k: v * 2 for k, v in model.params.items()}
        >>> proto = model.to_onnx(params)
        >>> [t.name for t in proto.graph.initializer] == [
        ...     t.name for t in model.proto.graph.initializer]
        True
    """
    params = _known_params(model, params)
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    _restore_released(proto.graph, model.released_weights)
    _inline_external_data(proto.graph, model.base_dir)
    remaining = dict(params)
    graph = proto.graph
    for index, tensor in enumerate(graph.initializer):
        if tensor.name in remaining:
            new = _updated_tensor(tensor, remaining.pop(tensor.name), model.base_dir)
            if new is not None:
                graph.initializer[index].CopyFrom(new)
    for index in reversed(range(len(graph.sparse_initializer))):
        sparse = graph.sparse_initializer[index]
        if sparse.values.name in remaining:
            _update_sparse(graph, index, remaining.pop(sparse.values.name), model.base_dir)
    return proto


def _known_params(model: ModelLike, params: Mapping[str, Any] | None) -> Mapping[str, Any]:
    params = model.params if params is None else params
    unknown = [k for k in params if k not in model.params]
    if unknown:
        raise InputError(
            f"params holds {len(unknown)} name(s) that are not params of the model "
            f"(first: {unknown[:3]}); model.params lists the valid names"
        )
    return params


def _streamed_proto(
    model: ModelLike, params: Mapping[str, Any] | None
) -> tuple[onnx.ModelProto, Callable[[onnx.TensorProto, bool], Any]]:
    """:func:`to_onnx`'s proto with no tensor's bytes filled in yet, and the function that
    fills one in (``fill(tensor, is_initializer)``): what :func:`to_onnx` would put there. It
    returns the value whose bytes are the tensor's raw data when they are to be written from
    it (the tensor is then left with no data; :func:`_write_value`), else ``None``. A save
    streams the tensors one at a time through it, so the model's bytes are never all in
    memory, and a param that replaces external data is written without reading the old."""
    params = _known_params(model, params)
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    graph = proto.graph
    remaining = dict(params)
    for index in reversed(range(len(graph.sparse_initializer))):
        sparse = graph.sparse_initializer[index]
        if sparse.values.name in remaining:
            _update_sparse(graph, index, remaining.pop(sparse.values.name), model.base_dir)
    released = model.released_weights

    def fill(tensor: onnx.TensorProto, is_initializer: bool) -> Any:
        bare = is_initializer and tensor.name in released and not tensor.HasField("raw_data")
        if is_initializer and tensor.name in remaining:
            value = _array_like(remaining.pop(tensor.name))
            if bare or tensor.data_location == onnx.TensorProto.EXTERNAL:
                # Raw bytes, replaced whole: an unchanged value writes the same bytes.
                _checked_dtype(tensor, value)
                _clear_data(tensor)
                return value
            new = _updated_tensor(tensor, value, model.base_dir)
            if new is not None:
                tensor.CopyFrom(new)
            return None
        if bare:
            return released[tensor.name]
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _inline_tensor(tensor, model.base_dir)
        return None

    return proto, fill


def _estimated_bytes(model: ModelLike, params: Mapping[str, Any] | None) -> int:
    """About the bytes of :func:`to_onnx`'s tensors, from shapes alone (nothing gathered)."""
    values = {**model.released_weights, **(params or {})}
    total = 0
    for tensor in graph_tensors(model.proto.graph):
        if tensor.name in values:
            total += int(np.prod(tensor.dims)) * numpy_dtype(tensor.data_type).itemsize
        elif tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += external_data_extent(tensor, external_data_path(tensor, model.base_dir))[1]
        else:
            total += tensor.ByteSize()
    return total


def host_array(value: Any) -> np.ndarray:
    """``value`` as a NumPy array in this process; a ``jax.Array`` with shards in other
    processes is gathered from all of them (every process must make the same call).

    Example:
        >>> import jax.numpy as jnp
        >>> host_array(jnp.ones(2)).tolist()
        [1.0, 1.0]
    """
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    if _spread(value) and value.ndim:
        return _rows(value, 0, value.shape[0])
    return np.asarray(value)


def _spread(value: Any) -> bool:
    """Whether ``value`` is a ``jax.Array`` over several devices, all in this process."""
    return (
        isinstance(value, jax.Array)
        and value.is_fully_addressable
        and len(value.sharding.device_set) > 1
    )


def _rows(value: jax.Array, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a :func:`_spread` array, put together from its shards: a host
    copy of the rows alone (np.asarray of the whole array would keep its copy on the array,
    a second copy of every param for as long as the params live)."""
    out = np.empty((stop - start, *value.shape[1:]), value.dtype)
    for shard in value.addressable_shards:
        if shard.replica_id != 0:  # each part once, however many devices hold it
            continue
        first, last, _ = shard.index[0].indices(value.shape[0])
        low, high = max(first, start), min(last, stop)
        if low < high:
            part = np.asarray(shard.data)[low - first : high - first]
            out[(slice(low - start, high - start), *shard.index[1:])] = part
    return out


def _host_blocks(value: Any) -> Iterable[np.ndarray]:
    """``value`` in this process as consecutive blocks of rows, in C order, each of at most
    about ``_BLOCK`` bytes: a save writes a param through them, never holding it whole."""
    host = None if _spread(value) and value.ndim else host_array(value)
    shape = value.shape if host is None else host.shape
    if not shape:
        yield host
        return
    row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(value.dtype).itemsize)
    step = max(1, _BLOCK // row)
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        yield _rows(value, start, stop) if host is None else host[start:stop]


def _sharded(values: Iterable[Any]) -> bool:
    """Whether any value is a ``jax.Array`` spread over several devices."""
    return any(
        isinstance(getattr(v, "sharding", None), jax.sharding.Sharding)
        and len(v.sharding.device_set) > 1
        for v in values
    )


def release_weight_bytes(
    proto: onnx.ModelProto, params: Mapping[str, Any]
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A copy of ``proto`` without the bytes of the initializers that ``params`` holds exactly.

    A loaded model would otherwise hold every weight twice: as a device array and as bytes in
    its proto. ``params`` gives each param's array, or its shape and dtype as it will be held
    (``jax.ShapeDtypeStruct``). Only inline ``raw_data`` tensors whose param has the
    initializer's own dtype are dropped, so :func:`to_onnx` rebuilds their bytes exactly from
    the params; the returned dict holds the entries of ``params`` that were dropped. The copy
    is parsed anew (protobuf frees a message's memory only with the whole message), and
    ``proto`` is left cleared of those bytes.
    """
    released = {}
    for tensor in proto.graph.initializer:
        value = params.get(tensor.name)
        if (
            value is None
            or tensor.data_location == onnx.TensorProto.EXTERNAL
            or not tensor.HasField("raw_data")
            or np.dtype(value.dtype) != numpy_dtype(tensor.data_type)
        ):
            continue
        tensor.ClearField("raw_data")
        released[tensor.name] = value
    if not released:
        return proto, released
    compact = onnx.ModelProto()
    compact.ParseFromString(proto.SerializeToString())
    return compact, released


def _restore_released(graph: onnx.GraphProto, released: Mapping[str, Any]) -> None:
    """Put back the bytes :func:`release_weight_bytes` dropped, from the params it kept."""
    if not released:
        return
    for tensor in graph.initializer:
        value = released.get(tensor.name)
        if value is not None:
            tensor.raw_data = _little_endian_bytes(np.asarray(value))


def _little_endian_bytes(value: np.ndarray) -> bytes:
    value = np.ascontiguousarray(value)
    return value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()


@dataclass(frozen=True)
class Verification:
    """How far onnxruntime, run on a saved file, is from ``model.apply`` with the same params.

    ``max_abs_diff`` maps each output name to the largest absolute difference.
    """

    max_abs_diff: dict[str, float]

    @property
    def worst(self) -> float:
        """The largest difference over every output."""
        return max(self.max_abs_diff.values(), default=0.0)

    def __str__(self) -> str:
        parts = ", ".join(f"{k}: {v:.3g}" for k, v in self.max_abs_diff.items())
        return f"onnxruntime vs model.apply, max abs difference: {parts}"


def save(
    model: ModelLike,
    path: str | os.PathLike,
    params: Mapping[str, Any] | None = None,
    *,
    external_data: bool = False,
    verify: bool | Mapping[str, Any] = False,
) -> Verification | None:
    """Write the model with ``params`` to ``path``; see :func:`to_onnx` for what is kept.

    The file is written to a temporary name and renamed into place, so a failed save leaves
    any existing file untouched. With ``external_data`` (forced for models over 2 GB) the
    tensor bytes go to ``<name>.<8 hex digits>.data`` next to the file, a new name each save:
    the new ``.onnx`` replaces the old one last, so a reader sees either the old model or the
    new one, never one's graph with the other's weights; the old data file is then removed.
    Temporaries that a killed save left are removed by the next save of that path. ``verify``
    runs the saved file in onnxruntime (when installed) and returns a :class:`Verification`
    comparing it with ``model.apply``; pass a dict of inputs to choose them, else random
    ones with each free dimension set to 2 are used (zeros for integer inputs).

    Sharded params (``jax.Array``s over several devices) are written to external data when
    it is asked for or the model is over 2 GB, one param at a time, each gathered alone; the
    files are the same bytes as a save of the same values unsharded. Params with shards in
    several processes (``jax.distributed``) are always written so: every process calls
    ``save`` with the same arguments and takes part in each param's gather, the first process
    (``jax.process_index() == 0``) writes the files, and ``verify`` is refused.

    Example:
        >>> import os, tempfile, onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> path = os.path.join(tempfile.mkdtemp(), "tuned.onnx")
        >>> report = model.save(path, model.params, verify=True)
        >>> report.worst < 1e-5
        True
    """
    path = Path(path)
    # Sharded params go to external data one by one, each gathered alone (_streamed_proto).
    fill = None
    values = {**model.params, **(params or {})}.values()
    if _sharded(values):
        # Params of several processes: each process calls save and takes part in each
        # param's gather; the first one writes.
        elsewhere = any(isinstance(v, jax.Array) and not v.is_fully_addressable for v in values)
        if elsewhere and verify is not False:
            raise InputError(
                "verify runs the model in this process alone; save from several processes "
                "without it, then verify the file in one"
            )
        if elsewhere or (not external_data and _estimated_bytes(model, params) >= PROTO_LIMIT):
            external_data = True
        if external_data:
            proto, fill = _streamed_proto(model, params)
            if jax.process_index() != 0:
                _gather_only(proto.graph, fill)
                return None
    if fill is None:
        proto = to_onnx(model, params)
        if not external_data and _tensor_bytes(proto.graph) >= PROTO_LIMIT:
            external_data = True
    folder = path.resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temporaries(folder, path.name)
    # Data files the file being replaced points at, removed once nothing reads them.
    superseded = _own_data_files(path)
    saved = False
    with contextlib.ExitStack() as cleanup:
        written = None
        if external_data:
            # A name of its own, so the old .onnx keeps reading its old data until the new
            # .onnx replaces it: a reader never sees one file's graph with another's weights.
            data_name = f"{path.name}.{secrets.token_hex(4)}.data"
            data_tmp = _temporary(folder, data_name, cleanup)
            with open(data_tmp, "r+b") as handle:
                if fill is None:
                    _move_to_external(proto.graph, handle, data_name)
                else:
                    _stream_to_external(proto.graph, handle, data_name, fill)
            written = folder / data_name
            os.replace(data_tmp, written)
            cleanup.callback(lambda: saved or written.unlink(missing_ok=True))
        model_tmp = _temporary(folder, path.name, cleanup)
        with open(model_tmp, "r+b") as handle:
            handle.write(proto.SerializeToString())
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_folder(folder)
        os.replace(model_tmp, path)
        saved = True
        _fsync_folder(folder)
    still_read = _files_read_by(model)
    for old in superseded:
        if old != written and old.resolve() not in still_read:
            old.unlink(missing_ok=True)
    if verify is False:
        return None
    return verify_file(model, path, params, None if verify is True else verify)


def verify_file(
    model: ModelLike,
    path: str | os.PathLike,
    params: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> Verification | None:
    """Run the ONNX file ``path`` in onnxruntime and compare it with ``model.apply(params)``.

    Returns ``None`` when onnxruntime is not installed. ``inputs`` defaults to random ones
    (see :func:`save`).

    Example:
        >>> import onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> verify_file(model, onnx2jax.example_path()).worst < 1e-5
        True
    """
    try:
        import onnxruntime
    except ImportError:
        return None
    full = dict(model.params)
    full.update(params or {})
    feeds = dict(inputs) if inputs is not None else sample_inputs(model)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = model.apply(full, **feeds)
    names = [o.name for o in session.get_outputs()]
    got = session.run(names, {k: np.asarray(v) for k, v in feeds.items()})
    diffs = {}
    for name, value in zip(names, got, strict=True):
        want = np.asarray(expected[name])
        value = np.asarray(value)
        if want.shape != value.shape:
            diffs[name] = float("inf")
        elif want.size == 0:
            diffs[name] = 0.0
        else:
            delta = np.abs(value.astype(np.float64) - want.astype(np.float64))
            diffs[name] = float(np.nanmax(np.where(np.isnan(delta), np.inf, delta)))
    return Verification(diffs)


def sample_inputs(model: ModelLike, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a test run: free dims set to 2, floats random normal, integers zero.

    Example:
        >>> import onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> sample_inputs(model)["image"].shape
        (2, 1, 8, 8)
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in model.inputs:
        if info.kind != "tensor" or info.dtype is None or info.shape is None:
            raise InputError(
                f"cannot make a sample value for input {info.describe()}; pass "
                "the inputs to verify explicitly"
            )
        shape = tuple(d if isinstance(d, int) and d > 0 else 2 for d in info.shape)
        if np.issubdtype(info.dtype, np.floating) or info.dtype.kind == "V":
            feeds[info.name] = rng.standard_normal(shape).astype(info.dtype)
        else:
            feeds[info.name] = np.zeros(shape, info.dtype)
    return feeds


# ------------------------------------------------------------------------------ tensors
def _updated_tensor(
    original: onnx.TensorProto, value: Any, base_dir: Path | None
) -> onnx.TensorProto | None:
    """A tensor like ``original`` holding ``value``; ``None`` when the bytes are unchanged."""
    dtype = _checked_dtype(original, value)
    new = np.ascontiguousarray(host_array(value).astype(dtype, copy=False))
    old = tensor_to_numpy(original, base_dir)
    if old.dtype == new.dtype and np.array_equal(_as_bytes(old), _as_bytes(new)):
        return None
    tensor = onnx.TensorProto()
    tensor.CopyFrom(original)
    _clear_data(tensor)
    tensor.raw_data = _little_endian_bytes(new)
    return tensor


def _checked_dtype(original: onnx.TensorProto, value: Any) -> np.dtype:
    """The initializer's dtype, which ``value`` is cast to; raises if it cannot hold it."""
    dtype = numpy_dtype(original.data_type)
    value = _array_like(value)
    if tuple(value.shape) != tuple(original.dims):
        raise InputError(
            f"param {original.name!r} has shape {tuple(value.shape)}, but the "
            f"model's initializer has shape {tuple(original.dims)}"
        )
    if np.dtype(value.dtype).kind in "OSU" or dtype.hasobject:
        raise InputError(
            f"param {original.name!r} holds {np.dtype(value.dtype)} values; the model's "
            f"initializer stores {dtype.name} values"
        )
    return dtype


def _array_like(value: Any) -> Any:
    """``value`` itself when it has a shape and a dtype (an array of any kind), else as NumPy's."""
    return value if hasattr(value, "shape") and hasattr(value, "dtype") else np.asarray(value)


def _as_bytes(value: np.ndarray) -> np.ndarray:
    """A contiguous array's bytes, viewed in place: compared bit for bit (0.0 is not -0.0,
    and a NaN equals itself), as ``tobytes`` would compare them, without the copies."""
    return np.ascontiguousarray(value).reshape(-1).view(np.uint8)


def _clear_data(tensor: onnx.TensorProto) -> None:
    """Drop every field that holds the tensor's values, leaving a tensor with none."""
    for name in (
        "float_data",
        "int32_data",
        "int64_data",
        "double_data",
        "uint64_data",
        "string_data",
        "external_data",
        "raw_data",
    ):
        tensor.ClearField(name)
    tensor.data_location = onnx.TensorProto.DEFAULT


def _update_sparse(graph: onnx.GraphProto, index: int, value: Any, base_dir: Path | None) -> None:
    """Store a changed sparse initializer as a dense one (training fills in its zeros)."""
    sparse = graph.sparse_initializer[index]
    dense = onnx.TensorProto()
    dense.name = sparse.values.name
    dense.data_type = sparse.values.data_type
    dense.dims.extend(sparse.dims)
    dtype = numpy_dtype(dense.data_type)
    dense.raw_data = np.zeros(tuple(sparse.dims), dtype).tobytes()
    new = _updated_tensor(dense, value, base_dir)
    del graph.sparse_initializer[index]
    graph.initializer.append(new if new is not None else dense)


def _inline_external_data(graph: onnx.GraphProto, base_dir: Path | None) -> None:
    for tensor in graph_tensors(graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _inline_tensor(tensor, base_dir)


def _inline_tensor(tensor: onnx.TensorProto, base_dir: Path | None) -> None:
    raw = external_data_bytes(tensor, base_dir)
    tensor.ClearField("external_data")
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = raw


def _tensor_bytes(graph: onnx.GraphProto) -> int:
    return sum(t.ByteSize() for t in graph_tensors(graph))


def _move_to_external(graph: onnx.GraphProto, handle: Any, location: str) -> None:
    """Write the raw bytes of every sizeable tensor to ``handle`` and point the tensor there."""
    for tensor in graph_tensors(graph):
        _move_tensor(tensor, handle, location)
    handle.flush()
    os.fsync(handle.fileno())


def _stream_to_external(
    graph: onnx.GraphProto,
    handle: Any,
    location: str,
    fill: Callable[[onnx.TensorProto, bool], Any],
) -> None:
    """:func:`_move_to_external` of the tensors of a :func:`_streamed_proto`, each filled in
    just before it is written: the same file, with one tensor's bytes in memory at a time."""
    initializers = len(graph.initializer)
    for position, tensor in enumerate(graph_tensors(graph)):
        # Filled in a message of its own: upb frees nothing set on a message before the whole
        # message goes, so bytes set on the graph's tensors would all stay until the save ends.
        alone = onnx.TensorProto()
        alone.CopyFrom(tensor)
        value = fill(alone, position < initializers)
        if value is None:
            _move_tensor(alone, handle, location)
        else:
            _write_value(alone, value, handle, location)
        tensor.CopyFrom(alone)
    handle.flush()
    os.fsync(handle.fileno())


def _gather_only(graph: onnx.GraphProto, fill: Callable[[onnx.TensorProto, bool], Any]) -> None:
    """What :func:`_stream_to_external` gathers, in its order, with nothing written: the part
    of a save from several processes that the processes other than the first take."""
    initializers = len(graph.initializer)
    for position, tensor in enumerate(graph_tensors(graph)):
        alone = onnx.TensorProto()  # as in _stream_to_external: freed tensor by tensor
        alone.CopyFrom(tensor)
        value = fill(alone, position < initializers)
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            host_array(value)  # the gather _write_value takes part in


def _move_tensor(tensor: onnx.TensorProto, handle: Any, location: str) -> None:
    if not tensor.HasField("raw_data") or len(tensor.raw_data) < EXTERNAL_THRESHOLD:
        return
    raw = tensor.raw_data
    tensor.ClearField("raw_data")
    _point_external(tensor, _aligned_start(handle), len(raw), location)
    handle.write(raw)


def _write_value(tensor: onnx.TensorProto, value: Any, handle: Any, location: str) -> None:
    """Give a tensor left with no data (:func:`_streamed_proto`) ``value``'s bytes, cast to
    its dtype: written to ``handle`` block by block when it is big enough for external data,
    as :func:`_move_tensor` would write them from ``raw_data``, else set as its raw_data."""
    dtype = numpy_dtype(tensor.data_type)
    length = int(np.prod(value.shape, dtype=np.int64)) * dtype.itemsize
    if length < EXTERNAL_THRESHOLD:
        tensor.raw_data = _little_endian_bytes(host_array(value).astype(dtype, copy=False))
        return
    _point_external(tensor, _aligned_start(handle), length, location)
    for block in _host_blocks(value):
        block = block.astype(dtype, copy=False)
        handle.write(_as_bytes(block.astype(dtype.newbyteorder("<"), copy=False)))
        del block  # before the next block is put together, not after


def _aligned_start(handle: Any) -> int:
    """Pad ``handle`` to the next ``_ALIGNMENT`` boundary; the offset the next tensor has."""
    offset = handle.tell()
    padding = -offset % _ALIGNMENT
    handle.write(b"\0" * padding)
    return offset + padding


def _point_external(tensor: onnx.TensorProto, offset: int, length: int, location: str) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (
        ("location", location),
        ("offset", str(offset)),
        ("length", str(length)),
    ):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _temporary(folder: Path, name: str, cleanup: contextlib.ExitStack) -> Path:
    """A fresh temporary file next to the target, removed on exit unless renamed into place.

    It stays locked while this process lives, so a later save can tell the temporaries of a
    killed save (unlocked) from those of one still writing (locked).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=_TEMPORARY_SUFFIX, dir=folder)
    tmp_path = Path(tmp)
    handle = os.fdopen(fd, "r+b")
    cleanup.callback(handle.close)
    if fcntl is not None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    cleanup.callback(lambda: tmp_path.unlink(missing_ok=True))
    return tmp_path


def _remove_abandoned_temporaries(folder: Path, name: str) -> None:
    """Delete what killed saves of ``name`` left behind (their locks died with them)."""
    if fcntl is None:
        return
    for stale in folder.glob(f".{glob.escape(name)}.*{_TEMPORARY_SUFFIX}"):
        try:
            with open(stale, "rb") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                stale.unlink(missing_ok=True)
        except OSError:  # locked: another save is writing it
            continue


def _own_data_files(path: Path) -> list[Path]:
    """The external-data files of the .onnx at ``path`` that a save of ``path`` wrote itself.

    Only files named like our own (``NAME.data`` or ``NAME.<hex>.data``, beside the file) are
    ever removed: a data file the user shares between models is theirs.
    """
    if not path.is_file():
        return []
    try:
        old = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a model we can read: leave whatever is beside it alone
        return []
    own = re.compile(re.escape(path.name) + r"(\.[0-9a-f]{8})?\.data")
    found = set()
    for tensor in graph_tensors(old.graph):
        for entry in tensor.external_data:
            if entry.key == "location" and own.fullmatch(entry.value):
                found.add(path.parent / entry.value)
    return sorted(found)


def _files_read_by(model: ModelLike) -> set[Path]:
    """External-data files the model in memory may still read (its constants, to_onnx)."""
    if model.base_dir is None:
        return set()
    return data_files_named(model.proto, model.base_dir)


def _fsync_folder(folder: Path) -> None:
    """Make renames in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
