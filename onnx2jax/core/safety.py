"""File-permission checks for what onnx2jax reads back from disk and then trusts.

The compile cache (onnx2jax/runtime/cache.py) and the native kernels (onnx2jax/native/) load
things that run code in this process: an unpickled executable, a shared library. They are only read
from folders and files that no other user can have written, the rules ssh applies to
``~/.ssh``:

- the folder and every file read from it are owned by this user (or root) and are not
  writable by group or others;
- every folder above it is owned by this user or root, and is not writable by group or others
  unless its sticky bit is set (``/tmp``: others cannot rename or replace what is ours there);
- files are opened without following a final symlink and checked on the opened descriptor.

On platforms without POSIX owners (Windows) only the symlink rule applies.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
import threading
import warnings
from pathlib import Path

from onnx2jax.core import settings
from onnx2jax.core.errors import UnsafeCacheWarning

log = logging.getLogger("onnx2jax")

KEY_ENV = settings.CACHE_KEY_FILE_ENV
KEY_BYTES = 32

_warned: set[str] = set()
_warned_lock = threading.Lock()


class UnsafePathError(OSError):
    """A folder or file fails the ownership and mode rules; the message says why and how to fix."""


def _posix_owners() -> bool:
    return hasattr(os, "getuid")


def _owner_ok(st: os.stat_result) -> bool:
    return not _posix_owners() or st.st_uid in (os.getuid(), 0)


def warn_once(message: str) -> None:
    """Warn (:class:`~onnx2jax.core.errors.UnsafeCacheWarning`) once per process per message."""
    with _warned_lock:
        if message in _warned:
            return
        _warned.add(message)
    log.warning("onnx2jax: %s", message)
    warnings.warn(message, UnsafeCacheWarning, stacklevel=3)


def folder_problem(path: Path) -> str | None:
    """Why ``path`` (an existing folder) is unsafe to load code from, or None when it is safe.

    Symlinks in the path are resolved first; the real folder and each folder above it are
    checked.
    """
    real = Path(os.path.realpath(path))
    try:
        st = os.stat(real)
    except OSError as exc:
        return f"{path} cannot be examined ({exc.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder"
    if not _owner_ok(st):
        return (
            f"{real} belongs to another user (uid {st.st_uid}); use a folder of your own "
            "(or have it removed and let onnx2jax create it)"
        )
    if _posix_owners() and st.st_mode & 0o022:
        return (
            f"{real} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); fix it "
            f"with: chmod go-w {real}"
        )
    for parent in real.parents:
        try:
            up = os.stat(parent)
        except OSError as exc:
            return f"{parent} cannot be examined ({exc.strerror})"
        if not _owner_ok(up):
            return (
                f"{parent}, a folder above {real}, belongs to another user (uid "
                f"{up.st_uid}), who could replace it; use a folder of your own"
            )
        if _posix_owners() and up.st_mode & 0o022 and not up.st_mode & stat.S_ISVTX:
            return (
                f"{parent}, a folder above {real}, is writable by other users (mode "
                f"{stat.S_IMODE(up.st_mode):o}), who could replace it; fix it with: "
                f"chmod go-w {parent}"
            )
    return None


def private_folder(path: Path) -> str | None:
    """Create ``path`` (mode 0700) if missing; then :func:`folder_problem`."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        return f"{path} cannot be created ({exc.strerror})"
    return folder_problem(path)


def file_problem(st: os.stat_result, path: Path, secret: bool = False) -> str | None:
    """Why the opened file ``path`` (its ``fstat``) is unsafe to trust, or None.

    ``secret``: others must not read it either.
    """
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if not _owner_ok(st):
        return f"{path} belongs to another user (uid {st.st_uid})"
    mask = 0o077 if secret else 0o022
    if _posix_owners() and st.st_mode & mask:
        how = "go-rwx" if secret else "go-w"
        return (
            f"{path} is {'accessible' if secret else 'writable'} by other users (mode "
            f"{stat.S_IMODE(st.st_mode):o}); fix it with: chmod {how} {path}"
        )
    return None


def read_owned_file(path: Path, secret: bool = False) -> bytes:
    """The bytes of ``path``, opened without following a symlink and checked on the open file.

    Raises FileNotFoundError when it is missing and :class:`UnsafePathError` when it is a
    symlink or fails :func:`file_problem`.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafePathError(f"{path} is a symlink; it is not followed") from None
        raise UnsafePathError(f"{path} cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        problem = file_problem(os.fstat(handle.fileno()), path, secret)
        if problem:
            raise UnsafePathError(problem)
        return handle.read()


def key_path() -> Path:
    """Where the per-user secret that signs cache entries is kept: ``$ONNX2JAX_CACHE_KEY_FILE``,
    else ``$XDG_CONFIG_HOME/onnx2jax/cache.key`` (default ``~/.config``), outside any cache."""
    return settings.cache_key_file()


def cache_secret() -> bytes:
    """This user's secret for signing cache entries (created on first use, mode 0600).

    Raises :class:`UnsafePathError` when it cannot be created or fails the rules (its folder
    writable by others, the file readable by others or not owned by this user).
    """
    path = key_path()
    problem = private_folder(path.parent)
    if problem:
        raise UnsafePathError(f"the cache key's folder is unsafe: {problem}")
    try:
        data = read_owned_file(path, secret=True)
    except FileNotFoundError:
        data = _create_secret(path)
    if len(data) != KEY_BYTES:
        raise UnsafePathError(
            f"{path} is not an onnx2jax cache key ({len(data)} bytes); "
            "delete it and a new one is made"
        )
    return data


def _create_secret(path: Path) -> bytes:
    """Write a fresh key beside ``path`` and link it into place: another process that races
    us either wins (its key is used) or loses; nobody reads a half-written key."""
    data = secrets.token_bytes(KEY_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return read_owned_file(path, secret=True)
    finally:
        tmp.unlink(missing_ok=True)
    return data


def sign(secret: bytes, *parts: bytes) -> str:
    """HMAC-SHA256 of ``parts`` (each length-prefixed, so no two splits sign alike)."""
    mac = hmac.new(secret, digestmod="sha256")
    for part in parts:
        mac.update(len(part).to_bytes(8, "big"))
        mac.update(part)
    return mac.hexdigest()


def within(path: Path, root: Path) -> bool:
    """Whether the absolute ``path`` is ``root`` or lies inside it (paths compared as given)."""
    return path == root or root in path.parents
