"""The native 4-bit MatMulNBits kernel (onnx2jax/native/calls.py: matmul_nbits,
kernels/nbits.cc) and the NativeMatMulNBits node that model(...)'s program computes MatMulNBits
with (onnx2jax/runtime/fusion.py, onnx2jax/ops/native_calls.py): against onnxruntime, XLA's
path and an exact NumPy product; gradients are XLA's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx2jax
from onnx2jax import native
from onnx2jax.native import calls

needs_kernel = pytest.mark.skipif(
    not native.available() or native.lanes() is None,
    reason=f"no native nbits kernel: {native.status()}",
)
MS = "com.microsoft"


def _case(rng, rows, k, n, block, zeros):
    """A [rows, K], packed B [N, blocks, block / 2], scales, packed zero points or None."""
    blocks = -(-k // block)
    packed = rng.integers(0, 256, size=(n, blocks, block // 2), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(n, blocks)).astype(np.float32)
    zp = rng.integers(0, 256, size=(n, -(-blocks // 2)), dtype=np.uint8) if zeros else None
    a = rng.normal(size=(rows, k)).astype(np.float32)
    return a, packed, scales, zp


def _weight(packed, scales, zp, k, block):
    """The [K, N] float64 weight, dequantized straight from the spec."""
    n, blocks = scales.shape
    q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, -1)[:, :k].astype(np.float64)
    if zp is None:
        zero = np.full((n, blocks), 8.0)
    else:
        zero = np.stack([zp & 0x0F, zp >> 4], -1).reshape(n, -1)[:, :blocks].astype(np.float64)
    group = np.arange(k) // block
    return ((q - zero[:, group]) * scales[:, group]).T


def _model(k, n, block, packed, scales, zp):
    inputs = ["a", "b", "scales"] + (["zp"] if zp is not None else [])
    node = helper.make_node(
        "MatMulNBits", inputs, ["y"], domain=MS, K=k, N=n, bits=4, block_size=block
    )
    inits = [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "scales")]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "zp"))
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _bound(a, weight):
    """Float32 rounding of a K-term sum: at most K * 2^-24 of the sum of absolute terms."""
    return a.shape[-1] * 2.0**-24 * (np.abs(a).astype(np.float64) @ np.abs(weight)) + 1e-30


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("zeros", [False, True])
def test_kernel_matches_onnxruntime_and_exact_product(rows, block, zeros):
    # K = 200 is no multiple of any block (the last block is partly padding; with 16, an odd
    # number of blocks); N = 37 is odd.
    rng = np.random.default_rng(rows * 1000 + block + zeros)
    k, n = 200, 37
    a, packed, scales, zp = _case(rng, rows, k, n, block, zeros)
    got = np.asarray(
        jax.jit(calls.matmul_nbits, static_argnums=(4, 5))(
            a, packed.reshape(n, -1), scales, zp, n, block
        )
    )
    weight = _weight(packed, scales, zp, k, block)
    exact = a.astype(np.float64) @ weight
    bound = _bound(a, weight)
    assert got.shape == (rows, n)
    assert np.all(np.abs(got - exact) <= bound)
    session = ort.InferenceSession(
        _model(k, n, block, packed, scales, zp).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    want = session.run(None, {"a": a})[0]
    assert np.all(np.abs(got - want) <= 2 * bound)


def _compiled_text(model: onnx2jax.Model, a: np.ndarray) -> str:
    """The HLO of the program model(...) runs on ``a``."""
    return model.engine.lower(model.bind_inputs((), {"a": a})).compile().as_text()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("zeros", [False, True])
def test_model_call_uses_the_kernel_and_matches_xla_and_onnxruntime(rows, zeros):
    rng = np.random.default_rng(rows + 7 * zeros)
    k, n, block = 100, 33, 32
    a, packed, scales, zp = _case(rng, rows, k, n, block, zeros)
    proto = _model(k, n, block, packed, scales, zp)
    compiled = onnx2jax.load(proto)
    bound = compiled.bind_inputs((), {"a": a})
    kernels = compiled.inference_function(bound)[2]
    assert "nbits" in kernels
    plan = compiled.engine.fused_plan(kernels, None)
    assert [(node.op_type, node.domain) for node in plan.nodes] == [
        ("NativeMatMulNBits", "ai.onnx2jax")
    ]
    assert native.NBITS_TARGET in _compiled_text(compiled, a)
    # model.apply (the graph as it is: exported, AOT and the user's jit) is XLA's.
    assert native.NBITS_TARGET not in jax.jit(compiled.apply).lower(compiled.params, a=a).as_text()
    xla = np.asarray(jax.jit(compiled.apply)(compiled.params, a=a)["y"])
    got = np.asarray(compiled(a=a)["y"])
    weight = _weight(packed, scales, zp, k, block)
    limit = _bound(a, weight)
    assert np.all(np.abs(got - xla) <= 2 * limit)
    assert np.all(np.abs(got - a.astype(np.float64) @ weight) <= limit)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.all(np.abs(got - session.run(None, {"a": a})[0]) <= 2 * limit)


@needs_kernel
def test_more_rows_than_the_kernel_takes_run_xlas_path():
    rng = np.random.default_rng(3)
    k, n, block = 64, 24, 16
    a, packed, scales, zp = _case(rng, 17, k, n, block, True)
    compiled = onnx2jax.load(_model(k, n, block, packed, scales, zp))
    assert native.NBITS_TARGET not in _compiled_text(compiled, a)
    weight = _weight(packed, scales, zp, k, block)
    got = np.asarray(compiled(a=a)["y"])
    assert np.all(np.abs(got - a.astype(np.float64) @ weight) <= _bound(a, weight))


@needs_kernel
def test_other_precisions_and_traces_keep_xlas_path():
    rng = np.random.default_rng(4)
    k, n, block = 64, 8, 32
    a, packed, scales, zp = _case(rng, 2, k, n, block, False)
    proto = _model(k, n, block, packed, scales, zp)
    rounded = onnx2jax.load(proto, precision="bfloat16")
    kernels = rounded.inference_function(rounded.bind_inputs((), {"a": a}))[2]
    assert "nbits" not in kernels
    assert [node.op_type for node in rounded.engine.fused_plan(kernels, None).nodes] == [
        "MatMulNBits"
    ]
    # model(...) inside the user's jit runs the graph as it is.
    compiled = onnx2jax.load(proto)
    text = jax.jit(lambda x: compiled(a=x)["y"]).lower(a).as_text()
    assert native.NBITS_TARGET not in text


def _native_node_model(k, n, block, packed, scales, zp):
    """A model of one NativeMatMulNBits node (what model(...)'s plan holds), run by apply."""
    model = _model(k, n, block, packed, scales, zp)
    model.graph.node[0].op_type = "NativeMatMulNBits"
    model.graph.node[0].domain = "ai.onnx2jax"
    model.opset_import.append(helper.make_opsetid("ai.onnx2jax", 1))
    return onnx2jax.load(model)


@needs_kernel
@pytest.mark.parametrize("zeros", [False, True])
def test_gradient_is_xlas(zeros):
    rng = np.random.default_rng(11)
    k, n, block = 72, 19, 16
    a, packed, scales, zp = _case(rng, 2, k, n, block, zeros)
    compiled = _native_node_model(k, n, block, packed, scales, zp)
    cotangent = rng.normal(size=(2, n)).astype(np.float32)

    def loss(x, scale):
        params = {**compiled.params, "scales": scale}
        return jnp.sum(compiled.apply(params, a=x)["y"] * cotangent)

    assert native.NBITS_TARGET in jax.jit(loss).lower(a, scales).as_text()
    grad_a, grad_scales = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, scales)
    weight = _weight(packed, scales, zp, k, block)
    want_a = cotangent.astype(np.float64) @ weight.T
    np.testing.assert_allclose(grad_a, want_a, rtol=1e-5, atol=1e-5)
    # The scales' gradient, which the weight has: sum over rows and the block's values.
    q_minus_zero = weight / np.repeat(scales, block, axis=1)[:, :k].T
    per_value = (a.astype(np.float64).T @ cotangent) * q_minus_zero
    blocks = scales.shape[1]
    padded = np.pad(per_value, ((0, blocks * block - k), (0, 0)))
    want_scales = padded.reshape(blocks, block, n).sum(1).T
    np.testing.assert_allclose(grad_scales, want_scales, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_vmap_runs_the_kernel_per_element():
    rng = np.random.default_rng(5)
    k, n, block = 64, 9, 32
    a, packed, scales, zp = _case(rng, 3, k, n, block, True)
    flat = packed.reshape(n, -1)
    got = jax.vmap(lambda x: calls.matmul_nbits(x[None], flat, scales, zp, n, block))(a)
    weight = _weight(packed, scales, zp, k, block)
    exact = a.astype(np.float64) @ weight
    assert np.all(np.abs(np.asarray(got)[:, 0] - exact) <= _bound(a, weight))
