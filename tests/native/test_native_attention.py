"""The native attention kernel of model(...) (onnx2jax/native/calls.py, kernels/attention.cc)
and the graph rewrites that feed it (onnx2jax/runtime/fusion.py: fuse_attention, then the
NativeAttention node)."""

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx2jax
from onnx2jax import native
from onnx2jax.native import calls
from onnx2jax.runtime.fusion import fuse_attention
from tests.helpers import f32

needs_kernels = pytest.mark.skipif(
    not native.available(), reason=f"native kernels unavailable: {native.status()}"
)
MIN = np.finfo(np.float32).min
_MASKS = np.random.default_rng(1)


def _reference(q, kt, v, mask, scale):
    scores = jnp.matmul(q, kt) * scale
    if mask is not None:
        scores = scores + mask
    return jnp.matmul(jax.nn.softmax(scores, axis=-1), v)


def _mask(shape):
    """Additive 0 / float32-min entries, as exported BERT and GPT-2 masks hold."""
    return np.where(_MASKS.random(shape) < 0.3, MIN, 0).astype(np.float32)


@needs_kernels
@pytest.mark.parametrize(
    "lead, s, d, t, e, mask_shape",
    [
        ((2, 3), 128, 32, 128, 32, (2, 1, 1, 128)),  # MiniLM's heads, a padding mask
        ((1, 2), 197, 64, 197, 64, None),  # ViT's 197 tokens: a tail of 5 keys
        ((2, 2), 7, 5, 19, 16, (7, 19)),  # odd sizes, a 2-D mask
        ((1, 1), 30, 64, 64, 128, (1, 1, 30, 64)),  # two passes over the values
        ((3, 4), 1, 8, 1, 16, (3, 1, 1, 1)),  # one query, one key
        ((2, 3), 13, 16, 70, 48, (1, 3, 13, 70)),  # a mask per head
        ((5,), 9, 24, 33, 32, (9, 33)),  # 3-D operands
    ],
)
def test_kernel_matches_the_unfused_computation(lead, s, d, t, e, mask_shape):
    q, kt, v = f32(*lead, s, d), f32(*lead, d, t), f32(*lead, t, e)
    mask = None if mask_shape is None else _mask(mask_shape)
    scale = np.float32(d**-0.5)
    assert calls.attention_applies(q, kt, v, mask, scale)
    got = jax.jit(calls.attention)(q, kt, v, mask, scale)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(_reference(q, kt, v, mask, scale)), rtol=1e-5, atol=1e-5
    )


@needs_kernels
def test_a_row_of_only_minus_infinity_is_nan_as_in_the_graph():
    q, kt, v = f32(1, 1, 4, 8), f32(1, 1, 8, 20), f32(1, 1, 20, 16)
    mask = np.zeros((1, 1, 4, 20), np.float32)
    mask[0, 0, 2] = -np.inf
    got = np.asarray(calls.attention(q, kt, v, mask, np.float32(1)))
    want = np.asarray(_reference(q, kt, v, mask, 1.0))
    assert np.isnan(want[0, 0, 2]).all() and np.isnan(got[0, 0, 2]).all()
    np.testing.assert_allclose(
        np.delete(got, 2, axis=2), np.delete(want, 2, axis=2), rtol=1e-5, atol=1e-5
    )


@needs_kernels
def test_attention_applies_only_where_the_kernel_can():
    q, kt, v = f32(2, 3, 8, 16), f32(2, 3, 16, 10), f32(2, 3, 10, 32)
    one = np.float32(0.25)
    assert calls.attention_applies(q, kt, v, None, one)
    assert not calls.attention_applies(q, kt, f32(2, 3, 10, 8), None, one)  # 8 values wide
    assert not calls.attention_applies(q, f32(1, 3, 16, 10), v, None, one)  # broadcast heads
    assert not calls.attention_applies(q.astype(np.float64), kt, v, None, one)
    assert not calls.attention_applies(q, kt, v, None, np.ones(2, np.float32))
    assert not calls.attention_applies(q, kt, v, f32(2, 3, 8, 11), one)
    assert not calls.attention_applies(q[0, 0], kt[0, 0], v[0, 0], None, one)  # 2-D
    assert calls.attention_applies(q, kt, v, f32(8, 1), one)  # constant along the keys
    assert not calls.attention_applies(q, kt[..., :0], v[..., :0, :], None, one)  # no keys


def _attention_model(
    *,
    scale_op="Div",
    mask=True,
    casts=1,
    e=32,
    outputs=("out",),
    softmax_opset=17,
    **softmax_attributes,
):
    """Attention as torch.onnx exports it: MatMul(q, kt) -> Div or Mul by a constant -> Add
    a mask -> Softmax -> Cast(s) to float -> MatMul with v."""
    nodes, scores = [helper.make_node("MatMul", ["q", "kt"], ["s0"])], "s0"
    initializers = []
    if scale_op:
        value = 4.0 if scale_op == "Div" else 0.25
        initializers.append(numpy_helper.from_array(np.array(value, np.float32), "scale"))
        nodes.append(helper.make_node(scale_op, [scores, "scale"], ["s1"]))
        scores = "s1"
    if mask:
        nodes.append(helper.make_node("Add", ["mask", scores], ["scores"]))
        scores = "scores"
    nodes.append(helper.make_node("Softmax", [scores], ["p0"], **softmax_attributes))
    for i in range(casts):
        nodes.append(helper.make_node("Cast", [f"p{i}"], [f"p{i + 1}"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("MatMul", [f"p{casts}", "v"], ["out"]))
    shapes = {"q": (2, 4, 16, 16), "kt": (2, 4, 16, 24), "v": (2, 4, 24, e), "mask": (2, 1, 1, 24)}
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
        for n, shape in shapes.items()
        if n != "mask" or mask
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        inputs,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializer=initializers,
    )
    feeds = {"q": f32(*shapes["q"]), "kt": f32(*shapes["kt"]), "v": f32(*shapes["v"])}
    if mask:
        feeds["mask"] = _mask(shapes["mask"])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", softmax_opset)]), feeds


def _op_types(proto: onnx.ModelProto, keep=()) -> list[str]:
    return [n.op_type for n in fuse_attention(onnx2jax.load(proto).plan, keep).nodes]


def test_attention_chains_fuse_where_nothing_else_reads_the_intermediates():
    assert _op_types(_attention_model()[0]) == ["SoftmaxAttention"]
    assert _op_types(_attention_model(scale_op="Mul", mask=False, casts=2)[0]) == [
        "SoftmaxAttention"
    ]
    assert _op_types(_attention_model(scale_op=None, casts=0)[0]) == ["SoftmaxAttention"]
    fused = fuse_attention(onnx2jax.load(_attention_model()[0]).plan).nodes[0]
    assert list(fused.input) == ["q", "kt", "v", "mask", "scale"]
    assert {a.name: a.i for a in fused.attribute} == {"divide": 1, "cast_to": TensorProto.FLOAT}
    # Scores asked for by name, or a graph output, stay; so does every other Softmax.
    assert "SoftmaxAttention" not in _op_types(_attention_model()[0], keep=("scores",))
    assert "SoftmaxAttention" not in _op_types(_attention_model(outputs=("out", "p0"))[0])
    assert "SoftmaxAttention" not in _op_types(_attention_model(axis=1)[0])
    # Before opset 13 Softmax flattens from axis 1 by default: not over the last axis alone.
    assert "SoftmaxAttention" not in _op_types(_attention_model(softmax_opset=11)[0])
    assert _op_types(_attention_model(softmax_opset=11, axis=-1)[0]) == ["SoftmaxAttention"]


def _session(proto):
    import onnxruntime

    return onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )


@needs_kernels
@pytest.mark.parametrize(
    "scale_op, mask, casts", [("Div", True, 1), ("Mul", False, 2), (None, True, 0)]
)
def test_model_call_runs_the_kernel_and_matches_onnxruntime(scale_op, mask, casts):
    proto, feeds = _attention_model(scale_op=scale_op, mask=mask, casts=casts)
    model = onnx2jax.load(proto)
    bound = model.bind_inputs((), feeds)
    function, _, kernels = model.inference_function(bound)
    assert "attention" in kernels
    assert "onnx2jax_attention" in model.engine.lower(bound).compile().as_text()
    (want,) = _session(proto).run(None, feeds)
    np.testing.assert_allclose(np.asarray(model(**feeds)["out"]), want, rtol=1e-5, atol=1e-5)
    # apply() keeps the graph's own ops: differentiable, and the same numbers.
    np.testing.assert_allclose(
        np.asarray(jax.jit(model.apply)(model.params, **feeds)["out"]), want, rtol=1e-5, atol=1e-5
    )
    # The scores asked for by name come out, and the rest stays right.
    got = model(**feeds, outputs=["out", "p0"])
    np.testing.assert_allclose(np.asarray(got["out"]), want, rtol=1e-5, atol=1e-5)
    assert np.asarray(got["p0"]).shape == (2, 4, 16, 24)


@needs_kernels
def test_a_fused_chain_the_kernel_cannot_take_runs_as_its_own_ops():
    proto, feeds = _attention_model(e=8)  # values 8 wide: not a multiple of the vector width
    model = onnx2jax.load(proto)
    bound = model.bind_inputs((), feeds)
    kernels = model.inference_function(bound)[2]
    assert "attention" in kernels
    # The node is NativeAttention (the rewrite sees no shapes), which runs SoftmaxAttention's
    # ops when its operands do not fit the kernel.
    assert [n.op_type for n in model.engine.fused_plan(kernels, None).nodes] == ["NativeAttention"]
    assert "onnx2jax_attention" not in model.engine.lower(bound).compile().as_text()
    (want,) = _session(proto).run(None, feeds)
    np.testing.assert_allclose(np.asarray(model(**feeds)["out"]), want, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_the_program_holds_a_native_attention_node_under_float32_only():
    proto, feeds = _attention_model()
    model = onnx2jax.load(proto)
    kernels = model.inference_function(model.bind_inputs((), feeds))[2]
    (node,) = model.engine.fused_plan(kernels, None).nodes
    assert (node.op_type, node.domain) == ("NativeAttention", "ai.onnx2jax")
    assert list(node.input) == ["q", "kt", "v", "mask", "scale"]
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attributes == {"divide": 1, "cast_to": TensorProto.FLOAT, "precision": b"float32"}
    # model.apply runs the graph as it is, and agrees with model(...).
    assert [n.op_type for n in model.plan.nodes][-1] == "MatMul"
    np.testing.assert_allclose(
        np.asarray(model(**feeds)["out"]),
        np.asarray(jax.jit(model.apply)(model.params, **feeds)["out"]),
        rtol=1e-5,
        atol=1e-5,
    )
    # Under bfloat16 products the kernel, which computes float32 ones, is not used.
    rounded = onnx2jax.load(proto, precision="bfloat16")
    kernels = rounded.inference_function(rounded.bind_inputs((), feeds))[2]
    assert "attention" not in kernels
    assert "Native" not in str([n.op_type for n in rounded.engine.fused_plan(kernels, None).nodes])
