"""Native CPU kernels for ``model(...)``: their build, checked loading and registration.

XLA:CPU's convolutions (Eigen) are well behind onnxruntime's on ResNet's shapes, and so are its
dots of few rows (YNNPACK, Eigen) on MiniLM's and GPT-2's; no XLA option in jaxlib changes that
(benchmarks/LOG.md). ``kernels/conv2d.cc`` is a direct convolution that keeps its output tile
in vector registers (a matrix product is its 1x1 case), and a Winograd F(2x2, 3x3) convolution
for 3x3 ones of stride 1, whose weights ``model(...)`` keeps transformed.
``kernels/attention.cc`` computes softmax attention a few query rows at a time with their
scores in cache (XLA wrote the scores out between its ops and ran the batched products on one
thread). ``kernels/nbits.cc`` multiplies few rows by MatMulNBits' 4-bit weights as they are
stored, dequantizing them in registers (XLA widened the whole weight to float on every call);
``model(...)`` rewrites com.microsoft MatMulNBits nodes into the NativeMatMulNBits nodes that
call it (runtime/fusion.py).
They are compiled here, once per machine, with the machine's C++ compiler and
``-march=native`` (the result is cached, see :func:`library_path`), and registered with XLA as
the custom calls ``onnx2jax_conv2d``, ``onnx2jax_winograd``, ``onnx2jax_attention`` and
``onnx2jax_nbits``.

They are fast only with AVX-512: an AVX2 build was slower than XLA's kernels. On other x86-64
CPUs, convolutions go to oneDNN (``kernels/onednn.cc``, custom call ``onnx2jax_onednn_conv``),
a library kept by Intel that picks AVX2, AVX-512 or AMX kernels at run time, so its glue is
compiled without ``-march=native``. Which backend computes each kind of kernel
(:func:`backend`, :func:`status`) follows the measurements in benchmarks/README.md, "Kernels":

- with AVX-512, the hand-written kernels for every kind: they were faster than oneDNN's
  (the ``onednn-cpu-gomp`` 3.2 build) on ResNet-50's 3x3 convolutions and on par on its 1x1
  ones; on matrix products of MiniLM's shapes two runs disagreed, so they stay until a quiet
  host decides;
- without it, oneDNN's convolutions: capped at AVX2, ResNet-50 b8 with them took less time
  than with XLA's AVX-512 ones (which an AVX2 host does not even have); and XLA's matrix
  products and attention: oneDNN's AVX2 matrix products were slower than XLA's dots there;
- without oneDNN (not installed: it has wheels for Linux x86-64 only; or it does not build),
  XLA's kernels, as before.

The package:

- this module: the build, the checks before a library is loaded, :func:`status`;
- :mod:`~onnx2jax.native.layouts`: the weight layouts the kernels read (blocked, Winograd);
- :mod:`~onnx2jax.native.calls`: the custom calls, from JAX arrays;
- ``kernels/``: the C++ sources (``onednn.cc``: the oneDNN glue).

Nothing here decides when a kernel runs. The program ``model(...)`` compiles on the CPU
rewrites the nodes the kernels compute into explicit onnx2jax nodes (NativeConv,
NativeMatMul, NativeAttention, NativeMatMulNBits: onnx2jax/runtime/fusion.py,
onnx2jax/ops/native_calls.py) whose inputs are the weights in the kernels' layouts: 2-D
float32 Convs of one group, with a residual Add and a ReLU after them fused in; attention
chains (MatMul, scale, mask, Softmax, MatMul); for inputs of few rows, MatMul and Gemm by a
float32 weight matrix; and 4-bit MatMulNBits (its packed weight as stored).
:meth:`Model.apply` (so gradients, ``vmap`` and other backends are unaffected), a batch split
over devices and :func:`onnx2jax.aot.export_model` artifacts keep XLA's kernels.

Without a compiler, or with ``ONNX2JAX_NATIVE=0``, XLA's kernels are used; on a CPU without
AVX-512 (decided before anything is built or loaded) the hand-written kernels are never built;
:func:`status` says which and why. A library is only loaded from a folder no other user can
write, and only when the manifest its build wrote beside it matches these sources, this
compiler and CPU (and the oneDNN library it links) and the library's sha256, signed with this
user's key (SECURITY.md).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import hashlib
import hmac
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from onnx2jax.core import safety, settings

log = logging.getLogger("onnx2jax")

KERNELS = Path(__file__).parent / "kernels"
SOURCES = (KERNELS / "conv2d.cc", KERNELS / "attention.cc", KERNELS / "nbits.cc")
HEADERS = (KERNELS / "parallel.h",)
ONEDNN_SOURCES = (KERNELS / "onednn.cc",)
TARGET = "onnx2jax_conv2d"
ATTENTION_TARGET = "onnx2jax_attention"
WINOGRAD_TARGET = "onnx2jax_winograd"
NBITS_TARGET = "onnx2jax_nbits"
ONEDNN_CONV_TARGET = "onnx2jax_onednn_conv"
MIN_LANES = 16  # AVX-512: an AVX2 build was slower than XLA's kernels (conv2d.cc)

# The oneDNN build (CPU engine, GNU OpenMP threads) and its headers, as pip installs them. The
# `onednn` wheel is a SYCL build whose CPU engine finds no device without an OpenCL ICD set up
# by environment variables, so it is not used.
ONEDNN_DISTRIBUTION = "onednn-cpu-gomp"
ONEDNN_DEVEL_DISTRIBUTION = "onednn-devel-cpu-gomp"

# 2-D Convs; MatMul and Gemm by a weight matrix; softmax attention; MatMulNBits of 4-bit
# weights (runtime/fusion.py)
KINDS = ("conv", "matrix", "attention", "nbits")

# Which backend computes each kind of kernel: "native" (kernels/conv2d.cc, attention.cc) or
# "onednn" (kernels/onednn.cc); see the module docstring for why.
BACKENDS = ("native", "onednn")

# dnnl::cpu_isa values (oneapi/dnnl/dnnl.hpp) -> the names status() reports.
_ONEDNN_ISAS = {
    0x1: "sse41",
    0x3: "avx",
    0x7: "avx2",
    0xF: "avx2_vnni",
    0x1F: "avx2_vnni_2",
    0x27: "avx512_core",
    0x67: "avx512_core_vnni",
    0xE7: "avx512_core_bf16",
    0x1EF: "avx512_core_fp16",
    0xFEF: "avx512_core_amx",
    0x1FEF: "avx512_core_amx_fp16",
}

_lock = threading.Lock()
_state: dict[str, Any] = {}  # what _register found: see status()


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


def _onednn_flags(compiler: str) -> list[str]:
    # No -march=native: oneDNN picks its kernels for the CPU at run time, the glue only calls it.
    return [compiler, "-O2", "-std=c++17", "-fPIC"]


@dataclass(frozen=True)
class _Library:
    """A library of custom calls built here: its sources, how they compile and link, and what
    else its manifest records (the oneDNN library it was linked against)."""

    name: str
    sources: tuple[Path, ...]
    headers: tuple[Path, ...]
    flags: Callable[[str], list[str]]
    include_dirs: tuple[str, ...] = ()
    link: tuple[str, ...] = ()
    recorded: tuple[tuple[str, str], ...] = ()


_HAND = _Library("kernels", SOURCES, HEADERS, _flags)


def _onednn_files() -> tuple[Path, Path]:
    """The oneDNN library and the folder of its headers, as pip installed them; raises
    _NotSupported when they are not installed."""
    try:
        files = [
            *(importlib.metadata.files(ONEDNN_DISTRIBUTION) or ()),
            *(importlib.metadata.files(ONEDNN_DEVEL_DISTRIBUTION) or ()),
        ]
    except importlib.metadata.PackageNotFoundError as exc:
        raise _NotSupported(f"{exc.args[0] if exc.args else exc} is not installed") from None
    libraries = [f for f in files if f.name == "libdnnl.so.3"]
    headers = [f for f in files if f.as_posix().endswith("include/oneapi/dnnl/dnnl.hpp")]
    if not libraries or not headers:
        raise _NotSupported(f"{ONEDNN_DISTRIBUTION} has no libdnnl.so.3 or headers here")
    library = Path(libraries[0].locate()).resolve()
    include = Path(headers[0].locate()).resolve().parents[2]
    return library, include


def _onednn_library(dnnl: Path, include: Path) -> _Library:
    return _Library(
        "onednn",
        ONEDNN_SOURCES,
        (),
        _onednn_flags,
        (str(include),),
        (f"-L{dnnl.parent}", "-ldnnl"),
        (("onednn_library", str(dnnl)),),
    )


def _sources_digest(library: _Library = _HAND) -> str:
    digest = hashlib.sha256()
    for path in (*library.sources, *library.headers):
        data = path.read_bytes()
        digest.update(f"{path.name}:{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


def library_path(compiler: str, library: _Library = _HAND) -> Path:
    """The cached library for these sources, jaxlib, compiler and CPU."""
    key = hashlib.sha256()
    for part in (
        *(path.read_bytes() for path in (*library.sources, *library.headers)),
        *(value.encode() for _, value in library.recorded),
        jax.__version__.encode(),
        compiler.encode(),
        _cpu_flags().encode(),
        platform.machine().encode(),
    ):
        key.update(part)
    return cache_dir() / f"{library.name}-{key.hexdigest()[:16]}.so"


def manifest_path(library: Path) -> Path:
    """The manifest the build writes beside ``library`` (see :func:`_expected_manifest`)."""
    return library.with_suffix(".json")


def _expected_manifest(compiler: str, library: _Library = _HAND) -> dict[str, Any]:
    """What a library built here for these sources must record, less its own sha256."""
    return {
        "format": "onnx2jax-kernels/1",
        "sources_sha256": _sources_digest(library),
        "compiler": compiler,
        "flags": library.flags(compiler)[1:],
        "jax": jax.__version__,
        "cpu_sha256": hashlib.sha256(_cpu_flags().encode()).hexdigest(),
        "machine": platform.machine(),
        **dict(library.recorded),
    }


def _manifest_signature(manifest: dict[str, Any], library_sha256: str) -> str:
    """The HMAC, with this user's secret key (onnx2jax/core/safety.py), of a manifest: someone who
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
    """Compile the hand-written kernels to ``target`` (see :func:`_build_library`)."""
    _build_library(_HAND, compiler, target)


def _build_library(library: _Library, compiler: str, target: Path) -> None:
    """Compile ``library`` to ``target`` (written to a temporary file, then renamed) and write
    its manifest. The sources compile side by side (one CPU each), then link."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = library.flags(compiler)
    includes = [f"-I{folder}" for folder in (jax.ffi.include_dir(), *library.include_dirs)]
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:
        objects = [str(Path(folder) / f"{source.stem}.o") for source in library.sources]
        with concurrent.futures.ThreadPoolExecutor(len(library.sources)) as pool:
            list(
                pool.map(
                    _run,
                    [
                        [*flags, *includes, "-c", str(source), "-o", obj]
                        for source, obj in zip(library.sources, objects, strict=True)
                    ],
                )
            )
        linked = Path(folder) / target.name
        _run([*flags, "-shared", *objects, *library.link, "-o", str(linked)])
        os.chmod(linked, 0o755)
        library_sha256 = hashlib.sha256(linked.read_bytes()).hexdigest()
        expected = _expected_manifest(compiler, library)
        manifest = {
            **expected,
            "library_sha256": library_sha256,
            "hmac": _manifest_signature(expected, library_sha256),
        }
        written = Path(folder) / manifest_path(target).name
        written.write_text(json.dumps(manifest, indent=1))
        # The library first: a manifest never names a library that is not there yet.
        os.replace(linked, target)
        os.replace(written, manifest_path(target))


def _verified_library(
    compiler: str, path: Path, library: _Library = _HAND
) -> tuple[int | None, str | None]:
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
    expected = _expected_manifest(compiler, library)
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
    """The verified hand-written kernels at ``path`` (see :func:`_load_library`)."""
    return _load_library(_HAND, compiler, path, _build)


def _load_library(
    library: _Library, compiler: str, path: Path, build: Callable[[str, Path], None]
) -> ctypes.CDLL:
    """The verified ``library`` at ``path``, rebuilt once (by ``build``) when missing or not
    the one we built."""
    fd, problem = _verified_library(compiler, path, library)
    if fd is None:
        # Another process may be building the same library: wait for it, then look again.
        with _folder_lock(path.parent):
            fd, problem = _verified_library(compiler, path, library)
            if fd is None:
                if path.exists():
                    log.info("onnx2jax: rebuilding the native kernels at %s: %s", path, problem)
                if library is _HAND:
                    compiler_problem = _compiler_problem(compiler)
                    if compiler_problem is not None:
                        raise _NotSupported(compiler_problem)
                build(compiler, path)
                fd, problem = _verified_library(compiler, path, library)
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
    """Both libraries' states and which backend computes each kind (see :func:`status`)."""
    if not enabled_by_env():
        return {"reason": "turned off by ONNX2JAX_NATIVE=0", "backends": dict.fromkeys(KINDS)}
    if platform.machine().lower() not in ("x86_64", "amd64"):
        # Neither library is for these CPUs: nothing is looked for, built or created.
        return {"reason": cpu_problem(), "backends": dict.fromkeys(KINDS)}
    compiler = _compiler()
    folder_problem = None
    if compiler is not None:
        folder_problem = safety.private_folder(cache_dir())
        if folder_problem is None:
            try:
                safety.cache_secret()  # signs the manifests
            except OSError as exc:
                folder_problem = str(exc)
        if folder_problem is not None:
            safety.warn_once(
                f"the native kernels in {cache_dir()} are not used: {folder_problem}. XLA's "
                "kernels are used instead (or set ONNX2JAX_NATIVE_DIR to a folder of "
                "your own)."
            )
            folder_problem = f"the kernel folder or key is unsafe: {folder_problem}"
    state = _register_hand(compiler, folder_problem)
    # The hand-written kernels where they run (AVX-512), else oneDNN's for what it computes:
    # the measurements behind this are in benchmarks/README.md, "Kernels".
    if "lanes" in state:
        state["backends"] = dict.fromkeys(KINDS, "native")
        return state
    onednn = _register_onednn(compiler, folder_problem)
    state["onednn"] = onednn
    backend = "onednn" if "isa" in onednn else None
    state["backends"] = {"conv": backend, "matrix": None, "attention": None, "nbits": None}
    return state


def _register_hand(compiler: str | None, folder_problem: str | None) -> dict[str, Any]:
    """The hand-written kernels registered: ``{"lanes", "block", "library", "path"}``, or
    ``{"reason": ...}``."""
    problem = cpu_problem()
    if problem is not None:
        return {"reason": problem}
    if compiler is None:
        return {"reason": "no C++ compiler found (c++, g++ or clang++; or set $CXX)"}
    if folder_problem is not None:
        return {"reason": folder_problem}
    path = library_path(compiler)
    try:
        library = _load(compiler, path)
        lanes = int(library.onnx2jax_conv2d_lanes())
        block = int(library.onnx2jax_conv2d_block())
        handlers = {
            TARGET: library.Onnx2jaxConv2d,
            ATTENTION_TARGET: library.Onnx2jaxAttention,
            WINOGRAD_TARGET: library.Onnx2jaxWinograd,
            NBITS_TARGET: library.Onnx2jaxNbits,
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


def _register_onednn(compiler: str | None, folder_problem: str | None) -> dict[str, Any]:
    """The oneDNN glue registered: ``{"isa", "path", "onednn_library", "library"}``, or
    ``{"reason": ...}``."""
    if compiler is None:
        return {"reason": "no C++ compiler found (c++, g++ or clang++; or set $CXX)"}
    if folder_problem is not None:
        return {"reason": folder_problem}
    try:
        dnnl, include = _onednn_files()
        library = _onednn_library(dnnl, include)
        path = library_path(compiler, library)
        # By its full path first: the glue names libdnnl.so.3 and the loader then finds this one
        # (loaded already) rather than searching the library path.
        ctypes.CDLL(str(dnnl))
        glue = _load_library(library, compiler, path, lambda c, t: _build_library(library, c, t))
        isa = int(glue.onnx2jax_onednn_isa())
        handlers = {
            ONEDNN_CONV_TARGET: glue.Onnx2jaxOnednnConv,
        }
    except _NotSupported as exc:
        return {"reason": str(exc)}
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as exc:
        return {"reason": f"the oneDNN kernels did not build or load: {exc}"}
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return {
        "isa": _ONEDNN_ISAS.get(isa, hex(isa)),
        "path": path,
        "onednn_library": dnnl,
        "library": glue,
    }


def _public(state: dict[str, Any]) -> dict[str, Any]:
    return {k: _public(v) if isinstance(v, dict) else v for k, v in state.items() if k != "library"}


def status() -> dict[str, Any]:
    """Which kernels ``model(...)`` uses. ``"backends"`` maps each kind (:data:`KINDS`) to
    "native" (the hand-written kernels), "onednn" or None (XLA's). The other keys describe the
    hand-written kernels as before: ``"lanes"``, ``"block"`` and ``"path"`` (the vector width
    in floats, the weight block's output channels and the compiled library) or ``"reason"``
    (why they are not used); then ``"onednn"`` says ``{"isa": ..., "path": ...}`` (oneDNN's
    instruction set here and the glue library) or ``{"reason": ...}``. Builds them on the
    first call.

    Example:
        >>> import onnx2jax.native
        >>> state = onnx2jax.native.status()
        >>> "lanes" in state or "reason" in state
        True
        >>> sorted(state["backends"])
        ['attention', 'conv', 'matrix', 'nbits']
    """
    with _lock:
        if not _state:
            _state.update(_register())
            if "reason" in _state:
                log.info(
                    "onnx2jax: no hand-written native kernels (%s); backends: %s",
                    _state["reason"],
                    _state["backends"],
                )
        return _public(_state)


def available() -> bool:
    """Whether ``model(...)`` can use native kernels of some kind on this machine (CPU backend).

    Example:
        >>> import onnx2jax.native
        >>> onnx2jax.native.available() == any(onnx2jax.native.status()["backends"].values())
        True
    """
    return (
        jax.default_backend() == "cpu" and enabled_by_env() and any(status()["backends"].values())
    )


def backend(kind: str) -> str | None:
    """The backend that computes native kernels of ``kind`` (one of :data:`KINDS`): "native",
    "onednn", or None (XLA's kernels).

    Example:
        >>> import onnx2jax.native
        >>> onnx2jax.native.backend("attention") in ("native", None)
        True
    """
    return status()["backends"].get(kind)


def lanes() -> int | None:
    """The kernels' vector width in float32 values (16), or None without kernels.

    Example:
        >>> import onnx2jax.native
        >>> onnx2jax.native.lanes() in (None, 16)
        True
    """
    return status().get("lanes")


def block() -> int | None:
    """How many output channels (columns of a matrix) the kernels' blocked weights hold per
    block, or None without kernels.

    Example:
        >>> import onnx2jax.native
        >>> block = onnx2jax.native.block()
        >>> block is None or block % 16 == 0
        True
    """
    return status().get("block")
