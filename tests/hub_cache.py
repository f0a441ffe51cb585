"""Writing files into a Hugging Face hub cache folder offline, in huggingface_hub's layout."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers, processors

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(
    cache: Path,
    repo_id: str,
    files: Mapping[str, bytes | Path],
    commit: str = COMMIT,
    refs: tuple[str, ...] = ("main",),
    missing: tuple[str, ...] = (),
) -> Path:
    """Cache ``files`` (repo path -> content or a file to copy) of ``repo_id`` at ``commit``.

    Blobs go to ``blobs/<sha256>``, the snapshot holds relative symlinks to them, each name in
    ``refs`` points at the commit, and each name in ``missing`` is recorded as absent on the hub
    (``.no_exist``), as huggingface_hub itself does. Returns the snapshot folder.
    """
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    for name in missing:
        marker = repo / ".no_exist" / commit / name
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return snapshot


WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran"]


def tiny_text_repo(
    folder: Path, pooling: str = "mean", normalize: bool = True, dim: int = 4
) -> dict[str, Path]:
    """A sentence-transformers-style repo of a tiny encoder, written into ``folder``.

    The encoder maps token ids and token types to vectors by two embedding tables (Gather, Add),
    so its embeddings are easy to compute by hand: see :func:`tiny_text_tables`. Returns the
    repo's files as ``{path in repo: file}``.
    """
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    words, types = tiny_text_tables(len(vocab), dim)
    ints = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["words", "input_ids"], ["w"]),
            helper.make_node("Gather", ["types", "token_type_ids"], ["t"]),
            helper.make_node("Add", ["w", "t"], ["last_hidden_state"]),
        ],
        "tiny_encoder",
        ints,
        [
            helper.make_tensor_value_info(
                "last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", dim]
            )
        ],
        initializer=[
            numpy_helper.from_array(words, "words"),
            numpy_helper.from_array(types, "types"),
        ],
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "onnx").mkdir(exist_ok=True)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        folder / "onnx" / "model.onnx",
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": dim, "pooling_mode": pooling})
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


def tiny_text_tables(
    vocab_size: int = len(WORDS) + 4, dim: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """The two embedding tables of :func:`tiny_text_repo` (token ids, token types)."""
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((vocab_size, dim)).astype(np.float32),
        rng.standard_normal((2, dim)).astype(np.float32),
    )
