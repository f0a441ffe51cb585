"""onnx2jax.from_hub and the text pipeline's hub loading, offline, from a cache the tests write."""

from __future__ import annotations

import huggingface_hub
import huggingface_hub.constants
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx2jax
from onnx2jax.core.errors import ModelLoadError
from onnx2jax.hub import external_data_files, parse_hub_uri
from tests.hub_cache import COMMIT, WORDS, put_in_cache, tiny_text_repo, tiny_text_tables


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this test (huggingface_hub reads the variable once, at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def affine_with_external_data(folder, bias: float):
    """y = x * w + b with w and b stored in an external file beside the model."""
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 3])],
        initializer=[
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.full(3, bias, np.float32), "b"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(
        proto,
        folder / "model.onnx",
        save_as_external_data=True,
        location="model.onnx_data",
        size_threshold=0,
    )
    return folder / "model.onnx", folder / "model.onnx_data"


def test_from_hub_loads_from_the_cache_offline_with_external_data_and_revisions(tmp_path, offline):
    cache = tmp_path / "cache"
    model_v1, data_v1 = affine_with_external_data(tmp_path / "v1", bias=1.0)
    model_v2, data_v2 = affine_with_external_data(tmp_path / "v2", bias=2.0)
    other = "fedcba9876543210fedcba9876543210fedcba98"
    put_in_cache(
        cache,
        "org/affine",
        {"onnx/model.onnx": model_v1, "onnx/model.onnx_data": data_v1},
        commit=COMMIT,
        refs=("v1",),
    )
    put_in_cache(
        cache,
        "org/affine",
        {"onnx/model.onnx": model_v2, "onnx/model.onnx_data": data_v2},
        commit=other,
        refs=("main",),
    )
    x = np.ones((1, 2, 3), np.float32)
    expected = x * np.arange(6, dtype=np.float32).reshape(2, 3)
    cases = [(None, 2.0), ("main", 2.0), ("v1", 1.0), (COMMIT, 1.0), (other, 2.0)]
    for revision, bias in cases:
        model = onnx2jax.from_hub(
            "org/affine", "onnx/model.onnx", revision=revision, cache_dir=cache
        )
        np.testing.assert_allclose(model(x)["y"], expected + bias)


def test_from_hub_without_the_cache_says_which_repo_file_and_revision(tmp_path, offline):
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError) as info:
        onnx2jax.from_hub("org/absent", "onnx/model.onnx", revision="v2", cache_dir=cache)
    message = str(info.value)
    for part in (
        "'onnx/model.onnx'",
        "'org/absent'",
        "revision v2",
        "HF_HUB_OFFLINE=1",
        str(cache),
        "nothing of that repo",
    ):
        assert part in message, (part, message)
    assert info.value.__cause__ is None and info.value.__suppress_context__

    model, data = affine_with_external_data(tmp_path / "m", bias=0.0)
    put_in_cache(cache, "org/partial", {"model.onnx": model})  # external data not cached
    with pytest.raises(
        ModelLoadError,
        match=r"'model.onnx_data' of hub repo 'org/partial' "
        r"\(revision main\).*holds model.onnx",
    ):
        onnx2jax.from_hub("org/partial", cache_dir=cache)
    with pytest.raises(
        ModelLoadError,
        match="'model.onnx' of hub repo 'org/partial' "
        r"\(revision nope\)",
    ):
        onnx2jax.from_hub("org/partial", revision="nope", cache_dir=cache)


def test_from_hub_refuses_external_data_outside_the_model_folder(tmp_path, offline):
    model, _ = affine_with_external_data(tmp_path / "m", bias=0.0)
    proto = onnx.load(model, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../secrets.bin"
    onnx.save(proto, model)
    put_in_cache(tmp_path / "cache", "org/evil", {"onnx/model.onnx": model})
    with pytest.raises(ModelLoadError, match="outside its folder"):
        onnx2jax.from_hub("org/evil", "onnx/model.onnx", cache_dir=tmp_path / "cache")


def test_external_data_files_lists_every_location(tmp_path):
    model, _ = affine_with_external_data(tmp_path, bias=0.0)
    assert external_data_files(onnx.load(model, load_external_data=False)) == ["model.onnx_data"]


@pytest.mark.parametrize(
    "error, expected",
    [
        ("RepositoryNotFoundError", "no such repo on the hub, or it is private"),
        ("GatedRepoError", "the repo is gated"),
        ("RevisionNotFoundError", "has no revision 'v9'"),
        ("RemoteEntryNotFoundError", "has no such file at that revision"),
    ],
)
def test_hub_errors_are_explained(monkeypatch, error, expected):
    import httpx2
    from huggingface_hub import errors

    response = httpx2.Response(404, request=httpx2.Request("HEAD", "https://huggingface.co/x"))

    def fail(*args, **kwargs):
        raise getattr(errors, error)("hub said no", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(
        ModelLoadError,
        match=f"'model.onnx' of hub repo 'org/m' "
        rf"\(revision v9\): .*{expected}",
    ):
        onnx2jax.from_hub("org/m", revision="v9")


def test_parse_hub_uri():
    assert parse_hub_uri("hf://org/m/model.onnx") == ("org/m", "model.onnx", None)
    assert parse_hub_uri("hf://org/m@abc/onnx/model.onnx") == ("org/m", "onnx/model.onnx", "abc")
    with pytest.raises(ModelLoadError, match="hf://OWNER/NAME/FILE.onnx"):
        parse_hub_uri("hf://org/model.onnx")


def test_sentence_encoder_from_hub_reads_model_tokenizer_and_pooling(tmp_path, offline):
    cache = tmp_path / "cache"
    put_in_cache(cache, "org/tiny-st", tiny_text_repo(tmp_path / "repo", pooling="cls"))
    encoder = onnx2jax.SentenceEncoder.from_hub("org/tiny-st", cache_dir=cache)
    assert encoder.pooling == ("cls",) and encoder.normalize and encoder.max_length == 64
    words, types = tiny_text_tables()
    got = encoder.encode(["the cat sat", "a dog ran on the mat"])
    cls = words[2] + types[0]  # [CLS] is token 2
    np.testing.assert_allclose(got, np.stack([cls, cls]) / np.linalg.norm(cls), rtol=1e-6)

    # A repo without sentence-transformers files (recorded absent in the cache): mean, no norm.
    files = tiny_text_repo(tmp_path / "plain")
    files = {k: v for k, v in files.items() if k in ("onnx/model.onnx", "tokenizer.json")}
    put_in_cache(cache, "org/plain", files, missing=("modules.json", "sentence_bert_config.json"))
    encoder = onnx2jax.SentenceEncoder.from_hub("org/plain", cache_dir=cache)
    assert encoder.pooling == ("mean",) and not encoder.normalize
    ids = [2, 4 + WORDS.index("cat"), 3]
    np.testing.assert_allclose(encoder.encode("cat"), words[ids].mean(0) + types[0], rtol=1e-6)

    # Not cached, and not recorded as absent: an error, not silently different pooling.
    put_in_cache(cache, "org/half", files)
    with pytest.raises(ModelLoadError, match="'modules.json' of hub repo 'org/half'"):
        onnx2jax.SentenceEncoder.from_hub("org/half", cache_dir=cache)
