"""Reading an ONNX model from a path, bytes or a ModelProto, with external data resolved safely."""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnx2jax.core.errors import ModelLoadError
from onnx2jax.core.safety import within

ModelSource = str | os.PathLike | bytes | onnx.ModelProto
# Folders of repos in a Hugging Face hub cache (see checked_link).
HUB_REPO_PREFIXES = ("models--", "datasets--", "spaces--")
# XLA's CPU client takes a host array of this alignment as a device buffer as it is, without a
# copy: params read into such arrays are in host memory once, not twice while they are copied.
ALIGNMENT = 64
# Below this many bytes per contiguous run, read_block copies from a memory map instead of
# reading each run on its own.
SMALLEST_RUN = 4096


def read_model(source: ModelSource) -> tuple[onnx.ModelProto, Path | None]:
    """Return the ModelProto of ``source`` and the folder its external data lives in.

    The proto's external-data tensors are left as references; :func:`tensor_to_numpy` reads them.
    """
    if isinstance(source, onnx.ModelProto):
        return source, None
    if isinstance(source, bytes | bytearray | memoryview):
        return _parse(bytes(source), "<bytes>"), None
    if not isinstance(source, str | os.PathLike):
        raise TypeError(
            f"onnx2jax.load expects a path, bytes or onnx.ModelProto, got {type(source).__name__}"
        )
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder; pass the path of the .onnx file inside it")
    # The folder as named, not symlinks resolved: in the Hugging Face cache the model file is a
    # link into blobs/, while its external data sits beside the link. The file itself is the
    # one the caller named, link or not; what it points at from inside is checked.
    named = Path(os.path.abspath(path))
    return _parse(named.read_bytes(), str(path)), named.parent


def _parse(data: bytes, name: str) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError(f"{name} is empty, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"{name} is not a valid ONNX model (truncated or not ONNX at all): {exc}"
        ) from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelLoadError(f"{name} parsed but holds no ONNX graph; is it really an .onnx file?")
    return model


def external_data_path(tensor: onnx.TensorProto, base_dir: Path | None) -> Path:
    """Where the bytes of an external-data tensor live; never outside ``base_dir``.

    Symlinks are resolved and must stay inside the folder too, except in the Hugging Face
    cache layout (see :func:`checked_link`).
    """
    info = _external_info(tensor)
    location = info.get("location")
    if not location:
        raise ModelLoadError(f"tensor {tensor.name!r} is stored externally but names no file")
    if base_dir is None:
        raise ModelLoadError(
            f"tensor {tensor.name!r} is stored in external file {location!r}, but the model was "
            "given as bytes or a proto; load it from its path so the file can be found"
        )
    # First on the path as written (the model controls ``location``), then its links.
    root = Path(os.path.abspath(base_dir))
    target = Path(os.path.normpath(root / location))
    if root != target and root not in target.parents:
        raise ModelLoadError(
            f"tensor {tensor.name!r} points at external data {location!r} outside the model's "
            f"folder {root}; refusing to read it"
        )
    try:
        found = target.is_file()
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
        raise ModelLoadError(
            f"tensor {tensor.name!r} names external data {location!r}, which is not a usable "
            f"file name: {exc}"
        ) from None
    if not found:
        raise ModelLoadError(f"external data file {target} of tensor {tensor.name!r} is missing")
    return checked_link(target, root, f"external data {location!r} of tensor {tensor.name!r}")


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    """The tensor's external-data entries; protobuf hands over text that is not valid UTF-8
    as bytes, which no file name or number may be."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    for key, value in info.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ModelLoadError(
                f"tensor {tensor.name!r} has external data entry {key!r}: {value!r}, which is "
                "not valid UTF-8; the file is corrupt"
            )
    return info


def checked_link(path: Path, root: Path, what: str) -> Path:
    """The real path of ``path`` (absolute, inside the folder ``root`` as written), refusing
    symlinks that lead out of ``root``.

    One layout may leave it: the Hugging Face cache's, where ``<repo>/snapshots/<rev>/...``
    holds links to ``<repo>/blobs/<hash>``. When ``root`` lies inside a snapshot folder of a
    ``models--``/``datasets--``/``spaces--`` repo folder, a link that resolves to a file
    directly inside that same repo's ``blobs/`` is allowed.
    """
    real = Path(os.path.realpath(path))
    if within(real, Path(os.path.realpath(root))):
        return real
    blobs = _hub_blobs(root)
    if blobs is not None and real.parent == Path(os.path.realpath(blobs)):
        return real
    raise ModelLoadError(
        f"{what} is a symlink (or inside a linked folder) that leads to {real}, outside the "
        f"model's folder {root}; refusing to read it"
    )


def _hub_blobs(root: Path) -> Path | None:
    """``<repo>/blobs`` when ``root`` is ``<repo>/snapshots/<rev>`` or a folder inside it."""
    parts = root.parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(HUB_REPO_PREFIXES):
            return Path(*parts[:i]) / "blobs"
    return None


def tensor_to_numpy(tensor: onnx.TensorProto, base_dir: Path | None) -> np.ndarray:
    """Decode an initializer or Constant tensor, reading external data from inside ``base_dir``."""
    if any(d < 0 for d in tensor.dims):
        raise ModelLoadError(
            f"tensor {tensor.name!r} has a negative dimension in its shape {list(tensor.dims)}"
        )
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        path = external_data_path(tensor, base_dir)
        offset, length = external_data_extent(tensor, path)
        dtype = _PLAIN_DTYPES.get(tensor.data_type)
        if dtype is not None:
            return _mapped_array(tensor, path, offset, length, dtype)
        inline = onnx.TensorProto()
        inline.CopyFrom(tensor)
        del inline.external_data[:]
        inline.data_location = onnx.TensorProto.DEFAULT
        inline.raw_data = _read_range(path, offset, length)
        tensor = inline
    try:
        return numpy_helper.to_array(tensor)
    except Exception as exc:  # onnx raises several types for corrupt tensors
        raise ModelLoadError(f"tensor {tensor.name!r} cannot be decoded: {exc}") from None


def mapped_tensor(tensor: onnx.TensorProto, base_dir: Path | None) -> np.ndarray | None:
    """A read-only memory map of an external-data tensor of a plain NumPy type, checked as
    :func:`tensor_to_numpy` checks it, so that slices of it read only their own pages
    (``None`` for a tensor stored inline or in a type onnx decodes itself).

    Example:
        >>> import onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> mapped_tensor(model.proto.graph.initializer[0], None) is None
        True
    """
    dtype = _PLAIN_DTYPES.get(tensor.data_type)
    if (
        tensor.data_location != onnx.TensorProto.EXTERNAL
        or dtype is None
        or any(d < 0 for d in tensor.dims)  # tensor_to_numpy says what is wrong
    ):
        return None
    shape = tuple(int(d) for d in tensor.dims)
    path = external_data_path(tensor, base_dir)
    offset, length = external_data_extent(tensor, path)
    _check_length(tensor, shape, dtype, length)
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype.newbyteorder("="))
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def external_data_extent(tensor: onnx.TensorProto, path: Path) -> tuple[int, int]:
    """(offset, length) of ``tensor``'s bytes in its external file ``path``, checked against
    the file's size before anything is allocated or read."""
    info = _external_info(tensor)

    def number(key: str) -> int | None:
        text = info.get(key)
        if text is None:
            return None
        if not text.strip().isdecimal():  # "-8", "1e3", "0x10": a clear error, not int()'s
            raise ModelLoadError(
                f"tensor {tensor.name!r} has external data {key} {text!r}, which is not a "
                "non-negative whole number"
            )
        return int(text)

    offset = number("offset") or 0
    length = number("length")
    size = os.path.getsize(path)
    if offset > size or (length is not None and length > size - offset):
        wanted = "the rest" if length is None else f"{length} bytes"
        raise ModelLoadError(
            f"external data file {path} is truncated or the model is corrupt: tensor "
            f"{tensor.name!r} needs {wanted} at offset {offset}, but the file has {size} bytes"
        )
    return offset, size - offset if length is None else length


def external_data_bytes(tensor: onnx.TensorProto, base_dir: Path | None) -> bytes:
    """The raw bytes of an external-data tensor: its file found and its extent checked as
    :func:`tensor_to_numpy` does (for code that re-inlines tensors, e.g. saving)."""
    path = external_data_path(tensor, base_dir)
    offset, length = external_data_extent(tensor, path)
    return _read_range(path, offset, length)


def _read_range(path: Path, offset: int, length: int) -> bytes:
    """``length`` bytes of ``path`` from ``offset`` (a range already checked against its size),
    through a memory map so nothing is read that is not asked for."""
    if length == 0:
        return b""
    with (
        open(path, "rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
    ):
        return mapped[offset : offset + length]


def _mapped_array(
    tensor: onnx.TensorProto, path: Path, offset: int, length: int, dtype: np.dtype
) -> np.ndarray:
    """The tensor's raw little-endian bytes read into an :func:`aligned_empty` array."""
    shape = tuple(int(d) for d in tensor.dims)
    _check_length(tensor, shape, dtype, length)
    return read_block(path, offset, shape, dtype, ())


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized C-order array whose data starts at a multiple of :data:`ALIGNMENT`
    bytes, which ``jax.device_put`` on the CPU keeps as the device buffer instead of copying.

    Example:
        >>> aligned_empty((3, 5), np.dtype(np.float32)).ctypes.data % ALIGNMENT
        0
    """
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.empty(size + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + size].view(dtype).reshape(shape)


def read_block(
    path: str | os.PathLike,
    offset: int,
    shape: tuple[int, ...],
    dtype: np.dtype,
    index: tuple[slice, ...],
) -> np.ndarray:
    """The block ``index`` (slices of step 1, fewer than ``len(shape)`` meaning whole trailing
    axes) of the C-order array of ``shape`` and ``dtype`` stored at ``offset`` in ``path``, in
    the native byte order, in an :func:`aligned_empty` array.

    Each contiguous run of the block is read straight into the result with ``preadv``: no
    memory map, so no page of the file counts in the process's resident memory, and no copy.
    Runs shorter than :data:`SMALLEST_RUN` bytes are copied from a memory map of the tensor's
    bytes, closed before returning. The caller checked the extent against the file's size.

    Example:
        >>> import tempfile
        >>> data = np.arange(24, dtype=np.float32).reshape(4, 6)
        >>> with tempfile.NamedTemporaryFile() as f:
        ...     _ = f.write(b"header" + data.tobytes()); f.flush()
        ...     block = read_block(f.name, 6, (4, 6), np.dtype("<f4"), (slice(1, 3), slice(2, 4)))
        >>> block.tolist()
        [[8.0, 9.0], [14.0, 15.0]]
    """
    dtype = np.dtype(dtype)
    bounds = [
        range(*(index[axis] if axis < len(index) else slice(None)).indices(dim))
        for axis, dim in enumerate(shape)
    ]
    if any(b.step != 1 for b in bounds):
        raise ValueError(f"read_block reads slices of step 1, got {index}")
    out = aligned_empty(tuple(len(b) for b in bounds), dtype.newbyteorder("="))
    if out.size == 0:
        return out
    # The axes from ``first`` on are whole but for ``first`` itself: each run spans them.
    first = max((a for a, b in enumerate(bounds) if len(b) != shape[a]), default=0)
    inner = math.prod(shape[first + 1 :])
    span = bounds[first] if bounds else range(1)  # a scalar is one run of one value
    run = len(span) * inner * dtype.itemsize
    runs = out.size * dtype.itemsize // run
    if run < SMALLEST_RUN and runs > 1:
        mapped = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        try:
            out[...] = mapped[tuple(slice(b.start, b.stop) for b in bounds)]
        finally:
            del mapped  # close the map now, not when the garbage collector gets to it
        return out
    strides = [math.prod(shape[a + 1 :]) for a in range(len(shape))]
    target = out.reshape(-1).view(np.uint8)
    with open(path, "rb") as handle:
        for number, prefix in enumerate(np.ndindex(*(len(b) for b in bounds[:first]))):
            element = sum((bounds[a][i]) * strides[a] for a, i in enumerate(prefix))
            element += span.start * inner
            _read_exactly(
                handle.fileno(),
                target[number * run : (number + 1) * run],
                offset + element * dtype.itemsize,
                path,
            )
    return out


def _read_exactly(fd: int, buffer: np.ndarray, position: int, path: str | os.PathLike) -> None:
    view = memoryview(buffer)
    while view:
        count = os.preadv(fd, [view], position)
        if count == 0:
            raise ModelLoadError(f"external data file {path} ended early (was it truncated?)")
        view, position = view[count:], position + count


def _check_length(
    tensor: onnx.TensorProto, shape: tuple[int, ...], dtype: np.dtype, length: int
) -> None:
    if math.prod(shape) * dtype.itemsize != length:
        raise ModelLoadError(
            f"tensor {tensor.name!r} of shape {list(shape)} and dtype {dtype} needs "
            f"{math.prod(shape) * dtype.itemsize} bytes, but its external data holds {length}"
        )


# ONNX types whose raw bytes are little-endian NumPy arrays as they are; the rest (strings,
# 4-bit and 8-bit float types, bfloat16) go through onnx's own decoder.
_PLAIN_DTYPES = {
    code: np.dtype(name).newbyteorder("<")
    for code, name in (
        (onnx.TensorProto.FLOAT, "float32"),
        (onnx.TensorProto.DOUBLE, "float64"),
        (onnx.TensorProto.FLOAT16, "float16"),
        (onnx.TensorProto.INT8, "int8"),
        (onnx.TensorProto.INT16, "int16"),
        (onnx.TensorProto.INT32, "int32"),
        (onnx.TensorProto.INT64, "int64"),
        (onnx.TensorProto.UINT8, "uint8"),
        (onnx.TensorProto.UINT16, "uint16"),
        (onnx.TensorProto.UINT32, "uint32"),
        (onnx.TensorProto.UINT64, "uint64"),
        (onnx.TensorProto.BOOL, "bool"),
        (onnx.TensorProto.COMPLEX64, "complex64"),
        (onnx.TensorProto.COMPLEX128, "complex128"),
    )
}


def graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in ``graph``: initializers (sparse ones too) and node attributes,
    subgraphs included.

    Example:
        >>> import numpy as np
        >>> from onnx import helper, numpy_helper
        >>> w = numpy_helper.from_array(np.ones(2, np.float32), "w")
        >>> [t.name for t in graph_tensors(helper.make_graph([], "g", [], [], initializer=[w]))]
        ['w']
    """
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from graph_tensors(sub)


def external_data_files(proto: onnx.ModelProto) -> list[str]:
    """The external-data files a model's tensors point at (relative to the model's folder).

    Example:
        >>> import numpy as np, onnx
        >>> from onnx import helper, numpy_helper
        >>> w = numpy_helper.from_array(np.ones(4, np.float32), "w")
        >>> w.data_location = onnx.TensorProto.EXTERNAL
        >>> w.external_data.add(key="location", value="weights.bin")  # doctest: +ELLIPSIS
        key: "location"...
        >>> graph = helper.make_graph([], "g", [], [], initializer=[w])
        >>> external_data_files(helper.make_model(graph))
        ['weights.bin']
    """
    return sorted(
        {
            entry.value
            for tensor in graph_tensors(proto.graph)
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
    )


def data_files_named(proto: onnx.ModelProto, folder: Path) -> set[Path]:
    """The files, resolved in ``folder``, that the tensors of ``proto`` name as external data
    (whether or not their bytes were read in since): the files a save must not remove.

    Example:
        >>> import numpy as np
        >>> from onnx import helper, numpy_helper
        >>> w = numpy_helper.from_array(np.ones(4, np.float32), "w")
        >>> w.external_data.add(key="location", value="weights.bin")  # doctest: +ELLIPSIS
        key: "location"...
        >>> model = helper.make_model(helper.make_graph([], "g", [], [], initializer=[w]))
        >>> [p.name for p in data_files_named(model, Path("/models"))]
        ['weights.bin']
    """
    return {
        (folder / entry.value).resolve()
        for tensor in graph_tensors(proto.graph)
        for entry in tensor.external_data
        if entry.key == "location"
    }
