"""A persistent cache of compiled XLA executables, keyed by program, signature and environment.

:class:`ExecutableCache` keeps compiled executables in a folder. A second process that runs the
same model on the same shapes loads the executable instead of tracing and compiling
(``model(...)`` with ``cache_dir`` or ``$ONNX2JAX_CACHE_DIR``: :meth:`Engine.cached_run
<onnx2jax.runtime.engine.Engine.cached_run>`). Opt-in, and JAX's global configuration is left
alone.

Nothing read back runs code unchecked: an entry is unpickled only once its key, checksum and
signature (an HMAC with this user's secret key) match, from a folder no other user can write.
See SECURITY.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from onnx2jax.core import safety, settings

CACHE_ENV = settings.CACHE_DIR_ENV
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
    parts = [
        jax.__version__,
        getattr(jax.lib, "__version__", ""),
        device.platform,
        getattr(device, "device_kind", ""),
        getattr(backend, "platform_version", ""),
        str(jax.config.jax_enable_x64),
        os.environ.get("XLA_FLAGS", ""),
    ]
    return "|".join(str(p) for p in parts)


def signature_key(tree: Any) -> str:
    """Structure, shapes and dtypes of a pytree of arrays (values ignored)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    specs = [
        (
            tuple(np.shape(v)),
            str(
                jax.dtypes.canonicalize_dtype(np.asarray(v).dtype)
                if not hasattr(v, "dtype")
                else jax.dtypes.canonicalize_dtype(v.dtype)
            ),
        )
        for v in leaves
    ]
    return f"{treedef}|{specs}"


class ExecutableCache:
    """Compiled executables on disk, one file per key, written atomically.

    JAX serializes an executable as a pickle (``serialize_executable``), and unpickling runs
    code, so an entry is only unpickled after three checks (:meth:`_verified`): it names the
    full key it was compiled for, its checksum matches, and it carries an HMAC made with this
    user's secret key (:func:`onnx2jax.core.safety.cache_secret`, kept outside the folder), which
    someone who can only write into the folder cannot forge. The backend's raw executable
    bytes alone are not enough to rebuild a callable without pickle (the pytrees and the
    argument layout travel in the pickle), hence the signature rather than another format.
    The folder itself must be this user's and not writable by others
    (:func:`onnx2jax.core.safety.folder_problem`); otherwise the cache is off, with one warning.

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

    @property
    def refused(self) -> str | None:
        """Why the folder is not used (see :meth:`usable`), or None."""
        return self._refused

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
                safety.warn_once(
                    f"the executable cache {self.directory} is not used: "
                    f"{problem}. Models run, compiled in each process."
                )
        return self._secret is not None

    def compiled(
        self, key: str, lower: Callable[[], Any], devices: Sequence[jax.Device] | None = None
    ) -> Any:
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
                        payload,
                        in_tree,
                        out_tree,
                        execution_devices=list(devices or jax.devices()[:1]),
                    )
                    self.hits += 1
                except Exception as exc:  # signed but stale for this jaxlib: compile again
                    log.info("onnx2jax: cache entry %s does not load (%s); recompiling", file, exc)
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
        size = int.from_bytes(data[len(ENTRY_MAGIC) : start], "big")
        if size > len(data) - start:
            return None, "is truncated"
        try:
            header = json.loads(data[start : start + size])
            recorded_key, checksum, signature = (header["key"], header["sha256"], header["hmac"])
        except (ValueError, KeyError, TypeError):
            return None, "has a damaged header"
        body = data[start + size :]
        if recorded_key != full_key:
            return None, "was compiled for another key"
        if not isinstance(checksum, str) or not hmac.compare_digest(
            checksum, hashlib.sha256(body).hexdigest()
        ):
            return None, "is corrupt (checksum mismatch)"
        assert self._secret is not None
        expected = safety.sign(self._secret, full_key.encode(), body)
        if not isinstance(signature, str) or not hmac.compare_digest(signature, expected):
            return None, "is not signed with your cache key (written by someone else?)"
        return body, None

    def _write(self, file: Path, full_key: str, body: bytes) -> None:
        assert self._secret is not None
        header = json.dumps(
            {
                "key": full_key,
                "sha256": hashlib.sha256(body).hexdigest(),
                "hmac": safety.sign(self._secret, full_key.encode(), body),
            }
        ).encode()
        try:
            atomic_write(file, ENTRY_MAGIC + len(header).to_bytes(8, "big") + header + body)
        except OSError as exc:  # a full or read-only disk: the model still runs
            log.info("onnx2jax: cannot write cache entry %s: %s", file, exc)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so a reader sees the
    old file or the new one, never a part.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> target = Path(tempfile.mkdtemp()) / "entry"
        >>> atomic_write(target, b"body")
        >>> target.read_bytes()
        b'body'
    """
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
