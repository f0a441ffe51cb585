"""Real exported models compared with onnxruntime on the same inputs."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import pytest

import onnx2jax
from onnx2jax import native
from tests.models.exports import export_tiny_transformers, minilm_inputs

# Exports and runs real models: after the fast tests (tests/conftest.py).
pytestmark = pytest.mark.slow


def ort_run(path_or_proto, feeds: dict, outputs: list[str] | None = None) -> dict:
    data = (
        path_or_proto.SerializeToString()
        if isinstance(path_or_proto, onnx.ModelProto)
        else str(path_or_proto)
    )
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = outputs or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_minilm_matches_onnxruntime_at_two_shapes(exporter, request):
    path = request.getfixturevalue(f"minilm_{exporter}_onnx")
    model = onnx2jax.load(path)
    for batch, seq in ((2, 16), (3, 41)):
        feeds = minilm_inputs(batch, seq, seed=seq)
        if native.available():
            # Both exports' attention blocks are recognised for the native kernel.
            assert "attention" in model.inference_function(model.bind_inputs((), feeds))[2]
        got = model(**feeds)["last_hidden_state"]
        want = ort_run(path, feeds)["last_hidden_state"]
        assert got.shape == (batch, seq, 384)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_minilm_intermediate_embeddings_sum(exporter, request):
    path = request.getfixturevalue(f"minilm_{exporter}_onnx")
    model = onnx2jax.load(path)
    first_norm = next(n for n in model.plan.nodes if n.op_type == "LayerNormalization")
    embeddings = first_norm.input[0]
    feeds = minilm_inputs(2, 10)
    got = model(**feeds, outputs=[embeddings])[embeddings]

    proto = onnx.load(str(path))
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(embeddings))
    want = ort_run(proto, feeds, [embeddings])[embeddings]
    assert got.shape == (2, 10, 384)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_minilm_gradients_are_finite(minilm_legacy_onnx):
    model = onnx2jax.load(minilm_legacy_onnx)
    feeds = minilm_inputs(2, 8)

    def loss(params):
        hidden = model.apply(params, **feeds)["last_hidden_state"]
        return jnp.mean(hidden[:, 0] ** 2)

    grads = jax.jit(jax.grad(loss))(model.params)
    assert set(grads) == set(model.params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads.values())
    assert float(jnp.abs(grads["bert.encoder.layer.0.attention.self.query.bias"]).sum()) > 0


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "t5", "vit", "llama", "resnet"])
def test_transformers_models_match_onnxruntime(kind, exporter, tiny_models):
    path = tiny_models / f"{kind}-{exporter}.onnx"
    feeds = export_tiny_transformers(kind, path, dynamo=exporter == "dynamo")
    model = onnx2jax.load(path)
    got = model(**feeds)
    want = ort_run(path, feeds)
    for name, expected in want.items():
        actual = np.asarray(got[name])
        assert actual.shape == expected.shape
        close = np.abs(actual - expected) <= np.maximum(1e-4, 1e-3 * np.abs(expected))
        assert close.all(), f"{name}: worst error {np.abs(actual - expected).max()}"
