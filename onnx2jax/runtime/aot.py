"""Ahead-of-time artifacts: a model traced once, run later without ONNX or tracing.

:func:`export_model` writes an artifact (``onnx2jax compile MODEL -o FILE``): the program
``model(...)`` runs, traced for fixed input shapes with :mod:`jax.export` (StableHLO), plus its
weights. :func:`load_artifact` runs it without parsing ONNX or tracing again; with a cache
folder (:class:`~onnx2jax.runtime.cache.ExecutableCache`) it skips XLA compilation too.
:func:`cached_call` runs a model through such a cache.

Nothing read back runs code unchecked: an artifact is JSON, ``jax.export``'s serialization
and an ``.npz`` read without pickle. See SECURITY.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from onnx2jax.core.errors import InputError, Onnx2JaxError

# Re-exported: the cache's names were first importable from here (onnx2jax.aot).
from onnx2jax.runtime.cache import (  # noqa: F401
    CACHE_ENV,
    ENTRY_MAGIC,
    ExecutableCache,
    atomic_write,
    environment_key,
    model_digest,
    resolve_cache_dir,
    signature_key,
)
from onnx2jax.runtime.options import default_compiler_options, inference_compiler_options

ARTIFACT_FORMAT = "onnx2jax-aot/1"


def cached_call(
    model: Any,
    cache: ExecutableCache,
    inputs: Mapping[str, Any],
    outputs: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run ``model`` with its params on ``inputs`` through ``cache``.

    The same as ``model(**inputs)`` for models that run under jit, but the compiled executable
    is read from (or written to) the cache folder (``model.engine.cached_run``).

    Example:
        >>> import tempfile, numpy as np, onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> cache = ExecutableCache(tempfile.mkdtemp())
        >>> cached_call(model, cache, {"image": np.zeros((2, 1, 8, 8), np.float32)})["logits"].shape
        (2, 10)
    """
    bound = model.bind_inputs((), inputs)
    return model.engine.cached_run(cache, bound, tuple(outputs) if outputs else None)


def export_model(
    model: Any,
    inputs: Mapping[str, Any],
    path: str | os.PathLike,
    outputs: Sequence[str] | None = None,
) -> Path:
    """Write ``model`` traced for the shapes and dtypes of ``inputs`` to an artifact at ``path``.

    The artifact holds the serialized :class:`jax.export.Exported` (StableHLO; params are
    arguments), the params, and the input and output names. Values of ``inputs`` are not stored.
    It is the program ``model(...)`` runs: Conv weights are stored pre-transposed to the layout
    XLA's CPU convolution reads, so no weight is transposed per call.

    Example:
        >>> import os, tempfile, numpy as np, onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> file = os.path.join(tempfile.mkdtemp(), "digits.o2j")
        >>> _ = export_model(model, {"image": np.zeros((2, 1, 8, 8), np.float32)}, file)
        >>> load_artifact(file)(np.ones((2, 1, 8, 8), np.float32))["logits"].shape
        (2, 10)
    """
    bound = model.bind_inputs((), inputs)
    names = list(bound)
    wanted = list(outputs) if outputs else model.output_names
    engine = model.engine
    prepared = engine.prepared_params()  # what model(...) passes to its jitted function
    param_names = list(prepared)

    def run(params: list[Any], *args: Any) -> tuple[Any, ...]:
        result = engine.apply_prepared(
            dict(zip(param_names, params, strict=True)),
            dict(zip(names, args, strict=True)),
            tuple(wanted),
        )
        return tuple(result[name] for name in wanted)

    def spec(value: Any) -> jax.ShapeDtypeStruct:
        dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
        return jax.ShapeDtypeStruct(np.shape(value), jax.dtypes.canonicalize_dtype(dtype))

    params = [prepared[name] for name in param_names]
    try:
        exported = jax.export.export(jax.jit(run))(
            [spec(p) for p in params], *[spec(bound[n]) for n in names]
        )
    except Exception as exc:
        raise Onnx2JaxError(f"cannot export the model ahead of time: {exc}") from exc
    meta = {
        "format": ARTIFACT_FORMAT,
        "inputs": names,
        "outputs": wanted,
        "params": param_names,
        "jax": jax.__version__,
        "precision": model.precision,
        "input_specs": [
            {"shape": list(s.shape), "dtype": str(s.dtype)}
            for s in exported.in_avals[len(params) :]
        ],
    }
    weights = io.BytesIO()
    np.savez(weights, **{f"p{i}": np.asarray(p) for i, p in enumerate(params)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("meta.json", json.dumps(meta, indent=1))
        archive.writestr("exported.bin", bytes(exported.serialize()))
        archive.writestr("params.npz", weights.getvalue())
    path = Path(path)
    atomic_write(path, buffer.getvalue())
    return path


def _read_artifact(path: Path) -> tuple[dict[str, Any], bytes, list[np.ndarray]]:
    """The checked metadata, the serialized program and the params of an artifact.

    Nothing here can run code: the metadata is JSON, the params an ``.npz`` read with
    ``allow_pickle=False``, and only stored (uncompressed) members are read, so a member
    cannot expand beyond the file's own size.
    """

    def bad(why: str) -> Onnx2JaxError:
        return Onnx2JaxError(f"{path} is not a valid onnx2jax artifact: {why}")

    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            for name in ("meta.json", "exported.bin", "params.npz"):
                if name not in members:
                    raise bad(f"it has no {name}")
                if members[name].compress_type != zipfile.ZIP_STORED:
                    raise bad(f"{name} is compressed; artifacts store their members")
            meta = json.loads(archive.read("meta.json"))
            if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT:
                found = meta.get("format") if isinstance(meta, dict) else None
                raise Onnx2JaxError(f"{path} is not an onnx2jax artifact (format {found!r})")
            _check_meta(meta, bad)
            blob = archive.read("exported.bin")
            with np.load(io.BytesIO(archive.read("params.npz")), allow_pickle=False) as weights:
                params = [weights[f"p{i}"] for i in range(len(meta["params"]))]
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError) as exc:
        raise bad(str(exc)) from None
    return meta, blob, params


def _check_meta(meta: dict[str, Any], bad: Callable[[str], Exception]) -> None:
    """The fields of an artifact's meta.json have the types the loader relies on."""
    for field in ("inputs", "outputs", "params"):
        value = meta.get(field)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(f"meta.json's {field!r} is not a list of names")
    specs = meta.get("input_specs")
    if not isinstance(specs, list) or len(specs) != len(meta["inputs"]):
        raise bad("meta.json's 'input_specs' do not match its inputs")
    for spec in specs:
        shape = spec.get("shape") if isinstance(spec, dict) else None
        dtype = spec.get("dtype") if isinstance(spec, dict) else None
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or not isinstance(dtype, str)
            or np.dtype(dtype).kind not in "biufc"
        ):
            raise bad(f"meta.json has an invalid input spec {spec!r}")


def _check_custom_calls(exported: Any, path: str | os.PathLike) -> None:
    """Refuse a program that calls a custom call target outside those JAX guarantees stable.

    A custom call runs native code with the operands and attributes the program gives it; a
    crafted artifact could point one (e.g. our kernels, registered once model(...) used them)
    at memory it does not own. export_model never emits others.
    """
    import re

    try:  # the list jax.export itself checks at export time (private, so it may move)
        from jax._src.export import _export

        allowed = getattr(_export, "_CUSTOM_CALL_TARGETS_GUARANTEED_STABLE", None)
    except ImportError:
        allowed = None  # then at least our own kernels, which trust their operands, are refused
    text = exported.mlir_module()
    targets = set(re.findall(r"custom_call\s+@([^\s(]+)", text))
    targets |= set(re.findall(r'call_target_name\s*=\s*"([^"]*)"', text))
    refused = sorted(
        t
        for t in targets
        if (t not in allowed if allowed is not None else t.startswith("onnx2jax"))
    )
    if refused:
        raise Onnx2JaxError(
            f"{path} calls native code outside JAX's stable set "
            f"({', '.join(refused)}); refusing to load it"
        )


class AotModel:
    """A model loaded from an artifact of :func:`export_model`: fixed shapes, no ONNX, no trace.

    Call it like a :class:`~onnx2jax.model.Model` (positional inputs in :attr:`input_names`
    order, or by name); it returns a dict from output name to array.
    """

    def __init__(self, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        meta, blob, params = _read_artifact(Path(path))
        self.meta = meta
        try:
            self.exported = jax.export.deserialize(bytearray(blob))
        except Exception as exc:  # the flatbuffer's reader raises several types
            raise Onnx2JaxError(
                f"{path} is not a valid onnx2jax artifact: its program cannot be read ({exc})"
            ) from None
        _check_custom_calls(self.exported, path)
        self.input_names: list[str] = list(meta["inputs"])
        self.output_names: list[str] = list(meta["outputs"])
        self.param_names: list[str] = list(meta["params"])
        self.params = jax.device_put(params)
        self._specs = [(tuple(s["shape"]), np.dtype(s["dtype"])) for s in meta["input_specs"]]
        # The XLA options model(...) would compile these inputs with.
        self.compiler_options = inference_compiler_options(
            {
                name: jax.ShapeDtypeStruct(shape, dtype)
                for name, (shape, dtype) in zip(self.input_names, self._specs, strict=True)
            },
            default_compiler_options(),
            meta.get("precision", "float32"),
        )
        self._jitted = jax.jit(self.exported.call, compiler_options=self.compiler_options or None)
        directory = resolve_cache_dir(cache_dir)
        self.cache = ExecutableCache(directory) if directory is not None else None
        self._digest = hashlib.sha256(blob).hexdigest()

    def __call__(self, *inputs: Any, **named: Any) -> dict[str, Any]:
        args = self._bind(inputs, named)
        if self.cache is not None:
            key = f"aot:{self._digest}|{sorted(self.compiler_options.items())}"
            compiled = self.cache.compiled(key, lambda: self._jitted.lower(self.params, *args))
            values = compiled(self.params, *args)
        else:
            values = self._jitted(self.params, *args)
        return dict(zip(self.output_names, values, strict=True))

    def lower(self, *inputs: Any, **named: Any) -> Any:
        """The :class:`jax.stages.Lowered` program a call on these inputs runs."""
        return self._jitted.lower(self.params, *self._bind(inputs, named))

    def _bind(self, inputs: Sequence[Any], named: Mapping[str, Any]) -> list[Any]:
        if len(inputs) > len(self.input_names):
            raise InputError(
                f"the artifact takes {len(self.input_names)} inputs, got {len(inputs)}"
            )
        bound = dict(zip(self.input_names, inputs, strict=False))
        for name, value in named.items():
            if name not in self.input_names or name in bound:
                raise InputError(
                    f"unexpected or repeated input {name!r}; the artifact takes {self.input_names}"
                )
            bound[name] = value
        args = []
        for name, (shape, dtype) in zip(self.input_names, self._specs, strict=True):
            if name not in bound:
                raise InputError(f"missing input {name!r}")
            value = bound[name]
            if tuple(np.shape(value)) != shape:
                raise InputError(
                    f"input {name!r} has shape {tuple(np.shape(value))}; the "
                    f"artifact was compiled for {shape}"
                )
            value = value if hasattr(value, "dtype") else np.asarray(value)
            args.append(value.astype(dtype) if value.dtype != dtype else value)
        return args


def load_artifact(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> AotModel:
    """Load an artifact written by :func:`export_model` (or ``onnx2jax compile``).

    With ``cache_dir`` (or ``$ONNX2JAX_CACHE_DIR``) the XLA executable is cached too.
    """
    return AotModel(path, cache_dir)
