"""A small BERT through onnxruntime's transformer optimizer, against onnxruntime.

torch.onnx (TorchScript exporter) at opsets 14 and 17, eager and sdpa attention, then
``onnxruntime.transformers.optimizer.optimize_model``: the eager export takes the classic BERT
fusion (EmbedLayerNormalization, whose 1-D mask_index feeds com.microsoft Attention), the sdpa
export keeps its attention unfused and leaves the embedding LayerNormalization in the default
domain of an opset-14 model. Each optimized model, and its fp16 conversion, runs in onnx2jax
and onnxruntime on the same padded batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.helpers import run_onnx2jax

# Exports and runs real models: after the fast tests (tests/conftest.py).
pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
onnx_model = pytest.importorskip("onnxruntime.transformers.onnx_model")

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUTS = ["last_hidden_state", "pooler_output"]
VARIANTS = [("eager", 14), ("eager", 17), ("sdpa", 14), ("sdpa", 17)]


def _inputs() -> list[dict[str, np.ndarray]]:
    """The same ids with two masks: the second row padded after 5 tokens, then no padding."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, size=(2, 8)).astype(np.int64)
    types = np.zeros((2, 8), np.int64)
    types[:, 4:] = 1
    padded = np.ones((2, 8), np.int64)
    padded[1, 5:] = 0
    return [
        {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        for mask in (padded, np.ones_like(padded))
    ]


def _export(path: Path, attention: str, opset: int) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    bert = transformers.BertModel(config).eval()
    bert.config._attn_implementation = attention

    class Positional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return out.last_hidden_state, out.pooler_output

    sample = tuple(torch.from_numpy(v) for v in _inputs()[0].values())
    with torch.no_grad():
        torch.onnx.export(
            Positional().eval(),
            sample,
            str(path),
            input_names=NAMES,
            output_names=OUTPUTS,
            opset_version=opset,
            dynamo=False,
            dynamic_axes={name: {0: "batch", 1: "length"} for name in NAMES},
        )


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    """(attention, opset, opt_level) -> the optimized model, built on first use."""
    folder = tmp_path_factory.mktemp("optimized_bert")
    cache: dict[tuple, onnx.ModelProto] = {}

    def get(attention: str, opset: int, level: int) -> onnx.ModelProto:
        key = (attention, opset, level)
        if key not in cache:
            exported = folder / f"{attention}_{opset}.onnx"
            if not exported.exists():
                _export(exported, attention, opset)
            cache[key] = optimizer.optimize_model(
                str(exported),
                model_type="bert",
                num_heads=2,
                hidden_size=32,
                opt_level=level,
                use_gpu=False,
            ).model
        return cache[key]

    return get


def _run_onnxruntime(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, _feeds_for(model, feeds))


def _feeds_for(model: onnx.ModelProto, feeds: dict) -> dict:
    """The optimizer drops graph inputs it no longer reads."""
    names = {value.name for value in model.graph.input}
    return {name: value for name, value in feeds.items() if name in names}


def _op_types(model: onnx.ModelProto) -> set[tuple[str, str]]:
    return {(node.domain or "", node.op_type) for node in model.graph.node}


def test_the_fusions_this_suite_relies_on(optimized):
    classic = optimized("eager", 14, 1)
    ops = _op_types(classic)
    assert {("com.microsoft", "EmbedLayerNormalization"), ("com.microsoft", "Attention")} <= ops
    embed = next(n for n in classic.graph.node if n.op_type == "EmbedLayerNormalization")
    for node in classic.graph.node:
        if node.op_type == "Attention":
            # The 1-D mask_index (valid length per row) from EmbedLayerNormalization.
            assert node.input[3] == embed.output[1]
    unfused = optimized("sdpa", 14, 1)
    assert ("", "LayerNormalization") in _op_types(unfused)
    assert {o.domain: o.version for o in unfused.opset_import}.get("", 0) == 14


# opt_level 2 gives these exports the same fusions as 1; one case of it keeps the suite fast.
@pytest.mark.parametrize(
    "attention, opset, opt_level", [(a, o, 1) for a, o in VARIANTS] + [("eager", 14, 2)]
)
def test_float32_matches_onnxruntime(optimized, attention, opset, opt_level):
    model = optimized(attention, opset, opt_level)
    results = []
    for feeds in _inputs():
        want = _run_onnxruntime(model, feeds)
        got = run_onnx2jax(model, _feeds_for(model, feeds), x64=False)
        for ours, theirs in zip(got, want, strict=True):
            assert ours.dtype == theirs.dtype == np.float32
            scale = np.abs(theirs).max()
            assert np.abs(ours - theirs).max() <= 1e-4 * scale
        results.append(want[0])
    # The padding changes the second row (the mask reached attention) and not the first.
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert np.abs(results[0][1] - results[1][1]).max() > 1e-3


@pytest.mark.parametrize("attention, opset", [("eager", 14), ("sdpa", 17)])
def test_float16_no_further_from_float32_than_onnxruntime(optimized, attention, opset):
    full = optimized(attention, opset, 1)
    half = onnx_model.OnnxModel(onnx.ModelProto.FromString(full.SerializeToString()))
    half.convert_float_to_float16(keep_io_types=True)
    feeds = _inputs()[0]
    reference = _run_onnxruntime(full, feeds)
    theirs = _run_onnxruntime(half.model, feeds)
    ours = run_onnx2jax(half.model, _feeds_for(half.model, feeds), x64=False)
    for exact, their, our in zip(reference, theirs, ours, strict=True):
        assert our.dtype == their.dtype == np.float32
        their_distance = np.abs(their - exact).mean()
        our_distance = np.abs(our - exact).mean()
        # Mean, not largest, distance: onnxruntime keeps chains of nodes it runs in float32
        # unrounded between them (its cast-removal pass), which moves single elements.
        assert our_distance <= 1.2 * their_distance, (our_distance, their_distance)
