"""Hostile files on disk: nothing onnx2jax reads back may run code or read outside the model.

Each test builds one situation from SECURITY.md (a planted pickle or library, a folder others
can write, a corrupt or misplaced cache entry, a symlink out of the model's folder, absurd
external-data extents) and checks for the clear error or the safe outcome.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx2jax
from onnx2jax import native
from onnx2jax.core import loader, safety
from onnx2jax.core.errors import ModelLoadError, Onnx2JaxError, UnsafeCacheWarning
from onnx2jax.runtime import aot
from tests.hub_cache import put_in_cache

ROOT = Path(__file__).resolve().parents[2]
W = np.arange(4, dtype=np.float32) * 10
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
POSIX = hasattr(os, "getuid")


@pytest.fixture(autouse=True)
def own_key(tmp_path_factory, monkeypatch):
    """Each test signs with a key of its own, in a private folder, never the user's.

    The native kernels are loaded first, with the user's key that signed their manifest:
    otherwise the first model(...) here would rebuild them, signed with a test key.
    """
    native.status()
    folder = tmp_path_factory.mktemp("key")
    os.chmod(folder, 0o700)
    monkeypatch.setenv(safety.KEY_ENV, str(folder / "cache.key"))
    monkeypatch.delenv(aot.CACHE_ENV, raising=False)


def add_model() -> onnx.ModelProto:
    """y = x + w, with w a float initializer (a param) and a free batch size."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=[numpy_helper.from_array(W, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def x_of(rows: int) -> np.ndarray:
    return np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)


def run_cached(folder: Path, rows: int = 2) -> tuple[np.ndarray, aot.ExecutableCache]:
    """One call of a fresh model (as in a new process) through the cache in ``folder``."""
    model = onnx2jax.load(add_model(), cache_dir=folder)
    out = np.asarray(model(x_of(rows))["y"])
    np.testing.assert_array_equal(out, x_of(rows) + W)
    return out, model.engine.cache


def private(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


class Mkdir:
    """Unpickling this creates a folder: the marker that shows code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def live_payload(marker: Path, tmp_path: Path) -> bytes:
    """A pickle that creates ``marker`` when loaded, checked to be live on a copy of it."""
    probe = tmp_path / "probe-marker"
    import pickle

    pickle.loads(pickle.dumps(Mkdir(probe)))
    assert probe.is_dir()  # the payload does run code when unpickled
    return pickle.dumps(Mkdir(marker))


def entry_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jaxexec"))


# ------------------------------------------------------------------ the executable cache
def entry_key(entry: Path) -> str:
    """The full key recorded in a cache entry's header."""
    data = entry.read_bytes()
    start = len(aot.ENTRY_MAGIC) + 8
    size = int.from_bytes(data[len(aot.ENTRY_MAGIC) : start], "big")
    return json.loads(data[start : start + size])["key"]


def test_a_planted_pickle_in_the_cache_does_not_run(tmp_path):
    folder = private(tmp_path / "cache")
    run_cached(folder, rows=2)
    (entry,) = entry_files(folder)
    marker = tmp_path / "ran"
    payload = live_payload(marker, tmp_path)
    # The right key and checksum (both public), but no valid signature: the attacker has no key.
    header = json.dumps(
        {"key": entry_key(entry), "sha256": hashlib.sha256(payload).hexdigest(), "hmac": "0" * 64}
    ).encode()
    forged = aot.ENTRY_MAGIC + len(header).to_bytes(8, "big") + header + payload
    for planted, warns in ((payload, False), (forged, True)):  # the old format, a forgery
        entry.write_bytes(planted)
        if warns:
            with pytest.warns(UnsafeCacheWarning, match="not signed with your cache key"):
                out, cache = run_cached(folder, rows=2)
        else:
            out, cache = run_cached(folder, rows=2)
        assert not marker.exists()
        assert (cache.hits, cache.misses) == (0, 1)
    # The entry was replaced by a good one, which the next process uses.
    _, cache = run_cached(folder, rows=2)
    assert (cache.hits, cache.misses) == (1, 0)
    assert not marker.exists()


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_a_world_writable_cache_folder_is_refused_and_the_model_still_runs(tmp_path):
    folder = private(tmp_path / "shared")
    run_cached(folder)
    (entry,) = entry_files(folder)
    marker = tmp_path / "ran"
    payload = live_payload(marker, tmp_path)
    entry.write_bytes(payload)  # planted under the very name the next call looks for
    os.chmod(folder, 0o777)
    model = onnx2jax.load(add_model(), cache_dir=folder)
    with pytest.warns(UnsafeCacheWarning, match="writable by other users.*chmod go-w"):
        out = np.asarray(model(x_of(2))["y"])
    np.testing.assert_array_equal(out, x_of(2) + W)
    cache = model.engine.cache
    assert cache.refused and (cache.hits, cache.misses) == (0, 1)
    # Nothing read (no marker) and nothing written (the planted bytes are still there, alone).
    assert not marker.exists()
    assert entry_files(folder) == [entry] and entry.read_bytes() == payload


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_a_cache_under_a_folder_others_can_write_is_refused(tmp_path):
    parent = private(tmp_path / "team")
    folder = private(parent / "cache")
    os.chmod(parent, 0o775)  # group-writable, no sticky bit: the group could swap "cache"
    with pytest.warns(UnsafeCacheWarning, match="a folder above"):
        out, cache = run_cached(folder)
    assert not cache.usable() and not entry_files(folder)
    os.chmod(parent, 0o1777)  # sticky, as /tmp: others cannot rename what is ours
    assert safety.folder_problem(folder) is None


@pytest.mark.skipif(not IS_ROOT, reason="needs root to hand files to another user")
def test_folders_and_entries_of_another_user_are_refused(tmp_path):
    folder = private(tmp_path / "theirs")
    os.chown(folder, 65534, 65534)
    with pytest.warns(UnsafeCacheWarning, match="belongs to another user"):
        _, cache = run_cached(folder)
    assert not cache.usable()
    mine = private(tmp_path / "mine")
    run_cached(mine)
    (entry,) = entry_files(mine)
    os.chown(entry, 65534, 65534)
    with pytest.warns(UnsafeCacheWarning, match="belongs to another user"):
        _, cache = run_cached(mine)
    assert (cache.hits, cache.misses) == (0, 1) and entry.stat().st_uid == os.getuid()


def test_a_symlinked_entry_is_not_followed(tmp_path):
    folder = private(tmp_path / "cache")
    run_cached(folder)
    (entry,) = entry_files(folder)
    elsewhere = tmp_path / "elsewhere.bin"
    shutil.move(entry, elsewhere)
    entry.symlink_to(elsewhere)
    with pytest.warns(UnsafeCacheWarning, match="symlink"):
        _, cache = run_cached(folder)
    assert (cache.hits, cache.misses) == (0, 1) and not entry.is_symlink()


def test_an_entry_under_another_keys_name_is_recompiled_and_replaced(tmp_path):
    folder = private(tmp_path / "cache")
    run_cached(folder, rows=2)
    (two,) = entry_files(folder)
    run_cached(folder, rows=3)
    (three,) = [p for p in entry_files(folder) if p != two]
    shutil.copy(two, three)  # the 2-row program stored under the 3-row key's name
    _, cache = run_cached(folder, rows=3)  # run_cached checks the 3-row result
    assert (cache.hits, cache.misses) == (0, 1)
    _, cache = run_cached(folder, rows=3)  # replaced with the right program
    assert (cache.hits, cache.misses) == (1, 0)


FLIPPED = r"""
import sys
from pathlib import Path
import numpy as np
from tests.core.test_security import W, entry_files, run_cached, x_of

folder = Path(sys.argv[1])
(entry,) = entry_files(folder)
data = bytearray(entry.read_bytes())
for at in range(len(data) // 2, len(data), max(1, len(data) // 7)):
    data[at] ^= 0x5A  # bits flipped in the serialized executable
entry.write_bytes(bytes(data))
out, cache = run_cached(folder)
assert (cache.hits, cache.misses) == (0, 1), (cache.hits, cache.misses)
np.testing.assert_array_equal(out, x_of(2) + W)
_, cache = run_cached(folder)
assert (cache.hits, cache.misses) == (1, 0), "the corrupt entry was not replaced"
print("recompiled")
"""


def test_an_entry_with_flipped_bits_is_recompiled_not_loaded(tmp_path):
    folder = private(tmp_path / "cache")
    run_cached(folder)
    # In a child: loading such an entry unchecked aborted the process (an XLA check).
    # No native kernels there: the child signs with the test's key, which did not sign them.
    env = {**os.environ, "ONNX2JAX_NATIVE": "0"}
    done = subprocess.run(
        [sys.executable, "-c", FLIPPED, str(folder)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "recompiled" in done.stdout


def test_an_entry_signed_with_another_key_is_replaced(tmp_path, monkeypatch):
    folder = private(tmp_path / "cache")
    run_cached(folder)
    other = private(tmp_path / "other-key")
    monkeypatch.setenv(safety.KEY_ENV, str(other / "cache.key"))
    with pytest.warns(UnsafeCacheWarning, match="not signed with your cache key"):
        _, cache = run_cached(folder)
    assert (cache.hits, cache.misses) == (0, 1)
    _, cache = run_cached(folder)
    assert (cache.hits, cache.misses) == (1, 0)


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_a_key_others_can_read_turns_the_cache_off(tmp_path, monkeypatch):
    key = private(tmp_path / "keys") / "cache.key"
    key.write_bytes(b"k" * safety.KEY_BYTES)
    os.chmod(key, 0o644)
    monkeypatch.setenv(safety.KEY_ENV, str(key))
    folder = private(tmp_path / "cache")
    with pytest.warns(UnsafeCacheWarning, match="accessible by other users"):
        out, cache = run_cached(folder)
    assert not cache.usable() and not entry_files(folder)
    np.testing.assert_array_equal(out, x_of(2) + W)


def test_the_key_is_created_private_and_reused(tmp_path, monkeypatch):
    key = tmp_path / "fresh" / "sub" / "cache.key"
    monkeypatch.setenv(safety.KEY_ENV, str(key))
    first = safety.cache_secret()
    assert len(first) == safety.KEY_BYTES and safety.cache_secret() == first
    if POSIX:
        assert key.stat().st_mode & 0o077 == 0 and key.parent.stat().st_mode & 0o077 == 0
    assert [p.name for p in key.parent.iterdir()] == ["cache.key"]


# ------------------------------------------------------------------ ahead-of-time artifacts
def rewrite_member(
    artifact: Path, name: str, data: bytes, compression: int = zipfile.ZIP_STORED
) -> None:
    with zipfile.ZipFile(artifact) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    members[name] = data
    with zipfile.ZipFile(artifact, "w") as archive:
        for member, content in members.items():
            archive.writestr(
                member, content, compress_type=compression if member == name else zipfile.ZIP_STORED
            )


def test_an_artifact_with_pickled_params_is_refused_without_running_them(tmp_path):
    model = onnx2jax.load(add_model())
    artifact = aot.export_model(model, {"x": x_of(2)}, tmp_path / "add.o2j")
    np.testing.assert_array_equal(
        np.asarray(aot.load_artifact(artifact)(x_of(2))["y"]), x_of(2) + W
    )
    marker = tmp_path / "ran"
    live_payload(marker, tmp_path)
    params = io.BytesIO()
    evil = np.empty(1, dtype=object)
    evil[0] = Mkdir(marker)
    np.savez(params, p0=evil)
    rewrite_member(artifact, "params.npz", params.getvalue())
    with pytest.raises(Onnx2JaxError, match="not a valid onnx2jax artifact"):
        aot.load_artifact(artifact)
    assert not marker.exists()


def test_an_artifact_with_a_compressed_or_bad_member_is_refused(tmp_path):
    model = onnx2jax.load(add_model())
    artifact = aot.export_model(model, {"x": x_of(2)}, tmp_path / "add.o2j")
    with zipfile.ZipFile(artifact) as archive:
        meta = json.loads(archive.read("meta.json"))
    rewrite_member(artifact, "params.npz", b"\0" * 1000, zipfile.ZIP_DEFLATED)
    with pytest.raises(Onnx2JaxError, match="compressed"):
        aot.load_artifact(artifact)
    artifact = aot.export_model(model, {"x": x_of(2)}, tmp_path / "add2.o2j")
    meta["input_specs"][0]["dtype"] = "object"
    rewrite_member(artifact, "meta.json", json.dumps(meta).encode())
    with pytest.raises(Onnx2JaxError, match="invalid input spec"):
        aot.load_artifact(artifact)


def test_an_artifact_calling_native_code_outside_jax_stable_set_is_refused(tmp_path):
    import jax
    import jax.numpy as jnp

    model = onnx2jax.load(add_model())
    artifact = aot.export_model(model, {"x": x_of(2)}, tmp_path / "add.o2j")

    def hostile(params, x):
        call = jax.ffi.ffi_call("onnx2jax_conv2d", jax.ShapeDtypeStruct((2, 4), jnp.float32))
        return (call(x, pad_h=np.int64(1 << 40)),)

    exported = jax.export.export(
        jax.jit(hostile),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("onnx2jax_conv2d")],
    )([jax.ShapeDtypeStruct((2, 4), jnp.float32)], jax.ShapeDtypeStruct((2, 4), jnp.float32))
    rewrite_member(artifact, "exported.bin", bytes(exported.serialize()))
    with pytest.raises(Onnx2JaxError, match="onnx2jax_conv2d"):
        aot.load_artifact(artifact)


# ------------------------------------------------------------------ native kernels
PLANTED_SO = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
  FILE* f = fopen(MARKER, "w");
  if (f) { fputs("ran", f); fclose(f); }
}
int onnx2jax_conv2d_lanes(void) { return 16; }
int onnx2jax_conv2d_block(void) { return 64; }
"""

NATIVE_CHILD = r"""
import hashlib, json, os, shutil, sys
from pathlib import Path
from onnx2jax import native

planted, case = Path(sys.argv[1]), sys.argv[2]
compiler = native._compiler()
path = native.library_path(compiler)
path.parent.mkdir(parents=True, exist_ok=True)
shutil.copy(planted, path)
if case == "forged-manifest":  # every field right, its sha256 too, but not our signature
    manifest = {**native._expected_manifest(compiler),
                "library_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "hmac": "0" * 64}
    native.manifest_path(path).write_text(json.dumps(manifest))
if case == "world-writable":
    os.chmod(path.parent, 0o777)

def no_build(compiler, target):
    raise RuntimeError("this test builds nothing")

native._build = no_build
print(json.dumps({"reason": native.status().get("reason"), "exists": path.exists()}))
"""


def compile_planted(tmp_path: Path, marker: Path) -> Path:
    """A shared library whose constructor creates ``marker`` when it is loaded."""
    compiler = shutil.which("cc")
    if compiler is None or sys.platform != "linux":
        pytest.skip("needs a C compiler on Linux")
    source = tmp_path / "planted.c"
    source.write_text(PLANTED_SO)
    library = tmp_path / f"{marker.name}.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source), "-o", str(library)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return library


@pytest.mark.parametrize("case", ["no-manifest", "forged-manifest", "world-writable"])
def test_a_planted_library_at_the_kernel_path_is_not_loaded(tmp_path, case):
    if native.cpu_problem() is not None:
        pytest.skip("the kernels are never loaded on this CPU in the first place")
    marker = tmp_path / "constructor-ran"
    library = compile_planted(tmp_path, marker)
    # The same library does run its constructor when loaded (in a child, with its own marker).
    probe = tmp_path / "probe-ran"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import ctypes, sys; ctypes.CDLL(sys.argv[1])",
            str(compile_planted(tmp_path, probe)),
        ],
        check=True,
        timeout=60,
    )
    assert probe.exists()
    folder = tmp_path / "kernels"
    env = {**os.environ, "ONNX2JAX_NATIVE_DIR": str(folder), "ONNX2JAX_NATIVE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", NATIVE_CHILD, str(library), case],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert not marker.exists()
    expected = "writable by other users" if case == "world-writable" else "builds nothing"
    assert expected in state["reason"]


CPU_CHILD = r"""
from onnx2jax import native

def forbidden(*args, **kwargs):
    raise AssertionError("built or loaded the hand-written kernels on a CPU without AVX-512")

native._cpu_flags = lambda: "flags\t\t: fpu sse sse2 avx avx2 fma"
native._build = native._load = forbidden
print(native.status()["reason"])
"""


def test_a_cpu_without_avx512_never_builds_or_loads_the_hand_written_kernels(tmp_path):
    if sys.platform != "linux":
        pytest.skip("the kernels build on Linux x86-64")
    env = {**os.environ, "ONNX2JAX_NATIVE_DIR": str(tmp_path / "kernels"), "ONNX2JAX_NATIVE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CPU_CHILD],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "need AVX-512" in done.stdout or "CPUs" in done.stdout
    assert not list((tmp_path / "kernels").glob("kernels-*"))


# ------------------------------------------------------------------ model folders
def save_external(folder: Path, name: str = "model.onnx", location: str = "weights.bin") -> Path:
    """add_model() with ``w`` in an external file beside it."""
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save_model(
        add_model(),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def set_external(path: Path, **entries: str) -> None:
    """Rewrite the external-data entries (location, offset, length) of ``w`` in place."""
    proto = onnx.load(str(path), load_external_data=False)
    (tensor,) = proto.graph.initializer
    info = {e.key: e.value for e in tensor.external_data}
    info.update(entries)
    del tensor.external_data[:]
    for key, value in info.items():
        tensor.external_data.add(key=key, value=value)
    onnx.save(proto, str(path))


def test_external_data_symlinked_out_of_the_folder_is_refused(tmp_path):
    secret = tmp_path / "outside" / "id_rsa"
    secret.parent.mkdir()
    secret.write_bytes(np.ones(4, np.float32).tobytes())
    model = save_external(tmp_path / "model")
    (tmp_path / "model" / "weights.bin").unlink()
    (tmp_path / "model" / "weights.bin").symlink_to(secret)
    with pytest.raises(ModelLoadError, match="symlink.*outside the model's folder"):
        onnx2jax.load(model)


def test_a_symlinked_subfolder_out_of_the_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    model = save_external(tmp_path / "model")
    shutil.move(tmp_path / "model" / "weights.bin", outside / "weights.bin")
    (tmp_path / "model" / "sub").symlink_to(outside, target_is_directory=True)
    set_external(model, location="sub/weights.bin")
    with pytest.raises(ModelLoadError, match="symlink.*outside"):
        onnx2jax.load(model)


def test_a_linked_model_file_reads_its_external_data_beside_the_link(tmp_path):
    """The model file is the one the caller named (links followed); the data it points at
    is looked up beside the link, inside that folder, never beside the link's target."""
    real = save_external(tmp_path / "elsewhere")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.onnx").symlink_to(real)
    with pytest.raises(ModelLoadError, match="weights.bin.*missing"):
        onnx2jax.load(folder / "model.onnx")
    (folder / "weights.bin").symlink_to(real.parent / "weights.bin")
    with pytest.raises(ModelLoadError, match="symlink.*outside the model's folder"):
        onnx2jax.load(folder / "model.onnx")


def test_symlinks_that_stay_inside_the_folder_load(tmp_path):
    model = save_external(tmp_path / "model", location="data/weights.bin")
    (tmp_path / "model" / "link.bin").symlink_to("data/weights.bin")
    set_external(model, location="link.bin")
    (tmp_path / "model" / "alias.onnx").symlink_to("model.onnx")
    loaded = onnx2jax.load(tmp_path / "model" / "alias.onnx")
    np.testing.assert_array_equal(np.asarray(loaded.params["w"]), W)


def test_the_hugging_face_cache_layout_loads_and_other_repos_blobs_do_not(tmp_path):
    staged = save_external(tmp_path / "staged")
    files = {"onnx/model.onnx": staged, "onnx/weights.bin": staged.parent / "weights.bin"}
    snapshot = put_in_cache(tmp_path / "hub", "org/tiny", files)
    assert (snapshot / "onnx" / "model.onnx").is_symlink()
    loaded = onnx2jax.load(snapshot / "onnx" / "model.onnx")
    np.testing.assert_array_equal(np.asarray(loaded.params["w"]), W)
    # A link from this snapshot into another repo's blobs is not the layout.
    other = put_in_cache(tmp_path / "hub", "org/other", {"x.bin": W.tobytes()})
    weights = snapshot / "onnx" / "weights.bin"
    weights.unlink()
    weights.symlink_to((other / "x.bin").resolve())
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        onnx2jax.load(snapshot / "onnx" / "model.onnx")
    # Nor is the same layout outside a snapshot folder.
    plain = tmp_path / "hub" / "models--org--tiny" / "plain"
    plain.mkdir()
    (plain / "model.onnx").symlink_to((snapshot / "onnx" / "model.onnx").resolve())
    (plain / "weights.bin").symlink_to((snapshot / "onnx" / "weights.bin").resolve())
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        onnx2jax.load(plain / "model.onnx")


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"length": "-4"}, "not a non-negative whole number"),
        ({"offset": "-1"}, "not a non-negative whole number"),
        ({"offset": "1e3"}, "not a non-negative whole number"),
        ({"length": "lots"}, "not a non-negative whole number"),
        ({"length": str(10**15)}, "truncated or the model is corrupt"),
        ({"offset": str(10**15)}, "truncated or the model is corrupt"),
        ({"offset": "4", "length": "16"}, "truncated or the model is corrupt"),
        ({"length": "8"}, "needs 16 bytes, but its external data holds 8"),
    ],
)
def test_bad_external_data_extents_are_clear_errors(tmp_path, entries, message):
    model = save_external(tmp_path / "model")
    set_external(model, **entries)
    with pytest.raises(ModelLoadError, match=message):
        onnx2jax.load(model)
    if "needs" not in message:  # the extent alone is wrong: re-inlining (saving) refuses too
        (tensor,) = onnx.load(str(model), load_external_data=False).graph.initializer
        with pytest.raises(ModelLoadError, match=message):
            loader.external_data_bytes(tensor, model.parent)


HUGE = r"""
import resource, sys, time
import onnx2jax
from onnx2jax.core.errors import ModelLoadError

def virtual_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

# Whatever is mapped now, plus 256 MiB: a 1e15-byte (or 1e12-element) buffer cannot fit.
limit = virtual_bytes() + (256 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
start = time.perf_counter()
try:
    onnx2jax.load(sys.argv[1])
except ModelLoadError as exc:
    print("ModelLoadError", round(time.perf_counter() - start, 3), exc)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc/self/status")
@pytest.mark.parametrize("case", ["length", "dims"])
def test_huge_declared_sizes_fail_fast_under_a_memory_limit(tmp_path, case):
    model = save_external(tmp_path / "model")
    if case == "length":
        set_external(model, length=str(10**15))
    else:  # 1e12 elements declared, 16 bytes stored
        proto = onnx.load(str(model), load_external_data=False)
        del proto.graph.initializer[0].dims[:]
        proto.graph.initializer[0].dims.extend([10**6, 10**6])
        onnx.save(proto, str(model))
    done = subprocess.run(
        [sys.executable, "-c", HUGE, str(model)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ModelLoadError"), done.stdout


def test_negative_dims_in_an_initializer_are_a_clear_error():
    proto = add_model()
    tensor = proto.graph.initializer[0]
    del tensor.dims[:]
    tensor.dims.extend([-2, -4])
    with pytest.raises(ModelLoadError, match="negative dimension"):
        onnx2jax.load(proto)
