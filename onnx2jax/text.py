"""Sentence embeddings: text in, vectors out, from an ONNX encoder and its ``tokenizer.json``.

:class:`SentenceEncoder` reads a sentence-transformers repo (on the hub or in a folder): the ONNX
model, ``tokenizer.json`` (run by the ``tokenizers`` library), the pooling of
``1_Pooling/config.json``, whether ``modules.json`` ends in a Normalize step, and
``max_seq_length`` from ``sentence_bert_config.json``. Sentences are sorted by length, batched,
padded to a fixed batch size and to a length *bucket* (16, 32, 64, ... up to the maximum), and
run under one ``jax.jit``: each bucket compiles once, whatever the lengths that fall in it.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from onnx2jax.core.errors import InputError, ModelLoadError
from onnx2jax.core.model import Model, load
from onnx2jax.hub import download_model, folder_fetcher, read_json, repo_fetcher
from onnx2jax.runtime.options import (
    inference_compiler_options,
    jit_with_options,
    options_outside_traces,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# The legacy boolean keys of sentence-transformers' Pooling config, in its order.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
TOKENIZER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def pooling_modes(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The pooling modes a sentence-transformers ``1_Pooling/config.json`` asks for.

    Both the current form (``"pooling_mode": "mean"`` or a list) and the legacy booleans are read;
    several modes are concatenated in the order given.

    Example:
        >>> pooling_modes({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
        ('cls',)
        >>> pooling_modes({"pooling_mode": ["mean", "max"]})
        ('mean', 'max')
    """
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key, False))
    modes = modes or ("mean",)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
        raise ModelLoadError(f"unknown pooling mode(s) {unknown}; known: {list(POOLING_MODES)}")
    return modes


def pool(hidden: jax.Array, mask: jax.Array, modes: Sequence[str]) -> jax.Array:
    """Pool token vectors ``hidden`` [batch, seq, dim] over the tokens where ``mask`` is 1.

    Follows sentence-transformers' Pooling for right-padded batches; several modes are
    concatenated.

    Example:
        >>> import numpy as np
        >>> hidden = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
        >>> mask = np.array([[1, 1, 0]])
        >>> np.asarray(pool(hidden, mask, ["mean", "cls"])).tolist()
        [[2.0, 3.0, 4.0, 5.0, 0.0, 1.0, 2.0, 3.0]]
    """
    hidden = jnp.asarray(hidden, jnp.promote_types(hidden.dtype, jnp.float32))
    weights = jnp.asarray(mask).astype(hidden.dtype)[..., None]
    count = jnp.maximum(weights.sum(axis=1), 1e-9)
    vectors = []
    for mode in modes:
        if mode == "cls":
            first = jnp.argmax(jnp.asarray(mask) != 0, axis=1)
            vectors.append(jnp.take_along_axis(hidden, first[:, None, None], axis=1)[:, 0])
        elif mode == "max":
            vectors.append(jnp.where(weights > 0, hidden, -jnp.inf).max(axis=1))
        elif mode == "mean":
            vectors.append((hidden * weights).sum(axis=1) / count)
        elif mode == "mean_sqrt_len_tokens":
            vectors.append((hidden * weights).sum(axis=1) / jnp.sqrt(count))
        elif mode == "weightedmean":
            position = jnp.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype)[None, :, None]
            weighted = weights * position
            vectors.append(
                (hidden * weighted).sum(axis=1) / jnp.maximum(weighted.sum(axis=1), 1e-9)
            )
        elif mode == "lasttoken":
            last = jnp.maximum(weights[..., 0].sum(axis=1).astype(jnp.int32) - 1, 0)
            vectors.append(jnp.take_along_axis(hidden * weights, last[:, None, None], axis=1)[:, 0])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}; known: {list(POOLING_MODES)}")
    return jnp.concatenate(vectors, axis=-1)


def normalize(vectors: jax.Array) -> jax.Array:
    """Scale each row to unit length (as ``torch.nn.functional.normalize``, eps 1e-12).

    Example:
        >>> import numpy as np
        >>> np.allclose(normalize(np.array([[3.0, 4.0]])), [[0.6, 0.8]])
        True
    """
    norm = jnp.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / jnp.maximum(norm, 1e-12)


def length_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Padded sequence lengths: powers of two from ``smallest``, capped by ``max_length``.

    Example:
        >>> length_buckets(256)
        (16, 32, 64, 128, 256)
        >>> length_buckets(384)
        (16, 32, 64, 128, 256, 384)
    """
    buckets = []
    size = smallest
    while size < max_length:
        buckets.append(size)
        size *= 2
    buckets.append(max_length)
    return tuple(buckets)


def pad_tokens(
    encodings: Sequence[Any], buckets: Sequence[int], rows: int | None = None
) -> dict[str, np.ndarray]:
    """Stack ``tokenizers`` encodings into int64 arrays, right-padded with zeros.

    The length is the smallest of ``buckets`` that fits the longest encoding (or that length,
    beyond the last bucket); ``rows`` pads the batch with empty rows.

    Example:
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, "[UNK]"))
        >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tokens = pad_tokens(tok.encode_batch(["a b", "b"]), (4, 8), rows=3)
        >>> tokens["input_ids"].tolist(), tokens["attention_mask"].tolist()
        ([[1, 2, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0]], [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    """
    longest = max((len(e.ids) for e in encodings), default=1)
    length = next((b for b in sorted(buckets) if b >= longest), longest)
    shape = (max(rows or 0, len(encodings)), length)
    arrays = {name: np.zeros(shape, np.int64) for name in TOKENIZER_INPUTS}
    for row, encoding in enumerate(encodings):
        size = len(encoding.ids)
        arrays["input_ids"][row, :size] = encoding.ids
        arrays["attention_mask"][row, :size] = encoding.attention_mask
        arrays["token_type_ids"][row, :size] = encoding.type_ids
    return arrays


def read_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` read from a ``tokenizer.json``; a file it cannot read is a
    :class:`~onnx2jax.core.errors.ModelLoadError` naming it.

    Example:
        >>> read_tokenizer("/no/such/tokenizer.json")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        onnx2jax.core.errors.ModelLoadError: /no/such/tokenizer.json is not a valid ...
    """
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises a bare Exception
        raise ModelLoadError(f"{path} is not a valid tokenizer.json: {exc}") from None


class SentenceEncoder:
    """Sentence embeddings from an ONNX text encoder, equal to sentence-transformers' ``encode``.

    Build it with :meth:`from_hub` or :meth:`from_folder` (which read the repo's tokenizer and
    pooling configuration), or directly from a loaded :class:`~onnx2jax.Model` and a
    ``tokenizers.Tokenizer``. :attr:`compilations` counts the jit compilations so far: at most
    one per length bucket.

    Example (needs the hub, or the files in the cache):
        >>> import onnx2jax
        >>> encoder = onnx2jax.SentenceEncoder.from_hub(
        ...     "sentence-transformers/all-MiniLM-L6-v2")  # doctest: +SKIP
        >>> encoder.encode(["A cat sits.", "Hello world"]).shape  # doctest: +SKIP
        (2, 384)
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Any,
        *,
        pooling: Sequence[str] = ("mean",),
        normalize: bool = True,
        max_length: int = 512,
        batch_size: int = 32,
        buckets: Sequence[int] | None = None,
        output: str | None = None,
        lowercase: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = tuple(pooling)
        for mode in self.pooling:
            if mode not in POOLING_MODES:
                raise ValueError(f"unknown pooling mode {mode!r}; known: {list(POOLING_MODES)}")
        self.normalize = normalize
        self.max_length = max_length
        self.batch_size = batch_size
        self.buckets = tuple(sorted(buckets)) if buckets else length_buckets(max_length)
        self.lowercase = lowercase
        if output is None:
            names = model.output_names
            output = next(
                (n for n in ("last_hidden_state", "token_embeddings") if n in names), names[0]
            )
        elif output not in model.output_names:
            raise InputError(
                f"the model has no output {output!r}; its outputs are {model.output_names}"
            )
        self.output = output
        extra = [n for n in model.input_names if n not in TOKENIZER_INPUTS]
        if extra or "input_ids" not in model.input_names:
            raise InputError(
                f"the model's inputs {model.input_names} are not a text encoder's: expected "
                f"input_ids and optionally attention_mask and token_type_ids"
            )
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_length)
        self.compilations = 0
        self._embed_jits: dict[tuple, Any] = {}

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_hub(
        cls,
        repo_id: str,
        filename: str = "onnx/model.onnx",
        revision: str | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        precision: str = "float32",
        **options: Any,
    ) -> SentenceEncoder:
        """Load a sentence-transformers repo from the hub (or the cache, offline).

        ``options`` (``pooling``, ``normalize``, ``batch_size``, ``buckets``...) override what
        the repo's configuration says; ``precision`` is the model's (see ``onnx2jax.load``).

        Example (needs the hub, or the files in the cache):
            >>> encoder = SentenceEncoder.from_hub(
            ...     "sentence-transformers/all-MiniLM-L6-v2", "onnx/model.onnx")  # doctest: +SKIP
            >>> encoder.pooling  # doctest: +SKIP
            ('mean',)
        """
        fetch = repo_fetcher(repo_id, revision, cache_dir=cache_dir, token=token)
        model_path = download_model(repo_id, filename, revision, cache_dir=cache_dir, token=token)
        return cls._from_files(load(model_path, precision=precision), fetch, options)

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        filename: str = "onnx/model.onnx",
        *,
        precision: str = "float32",
        **options: Any,
    ) -> SentenceEncoder:
        """Load a sentence-transformers folder that holds an ONNX export of the model.

        ``options`` are those of :meth:`from_hub`; ``precision`` is the model's.

        Example:
            >>> SentenceEncoder.from_folder("/no/such/folder")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            onnx2jax.core.errors.ModelLoadError: model file not found: /no/such/folder/onnx/...
        """
        model = load(Path(folder) / filename, precision=precision)
        return cls._from_files(model, folder_fetcher(folder), options)

    @classmethod
    def _from_files(
        cls, model: Model, fetch: Callable[[str, bool], Path | None], options: dict[str, Any]
    ) -> SentenceEncoder:
        settings: dict[str, Any] = {"pooling": ("mean",), "normalize": False}
        modules_path = fetch("modules.json", False)
        for module in read_json(modules_path) if modules_path else []:
            kind = module.get("type", "")
            if kind.endswith("Pooling"):
                config = fetch(posixpath.join(module.get("path") or "", "config.json"), True)
                settings["pooling"] = pooling_modes(read_json(config))
            elif kind.endswith("Normalize"):
                settings["normalize"] = True
        bert_config = fetch("sentence_bert_config.json", False)
        if bert_config:
            config = read_json(bert_config)
            if config.get("max_seq_length"):
                settings["max_length"] = int(config["max_seq_length"])
            settings["lowercase"] = bool(config.get("do_lower_case", False))
        tokenizer = read_tokenizer(fetch("tokenizer.json", True))
        settings.update(options)
        return cls(model, tokenizer, **settings)

    # ---------------------------------------------------------------- running
    @property
    def params(self) -> dict[str, jax.Array]:
        """The model's weights, which :meth:`embed` takes first."""
        return self.model.params

    def tokenize(self, sentences: Sequence[str]) -> dict[str, np.ndarray]:
        """Token ids, attention mask and token types, right-padded to the bucket of the longest.

        Example (needs the hub, or the files in the cache):
            >>> encoder.tokenize(["A cat sits."])["input_ids"].shape  # doctest: +SKIP
            (1, 16)
        """
        return pad_tokens(self._encodings(sentences), self.buckets)

    def _encodings(self, sentences: Sequence[str]) -> list[Any]:
        texts = [str(s).strip() for s in sentences]
        if self.lowercase:
            texts = [t.lower() for t in texts]
        return self.tokenizer.encode_batch(texts)

    def _embed_batch(self, params: Mapping[str, Any], tokens: Mapping[str, Any]) -> jax.Array:
        self.compilations += 1  # runs only while tracing, i.e. once per compilation
        feeds = {k: v for k, v in tokens.items() if k in self.model.input_names}
        hidden = self.model.apply(params, outputs=[self.output], **feeds)[self.output]
        vectors = pool(hidden, tokens["attention_mask"], self.pooling)
        return normalize(vectors) if self.normalize else vectors

    def embed(self, params: Mapping[str, Any], tokens: Mapping[str, Any]) -> jax.Array:
        """Pooled (and normalized) vectors of tokenized input, pure in ``params``.

        The function to differentiate when fine-tuning the encoder on embeddings.

        Example (needs the hub, or the files in the cache):
            >>> tokens = encoder.tokenize(["A cat sits."])  # doctest: +SKIP
            >>> encoder.embed(encoder.params, tokens).shape  # doctest: +SKIP
            (1, 384)
        """
        return self._embed(params, dict(tokens))

    def _embed(self, params: Mapping[str, Any], tokens: dict[str, Any]) -> jax.Array:
        # Compiled with the XLA options model(...) would choose for these tokens, unless the
        # call is part of the caller's own trace (JAX takes options on top-level jits only).
        model = self.model
        options = options_outside_traces(
            inference_compiler_options(tokens, model.compiler_options, model.precision),
            params,
            tokens,
        )
        return jit_with_options(self._embed_jits, self._embed_batch, options)(params, tokens)

    def encode(self, sentences: str | Sequence[str]) -> np.ndarray:
        """Embed sentences: float32 array [n, dim] (or [dim] for a single string).

        Sentences are sorted by length and batched so each batch pads as little as possible;
        the result is in the order given.

        Example (needs the hub, or the files in the cache):
            >>> encoder.encode("A cat sits.").shape  # doctest: +SKIP
            (384,)
        """
        if isinstance(sentences, str):
            return self.encode([sentences])[0]
        sentences = list(sentences)
        if not sentences:
            raise InputError("encode() needs at least one sentence")
        encodings = self._encodings(sentences)
        order = np.argsort([-len(e.ids) for e in encodings], kind="stable")
        results: list[np.ndarray] = []
        for start in range(0, len(order), self.batch_size):
            chunk = [encodings[i] for i in order[start : start + self.batch_size]]
            # A fixed batch size: one compilation per length bucket, whatever the count.
            tokens = pad_tokens(chunk, self.buckets, rows=self.batch_size)
            results.append(np.asarray(self.embed(self.params, tokens))[: len(chunk)])
        embeddings = np.concatenate(results).astype(np.float32)
        out = np.empty_like(embeddings)
        out[order] = embeddings
        return out
