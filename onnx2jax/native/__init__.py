"""Native CPU kernels for ``model(...)``: compiled on first use, called through JAX's FFI.

XLA:CPU's convolutions (Eigen) are well behind onnxruntime's on ResNet's shapes, and so are its
dots of few rows (YNNPACK, Eigen) on MiniLM's and GPT-2's; no XLA option in jaxlib changes that
(benchmarks/LOG.md). ``onnx2jax/kernels/conv2d.cc`` is a direct convolution
that keeps its output tile in vector registers (a matrix product is its 1x1 case), and a
Winograd F(2x2, 3x3) convolution for 3x3 ones of stride 1, whose weights ``model(...)`` keeps
transformed.
``onnx2jax/kernels/attention.cc`` computes softmax attention a few query rows at a time with
their scores in cache (XLA wrote the scores out between its ops and ran the batched products
on one thread). They are compiled here, once per machine, with the machine's C++ compiler and
``-march=native`` (the result is cached, see :func:`library_path`), and registered with XLA as
the custom calls ``onnx2jax_conv2d``, ``onnx2jax_winograd`` and ``onnx2jax_attention``.

Only the program ``model(...)`` compiles on the CPU uses them: for 2-D float32 Convs of one
group, with a residual Add and a ReLU after them fused in (onnx2jax/fusion.py); for attention
chains (MatMul, scale, mask, Softmax, MatMul) rewritten into one node (onnx2jax/fusion.py);
and, for inputs of few rows, for MatMul and Gemm by a float32 weight matrix (many rows keep
XLA's dots, measured faster there). :meth:`Model.apply` (so gradients, ``vmap`` and other
backends are unaffected), a batch split over devices and :func:`onnx2jax.aot.export_model`
artifacts keep XLA's kernels.
Without a compiler, on a CPU without AVX-512 (decided before anything is built or loaded), or
with ``ONNX2JAX_NATIVE=0``, XLA's kernels are used; :func:`status` says which and why. The
library is only loaded from a folder no other user can write, and only when the manifest its
build wrote beside it matches these sources, this compiler and CPU and the library's sha256,
signed with this user's key (SECURITY.md).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import hashlib
import hmac
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from onnx2jax import safety, settings

log = logging.getLogger("onnx2jax")

KERNELS = Path(__file__).parent / "kernels"
SOURCES = (KERNELS / "conv2d.cc", KERNELS / "attention.cc")
HEADERS = (KERNELS / "parallel.h",)
TARGET = "onnx2jax_conv2d"
ATTENTION_TARGET = "onnx2jax_attention"
WINOGRAD_TARGET = "onnx2jax_winograd"
# Winograd F(2x2, 3x3) for 3x3 convolutions of stride and dilation 1 with at most this many input
# channels (a multiple of the vector width): faster than the direct kernel up to 256 channels,
# slower at 512, where a block's transformed weights leave L2 (conv2d.cc; benchmarks/LOG.md).
WINOGRAD_MAX_CHANNELS = 256
MIN_LANES = 16  # AVX-512: an AVX2 build was slower than XLA's kernels (conv2d.cc)

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "lanes" once registered, or "reason" why not
_active = threading.local()


def enabled_by_env() -> bool:
    return settings.native_kernels()


def cache_dir() -> Path:
    """Where compiled kernels are kept (:func:`onnx2jax.settings.native_dir`)."""
    return settings.native_dir()


def _compiler() -> str | None:
    for name in settings.compiler_candidates():
        if shutil.which(name):
            return name
    return None


def _cpu_flags() -> str:
    """This CPU's feature flags: a kernel built with -march=native is only valid for them."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def cpu_problem() -> str | None:
    """Why this CPU cannot run the kernels, or None; decided before anything is built or loaded.

    The kernels use 16-lane vectors only when ``-march=native`` defines ``__AVX512F__``
    (conv2d.cc's kLanes), which GCC and Clang do exactly when the CPU reports ``avx512f`` and
    the OS saves its registers, which is when Linux lists the flag in /proc/cpuinfo. Elsewhere
    (no /proc/cpuinfo) :func:`_compiler_problem` decides before a build.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"no native kernels for {platform.machine()} CPUs"
    line = _cpu_flags()
    if line.startswith("flags") and "avx512f" not in line.split(":", 1)[-1].split():
        return "this CPU has no AVX-512 (avx512f); the kernels need AVX-512"
    return None


def _compiler_problem(compiler: str) -> str | None:
    """Why ``compiler -march=native`` would build kernels without AVX-512 here, or None.

    Raises RuntimeError when the compiler does not run at all (a failed build, as before).
    """
    try:
        done = subprocess.run(
            [compiler, "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"the compiler {compiler} cannot run: {exc}") from None
    if done.returncode != 0:
        raise RuntimeError(f"{compiler} -march=native -dM -E failed: {done.stderr.strip()[-500:]}")
    if "__AVX512F__" not in done.stdout:
        return (
            f"{compiler} -march=native does not enable AVX-512 on this machine; the "
            "kernels need AVX-512"
        )
    return None


def _flags(compiler: str) -> list[str]:
    return [compiler, "-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-fPIC"]


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        data = path.read_bytes()
        digest.update(f"{path.name}:{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


def library_path(compiler: str) -> Path:
    """The cached library for these sources, jaxlib, compiler and CPU."""
    key = hashlib.sha256()
    for part in (
        *(path.read_bytes() for path in (*SOURCES, *HEADERS)),
        jax.__version__.encode(),
        compiler.encode(),
        _cpu_flags().encode(),
        platform.machine().encode(),
    ):
        key.update(part)
    return cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"


def manifest_path(library: Path) -> Path:
    """The manifest the build writes beside ``library`` (see :func:`_expected_manifest`)."""
    return library.with_suffix(".json")


def _expected_manifest(compiler: str) -> dict[str, Any]:
    """What a library built here for these sources must record, less its own sha256."""
    return {
        "format": "onnx2jax-kernels/1",
        "sources_sha256": _sources_digest(),
        "compiler": compiler,
        "flags": _flags(compiler)[1:],
        "jax": jax.__version__,
        "cpu_sha256": hashlib.sha256(_cpu_flags().encode()).hexdigest(),
        "machine": platform.machine(),
    }


def _manifest_signature(manifest: dict[str, Any], library_sha256: str) -> str:
    """The HMAC, with this user's secret key (onnx2jax/safety.py), of a manifest: someone who
    could write into the folder still could not make a library of theirs verify."""
    return safety.sign(
        safety.cache_secret(),
        json.dumps(manifest, sort_keys=True).encode(),
        library_sha256.encode(),
    )


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-2000:]}")


def _build(compiler: str, target: Path) -> None:
    """Compile the kernels to ``target`` (written to a temporary file, then renamed) and write
    its manifest. The sources compile side by side (one CPU each), then link."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = _flags(compiler)
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:
        objects = [str(Path(folder) / f"{source.stem}.o") for source in SOURCES]
        with concurrent.futures.ThreadPoolExecutor(len(SOURCES)) as pool:
            list(
                pool.map(
                    _run,
                    [
                        [*flags, f"-I{jax.ffi.include_dir()}", "-c", str(source), "-o", obj]
                        for source, obj in zip(SOURCES, objects, strict=True)
                    ],
                )
            )
        linked = Path(folder) / target.name
        _run([*flags, "-shared", *objects, "-o", str(linked)])
        os.chmod(linked, 0o755)
        library_sha256 = hashlib.sha256(linked.read_bytes()).hexdigest()
        manifest = {
            **_expected_manifest(compiler),
            "library_sha256": library_sha256,
            "hmac": _manifest_signature(_expected_manifest(compiler), library_sha256),
        }
        written = Path(folder) / manifest_path(target).name
        written.write_text(json.dumps(manifest, indent=1))
        # The library first: a manifest never names a library that is not there yet.
        os.replace(linked, target)
        os.replace(written, manifest_path(target))


def _verified_library(compiler: str, path: Path) -> tuple[int | None, str | None]:
    """An open descriptor of ``path`` when it is the library this build recorded (its manifest
    matches the sources, compiler, flags and CPU, and its sha256 the file's), else (None, why).

    Both files are opened without following symlinks and must pass the ownership rules; the
    library is hashed from the descriptor that is then loaded, so it cannot change in between.
    """
    try:
        manifest = json.loads(safety.read_owned_file(manifest_path(path)))
    except FileNotFoundError:
        return None, "it has no manifest"
    except (OSError, ValueError) as exc:
        return None, f"its manifest is unusable ({exc})"
    if not isinstance(manifest, dict):
        return None, "its manifest is unusable"
    recorded = {k: v for k, v in manifest.items() if k not in ("library_sha256", "hmac")}
    expected = _expected_manifest(compiler)
    if recorded != expected:
        return None, "its manifest records other sources, compiler, flags or CPU"
    signature = manifest.get("hmac")
    library_sha256 = manifest.get("library_sha256")
    if not (
        isinstance(signature, str)
        and isinstance(library_sha256, str)
        and hmac.compare_digest(signature, _manifest_signature(expected, library_sha256))
    ):
        return None, "its manifest is not signed with your key (not built by you?)"
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None, "it is missing"
    except OSError as exc:
        return None, f"it cannot be opened ({exc.strerror}; a symlink?)"
    try:
        problem = safety.file_problem(os.fstat(fd), path)
        if problem is None:
            digest = hashlib.sha256()
            with os.fdopen(os.dup(fd), "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            if digest.hexdigest() != manifest.get("library_sha256"):
                problem = "its sha256 differs from the one its build recorded"
    except BaseException:
        os.close(fd)
        raise
    if problem is not None:
        os.close(fd)
        return None, problem
    return fd, None


def _load(compiler: str, path: Path) -> ctypes.CDLL:
    """The verified library at ``path``, rebuilt once when missing or not the one we built."""
    fd, problem = _verified_library(compiler, path)
    if fd is None:
        # Another process may be building the same library: wait for it, then look again.
        with _folder_lock(path.parent):
            fd, problem = _verified_library(compiler, path)
            if fd is None:
                if path.exists():
                    log.info("onnx2jax: rebuilding the native kernels at %s: %s", path, problem)
                compiler_problem = _compiler_problem(compiler)
                if compiler_problem is not None:
                    raise _NotSupported(compiler_problem)
                _build(compiler, path)
                fd, problem = _verified_library(compiler, path)
                if fd is None:
                    raise RuntimeError(
                        f"the library just built at {path} does not verify: {problem}"
                    )
    try:
        # Loaded through the descriptor that was hashed (Linux); the folder rules keep others
        # from replacing the file anyway where /proc/self/fd is absent.
        proc = f"/proc/self/fd/{fd}"
        return ctypes.CDLL(proc if os.path.exists(proc) else str(path))
    finally:
        os.close(fd)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` itself (no lock file left behind), where flock exists."""
    try:
        import fcntl
    except ImportError:  # Windows: builds may race; the loser's library fails to verify
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class _NotSupported(Exception):
    """The compiler or CPU cannot give AVX-512 kernels; the message says why."""


def _register() -> dict[str, Any]:
    if not enabled_by_env():
        return {"reason": "turned off by ONNX2JAX_NATIVE=0"}
    problem = cpu_problem()
    if problem is not None:
        return {"reason": problem}
    compiler = _compiler()
    if compiler is None:
        return {"reason": "no C++ compiler found (c++, g++ or clang++; or set $CXX)"}
    folder = cache_dir()
    problem = safety.private_folder(folder)
    if problem is None:
        try:
            safety.cache_secret()  # signs the manifests
        except OSError as exc:
            problem = str(exc)
    if problem is not None:
        safety.warn_once(
            f"the native kernels in {folder} are not used: {problem}. XLA's "
            "kernels are used instead (or set ONNX2JAX_NATIVE_DIR to a folder of "
            "your own)."
        )
        return {"reason": f"the kernel folder or key is unsafe: {problem}"}
    path = library_path(compiler)
    try:
        library = _load(compiler, path)
        lanes = int(library.onnx2jax_conv2d_lanes())
        block = int(library.onnx2jax_conv2d_block())
        handlers = {
            TARGET: library.Onnx2jaxConv2d,
            ATTENTION_TARGET: library.Onnx2jaxAttention,
            WINOGRAD_TARGET: library.Onnx2jaxWinograd,
        }
    except _NotSupported as exc:
        return {"reason": str(exc)}
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as exc:
        return {"reason": f"the kernels did not build or load: {exc}"}
    if lanes < MIN_LANES:
        return {"reason": f"this CPU has {lanes}-lane vectors; the kernels need AVX-512"}
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return {"lanes": lanes, "block": block, "library": library, "path": path}


def status() -> dict[str, Any]:
    """Whether the native kernels are in use: ``{"lanes": 16, "block": 64, "path": ...}``
    (the vector width in floats, the weight block's output channels and the compiled library)
    or ``{"reason": ...}`` (why not). Builds them on the first call.

    Example:
        >>> import onnx2jax.native
        >>> state = onnx2jax.native.status()
        >>> "lanes" in state or "reason" in state
        True
    """
    with _lock:
        if not _state:
            _state.update(_register())
            if "reason" in _state:
                log.info("onnx2jax: no native kernels, XLA's are used: %s", _state["reason"])
        return {k: v for k, v in _state.items() if k != "library"}


def available() -> bool:
    """Whether ``model(...)`` can use the native kernels on this machine (CPU backend)."""
    return jax.default_backend() == "cpu" and enabled_by_env() and "lanes" in status()


# 2-D Convs; MatMul and Gemm by a weight matrix; softmax attention (onnx2jax/fusion.py)
KINDS = ("conv", "matrix", "attention")


@contextlib.contextmanager
def kernels(kinds: Collection[str]) -> Iterator[None]:
    """Ops traced inside use these kinds of native kernels where they apply (:func:`active`)."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kinds of native kernels {sorted(unknown)}; known: {KINDS}")
    before = getattr(_active, "kinds", frozenset()), getattr(_active, "prepared", {})
    _active.kinds, _active.prepared = frozenset(kinds), {}
    try:
        yield
    finally:
        _active.kinds, _active.prepared = before


def active(kind: str) -> bool:
    """Whether the trace in progress is ``model(...)``'s with native kernels of this kind."""
    return kind in getattr(_active, "kinds", frozenset())


def weight_block(out_channels: int) -> int | None:
    """B when the kernel takes weights of this many output channels (columns of a matrix)
    blocked, ``[O / B, KH, KW, I, B]``: when B divides them. Otherwise it takes them HWIO."""
    block = _state.get("block")
    return block if block and out_channels % block == 0 else None


def blocked_weights(w: Any) -> Any:
    """OIHW Conv weights in the kernel's blocked layout (NumPy or JAX; see weight_block)."""
    o, i, kh, kw = np.shape(w)
    block = _state["block"]
    return w.reshape(o // block, block, i, kh, kw).transpose(0, 3, 4, 2, 1)


def unblocked_weights(w: Any) -> Any:
    """The inverse of :func:`blocked_weights`: OIHW."""
    blocks, kh, kw, i, block = np.shape(w)
    return w.transpose(0, 4, 3, 1, 2).reshape(blocks * block, i, kh, kw)


def winograd_applies(
    w_shape: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> bool:
    """Whether a Conv of these OIHW weights is computed by Winograd F(2x2, 3x3): 3x3 of stride
    and dilation 1, input channels a multiple of the vector width up to
    WINOGRAD_MAX_CHANNELS, output channels a multiple of the weight block."""
    lanes, block = _state.get("lanes"), _state.get("block")
    o, i, kh, kw = w_shape
    return (
        lanes is not None
        and block is not None
        and (kh, kw) == (3, 3)
        and tuple(strides) == (1, 1)
        and tuple(dilations) == (1, 1)
        and i % lanes == 0
        and i <= WINOGRAD_MAX_CHANNELS
        and o % block == 0
    )


# G of F(2x2, 3x3), and its exact left inverse (rows 0, 1 - 2 and 3 of G g give g).
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_WINOGRAD_G_INVERSE = np.array([[1, 0, 0, 0], [0, 1, -1, 0], [0, 0, 0, 1]], np.float32)


def winograd_weights(w: Any) -> Any:
    """OIHW 3x3 weights as the Winograd kernel reads them: U = G w G^T, [O / B, 16, I, B]
    (NumPy or JAX)."""
    o, i, _, _ = np.shape(w)
    block = _state["block"]
    xp = jnp if isinstance(w, jax.Array) else np
    u = xp.einsum("ak,oikl,bl->oiab", _WINOGRAD_G, w, _WINOGRAD_G)
    return u.reshape(o // block, block, i, 16).transpose(0, 3, 2, 1)


def restored_winograd_weights(u: Any) -> Any:
    """The OIHW weights of :func:`winograd_weights`' ``u``. Inside ``model(...)``'s trace the
    result is remembered with ``u``, so that :func:`conv2d` reads ``u`` itself."""
    blocks, _, i, block = np.shape(u)
    w = jnp.einsum(
        "ka,oiab,lb->oikl",
        _WINOGRAD_G_INVERSE,
        jnp.transpose(u, (0, 3, 2, 1)).reshape(blocks * block, i, 4, 4),
        _WINOGRAD_G_INVERSE,
    )
    _remember(w, u, "conv")
    return w


def _remember(weight: Any, prepared: Any, kind: str) -> None:
    """Inside ``model(...)``'s trace with ``kind`` kernels, notes that ``weight`` was restored
    from the ``prepared`` weights ``model(...)`` keeps, so that the kernel reads ``prepared``
    itself (_prepared_for)."""
    remembered = getattr(_active, "prepared", None)
    if remembered is not None and active(kind):
        remembered[id(weight)] = (weight, prepared)


def _prepared_for(weight: Any) -> Any | None:
    """The prepared weights ``weight`` was restored from in this trace (_remember), if any."""
    found = getattr(_active, "prepared", {}).get(id(weight))
    return found[1] if found is not None and found[0] is weight else None


def matrix_blocked(columns: int) -> bool:
    """Whether the kernel reads a [K, N] matrix of this many columns blocked (by blocked_matrix):
    when the block divides them, or when the vector width does not, the last block then padded
    with zero columns (GPT-2's LM head of 50,257). Otherwise it reads the matrix as it is."""
    lanes = _state.get("lanes")
    return weight_block(columns) is not None or (lanes is not None and columns % lanes != 0)


def blocked_matrix(b: Any) -> Any:
    """A [K, N] matrix in the blocked layout of a 1x1 convolution's weights, its columns padded
    with zeros to whole blocks (NumPy or JAX)."""
    k, n = np.shape(b)
    block = _state["block"]
    blocks = -(-n // block)
    if blocks * block != n:
        xp = jnp if isinstance(b, jax.Array) else np
        b = xp.pad(b, ((0, 0), (0, blocks * block - n)))
    return b.reshape(k, blocks, block).transpose(1, 0, 2).reshape(blocks, 1, 1, k, block)


def unblocked_matrix(w: Any, columns: int | None = None) -> Any:
    """The inverse of :func:`blocked_matrix`: [K, N], the first ``columns`` (default all)."""
    blocks, _, _, k, block = np.shape(w)
    return w.reshape(blocks, k, block).transpose(1, 0, 2).reshape(k, blocks * block)[:, :columns]


def restored_matrix(w: Any, columns: int) -> Any:
    """:func:`unblocked_matrix`, remembered inside ``model(...)``'s trace with ``w``, so that
    :func:`matmul` reads ``w`` itself (XLA cancels the transposes of a round trip, but not the
    slice and padding of a padded one)."""
    b = unblocked_matrix(w, columns)
    _remember(b, w, "matrix")
    return b


def conv2d_applies(x: Any, w: Any, group: int) -> bool:
    """Whether :func:`conv2d` computes this Conv: float32, 2-D, one group, output channels a
    multiple of the vector width."""
    lanes = _state.get("lanes")
    return (
        lanes is not None
        and group == 1
        and np.ndim(x) == 4
        and np.ndim(w) == 4
        and x.dtype == np.float32
        and w.dtype == np.float32
        and np.shape(w)[0] % lanes == 0
    )


def conv2d_shape(
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    dilations: Sequence[int],
) -> tuple[int, int, int, int]:
    """The NCHW shape of a 2-D Conv's output."""
    n, _, h, width = x_shape
    out_channels, _, kh, kw = w_shape
    (top, bottom), (left, right) = padding
    oh = (h + top + bottom - (kh - 1) * dilations[0] - 1) // strides[0] + 1
    ow = (width + left + right - (kw - 1) * dilations[1] - 1) // strides[1] + 1
    return n, out_channels, oh, ow


def addend_applies(addend: Any | None, shape: Sequence[int]) -> bool:
    """Whether the kernel can add ``addend`` to its result of ``shape``: none, or float32
    and broadcasting to that shape."""
    return addend is None or (
        getattr(addend, "dtype", None) == np.float32
        and np.broadcast_shapes(np.shape(addend), tuple(shape)) == tuple(shape)
    )


def matmul_applies(a: Any, b: Any) -> bool:
    """Whether :func:`matmul` computes ``a @ b``: float32, ``b`` a matrix, ``a`` of at least 2
    dimensions."""
    return (
        _state.get("lanes") is not None
        and np.ndim(a) >= 2
        and np.ndim(b) == 2
        and a.dtype == np.float32
        and b.dtype == np.float32
        and np.shape(a)[-1] == np.shape(b)[0]
    )


def matmul(a: Any, b: Any, bias: Any | None = None) -> jax.Array:
    """``a @ b (+ bias)`` for a matrix ``b`` [K, N] by the convolution kernel, as a 1x1
    convolution of one row of ``a``'s rows, ``b`` read blocked where :func:`matrix_blocked`
    says so (the blocked copy ``model(...)`` keeps of its params, else laid out here). For
    the 128 rows of MiniLM's and GPT-2's products it is closer to onnxruntime than XLA's Eigen
    or YNNPACK dots (benchmarks/LOG.md)."""
    *lead, k = np.shape(a)
    rows, n = int(np.prod(lead)), np.shape(b)[1]
    if rows == 0:
        return jnp.zeros((*lead, n), jnp.float32) + (0 if bias is None else bias)
    weights = _prepared_for(b)
    blocked = weights is not None or matrix_blocked(n)
    if weights is None:
        b = jnp.asarray(b)
        weights = blocked_matrix(b) if blocked else jnp.reshape(b, (1, 1, k, n))
    y = _kernel(jnp.reshape(a, (1, 1, rows, k)), weights, blocked, bias, (1, 1, rows, n))
    return jnp.reshape(y, (*lead, n))


def conv2d(
    x: Any,
    w: Any,
    b: Any | None,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    dilations: Sequence[int],
    *,
    residual: Any | None = None,
    relu: bool = False,
) -> jax.Array:
    """ONNX Conv (NCHW input, OIHW weights, optional bias) by the native kernel, optionally
    followed by ``+ residual`` (the output's shape) and a ReLU, in the kernel's registers.

    The kernel reads NHWC and blocked (or HWIO) weights: the transposes here cancel against
    XLA's layout of the neighbouring ops and the weights ``model(...)`` keeps in that layout
    (:func:`weight_block`).
    """
    n, out_channels, oh, ow = conv2d_shape(np.shape(x), np.shape(w), strides, padding, dilations)
    (top, _), (left, _) = padding
    if residual is not None:
        residual = jnp.transpose(
            jnp.broadcast_to(residual, (n, out_channels, oh, ow)), (0, 2, 3, 1)
        )
    if winograd_applies(np.shape(w), strides, dilations):
        # Weights prepared by model(...) (restored_winograd_weights) are read as they are;
        # any others are transformed here, on every call.
        u = _prepared_for(w)
        if u is None:
            u = winograd_weights(jnp.asarray(w))
        bias, addend = _bias_and_addend(b, residual, out_channels)
        call = jax.ffi.ffi_call(
            WINOGRAD_TARGET, jax.ShapeDtypeStruct((n, oh, ow, out_channels), jnp.float32)
        )
        y = call(
            jnp.transpose(x, (0, 2, 3, 1)),
            u,
            bias,
            addend,
            pad_h=np.int64(top),
            pad_w=np.int64(left),
            relu=relu,
            add_residual=residual is not None,
        )
        return jnp.transpose(y, (0, 3, 1, 2))
    block = weight_block(out_channels)
    w = jnp.asarray(w)
    weights = blocked_weights(w) if block else jnp.transpose(w, (2, 3, 1, 0))
    y = _kernel(
        jnp.transpose(x, (0, 2, 3, 1)),
        weights,
        block is not None,
        b,
        (n, oh, ow, out_channels),
        strides,
        dilations,
        (top, left),
        residual,
        relu,
    )
    return jnp.transpose(y, (0, 3, 1, 2))


def _bias_and_addend(
    bias: Any | None, residual: Any | None, channels: int
) -> tuple[jax.Array, jax.Array]:
    """The convolution kernels' bias (zeros when none) and residual (empty when none)."""
    bias = jnp.zeros((channels,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    addend = (
        jnp.zeros((0,), jnp.float32) if residual is None else jnp.asarray(residual, jnp.float32)
    )
    return bias, addend


def _kernel(
    x: Any,
    weights: Any,
    blocked: bool,
    bias: Any | None,
    shape: tuple[int, ...],
    strides: Sequence[int] = (1, 1),
    dilations: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0),
    residual: Any | None = None,
    relu: bool = False,
) -> jax.Array:
    """The custom call: NHWC ``x`` (``pads`` = zero rows above it, zero columns left of it),
    weights HWIO or blocked, an NHWC result of ``shape``, plus ``residual`` (NHWC) and a ReLU
    if asked. Blocked weights may have more columns than the result (a padded matrix): the
    bias is padded to them."""
    columns = np.shape(weights)[0] * np.shape(weights)[-1] if blocked else shape[-1]
    if bias is not None and np.shape(bias)[0] < columns:
        bias = jnp.pad(jnp.asarray(bias, jnp.float32), (0, columns - np.shape(bias)[0]))
    bias, addend = _bias_and_addend(bias, residual, columns)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(shape, jnp.float32))
    return call(
        x,
        weights,
        bias,
        addend,
        stride_h=np.int64(strides[0]),
        stride_w=np.int64(strides[1]),
        dilation_h=np.int64(dilations[0]),
        dilation_w=np.int64(dilations[1]),
        pad_h=np.int64(pads[0]),
        pad_w=np.int64(pads[1]),
        blocked=blocked,
        relu=relu,
        add_residual=residual is not None,
    )


def attention_applies(q: Any, kt: Any, v: Any, mask: Any | None, scale: Any) -> bool:
    """Whether :func:`attention` computes ``softmax(scale * (q @ kt) + mask) @ v``: float32
    operands of 3 or 4 dimensions with the same leading ones (no broadcasting between them),
    values a multiple of the vector width wide, a scalar scale and a mask that broadcasts to
    the scores along whole dimensions."""
    lanes = _state.get("lanes")
    operands = (q, kt, v) if mask is None else (q, kt, v, mask)
    if (
        lanes is None
        or np.ndim(q) not in (3, 4)
        or not np.ndim(q) == np.ndim(kt) == np.ndim(v)
        or any(getattr(x, "dtype", None) != np.float32 for x in operands)
        or np.size(scale) != 1
    ):
        return False
    *lead, s, d = np.shape(q)
    *kt_lead, kt_d, t = np.shape(kt)
    *v_lead, v_t, e = np.shape(v)
    # No keys: the softmax is empty and the product zero, which the graph's own ops give.
    if lead != kt_lead or lead != v_lead or kt_d != d or v_t != t or e % lanes or not e or not t:
        return False
    if mask is None:
        return True
    scores = (*lead, s, t)
    try:
        return np.broadcast_shapes(np.shape(mask), scores) == scores
    except ValueError:
        return False


def attention(q: Any, kt: Any, v: Any, mask: Any | None, scale: Any) -> jax.Array:
    """``softmax(scale * (q @ kt) + mask, axis=-1) @ v`` by the native kernel, which keeps each
    query row's scores in cache (onnx2jax/kernels/attention.cc); see :func:`attention_applies`.
    ``q`` [..., S, D], ``kt`` the keys transposed [..., D, T], ``v`` [..., T, E]."""
    q, kt, v = jnp.asarray(q), jnp.asarray(kt), jnp.asarray(v)
    three_d = q.ndim == 3
    if three_d:
        q, kt, v = q[None], kt[None], v[None]
    b, h, s, _ = q.shape
    t, e = v.shape[-2:]
    if mask is None:
        addend = jnp.zeros((0, 0, 0, 0), jnp.float32)
    else:
        addend = jnp.asarray(mask)
        addend = jnp.reshape(addend, (1,) * (4 - addend.ndim) + addend.shape)
        if addend.shape[-1] != t:  # a mask constant along the keys
            addend = jnp.broadcast_to(addend, (*addend.shape[:3], t))
    call = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct((b, h, s, e), jnp.float32))
    out = call(
        q,
        kt,
        v,
        addend,
        jnp.reshape(jnp.asarray(scale, jnp.float32), (1,)),
        masked=mask is not None,
    )
    return out[0] if three_d else out
