"""LoRA on MatMul and Gemm weights as a side branch (``x @ W + s * (x @ a) @ b``, issue 26):
the same outputs and adapter gradients as the adapters folded into a copy of each weight."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
from onnx import helper, numpy_helper

import onnx2jax
from onnx2jax.train.lora import LoRA

RANK = 3


def branchy_model(dtype: type = np.float32) -> onnx.ModelProto:
    """x [2, 5, 8] -> a MatMul with batch dims, a weight two MatMuls share, a Gemm with
    transB and alpha, a Gemm with transA, a weight a Transpose also reads, a Conv."""
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(dtype), name)

    nodes = [
        helper.make_node("MatMul", ["x", "w_batch"], ["h1"], "batch/MatMul"),  # [2, 5, 6]
        helper.make_node("MatMul", ["h1", "w_shared"], ["h2"], "shared_a/MatMul"),  # [2, 5, 6]
        helper.make_node("MatMul", ["h2", "w_shared"], ["h3"], "shared_b/MatMul"),  # [2, 5, 6]
        helper.make_node("Reshape", ["h3", "flat"], ["f"], "flatten"),  # [10, 6]
        helper.make_node(
            "Gemm", ["f", "w_gemm_t", "c"], ["g1"], "gemm_t/Gemm", transB=1, alpha=0.5, beta=2.0
        ),  # [10, 4]
        helper.make_node("Transpose", ["g1"], ["g1t"], "g1_t"),  # [4, 10]
        helper.make_node("Gemm", ["g1t", "w_gemm_a"], ["g2"], "gemm_a/Gemm", transA=1),  # [10, 4]
        helper.make_node("Transpose", ["w_tied"], ["w_tied_t"], "tied_t"),  # [4, 4]
        helper.make_node("MatMul", ["g2", "w_tied"], ["g3"], "tied/MatMul"),
        helper.make_node("MatMul", ["g3", "w_tied_t"], ["g4"], "tied_t/MatMul"),
        helper.make_node("Reshape", ["g4", "image"], ["img"], "to_image"),  # [10, 1, 2, 2]
        helper.make_node("Conv", ["img", "w_conv"], ["y"], "conv/Conv"),  # [10, 2, 1, 1]
    ]
    graph = helper.make_graph(
        nodes,
        "branchy",
        [helper.make_tensor_value_info("x", elem, [2, 5, 8])],
        [helper.make_tensor_value_info("y", elem, [10, 2, 1, 1])],
        [
            init("w_batch", 8, 6),
            init("w_shared", 6, 6),
            init("w_gemm_t", 4, 6),
            init("c", 4),
            init("w_gemm_a", 4, 4),
            init("w_tied", 4, 4),
            init("w_conv", 2, 1, 2, 2),
            numpy_helper.from_array(np.array([10, 6], np.int64), "flat"),
            numpy_helper.from_array(np.array([10, 1, 2, 2], np.int64), "image"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def tuned_adapters(lora: LoRA) -> dict:
    """Adapters with ``b`` nonzero too, so every target changes the outputs."""
    adapters = lora.init(jax.random.key(1))
    keys = jax.random.split(jax.random.key(2), len(adapters))
    return {
        name: value if name.endswith("::lora_a") else 0.3 * jax.random.normal(key, value.shape)
        for (name, value), key in zip(sorted(adapters.items()), keys, strict=True)
    }


def folded_apply(lora: LoRA, params: dict, x: np.ndarray) -> jax.Array:
    return lora.model.apply(lora.merge(params), x)["y"]


def test_dense_targets_run_as_adapter_nodes_and_match_the_folded_weights():
    model = onnx2jax.load(branchy_model())
    lora = LoRA(model, targets="*", rank=RANK, alpha=5)
    assert {t.weight for t in lora.targets} == {
        "w_batch",
        "w_shared",
        "w_gemm_t",
        "w_gemm_a",
        "w_tied",
        "w_conv",
    }
    adds = {n.output[0] for n in lora.plan.nodes if n.name.endswith("/lora_add")}
    # Every MatMul/Gemm reader of a branched weight gets adapter nodes; the weight the
    # Transpose also reads, and the Conv, are folded.
    assert adds == {"h1", "h2", "h3", "g1", "g2"}
    params = {**model.params, **tuned_adapters(lora)}
    x = np.random.default_rng(3).standard_normal((2, 5, 8)).astype(np.float32)
    got = jax.jit(lambda p: lora.apply(p, x)["y"])(params)
    want = folded_apply(lora, params, x)
    assert float(jnp.abs(want - model.apply(model.params, x)["y"]).max()) > 0.1
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_adapter_gradients_equal_the_folded_ones():
    model = onnx2jax.load(branchy_model())
    lora = LoRA(model, targets="*", rank=RANK, alpha=5)
    adapters = tuned_adapters(lora)
    x = np.random.default_rng(4).standard_normal((2, 5, 8)).astype(np.float32)

    def branch_loss(adapters):
        return jnp.sum(jnp.sin(lora.apply({**model.params, **adapters}, x)["y"]))

    def folded_loss(adapters):
        return jnp.sum(jnp.sin(folded_apply(lora, {**model.params, **adapters}, x)))

    got = jax.grad(branch_loss)(adapters)
    want = jax.grad(folded_loss)(adapters)
    assert set(got) == set(lora.adapter_names)
    for name in want:
        scale = float(jnp.abs(want[name]).max())
        assert scale > 0, name
        error = float(jnp.abs(got[name] - want[name]).max()) / scale
        assert error < 1e-5, (name, error)


def test_no_weight_sized_value_in_the_branched_step():
    """The branched step's jaxpr makes no array of a branched weight's shape: neither a
    copy of the weight nor its full-size gradient."""
    model = onnx2jax.load(branchy_model())
    lora = LoRA(model, targets="*batch*", rank=RANK)
    adapters = tuned_adapters(lora)
    x = np.ones((2, 5, 8), np.float32)

    def loss(adapters):
        return jnp.sum(lora.apply({**model.params, **adapters}, x)["y"])

    def shapes(fn) -> list[tuple[int, ...]]:
        jaxpr = jax.make_jaxpr(jax.grad(fn))(adapters)
        return [tuple(v.aval.shape) for e in jaxpr.eqns for v in e.outvars]

    assert (8, 6) not in shapes(loss)
    folded = LoRA(model, targets="*batch*", rank=RANK)

    def folded_loss(adapters):
        return jnp.sum(folded_apply(folded, {**model.params, **adapters}, x))

    assert (8, 6) in shapes(folded_loss)


def test_float16_weights_match_the_folded_version(tmp_path: Path):
    model = onnx2jax.load(branchy_model(np.float16))
    lora = LoRA(model, targets=["w_batch", "w_gemm_t"], rank=RANK)
    adapters = lora.init(jax.random.key(0))
    assert all(v.dtype == jnp.float32 for v in adapters.values())
    params = {**model.params, **tuned_adapters(lora)}
    x = np.random.default_rng(5).standard_normal((2, 5, 8)).astype(np.float16)
    got = np.asarray(lora.apply(params, x)["y"], np.float32)
    want = np.asarray(folded_apply(lora, params, x), np.float32)
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


def test_save_folds_dense_targets_into_the_original_graph(tmp_path: Path):
    proto = branchy_model()
    model = onnx2jax.load(proto)
    lora = LoRA(model, targets="*", rank=RANK, alpha=5)
    params = {**model.params, **tuned_adapters(lora)}
    path = tmp_path / "tuned.onnx"
    lora.save(path, params)
    saved = onnx.load(str(path))
    assert [n.SerializeToString() for n in saved.graph.node] == [
        n.SerializeToString() for n in proto.graph.node
    ]
    x = np.random.default_rng(6).standard_normal((2, 5, 8)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["y"], {"x": x})
    np.testing.assert_allclose(got, np.asarray(lora.apply(params, x)["y"]), rtol=1e-5, atol=1e-5)
    merged = lora.merge(params)
    assert set(merged) == set(model.params)
    assert all(merged[k].shape == model.params[k].shape for k in merged)
