"""Variants of real models as people deploy them, built offline from tests/models/exports.py.

A *base* is one export (MiniLM with its real weights, a small-config transformers model at an
opset and attention implementation, a ResNet-style CNN, a scikit-learn pipeline). A *variant*
is what a deployment tool makes of it: onnxruntime's dynamic and static quantization (QDQ and
QOperator formats), onnxconverter-common's and onnxruntime.transformers' float16 converters,
and onnxruntime.transformers' optimizer. docs/variants.md lists the matrix
tests/models/test_variants.py runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from tests.models.exports import (
    export_minilm,
    export_transformers_variant,
    minilm_inputs,
    sklearn_pipelines,
)

Feeds = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- bases
def build_base(name: str, path: Path) -> Feeds:
    """Export base ``name`` to ``path`` and return the inputs it is compared on.

    Names: ``minilm`` (real weights, TorchScript exporter, opset 17), ``KIND-OPSET-ATTN`` for a
    small transformers model (KIND bert, gpt2, t5, vit, whisper or resnet; ATTN eager or sdpa),
    ``skl-logistic`` and ``skl-mlp`` (skl2onnx pipelines).
    """
    with _inside(path.parent):
        return _build_base(name, path)


@contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """Run with ``folder`` as the working directory: the tools write scratch files there."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _build_base(name: str, path: Path) -> Feeds:
    if name == "minilm":
        export_minilm(path, dynamo=False)
        return minilm_inputs(2, 12)
    if name.startswith("skl-"):
        return sklearn_pipelines(path, name.removeprefix("skl-"))
    kind, opset, attn = name.split("-")
    return export_transformers_variant(kind, path, int(opset), attn)


def calibration_batches(
    feeds: Mapping[str, np.ndarray], count: int = 4, seed: int = 1
) -> list[Feeds]:
    """Calibration inputs like ``feeds``: the feeds themselves and noisy copies of float inputs.

    Integer inputs (ids, masks) are kept as they are, so ids stay valid; floats get unit noise
    so the calibrated ranges cover more than the one test batch.
    """
    rng = np.random.default_rng(seed)
    batches = [dict(feeds)]
    for _ in range(count - 1):
        batches.append(
            {
                k: (v + rng.normal(size=v.shape).astype(v.dtype) if v.dtype.kind == "f" else v)
                for k, v in feeds.items()
            }
        )
    return batches


# -------------------------------------------------------------------------- variants
def quantize_dynamic(
    base: Path, out: Path, feeds: Feeds, weight_type: str = "QInt8", per_channel: bool = False
) -> Path:
    """onnxruntime.quantization.quantize_dynamic (MatMulInteger / DynamicQuantizeLinear)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as quantize

    quantize(
        str(base), str(out), weight_type=getattr(QuantType, weight_type), per_channel=per_channel
    )
    return out


def quantize_static(
    base: Path,
    out: Path,
    feeds: Feeds,
    quant_format: str = "QDQ",
    activation_type: str = "QUInt8",
    weight_type: str = "QInt8",
    per_channel: bool = False,
) -> Path:
    """onnxruntime.quantization.quantize_static with a CalibrationDataReader over ``feeds``.

    The base first goes through ``quant_pre_process`` (shape inference and onnxruntime's basic
    optimizations), the step onnxruntime's quantization guide prescribes; without it the
    QOperator quantizer fails on convolution biases that are not initializers. Its symbolic
    shape inference is skipped: it gives up on these transformer exports (ONNX's own shape
    inference still runs).
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as quantize
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[Feeds] = iter(calibration_batches(feeds))

        def get_next(self) -> Feeds | None:
            return next(self.batches, None)

    prepared = out.with_name(out.stem + "-prepared.onnx")
    quant_pre_process(str(base), str(prepared), skip_symbolic_shape=True)
    quantize(
        str(prepared),
        str(out),
        Reader(),
        quant_format=getattr(QuantFormat, quant_format),
        activation_type=getattr(QuantType, activation_type),
        weight_type=getattr(QuantType, weight_type),
        per_channel=per_channel,
    )
    return out


def float16_converter_common(
    base: Path, out: Path, feeds: Feeds, keep_io_types: bool = True
) -> Path:
    """onnxconverter_common.float16.convert_float_to_float16."""
    from onnxconverter_common.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(base)), keep_io_types=keep_io_types)
    onnx.save(model, str(out))
    return out


def ort_optimize(
    base: Path,
    out: Path,
    feeds: Feeds,
    model_type: str = "bert",
    opt_level: int | None = 1,
    float16: bool = False,
    num_heads: int = 0,
    hidden_size: int = 0,
    mask_format: str | None = None,
    embed_layer_norm: bool = True,
) -> Path:
    """onnxruntime.transformers.optimizer.optimize_model, optionally then its float16 pass.

    ``opt_level`` 1 and 2 first run onnxruntime's own basic or extended graph optimizations
    (the extended ones write com.microsoft ops such as FusedMatMul), then the transformer
    fusions (Attention, SkipLayerNormalization, BiasGelu, ...). ``float16`` runs
    ``OnnxModel.convert_float_to_float16(keep_io_types=True)``, the converter the
    onnxruntime.transformers tools use. ``mask_format`` names an ``AttentionMaskFormat``
    (how the fused Attention takes the mask: ``MaskIndexEnd`` a 1-D index, ``AttentionMask``
    the 2-D mask, ``NoMask`` none); ``embed_layer_norm`` False keeps the embeddings unfused,
    so Attention receives that mask rather than EmbedLayerNormalization's mask index.
    """
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(model_type)
    if mask_format is not None:
        options.attention_mask_format = getattr(AttentionMaskFormat, mask_format)
    options.enable_embed_layer_norm = embed_layer_norm
    optimized = optimize_model(
        str(base),
        model_type=model_type,
        num_heads=num_heads,
        hidden_size=hidden_size,
        optimization_options=options,
        opt_level=opt_level,
    )
    if float16:
        optimized.convert_float_to_float16(keep_io_types=True)
    optimized.save_model_to_file(str(out))
    return out


@dataclass(frozen=True)
class Variant:
    """One deployed form of a base model and how its outputs are judged.

    ``check`` is ``fp32`` (within 1e-4 of the output's scale of onnxruntime on the same file),
    ``fp16`` (no further from onnxruntime's fp32 result than 1.2x onnxruntime's own fp16
    result) or ``quant`` (see tests/models/test_variants.py).
    """

    base: str
    name: str
    tool: str
    check: str
    build: Callable[..., Path] | None = None
    options: Mapping[str, object] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.base}/{self.name}"

    def make(self, base_path: Path, out: Path, feeds: Feeds) -> Path:
        """Write the variant next to ``out`` and return its path (the base itself if no tool)."""
        if self.build is None:
            return base_path
        with _inside(out.parent):
            return self.build(base_path, out, feeds, **self.options)


def _v(base: str, name: str, tool: str, check: str, build=None, **options) -> Variant:
    return Variant(base, name, tool, check, build, options)


_DYN = "onnxruntime.quantization.quantize_dynamic"
_STATIC = "onnxruntime.quantization.quantize_static"
_OCC = "onnxconverter_common.float16"
_OPT = "onnxruntime.transformers.optimizer"

#: The matrix: every tool and option at least once, spread over the model kinds.
VARIANTS: list[Variant] = [
    # The exports themselves, so a variant's failure is never a base's.
    *[
        _v(base, "fp32", "torch.onnx (TorchScript)", "fp32")
        for base in (
            "minilm",
            "bert-14-eager",
            "bert-17-eager",
            "bert-17-sdpa",
            "gpt2-17-eager",
            "gpt2-14-sdpa",
            "t5-17-eager",
            "vit-17-eager",
            "vit-14-sdpa",
            "whisper-17-eager",
            "whisper-17-sdpa",
            "resnet-17-eager",
        )
    ],
    _v("skl-logistic", "fp32", "skl2onnx (ZipMap)", "fp32"),
    _v("skl-mlp", "fp32", "skl2onnx (ZipMap)", "fp32"),
    # Dynamic quantization.
    _v("minilm", "dynamic-qint8", _DYN, "quant", quantize_dynamic, weight_type="QInt8"),
    _v(
        "minilm",
        "dynamic-quint8-per-channel",
        _DYN,
        "quant",
        quantize_dynamic,
        weight_type="QUInt8",
        per_channel=True,
    ),
    _v("gpt2-14-sdpa", "dynamic-quint8", _DYN, "quant", quantize_dynamic, weight_type="QUInt8"),
    _v(
        "t5-17-eager",
        "dynamic-qint8-per-channel",
        _DYN,
        "quant",
        quantize_dynamic,
        weight_type="QInt8",
        per_channel=True,
    ),
    _v("whisper-17-eager", "dynamic-quint8", _DYN, "quant", quantize_dynamic, weight_type="QUInt8"),
    _v("skl-mlp", "dynamic-quint8", _DYN, "quant", quantize_dynamic, weight_type="QUInt8"),
    # Static quantization, QDQ and QOperator formats.
    _v(
        "resnet-17-eager", "qdq-quint8", _STATIC, "quant", quantize_static, activation_type="QUInt8"
    ),
    _v(
        "resnet-17-eager",
        "qdq-qint8-per-channel",
        _STATIC,
        "quant",
        quantize_static,
        activation_type="QInt8",
        per_channel=True,
    ),
    _v(
        "resnet-17-eager",
        "qoperator-quint8",
        _STATIC,
        "quant",
        quantize_static,
        quant_format="QOperator",
        activation_type="QUInt8",
    ),
    _v(
        "vit-17-eager",
        "qdq-qint8-per-channel",
        _STATIC,
        "quant",
        quantize_static,
        activation_type="QInt8",
        per_channel=True,
    ),
    _v(
        "bert-14-eager",
        "qdq-quint16",
        _STATIC,
        "quant",
        quantize_static,
        activation_type="QUInt16",
        weight_type="QInt8",
    ),
    _v(
        "bert-14-eager",
        "qoperator-quint8",
        _STATIC,
        "quant",
        quantize_static,
        quant_format="QOperator",
        activation_type="QUInt8",
    ),
    # float16 (onnxconverter-common writes models onnxruntime rejects for GPT-2, T5, Whisper and
    # ViT's eager export: Casts to float whose outputs it retypes float16; not covered).
    _v(
        "bert-14-eager", "fp16-occ-io32", _OCC, "fp16", float16_converter_common, keep_io_types=True
    ),
    _v(
        "bert-17-sdpa", "fp16-occ-io16", _OCC, "fp16", float16_converter_common, keep_io_types=False
    ),
    _v("minilm", "fp16-occ-io16", _OCC, "fp16", float16_converter_common, keep_io_types=False),
    _v("vit-14-sdpa", "fp16-occ-io16", _OCC, "fp16", float16_converter_common, keep_io_types=False),
    _v(
        "resnet-17-eager",
        "fp16-occ-io32",
        _OCC,
        "fp16",
        float16_converter_common,
        keep_io_types=True,
    ),
    # onnxruntime.transformers' optimizer (and its float16 pass).
    _v(
        "minilm",
        "ort-opt1",
        _OPT,
        "fp32",
        ort_optimize,
        model_type="bert",
        opt_level=1,
        num_heads=12,
        hidden_size=384,
    ),
    _v(
        "minilm",
        "ort-opt2-fp16",
        _OPT,
        "fp16",
        ort_optimize,
        model_type="bert",
        opt_level=2,
        float16=True,
        num_heads=12,
        hidden_size=384,
    ),
    _v(
        "bert-14-eager",
        "ort-opt2",
        _OPT,
        "fp32",
        ort_optimize,
        model_type="bert",
        opt_level=2,
        num_heads=4,
        hidden_size=32,
    ),
    _v(
        "bert-17-sdpa",
        "ort-opt1",
        _OPT,
        "fp32",
        ort_optimize,
        model_type="bert",
        opt_level=1,
        num_heads=4,
        hidden_size=32,
    ),
    _v(
        "bert-17-sdpa",
        "ort-opt2-fp16",
        _OPT,
        "fp16",
        ort_optimize,
        model_type="bert",
        opt_level=2,
        float16=True,
        num_heads=4,
        hidden_size=32,
    ),
    # The fused com.microsoft Attention's three mask forms.
    *[
        _v(
            "bert-17-eager",
            f"ort-opt2-{form.lower()}",
            _OPT,
            "fp32",
            ort_optimize,
            model_type="bert",
            opt_level=2,
            num_heads=4,
            hidden_size=32,
            mask_format=form,
            embed_layer_norm=False,
        )
        for form in ("MaskIndexEnd", "AttentionMask", "NoMask")
    ],
    _v(
        "gpt2-17-eager",
        "ort-opt2",
        _OPT,
        "fp32",
        ort_optimize,
        model_type="gpt2",
        opt_level=2,
        num_heads=4,
        hidden_size=32,
    ),
    _v(
        "gpt2-14-sdpa",
        "ort-opt1-fp16",
        _OPT,
        "fp16",
        ort_optimize,
        model_type="gpt2",
        opt_level=1,
        float16=True,
        num_heads=4,
        hidden_size=32,
    ),
    _v(
        "t5-17-eager",
        "ort-opt1",
        _OPT,
        "fp32",
        ort_optimize,
        model_type="t5",
        opt_level=1,
        num_heads=4,
        hidden_size=32,
    ),
    _v(
        "vit-14-sdpa",
        "ort-opt2",
        _OPT,
        "fp32",
        ort_optimize,
        model_type="vit",
        opt_level=2,
        num_heads=4,
        hidden_size=32,
    ),
    _v(
        "whisper-17-sdpa",
        "ort-opt2",
        _OPT,
        "fp32",
        ort_optimize,
        model_type="bart",
        opt_level=2,
        num_heads=4,
        hidden_size=32,
    ),
]
