"""Reading an ONNX model from a path, bytes or a ModelProto, with external data resolved safely."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnx2jax.errors import ModelLoadError

ModelSource = str | os.PathLike | bytes | onnx.ModelProto


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
    # link into blobs/, while its external data sits beside the link.
    return _parse(path.read_bytes(), str(path)), Path(os.path.abspath(path)).parent


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
    """Where the bytes of an external-data tensor live; never outside ``base_dir``."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location")
    if not location:
        raise ModelLoadError(f"tensor {tensor.name!r} is stored externally but names no file")
    if base_dir is None:
        raise ModelLoadError(
            f"tensor {tensor.name!r} is stored in external file {location!r}, but the model was "
            "given as bytes or a proto; load it from its path so the file can be found"
        )
    # Checked on the path as written (the model controls ``location``, not the folder's links).
    root = Path(os.path.abspath(base_dir))
    target = Path(os.path.normpath(root / location))
    if root != target and root not in target.parents:
        raise ModelLoadError(
            f"tensor {tensor.name!r} points at external data {location!r} outside the model's "
            f"folder {root}; refusing to read it"
        )
    if not target.is_file():
        raise ModelLoadError(
            f"external data file {target} of tensor {tensor.name!r} is missing"
        )
    return target


def tensor_to_numpy(tensor: onnx.TensorProto, base_dir: Path | None) -> np.ndarray:
    """Decode an initializer or Constant tensor, reading external data from inside ``base_dir``."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {entry.key: entry.value for entry in tensor.external_data}
        path = external_data_path(tensor, base_dir)
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else -1
        with open(path, "rb") as handle:
            handle.seek(offset)
            raw = handle.read(length)
        if length >= 0 and len(raw) != length:
            raise ModelLoadError(
                f"external data file {path} is truncated: tensor {tensor.name!r} needs {length} "
                f"bytes at offset {offset}, found {len(raw)}"
            )
        inline = onnx.TensorProto()
        inline.CopyFrom(tensor)
        del inline.external_data[:]
        inline.data_location = onnx.TensorProto.DEFAULT
        inline.raw_data = raw
        tensor = inline
    try:
        return numpy_helper.to_array(tensor)
    except Exception as exc:  # onnx raises several types for corrupt tensors
        raise ModelLoadError(f"tensor {tensor.name!r} cannot be decoded: {exc}") from None
