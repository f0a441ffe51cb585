"""The sentence-embedding pipeline: equal to sentence-transformers, one compilation per bucket."""

from __future__ import annotations

import huggingface_hub
import huggingface_hub.constants
import jax
import numpy as np
import pytest
import torch

import onnx2jax
from onnx2jax.core.errors import InputError, ModelLoadError
from onnx2jax.core.model import inference_compiler_options
from onnx2jax.text import length_buckets, pad_tokens, pool, pooling_modes
from tests.hub_cache import WORDS, put_in_cache, tiny_text_repo
from tests.models.exports import minilm_dir

ST_FILES = (
    "tokenizer.json",
    "modules.json",
    "sentence_bert_config.json",
    "config.json",
    "1_Pooling/config.json",
)

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "hi",
    "",
    "   leading and trailing spaces   ",
    "UPPER case and lower case",
    "Ünïcödé, accents: café, naïve, façade; and emoji 🚀🔥",
    "数字和中文字符也应该被正确处理。",
    "Numbers 3.14159, 2,718 and dates 2024-06-01 count as tokens too.",
    "The quick brown fox jumps over the lazy dog.",
    "Short.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "Machine learning models map sentences to dense vectors in a semantic space, "
    "so that similar meanings end up close together and unrelated ones far apart.",
    "JAX compiles a function once per input shape; padding to buckets bounds the number "
    "of compilations no matter how many different sentence lengths arrive.",
    "ONNX is an open format for machine learning models, with operators, opsets and "
    "a protobuf serialization that many runtimes and converters understand.",
    " ".join(["a very long sentence that goes past the maximum sequence length"] * 30),
    "Tokens: [CLS] [SEP] [PAD] [MASK] written out literally.",
    "tab\tseparated\tand\nnew\nlines",
    "Punctuation!!! ??? ... --- ;;;",
    "I love this movie.",
    "I hate this movie.",
    "This movie was okay, neither great nor terrible.",
    "The weather today is sunny with a light breeze from the west.",
    "Stock markets fell sharply after the announcement of new tariffs.",
    "She sells sea shells by the sea shore.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "Repeat repeat repeat repeat repeat repeat repeat repeat repeat repeat repeat.",
    "ok",
]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_minilm_embeddings_equal_sentence_transformers(tmp_path, offline, minilm_legacy_onnx):
    from sentence_transformers import SentenceTransformer

    files = {name: minilm_dir() / name for name in ST_FILES}
    files["onnx/model.onnx"] = minilm_legacy_onnx
    put_in_cache(tmp_path / "cache", "sentence-transformers/all-MiniLM-L6-v2", files)
    encoder = onnx2jax.SentenceEncoder.from_hub(
        "sentence-transformers/all-MiniLM-L6-v2", cache_dir=tmp_path / "cache"
    )
    assert encoder.pooling == ("mean",) and encoder.normalize and encoder.max_length == 256

    got = encoder.encode(SENTENCES)
    expected = SentenceTransformer(str(minilm_dir()), device="cpu").encode(SENTENCES)
    assert got.shape == expected.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)

    lengths = [len(e.ids) for e in encoder.tokenizer.encode_batch(SENTENCES)]
    assert len(set(lengths)) > 15  # many lengths ...
    used = {next(b for b in encoder.buckets if b >= n) for n in lengths}
    assert encoder.compilations <= len(used)  # ... but one compilation per bucket at most
    before = encoder.compilations
    single = encoder.encode(SENTENCES[6])  # a new batch, of a bucket already compiled
    assert encoder.compilations == before
    np.testing.assert_allclose(single, expected[6], rtol=0, atol=1e-5)

    # The opt-in bfloat16 products: other numbers, the same embeddings to 3 decimals.
    rounded = onnx2jax.SentenceEncoder.from_hub(
        "sentence-transformers/all-MiniLM-L6-v2", cache_dir=tmp_path / "cache", precision="bfloat16"
    )
    assert rounded.model.precision == "bfloat16"
    approx = rounded.encode(SENTENCES[:4])
    cosine = np.sum(approx * expected[:4], axis=1)  # both normalised
    assert np.all(cosine > 0.999) and not np.allclose(approx, expected[:4], rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # its import path moved in v6
@pytest.mark.parametrize(
    "mode", ["cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]
)
def test_pool_equals_sentence_transformers_pooling(mode):
    from sentence_transformers.models import Pooling

    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 7, 5)).astype(np.float32)
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6], np.int64)
    expected = Pooling(5, pooling_mode=mode)(
        {"token_embeddings": torch.from_numpy(hidden), "attention_mask": torch.from_numpy(mask)}
    )["sentence_embedding"].numpy()
    np.testing.assert_allclose(pool(hidden, mask, [mode]), expected, rtol=1e-6, atol=1e-6)


def test_pooling_config_forms():
    legacy = {
        "word_embedding_dimension": 384,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": True,
    }
    assert pooling_modes(legacy) == ("max", "mean")  # sentence-transformers' order
    assert pooling_modes({"pooling_mode": "cls"}) == ("cls",)
    assert pooling_modes({"word_embedding_dimension": 8}) == ("mean",)
    with pytest.raises(ModelLoadError, match="unknown pooling mode"):
        pooling_modes({"pooling_mode": "median"})


def test_buckets_and_padding(tmp_path):
    assert length_buckets(512) == (16, 32, 64, 128, 256, 512)
    assert length_buckets(100, smallest=8) == (8, 16, 32, 64, 100)
    encoder = onnx2jax.SentenceEncoder.from_folder(_tiny(tmp_path), batch_size=4)
    tokens = pad_tokens(encoder.tokenizer.encode_batch(["the cat", "a"]), (4, 8), rows=3)
    assert tokens["input_ids"].tolist() == [[2, 4, 5, 3], [2, 9, 3, 0], [0, 0, 0, 0]]
    assert tokens["attention_mask"].sum(axis=1).tolist() == [4, 3, 0]


def _tiny(folder, **options):
    tiny_text_repo(folder, **options)
    return folder


def test_one_compilation_per_bucket_and_order_kept(tmp_path):
    encoder = onnx2jax.SentenceEncoder.from_folder(
        _tiny(tmp_path), batch_size=4, buckets=(4, 8, 16)
    )
    sentences = [" ".join(WORDS[: n % 9]) for n in range(40)]  # 2 to 10 tokens
    got = encoder.encode(sentences)
    assert encoder.compilations == 3  # lengths 2..10 fall in buckets 4, 8 and 16
    for i in (0, 5, 17, 39):
        np.testing.assert_allclose(got[i], encoder.encode(sentences[i]), rtol=1e-6)
    assert encoder.compilations == 3
    with pytest.raises(InputError, match="at least one sentence"):
        encoder.encode([])


def test_embed_is_pure_and_differentiable(tmp_path):
    encoder = onnx2jax.SentenceEncoder.from_folder(_tiny(tmp_path))
    tokens = encoder.tokenize(["the cat sat", "a dog ran"])

    def similarity(params):
        a, b = encoder.embed(params, tokens)
        return a @ b

    grads = jax.grad(similarity)(encoder.params)
    assert set(grads) == set(encoder.params)
    assert float(np.abs(grads["words"]).sum()) > 0
    # Called directly, embed compiles with the XLA options model(...) picks for the tokens
    # (JAX refuses them on a jit inside someone's trace, as under grad above).
    plain = np.asarray(encoder.embed(encoder.params, tokens))
    options = inference_compiler_options(tokens, encoder.model.compiler_options)
    assert tuple(sorted(options.items())) in encoder._embed_jits
    np.testing.assert_allclose(
        plain, np.asarray(jax.jit(encoder.embed)(encoder.params, tokens)), rtol=1e-5, atol=1e-6
    )
