"""Start-up without recompiling: a persistent executable cache and ahead-of-time artifacts.

Two independent tools, both opt-in, neither touching JAX's global configuration:

- :class:`ExecutableCache` keeps compiled XLA executables in a folder, keyed by the model's
  graph, the input signature, and the JAX/XLA versions and backend. A second process that runs
  the same model on the same shapes loads the executable instead of tracing and compiling.
  :func:`cached_call` runs a :class:`~onnx2jax.model.Model` through it; the folder comes from
  an argument or the ``ONNX2JAX_CACHE_DIR`` environment variable.
- :func:`export_model` writes an artifact (``onnx2jax compile MODEL -o FILE``): the model
  traced once for fixed input shapes with :mod:`jax.export` (StableHLO) plus its weights.
  :func:`load_artifact` runs it without parsing ONNX or tracing again; with a cache folder it
  skips XLA compilation too.

Nothing read back runs code unchecked: a cache entry is unpickled only once its key,
checksum and signature (an HMAC with this user's secret key) match, from a folder no other
user can write; an artifact is JSON, ``jax.export``'s serialization and an ``.npz`` read
without pickle. See SECURITY.md.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from onnx2jax import safety, settings
from onnx2jax.devices import canonical_input
from onnx2jax.errors import InputError, Onnx2JaxError

CACHE_ENV = settings.CACHE_DIR_ENV
ARTIFACT_FORMAT = "onnx2jax-aot/1"
# An executable cache entry: this, the header's length (8 bytes), a JSON header (the full key,
# the body's sha256, its HMAC), then the body (the pickle of JAX's serialized executable).
ENTRY_MAGIC = b"onnx2jax-exec/2\n"

log = logging.getLogger("onnx2jax")


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cache folder: ``cache_dir`` if given, else ``$ONNX2JAX_CACHE_DIR``, else None (off).

    Example:
        >>> resolve_cache_dir("/tmp/o2j-cache")
        PosixPath('/tmp/o2j-cache')
    """
    if cache_dir is not None:
        return Path(cache_dir)
    return settings.cache_dir()


def environment_key() -> str:
    """What an executable depends on besides the program: versions, backend, device, x64."""
    device = jax.devices()[0]
    backend = jax.extend.backend.get_backend() if hasattr(jax, "extend") else None
    parts = [jax.__version__, getattr(jax.lib, "__version__", ""),
             device.platform, getattr(device, "device_kind", ""),
             getattr(backend, "platform_version", ""), str(jax.config.jax_enable_x64),
             os.environ.get("XLA_FLAGS", "")]
    return "|".join(str(p) for p in parts)


def signature_key(tree: Any) -> str:
    """Structure, shapes and dtypes of a pytree of arrays (values ignored)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    specs = [(tuple(np.shape(v)), str(jax.dtypes.canonicalize_dtype(np.asarray(v).dtype)
                                       if not hasattr(v, "dtype") else
                                       jax.dtypes.canonicalize_dtype(v.dtype)))
             for v in leaves]
    return f"{treedef}|{specs}"


class ExecutableCache:
    """Compiled executables on disk, one file per key, written atomically.

    JAX serializes an executable as a pickle (``serialize_executable``), and unpickling runs
    code, so an entry is only unpickled after three checks (:meth:`_verified`): it names the
    full key it was compiled for, its checksum matches, and it carries an HMAC made with this
    user's secret key (:func:`onnx2jax.safety.cache_secret`, kept outside the folder), which
    someone who can only write into the folder cannot forge. The backend's raw executable
    bytes alone are not enough to rebuild a callable without pickle (the pytrees and the
    argument layout travel in the pickle), hence the signature rather than another format.
    The folder itself must be this user's and not writable by others
    (:func:`onnx2jax.safety.folder_problem`); otherwise the cache is off, with one warning.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp
        >>> cache = ExecutableCache(tempfile.mkdtemp())
        >>> f = jax.jit(lambda x: x * 2)
        >>> run = cache.compiled("double", lambda: f.lower(jnp.ones(3)))
        >>> run(jnp.ones(3)).tolist(), cache.hits, cache.misses
        ([2.0, 2.0, 2.0], 0, 1)
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0
        self._memory: dict[str, Any] = {}
        self._secret: bytes | None = None
        self._refused: str | None = None  # why the folder is not used, once checked

    def path(self, key: str) -> Path:
        """The file of ``key``'s entry."""
        digest = hashlib.sha256(self._full_key(key).encode()).hexdigest()
        return self.directory / f"{digest[:40]}.jaxexec"

    @staticmethod
    def _full_key(key: str) -> str:
        return environment_key() + "||" + key

    def usable(self) -> bool:
        """Whether the folder may be read and written: checked on first use (the folder is
        created, mode 0700, if missing); if not, one warning says why and the cache is off."""
        if self._secret is None and self._refused is None:
            problem = safety.private_folder(self.directory)
            if problem is None:
                try:
                    self._secret = safety.cache_secret()
                except OSError as exc:
                    problem = str(exc)
            if problem is not None:
                self._refused = problem
                safety.warn_once(f"the executable cache {self.directory} is not used: "
                                 f"{problem}. Models run, compiled in each process.")
        return self._secret is not None

    def compiled(self, key: str, lower: Callable[[], Any],
                 devices: Sequence[jax.Device] | None = None) -> Any:
        """The executable for ``key``: from memory, else from disk, else ``lower().compile()``.

        ``lower`` returns a :class:`jax.stages.Lowered`; it is only called on a miss.
        ``devices`` are those the program runs on, in its order (default: JAX's first device);
        JAX would load an executable from disk onto all of a process's devices.
        """
        cached = self._memory.get(key)
        if cached is not None:
            return cached
        from jax.experimental import serialize_executable

        compiled = None
        usable = self.usable()
        full_key = self._full_key(key)
        file = self.path(key)
        if usable:
            body = self._read(file, full_key)
            if body is not None:
                try:
                    payload, in_tree, out_tree = pickle.loads(body)
                    compiled = serialize_executable.deserialize_and_load(
                        payload, in_tree, out_tree,
                        execution_devices=list(devices or jax.devices()[:1]))
                    self.hits += 1
                except Exception as exc:  # signed but stale for this jaxlib: compile again
                    log.info("onnx2jax: cache entry %s does not load (%s); recompiling", file,
                             exc)
                    compiled = None
        if compiled is None:
            self.misses += 1
            compiled = lower().compile()
            if usable:
                try:
                    body = pickle.dumps(serialize_executable.serialize(compiled))
                except Exception:  # a backend that cannot serialize still runs, uncached
                    body = None
                if body is not None:
                    self._write(file, full_key, body)
        self._memory[key] = compiled
        return compiled

    def _read(self, file: Path, full_key: str) -> bytes | None:
        """The verified pickle of ``file``, or None (missing, unsafe, corrupt, another key's
        or not signed with this user's key: then it is recompiled and replaced)."""
        try:
            data = safety.read_owned_file(file)
        except FileNotFoundError:
            return None
        except OSError as exc:
            safety.warn_once(f"cache entry ignored and replaced: {exc}")
            return None
        body, problem = self._verified(data, full_key)
        if problem is not None:
            log.info("onnx2jax: cache entry %s %s; recompiling", file, problem)
            if problem.startswith("is not signed"):
                safety.warn_once(f"cache entry {file} {problem}; it is ignored and replaced")
        return body

    def _verified(self, data: bytes, full_key: str) -> tuple[bytes | None, str | None]:
        """(the pickled executable, None) when ``data`` is an entry for ``full_key`` with a
        matching checksum and this user's signature, else (None, what is wrong)."""
        if not data.startswith(ENTRY_MAGIC) or len(data) < len(ENTRY_MAGIC) + 8:
            return None, "is not an onnx2jax cache entry of this version"
        start = len(ENTRY_MAGIC) + 8
        size = int.from_bytes(data[len(ENTRY_MAGIC):start], "big")
        if size > len(data) - start:
            return None, "is truncated"
        try:
            header = json.loads(data[start:start + size])
            recorded_key, checksum, signature = (header["key"], header["sha256"],
                                                 header["hmac"])
        except (ValueError, KeyError, TypeError):
            return None, "has a damaged header"
        body = data[start + size:]
        if recorded_key != full_key:
            return None, "was compiled for another key"
        if not isinstance(checksum, str) or not hmac.compare_digest(
                checksum, hashlib.sha256(body).hexdigest()):
            return None, "is corrupt (checksum mismatch)"
        assert self._secret is not None
        expected = safety.sign(self._secret, full_key.encode(), body)
        if not isinstance(signature, str) or not hmac.compare_digest(signature, expected):
            return None, "is not signed with your cache key (written by someone else?)"
        return body, None

    def _write(self, file: Path, full_key: str, body: bytes) -> None:
        assert self._secret is not None
        header = json.dumps({"key": full_key, "sha256": hashlib.sha256(body).hexdigest(),
                             "hmac": safety.sign(self._secret, full_key.encode(), body)}
                            ).encode()
        try:
            _atomic_write(file, ENTRY_MAGIC + len(header).to_bytes(8, "big") + header + body)
        except OSError as exc:  # a full or read-only disk: the model still runs
            log.info("onnx2jax: cannot write cache entry %s: %s", file, exc)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_digest(model: Any) -> str:
    """A digest of what compilation depends on: nodes, opsets, I/O, constants, param shapes.

    Float parameters enter only by name, shape and dtype (they are arguments, not constants),
    so fine-tuned weights reuse the same executables.
    """
    proto = model.proto
    h = hashlib.sha256()
    for opset in proto.opset_import:
        h.update(f"{opset.domain}:{opset.version};".encode())
    h.update(f"precision:{getattr(model, 'precision', 'float32')};".encode())
    h.update(f"float16:{getattr(model, 'float16_compute', 'float16')};".encode())
    graph = proto.graph
    for value in list(graph.input) + list(graph.output):
        h.update(value.SerializeToString())
    for node in graph.node:
        h.update(node.SerializeToString())
    for tensor in graph.initializer:
        h.update(f"{tensor.name}:{tensor.data_type}:{list(tensor.dims)}".encode())
        if tensor.name not in model.params:
            h.update(tensor.SerializeToString())
    return h.hexdigest()


def cached_call(model: Any, cache: ExecutableCache, inputs: Mapping[str, Any],
                outputs: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``model`` with its params on ``inputs`` through ``cache``.

    The same as ``model(**inputs)`` for models that run under jit, but the compiled executable
    is read from (or written to) the cache folder.

    Example:
        >>> import tempfile, numpy as np, onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> cache = ExecutableCache(tempfile.mkdtemp())
        >>> cached_call(model, cache, {"image": np.zeros((2, 1, 8, 8), np.float32)})["logits"].shape
        (2, 10)
    """
    bound = model.bind_inputs((), inputs)
    wanted = tuple(outputs) if outputs else None
    digest = getattr(model, "_onnx2jax_digest", None)
    if digest is None:
        digest = model_digest(model)
        model._onnx2jax_digest = digest
    function, options, kernels = model.inference_function(bound)
    # What model(...) passes to its jitted function; a batch split over devices is a program
    # of its own.
    params, placed, devices = model._placed(bound, kernels)
    key = f"model:{digest}|{signature_key((model.params, bound))}|{wanted}|"
    key += str(sorted(options.items())) + "".join(f"|native {kind}" for kind in sorted(kernels))
    key = f"{key}|{signature_key(params)}" + (f"|split over {len(devices)}" if devices else "")
    compiled = cache.compiled(key, lambda: function.lower(params, placed, outputs=wanted),
                              devices or None)
    return compiled(params, {k: canonical_input(v) for k, v in placed.items()})


# ------------------------------------------------------------------ ahead-of-time artifacts
def export_model(model: Any, inputs: Mapping[str, Any], path: str | os.PathLike,
                 outputs: Sequence[str] | None = None) -> Path:
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
    prepared = model._inference_params()  # what model(...) passes to its jitted function
    param_names = list(prepared)

    def run(params: list[Any], *args: Any) -> tuple[Any, ...]:
        result = model._apply_prepared(dict(zip(param_names, params, strict=True)),
                                       dict(zip(names, args, strict=True)), tuple(wanted))
        return tuple(result[name] for name in wanted)

    def spec(value: Any) -> jax.ShapeDtypeStruct:
        dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
        return jax.ShapeDtypeStruct(np.shape(value), jax.dtypes.canonicalize_dtype(dtype))

    params = [prepared[name] for name in param_names]
    try:
        exported = jax.export.export(jax.jit(run))([spec(p) for p in params],
                                                   *[spec(bound[n]) for n in names])
    except Exception as exc:
        raise Onnx2JaxError(f"cannot export the model ahead of time: {exc}") from exc
    meta = {"format": ARTIFACT_FORMAT, "inputs": names, "outputs": wanted,
            "params": param_names, "jax": jax.__version__, "precision": model.precision,
            "input_specs": [{"shape": list(s.shape), "dtype": str(s.dtype)}
                            for s in exported.in_avals[len(params):]]}
    weights = io.BytesIO()
    np.savez(weights, **{f"p{i}": np.asarray(p) for i, p in enumerate(params)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("meta.json", json.dumps(meta, indent=1))
        archive.writestr("exported.bin", bytes(exported.serialize()))
        archive.writestr("params.npz", weights.getvalue())
    path = Path(path)
    _atomic_write(path, buffer.getvalue())
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
        if (not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                           for d in shape)
                or not isinstance(dtype, str) or np.dtype(dtype).kind not in "biufc"):
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
    refused = sorted(t for t in targets
                     if (t not in allowed if allowed is not None else t.startswith("onnx2jax")))
    if refused:
        raise Onnx2JaxError(f"{path} calls native code outside JAX's stable set "
                            f"({', '.join(refused)}); refusing to load it")


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
            raise Onnx2JaxError(f"{path} is not a valid onnx2jax artifact: its program "
                                f"cannot be read ({exc})") from None
        _check_custom_calls(self.exported, path)
        self.input_names: list[str] = list(meta["inputs"])
        self.output_names: list[str] = list(meta["outputs"])
        self.param_names: list[str] = list(meta["params"])
        self.params = jax.device_put(params)
        self._specs = [(tuple(s["shape"]), np.dtype(s["dtype"])) for s in meta["input_specs"]]
        # Imported here: onnx2jax.model imports this module.
        from onnx2jax.model import default_compiler_options, inference_compiler_options

        # The XLA options model(...) would compile these inputs with.
        self.compiler_options = inference_compiler_options(
            {name: jax.ShapeDtypeStruct(shape, dtype)
             for name, (shape, dtype) in zip(self.input_names, self._specs, strict=True)},
            default_compiler_options(), meta.get("precision", "float32"))
        self._jitted = jax.jit(self.exported.call,
                               compiler_options=self.compiler_options or None)
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

    def _bind(self, inputs: Sequence[Any], named: Mapping[str, Any]) -> list[Any]:
        if len(inputs) > len(self.input_names):
            raise InputError(f"the artifact takes {len(self.input_names)} inputs, got "
                             f"{len(inputs)}")
        bound = dict(zip(self.input_names, inputs, strict=False))
        for name, value in named.items():
            if name not in self.input_names or name in bound:
                raise InputError(f"unexpected or repeated input {name!r}; the artifact takes "
                                 f"{self.input_names}")
            bound[name] = value
        args = []
        for name, (shape, dtype) in zip(self.input_names, self._specs, strict=True):
            if name not in bound:
                raise InputError(f"missing input {name!r}")
            value = bound[name]
            if tuple(np.shape(value)) != shape:
                raise InputError(f"input {name!r} has shape {tuple(np.shape(value))}; the "
                                 f"artifact was compiled for {shape}")
            value = value if hasattr(value, "dtype") else np.asarray(value)
            args.append(value.astype(dtype) if value.dtype != dtype else value)
        return args


def load_artifact(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
                  ) -> AotModel:
    """Load an artifact written by :func:`export_model` (or ``onnx2jax compile``).

    With ``cache_dir`` (or ``$ONNX2JAX_CACHE_DIR``) the XLA executable is cached too.
    """
    return AotModel(path, cache_dir)
