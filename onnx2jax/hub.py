"""Models from the Hugging Face hub, through ``huggingface_hub`` and its cache.

Downloads go to the ordinary Hugging Face cache (``HF_HUB_CACHE``), so a file fetched once is
reused, ``HF_HUB_OFFLINE=1`` works from that cache alone, and a token comes from ``HF_TOKEN`` or
``hf auth login`` unless one is passed. Every failure is a
:class:`~onnx2jax.core.errors.ModelLoadError` naming the repo, the file and the revision.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from onnx2jax.core.errors import ModelLoadError
from onnx2jax.core.loader import external_data_files
from onnx2jax.core.model import Model, load

HUB_PREFIX = "hf://"


def describe(repo_id: str, filename: str, revision: str | None) -> str:
    """How errors and progress messages name a hub file.

    Example:
        >>> describe("org/model", "onnx/model.onnx", None)
        "'onnx/model.onnx' of hub repo 'org/model' (revision main)"
    """
    return f"{filename!r} of hub repo {repo_id!r} (revision {revision or 'main'})"


def hub_file(
    repo_id: str,
    filename: str,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local path of one file of a hub repo, downloaded into the cache if needed.

    Raises :class:`~onnx2jax.core.errors.ModelLoadError` saying which repo, file and revision failed
    and why (offline and not cached, no such repo, revision or file, gated or private repo).

    Example (needs the hub, or the file in the cache):
        >>> path = hub_file("sentence-transformers/all-MiniLM-L6-v2",
        ...                 "tokenizer.json")  # doctest: +SKIP
        >>> path.name  # doctest: +SKIP
        'tokenizer.json'
    """
    path = _fetch(repo_id, filename, revision, cache_dir, token, missing_ok=False)
    assert path is not None
    return path


def optional_hub_file(
    repo_id: str,
    filename: str,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> Path | None:
    """Like :func:`hub_file`, but ``None`` when the repo has no such file.

    Offline, a file counts as absent only when the cache recorded that the hub lacks it; a file
    that merely was never downloaded is an error, so a half-filled cache cannot silently change
    what is loaded.

    Example (needs the hub, or the files in the cache):
        >>> optional_hub_file("sentence-transformers/all-MiniLM-L6-v2",
        ...                   "no_such_file.json") is None  # doctest: +SKIP
        True
    """
    return _fetch(repo_id, filename, revision, cache_dir, token, missing_ok=True)


def repo_fetcher(
    repo_id: str,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> Callable[[str, bool], Path | None]:
    """``fetch(name, required)`` for a hub repo: the local path of one of its files, through
    :func:`hub_file` when the file is required, else :func:`optional_hub_file`.

    Example (needs the hub, or the files in the cache):
        >>> fetch = repo_fetcher("sentence-transformers/all-MiniLM-L6-v2")  # doctest: +SKIP
        >>> fetch("no_such_file.json", False) is None  # doctest: +SKIP
        True
    """

    def fetch(name: str, required: bool) -> Path | None:
        if required:
            return hub_file(repo_id, name, revision, cache_dir=cache_dir, token=token)
        return optional_hub_file(repo_id, name, revision, cache_dir=cache_dir, token=token)

    return fetch


def folder_fetcher(folder: str | os.PathLike) -> Callable[[str, bool], Path | None]:
    """``fetch(name, required)`` for a folder laid out as a hub repo: the file's path, ``None``
    when an optional file is absent, a :class:`~onnx2jax.core.errors.ModelLoadError` when a
    required one is.

    Example:
        >>> fetch = folder_fetcher("/no/such/folder")
        >>> fetch("generation_config.json", False) is None
        True
        >>> fetch("tokenizer.json", True)
        Traceback (most recent call last):
        ...
        onnx2jax.core.errors.ModelLoadError: /no/such/folder/tokenizer.json is missing
    """
    root = Path(folder)

    def fetch(name: str, required: bool) -> Path | None:
        path = root / name
        if path.is_file():
            return path
        if required:
            raise ModelLoadError(f"{path} is missing")
        return None

    return fetch


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in a model's configuration file; a file that cannot be read or parsed is a
    :class:`~onnx2jax.core.errors.ModelLoadError` naming it.

    Example:
        >>> read_json("/no/such/config.json")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        onnx2jax.core.errors.ModelLoadError: cannot read /no/such/config.json: ...
    """
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None


def _fetch(
    repo_id: str,
    filename: str,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
    missing_ok: bool,
) -> Path | None:
    from huggingface_hub import (
        _CACHED_NO_EXIST,
        constants,
        hf_hub_download,
        try_to_load_from_cache,
    )
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = describe(repo_id, filename, revision)
    try:
        return Path(
            hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, token=token)
        )
    except LocalEntryNotFoundError:
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
        if missing_ok and cached is _CACHED_NO_EXIST:
            return None
        cache = Path(cache_dir or constants.HF_HUB_CACHE)
        reason = (
            "offline mode is on (HF_HUB_OFFLINE=1)"
            if constants.is_offline_mode()
            else "the hub cannot be reached"
        )
        files = _cached_files(cache, repo_id, revision)
        hint = (
            f"; the cache holds {', '.join(files)} for that revision"
            if files
            else "; nothing of that repo and revision is cached"
        )
        raise ModelLoadError(
            f"cannot get {what}: it is not in the Hugging Face cache {cache} and {reason}{hint}. "
            "Download it once while online, or point cache_dir / HF_HUB_CACHE at a cache "
            "that has it."
        ) from None
    except GatedRepoError:
        raise ModelLoadError(
            f"cannot get {what}: the repo is gated; accept its terms on huggingface.co and set "
            "HF_TOKEN (or pass token=) to a token of that account"
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"cannot get {what}: no such repo on the hub, or it is private and no valid token "
            "was given (set HF_TOKEN or pass token=)"
        ) from None
    except RevisionNotFoundError:
        raise ModelLoadError(
            f"cannot get {what}: the repo has no revision {revision!r} (a branch, tag or commit)"
        ) from None
    except EntryNotFoundError:
        if missing_ok:
            return None
        raise ModelLoadError(
            f"cannot get {what}: the repo has no such file at that revision; ONNX files often "
            "live in a subfolder, e.g. filename='onnx/model.onnx'"
        ) from None
    except (HFValidationError, ValueError) as exc:  # bad repo ids, filenames with ".."
        raise ModelLoadError(f"cannot get {what}: {exc}") from None
    except OSError as exc:  # network failures, HTTP errors, a cache that cannot be written
        raise ModelLoadError(f"cannot get {what}: {exc}") from None


def _cached_files(cache: Path, repo_id: str, revision: str | None) -> list[str]:
    """Files cached for ``repo_id`` at ``revision`` (a branch, tag or commit), for error hints."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    ref = folder / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else (revision or "")
    snapshot = folder / "snapshots" / commit
    if not commit or not snapshot.is_dir():
        return []
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def download_model(
    repo_id: str,
    filename: str = "model.onnx",
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> Path:
    """Fetch an ``.onnx`` file of a hub repo and every external-data file it needs.

    Returns the path of the model in the cache; its external data sits beside it, as the loader
    expects.

    Example (needs the hub, or the files in the cache):
        >>> path = download_model("sentence-transformers/all-MiniLM-L6-v2",
        ...                       "onnx/model.onnx")  # doctest: +SKIP
        >>> path.name  # doctest: +SKIP
        'model.onnx'
    """
    path = hub_file(repo_id, filename, revision, cache_dir=cache_dir, token=token)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for a file that is not ONNX
        raise ModelLoadError(
            f"{describe(repo_id, filename, revision)} is not a valid ONNX model: {exc}"
        ) from None
    folder = posixpath.dirname(filename)
    for location in external_data_files(proto):
        relative = posixpath.normpath(posixpath.join(folder, location))
        if relative.startswith("../") or posixpath.isabs(relative):
            raise ModelLoadError(
                f"{describe(repo_id, filename, revision)} points at external data {location!r} "
                "outside its folder; refusing to download it"
            )
        hub_file(repo_id, relative, revision, cache_dir=cache_dir, token=token)
    return path


def from_hub(
    repo_id: str,
    filename: str = "model.onnx",
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    **load_options: Any,
) -> Model:
    """Load an ONNX model from a Hugging Face hub repo, external data included.

    ``revision`` is a branch, tag or commit (default ``main``); ``cache_dir`` defaults to the
    Hugging Face cache and ``token`` to ``HF_TOKEN`` or the stored login. ``HF_HUB_OFFLINE=1``
    uses the cache alone. ``load_options`` go to :func:`onnx2jax.load`. Returns an
    :class:`onnx2jax.Model`.

    Example (needs the hub, or the files in the cache):
        >>> import onnx2jax
        >>> model = onnx2jax.from_hub("sentence-transformers/all-MiniLM-L6-v2",
        ...                           "onnx/model.onnx")  # doctest: +SKIP
        >>> model.input_names  # doctest: +SKIP
        ['input_ids', 'attention_mask', 'token_type_ids']
    """
    path = download_model(repo_id, filename, revision, cache_dir=cache_dir, token=token)
    return load(path, **load_options)


def parse_hub_uri(uri: str) -> tuple[str, str, str | None]:
    """Split ``hf://OWNER/NAME[@REVISION]/PATH/IN/REPO`` into repo id, filename and revision.

    Example:
        >>> parse_hub_uri("hf://org/model@v1.0/onnx/model.onnx")
        ('org/model', 'onnx/model.onnx', 'v1.0')
        >>> parse_hub_uri("hf://org/model/model.onnx")
        ('org/model', 'model.onnx', None)
    """
    if not uri.startswith(HUB_PREFIX):
        raise ValueError(f"{uri!r} does not start with {HUB_PREFIX}")
    parts = uri[len(HUB_PREFIX) :].split("/")
    if len(parts) < 3 or not all(parts):
        raise ModelLoadError(
            f"{uri!r} is not a hub model address; write hf://OWNER/NAME/FILE.onnx, optionally "
            "with a revision: hf://OWNER/NAME@REVISION/FILE.onnx"
        )
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", "/".join(parts[2:]), revision or None
