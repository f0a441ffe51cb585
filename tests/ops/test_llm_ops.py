"""The com.microsoft ops of decoder language models (onnxruntime-genai's builder): MatMulNBits,
GatherBlockQuantized, GroupQueryAttention and RotaryEmbedding, one node at a time against
onnxruntime's CPU kernels (a NumPy reference where onnxruntime refuses or departs from the spec)."""

from __future__ import annotations

import re

import jax
import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnx2jax
from onnx2jax.core.errors import OpError
from tests.helpers import run_reference, single_node_model

MS = "com.microsoft"
RNG = np.random.default_rng(0)


def _ours(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    compiled = onnx2jax.load(model)
    out = jax.jit(compiled.apply)(compiled.params, **feeds)
    return [np.asarray(out[name]) for name in compiled.output_names]


def _node_model(op, inputs, initializers, outputs=("y",), **attrs):
    return single_node_model(
        op, inputs, outputs=outputs, domain=MS, initializers=initializers, **attrs
    )


# ----------------------------------------------------------------------------- MatMulNBits


def _nbits_case(bits, block, k, n, zero_kind, g_idx=False, bias=False, lead=(2, 3)):
    blocks = -(-k // block)
    packed = RNG.integers(0, 256, size=(n, blocks, block * bits // 8), dtype=np.uint8)
    scales = RNG.uniform(0.01, 0.1, size=(n, blocks)).astype(np.float32)
    inits = {"b": packed, "scales": scales}
    if zero_kind == "packed":
        inits["zp"] = RNG.integers(0, 256, size=(n, -(-blocks * bits // 8)), dtype=np.uint8)
    elif zero_kind == "float":
        inits["zp"] = RNG.uniform(0, 2**bits - 1, size=(n, blocks)).astype(np.float32)
    if g_idx:
        group = (np.arange(k) // block).astype(np.int32)
        RNG.shuffle(group)
        inits["g"] = group
    if bias:
        inits["bias"] = RNG.normal(size=(n,)).astype(np.float32)
    a = RNG.normal(size=(*lead, k)).astype(np.float32)
    inputs = {"a": a, **{name: inits.get(name) for name in ("b", "scales", "zp", "g", "bias")}}
    return inputs, inits


def _nbits_weight(inputs, bits, block, k, n):
    """The [K, N] float weight, dequantized in NumPy straight from the spec."""
    packed, scales = inputs["b"], inputs["scales"]
    per_byte = 8 // bits
    shifts = np.arange(per_byte) * bits
    q = ((packed[..., None] >> shifts) & (2**bits - 1)).reshape(n, -1)[:, :k].astype(np.float64)
    blocks = scales.shape[1]
    zp = inputs["zp"]
    if zp is None:
        zero = np.full((n, blocks), 2 ** (bits - 1), np.float64)
    elif zp.dtype == np.uint8:
        zero = ((zp[..., None] >> shifts) & (2**bits - 1)).reshape(n, -1)[:, :blocks]
    else:
        zero = zp.astype(np.float64)
    group = inputs["g"] if inputs["g"] is not None else np.arange(k) // block
    return ((q - zero[:, group]) * scales[:, group]).T


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block", [16, 32, 128])
@pytest.mark.parametrize("zero_kind", ["none", "packed", "float"])
def test_matmul_nbits_matches_onnxruntime(bits, block, zero_kind):
    # K = 50 is no multiple of any block size: the last block is partly padding.
    k, n = 50, 7
    inputs, inits = _nbits_case(bits, block, k, n, zero_kind)
    model = _node_model("MatMulNBits", inputs, inits, K=k, N=n, bits=bits, block_size=block)
    feeds = {"a": inputs["a"]}
    got = _ours(model, feeds)[0]
    if bits == 8 and zero_kind == "float":
        # onnxruntime's CPU kernel refuses 8-bit weights with float zero points.
        want = inputs["a"].astype(np.float64) @ _nbits_weight(inputs, bits, block, k, n)
    else:
        want = run_reference(model, feeds)[0]
    assert got.shape == want.shape == (2, 3, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("zero_kind", ["none", "packed", "float"])
@pytest.mark.parametrize("rows", [1, 8])
def test_matmul_nbits_decode_rows_match_onnxruntime(bits, zero_kind, rows):
    # A decode step multiplies one row per sequence ([batch, 1, K]); K = 200 is no multiple of
    # the block size.
    k, n = 200, 24
    inputs, inits = _nbits_case(bits, 32, k, n, zero_kind, lead=(rows, 1))
    model = _node_model("MatMulNBits", inputs, inits, K=k, N=n, bits=bits, block_size=32)
    feeds = {"a": inputs["a"]}
    got = _ours(model, feeds)[0]
    weight = _nbits_weight(inputs, bits, 32, k, n)
    exact = inputs["a"].astype(np.float64) @ weight
    # Float32 rounding of a K-term sum: at most K * 2^-24 of the sum of absolute terms.
    bound = k * 2.0**-24 * (np.abs(inputs["a"]).astype(np.float64) @ np.abs(weight))
    assert np.all(np.abs(got - exact) <= bound)
    if not (bits == 8 and zero_kind == "float"):  # onnxruntime refuses this combination
        assert np.all(np.abs(got - run_reference(model, feeds)[0]) <= 2 * bound)


@pytest.mark.parametrize(
    ("zero_kind", "g_idx"), [("packed", False), ("float", False), ("none", True), ("float", True)]
)
@pytest.mark.parametrize("rows", [1, 8])
def test_matmul_nbits_weight_over_one_slice_matches_onnxruntime(zero_kind, g_idx, rows):
    # Over 2^20 weight values the product runs on slices of N rows; N = 1031 does not divide
    # into the slices (padded rows) and K = 1040 is no multiple of the block size.
    k, n = 1040, 1031
    inputs, inits = _nbits_case(4, 32, k, n, zero_kind, g_idx=g_idx, bias=True, lead=(rows,))
    model = _node_model("MatMulNBits", inputs, inits, K=k, N=n, bits=4, block_size=32)
    feeds = {"a": inputs["a"]}
    got = _ours(model, feeds)[0]
    exact = inputs["a"].astype(np.float64) @ _nbits_weight(inputs, 4, 32, k, n) + inputs["bias"]
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got, run_reference(model, feeds)[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 8])
def test_matmul_nbits_float16_decode_rows(rows):
    # Float16 A and scales: onnx2jax computes in float32 and rounds the result to float16 once.
    k, n = 96, 40
    inputs, inits = _nbits_case(4, 32, k, n, "packed", lead=(rows, 1))
    inputs["a"] = inputs["a"].astype(np.float16)
    inputs["scales"] = inits["scales"] = inits["scales"].astype(np.float16)
    model = _node_model("MatMulNBits", inputs, inits, K=k, N=n, bits=4, block_size=32)
    feeds = {"a": inputs["a"]}
    got = _ours(model, feeds)[0]
    assert got.dtype == np.float16
    weight = _nbits_weight(inputs, 4, 32, k, n)
    exact = inputs["a"].astype(np.float64) @ weight
    float32_bound = k * 2.0**-24 * (np.abs(inputs["a"]).astype(np.float64) @ np.abs(weight))
    assert np.all(np.abs(got - exact) <= np.spacing(np.abs(got)) + float32_bound)
    want = run_reference(model, feeds)[0]
    np.testing.assert_allclose(
        got.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3
    )


def test_matmul_nbits_bias_and_two_dim_input():
    inputs, inits = _nbits_case(4, 16, 64, 9, "packed", bias=True, lead=(5,))
    model = _node_model("MatMulNBits", inputs, inits, K=64, N=9, bits=4, block_size=16)
    feeds = {"a": inputs["a"]}
    np.testing.assert_allclose(
        _ours(model, feeds)[0], run_reference(model, feeds)[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("zero_kind", ["none", "float"])
def test_matmul_nbits_g_idx(zero_kind):
    inputs, inits = _nbits_case(4, 32, 96, 8, zero_kind, g_idx=True)
    model = _node_model("MatMulNBits", inputs, inits, K=96, N=8, bits=4, block_size=32)
    feeds = {"a": inputs["a"]}
    want = inputs["a"].astype(np.float64) @ _nbits_weight(inputs, 4, 32, 96, 8)
    np.testing.assert_allclose(_ours(model, feeds)[0], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run_reference(model, feeds)[0], want, rtol=1e-5, atol=1e-5)


def test_matmul_nbits_g_idx_with_packed_zero_points_follows_the_spec():
    # onnxruntime 1.32 drops packed zero points when g_idx is given (it uses 8); the spec and
    # onnx2jax subtract them, as without g_idx.
    inputs, inits = _nbits_case(4, 32, 64, 8, "packed", g_idx=True)
    model = _node_model("MatMulNBits", inputs, inits, K=64, N=8, bits=4, block_size=32)
    feeds = {"a": inputs["a"]}
    want = inputs["a"].astype(np.float64) @ _nbits_weight(inputs, 4, 32, 64, 8)
    np.testing.assert_allclose(_ours(model, feeds)[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [16, 32])
def test_matmul_nbits_accuracy_level_4_within_int8_activation_rounding(block):
    # onnx2jax computes in float32 at every accuracy_level (the attribute is the lowest accuracy
    # allowed); onnxruntime's level 4 rounds A to int8 per block of K, scale max|A| / 127. Its
    # error is therefore at most sum over blocks of (max|A_block| / 254) * sum |W| there.
    k, n = 64, 16
    inputs, inits = _nbits_case(4, block, k, n, "none", lead=(4,))
    model = _node_model(
        "MatMulNBits", inputs, inits, K=k, N=n, bits=4, block_size=block, accuracy_level=4
    )
    feeds = {"a": inputs["a"]}
    got, want = _ours(model, feeds)[0], run_reference(model, feeds)[0]
    exact = inputs["a"].astype(np.float64) @ _nbits_weight(inputs, 4, block, k, n)
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5)
    a_blocks = np.abs(inputs["a"]).reshape(4, -1, block).max(-1) / 254
    w_blocks = np.abs(_nbits_weight(inputs, 4, block, k, n)).reshape(-1, block, n).sum(1)
    bound = a_blocks @ w_blocks
    assert np.all(np.abs(want - exact) <= bound * 1.01 + 1e-5)
    assert np.abs(want - exact).max() > 0  # onnxruntime did round: the bound is not vacuous


def test_matmul_nbits_weights_stay_packed_in_the_program():
    # The packed weight is a frozen uint8 param (tests/core/test_packed_weights.py): the
    # program holds no constant of its unpacked (float or int32) size.
    k, n = 256, 64
    inputs, inits = _nbits_case(4, 32, k, n, "packed", lead=(2,))
    model = _node_model("MatMulNBits", inputs, inits, K=k, N=n, bits=4, block_size=32)
    compiled = onnx2jax.load(model)
    assert compiled.params["b"].dtype == np.uint8
    text = jax.jit(compiled.apply).lower(compiled.params, a=inputs["a"]).compile().as_text() or ""
    constants = re.findall(r"(\w+)\[([\d,]*)\]\{[^}]*\} constant\(", text)
    sizes = {
        (dtype, int(np.prod([int(d) for d in dims.split(",") if d]))) for dtype, dims in constants
    }
    assert all(size < k * n // 2 or dtype == "u8" for dtype, size in sizes), sizes


def test_matmul_nbits_symbolic_dims_and_inside_if():
    # A is [batch, seq, K] with named dims; the node sits in an If branch reading the outer
    # graph's packed initializers.
    k, n = 48, 8
    inputs, inits = _nbits_case(4, 16, k, n, "packed")
    node = helper.make_node(
        "MatMulNBits", ["a", "b", "scales", "zp"], ["y_then"], domain=MS,
        K=k, N=n, bits=4, block_size=16,
    )  # fmt: skip
    then = helper.make_graph(
        [node], "then", [], [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)]
    )
    negated = helper.make_node(
        "MatMulNBits", ["a", "b", "scales", "zp"], ["t"], domain=MS,
        K=k, N=n, bits=4, block_size=16,
    )  # fmt: skip
    other = helper.make_graph(
        [negated, helper.make_node("Neg", ["t"], ["y_else"])],
        "else",
        [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other)],
        "if_nbits",
        [
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "seq", k]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[onnx.numpy_helper.from_array(v, name) for name, v in inits.items()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
        ir_version=10,
    )
    for flag, shape in [(True, (1, 3, k)), (False, (2, 5, k))]:
        feeds = {"flag": np.array(flag), "a": RNG.normal(size=shape).astype(np.float32)}
        np.testing.assert_allclose(
            _ours(model, feeds)[0], run_reference(model, feeds)[0], rtol=1e-5, atol=1e-5
        )


def test_matmul_nbits_refuses_what_it_lacks():
    inputs, inits = _nbits_case(4, 16, 32, 4, "none")
    model = _node_model("MatMulNBits", inputs, inits, K=32, N=4, bits=3, block_size=16)
    with pytest.raises(OpError, match="bits=3"):
        _ours(model, {"a": inputs["a"]})


# ----------------------------------------------------------------------- GatherBlockQuantized


def _gather_case(data, scales, zero_points, indices, **attrs):
    inits = {"data": data, "scales": scales}
    if zero_points is not None:
        inits["zp"] = zero_points
    inputs = {"data": data, "indices": indices, "scales": scales, "zp": zero_points}
    model = _node_model("GatherBlockQuantized", inputs, inits, **attrs)
    feeds = {"indices": indices}
    got, want = _ours(model, feeds)[0], run_reference(model, feeds)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("with_zero", [False, True])
def test_gather_block_quantized_uint8_packed(block, with_zero):
    rows, width = 10, 64
    data = RNG.integers(0, 256, size=(rows, width // 2), dtype=np.uint8)
    scales = RNG.uniform(0.1, 1, size=(rows, width // block)).astype(np.float32)
    zp = RNG.integers(0, 256, size=(rows, width // block // 2), dtype=np.uint8)
    # Negative indices count from the end; out-of-range ones give zeros, as in onnxruntime.
    indices = np.array([[0, 3, -1], [9, 12, -11]], np.int64)
    _gather_case(
        data, scales, zp if with_zero else None, indices, bits=4, block_size=block, quantize_axis=1
    )


def test_gather_block_quantized_uint8_eight_bits():
    data = RNG.integers(0, 256, size=(6, 32), dtype=np.uint8)
    scales = RNG.uniform(0.1, 1, size=(6, 2)).astype(np.float32)
    zp = RNG.integers(0, 256, size=(6, 2), dtype=np.uint8)
    _gather_case(data, scales, zp, np.array([5, 0, 2], np.int32), bits=8, block_size=16)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("quantize_axis", [0, 1])
def test_gather_block_quantized_int4(signed, quantize_axis):
    dtype = onnx.helper.tensor_dtype_to_np_dtype(TensorProto.INT4 if signed else TensorProto.UINT4)
    low, high = (-8, 8) if signed else (0, 16)
    data = RNG.integers(low, high, size=(32, 48)).astype(dtype)
    shape = [32, 48]
    shape[quantize_axis] //= 16
    scales = RNG.uniform(0.1, 1, size=shape).astype(np.float32)
    zp = RNG.integers(low, high, size=shape).astype(dtype)
    indices = np.array([[1, 31], [-2, 7]], np.int64)
    _gather_case(data, scales, zp, indices, block_size=16, quantize_axis=quantize_axis)
    _gather_case(data, scales, None, indices, block_size=16, quantize_axis=quantize_axis)


# ---------------------------------------------------------------------------- RotaryEmbedding


def _caches(positions, half):
    freq = 1.0 / (10000 ** (np.arange(half) / half))
    angles = np.arange(positions)[:, None] * freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("layout", ["3d", "4d"])
@pytest.mark.parametrize("positions", ["offset", "ids"])
@pytest.mark.parametrize("rotary_dim", [0, 8])
def test_rotary_embedding_ms(interleaved, layout, positions, rotary_dim):
    batch, length, heads, size = 2, 5, 3, 16
    cos, sin = _caches(32, (rotary_dim or size) // 2)
    x = RNG.normal(size=(batch, length, heads * size)).astype(np.float32)
    if layout == "4d":
        x = x.reshape(batch, length, heads, size).transpose(0, 2, 1, 3).copy()
    ids = (
        np.array([4], np.int64)
        if positions == "offset"
        else RNG.integers(0, 32, size=(batch, length)).astype(np.int64)
    )
    inputs = {"x": x, "pos": ids, "cos": cos, "sin": sin}
    attrs = {"interleaved": interleaved}
    if rotary_dim:
        attrs.update(rotary_embedding_dim=rotary_dim, num_heads=heads)
    model = _node_model("RotaryEmbedding", inputs, {}, **attrs)
    feeds = {k: v for k, v in inputs.items()}
    np.testing.assert_allclose(
        _ours(model, feeds)[0], run_reference(model, feeds)[0], rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------------------- GroupQueryAttention

_GQA_INPUTS = (
    "query",
    "key",
    "value",
    "past_key",
    "past_value",
    "seqlens_k",
    "total_sequence_length",
    "cos_cache",
    "sin_cache",
    "position_ids",
    "attention_bias",
    "head_sink",
)


def _gqa(
    *,
    batch=2,
    length=4,
    heads=4,
    kv_heads=2,
    size=16,
    past=0,
    buffer=None,
    valid=None,
    total=None,
    packed=False,
    rotary=False,
    garbage_tail=False,
    extra=None,
    dtype=np.float32,
    **attrs,
):
    """One GroupQueryAttention node, run by both: (ours, onnxruntime's, valid, feeds)."""
    valid = np.array(valid if valid is not None else [past + length] * batch, np.int32)
    total = total if total is not None else int(valid.max())
    values = {}
    q = RNG.normal(size=(batch, length, heads * size)).astype(np.float32)
    k = RNG.normal(size=(batch, length, kv_heads * size)).astype(np.float32)
    v = RNG.normal(size=(batch, length, kv_heads * size)).astype(np.float32)
    if packed:
        values["query"] = np.concatenate([q, k, v], axis=-1)
    else:
        values.update(query=q, key=k, value=v)
    rows = buffer if buffer is not None else past
    if past or buffer is not None:
        shape = (batch, kv_heads, rows, size)
        pk = RNG.normal(size=shape).astype(np.float32)
        pv = RNG.normal(size=shape).astype(np.float32)
        if not garbage_tail:
            # Rows past each batch row's cached tokens are zero, as onnxruntime writes them.
            cached = (valid - length)[:, None, None, None]
            tail = np.arange(rows)[None, None, :, None] >= cached
            pk, pv = np.where(tail, 0, pk), np.where(tail, 0, pv)
        values.update(past_key=pk, past_value=pv)
    values["seqlens_k"] = valid - 1
    values["total_sequence_length"] = np.array(total, np.int32)
    if rotary:
        values["cos_cache"], values["sin_cache"] = _caches(64, size // 2)
    values.update(extra or {})
    values = {n: v.astype(dtype) if v.dtype == np.float32 else v for n, v in values.items()}
    inputs = {name: values.get(name) for name in _GQA_INPUTS}
    outputs = ("y", "present_key", "present_value") + (("qk",) if attrs.get("qk_output") else ())
    model = _node_model(
        "GroupQueryAttention",
        inputs,
        {"total_sequence_length": values["total_sequence_length"]},
        outputs=outputs,
        num_heads=heads,
        kv_num_heads=kv_heads,
        do_rotary=int(rotary),
        **attrs,
    )
    feeds = {n: v for n, v in values.items() if n != "total_sequence_length"}
    return _ours(model, feeds), run_reference(model, feeds), valid, feeds


def _assert_gqa(ours, theirs, valid, first_prompt=False, whole_present=True):
    """Output rows of real tokens match, and the present cache's rows of the row's tokens (all
    of it when ``whole_present``)."""
    (y, pk, pv), (ty, tpk, tpv) = ours[:3], theirs[:3]
    assert y.shape == ty.shape and pk.shape == tpk.shape and pv.shape == tpv.shape
    length = y.shape[1]
    for b, count in enumerate(valid):
        rows = min(count, length) if first_prompt else length
        np.testing.assert_allclose(y[b, :rows], ty[b, :rows], rtol=1e-5, atol=1e-5)
        if whole_present and not first_prompt:
            np.testing.assert_allclose(pk[b], tpk[b], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(pv[b], tpv[b], rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_allclose(pk[b, :, :count], tpk[b, :, :count], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(pv[b, :, :count], tpv[b, :, :count], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rotary", ["none", "halves", "interleaved"])
def test_gqa_first_prompt(packed, rotary):
    ours, theirs, valid, feeds = _gqa(
        length=5,
        packed=packed,
        rotary=rotary != "none",
        rotary_interleaved=int(rotary == "interleaved"),
    )
    _assert_gqa(ours, theirs, valid, first_prompt=True)


def test_gqa_first_prompt_batch_of_different_lengths():
    # Row 1 is right-padded: its outputs past its 3 tokens are unspecified.
    ours, theirs, valid, feeds = _gqa(length=6, valid=[6, 3], rotary=True)
    _assert_gqa(ours, theirs, valid, first_prompt=True)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("rotary", [False, True])
def test_gqa_decode_step_with_past(heads, kv_heads, rotary):
    ours, theirs, valid, feeds = _gqa(
        length=1, past=5, heads=heads, kv_heads=kv_heads, rotary=rotary, valid=[6, 4]
    )
    _assert_gqa(ours, theirs, valid)


@pytest.mark.parametrize("garbage_tail", [False, True])
def test_gqa_past_buffer_longer_than_its_tokens(garbage_tail):
    # A preallocated cache of 12 rows holding 5 and 3 tokens: present keeps the buffer's
    # length with the new token written at each row's position. onnxruntime (its buffers not
    # shared here) zeroes the rows after the tokens; onnx2jax keeps what the buffer held, so
    # with a garbage tail only the rows of real tokens are compared.
    ours, theirs, valid, feeds = _gqa(
        length=1, buffer=12, valid=[6, 4], total=6, rotary=True, garbage_tail=garbage_tail
    )
    assert ours[1].shape[2] == 12
    _assert_gqa(ours, theirs, valid, whole_present=not garbage_tail)
    for b, count in enumerate(valid):
        np.testing.assert_array_equal(ours[1][b, :, count:], feeds["past_key"][b, :, count:])
        np.testing.assert_array_equal(ours[2][b, :, count:], feeds["past_value"][b, :, count:])


def test_gqa_later_prompt_of_several_tokens():
    ours, theirs, valid, feeds = _gqa(batch=1, length=3, past=4, rotary=True)
    _assert_gqa(ours, theirs, valid)


@pytest.mark.parametrize("window", [1, 2, 4])
def test_gqa_local_window(window):
    ours, theirs, valid, feeds = _gqa(length=6, local_window_size=window)
    _assert_gqa(ours, theirs, valid, first_prompt=True)
    ours, theirs, valid, feeds = _gqa(length=1, past=7, valid=[8, 6], local_window_size=window)
    _assert_gqa(ours, theirs, valid)


def test_gqa_softcap_and_scale():
    ours, theirs, valid, feeds = _gqa(length=4, softcap=2.0, scale=0.7)
    _assert_gqa(ours, theirs, valid, first_prompt=True)
    ours, theirs, valid, feeds = _gqa(length=1, past=3, softcap=1.5)
    _assert_gqa(ours, theirs, valid)


def test_gqa_smooth_softmax_and_head_sink():
    ours, theirs, valid, feeds = _gqa(length=4, smooth_softmax=1)
    _assert_gqa(ours, theirs, valid, first_prompt=True)
    sink = {"head_sink": RNG.normal(size=(4,)).astype(np.float32)}
    ours, theirs, valid, feeds = _gqa(length=1, past=3, extra=sink, smooth_softmax=1)
    _assert_gqa(ours, theirs, valid)


def test_gqa_refuses_what_it_lacks():
    with pytest.raises(OpError, match="sliding_window_cache"):
        _gqa(length=4, local_window_size=2, sliding_window_cache=1)


@pytest.mark.parametrize("step", ["prompt", "decode"])
def test_gqa_not_causal(step):
    if step == "prompt":
        ours, theirs, valid, feeds = _gqa(length=5, causal=0, valid=[5, 3])
    else:
        ours, theirs, valid, feeds = _gqa(length=1, past=4, causal=0, valid=[5, 3])
    _assert_gqa(ours, theirs, valid, first_prompt=step == "prompt")


def test_gqa_attention_bias():
    bias = {"attention_bias": RNG.normal(size=(2, 4, 4, 4)).astype(np.float32)}
    ours, theirs, valid, feeds = _gqa(length=4, extra=bias)
    _assert_gqa(ours, theirs, valid, first_prompt=True)
    bias = {"attention_bias": RNG.normal(size=(1, 1, 1, 4)).astype(np.float32)}
    ours, theirs, valid, feeds = _gqa(length=1, past=3, extra=bias)
    _assert_gqa(ours, theirs, valid)


def test_gqa_position_ids():
    # A later step rotates at the given positions.
    ids = {"position_ids": np.array([[7], [1]], np.int64)}
    ours, theirs, valid, feeds = _gqa(length=1, past=3, rotary=True, valid=[4, 2], extra=ids)
    _assert_gqa(ours, theirs, valid)
    # A prompt reads each row's first position only, the others follow it. onnxruntime's
    # present key of the rows after the first is rotated at the first row's positions though
    # its attention used the row's own: only the output and row 0's cache are compared.
    ids = {"position_ids": np.array([[2, 9, 1, 0], [5, 0, 0, 0]], np.int64)}
    ours, theirs, valid, feeds = _gqa(length=4, rotary=True, extra=ids)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[1][0], theirs[1][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours[2], theirs[2], rtol=1e-6, atol=1e-6)


# ------------------------------------------------- MultiHeadAttention with a shared buffer


@pytest.mark.parametrize(
    "length,buffer,cached,unidirectional", [(1, 6, 3, 0), (3, 8, 2, 0), (3, 8, 2, 1), (1, 6, 0, 1)]
)
def test_multi_head_attention_past_sequence_length(length, buffer, cached, unidirectional):
    # past_key/past_value are a buffer of ``buffer`` rows holding ``cached`` tokens: this
    # step's keys go after them, the rest of the buffer is kept and never attended.
    batch, heads, size = 2, 2, 8
    q, k, v = (RNG.normal(size=(batch, length, heads * size)).astype(np.float32) for _ in "qkv")
    pk, pv = (RNG.normal(size=(batch, heads, buffer, size)).astype(np.float32) for _ in "kv")
    inputs = {
        "q": q,
        "k": k,
        "v": v,
        "bias": None,
        "mask": None,
        "attention_bias": None,
        "pk": pk,
        "pv": pv,
        "past_sequence_length": np.array(cached, np.int32),
    }
    model = _node_model(
        "MultiHeadAttention",
        inputs,
        {},
        outputs=("y", "present_key", "present_value"),
        num_heads=heads,
        unidirectional=unidirectional,
    )
    feeds = {name: value for name, value in inputs.items() if value is not None}
    ours, theirs = _ours(model, feeds), run_reference(model, feeds)
    for got, want in zip(ours, theirs, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert ours[1].shape[2] == buffer


def test_gqa_float16():
    # onnxruntime computes float16 attention in float32 and rounds once, as onnx2jax does.
    ours, theirs, valid, feeds = _gqa(length=5, rotary=True, dtype=np.float16)
    assert ours[0].dtype == theirs[0].dtype == np.float16
    for got, want in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)
    ours, theirs, valid, feeds = _gqa(length=1, past=4, rotary=True, dtype=np.float16)
    for got, want in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)


def test_matmul_nbits_float16():
    inputs, inits = _nbits_case(4, 32, 64, 8, "packed", bias=True)
    for name in ("scales", "bias"):
        inits[name] = inputs[name] = inits[name].astype(np.float16)
    inputs["a"] = inputs["a"].astype(np.float16)
    model = _node_model("MatMulNBits", inputs, inits, K=64, N=8, bits=4, block_size=32)
    got, want = _ours(model, {"a": inputs["a"]})[0], run_reference(model, {"a": inputs["a"]})[0]
    assert got.dtype == want.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(
    "dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float4_e2m1fn]
)
@pytest.mark.parametrize("block,scale_shape", [(16, (8, 2)), (0, (8, 1)), (16, (1, 2))])
def test_gather_block_quantized_float_codes(dtype, block, scale_shape):
    # No zero points; block_size 0 is one block per row; a scale dimension of 1 broadcasts.
    data = RNG.normal(size=(8, 32)).astype(dtype)
    scales = RNG.uniform(0.1, 1, size=scale_shape).astype(np.float32)
    _gather_case(data, scales, None, np.array([[0, 7], [-1, 9]], np.int64), block_size=block)


@pytest.mark.parametrize("quantize_axis", [0, 1])
def test_gather_block_quantized_int4_gather_axis_1(quantize_axis):
    dtype = onnx.helper.tensor_dtype_to_np_dtype(TensorProto.INT4)
    data = RNG.integers(-8, 8, size=(32, 32)).astype(dtype)
    shape = [32, 32]
    shape[quantize_axis] //= 16
    scales = RNG.uniform(0.1, 1, size=shape).astype(np.float32)
    zp = RNG.integers(-8, 8, size=shape).astype(dtype)
    indices = np.array([[3, 31, -5]], np.int64)
    _gather_case(
        data, scales, zp, indices, block_size=16, quantize_axis=quantize_axis, gather_axis=1
    )


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize(
    "case",
    [
        dict(length=4),
        dict(length=1, past=3, valid=[4, 2]),
        dict(length=4, softcap=1.0),
        dict(length=1, past=5, valid=[6, 3], local_window_size=2),
        dict(length=4, extra={"attention_bias": RNG.normal(size=(2, 4, 4, 4)).astype(np.float32)}),
    ],
)
def test_gqa_qk_output(mode, case):
    # The scores with softcap and bias (1) or the probabilities (2), zero where masked.
    ours, theirs, valid, feeds = _gqa(qk_output=mode, **case)
    _assert_gqa(ours, theirs, valid, first_prompt=case["length"] > 1)
    assert ours[3].shape == theirs[3].shape
    np.testing.assert_allclose(ours[3], theirs[3], rtol=1e-5, atol=1e-5)


def test_matmul_nbits_omitted_projection():
    # A packed weight with a zero dimension: zeros plus the broadcast bias.
    packed, scales = np.zeros((8, 0, 16), np.uint8), np.zeros((8, 0), np.float32)
    bias = RNG.normal(size=(8,)).astype(np.float32)
    a = RNG.normal(size=(3, 64)).astype(np.float32)
    inputs = {"a": a, "b": packed, "scales": scales, "zp": None, "g": None, "bias": bias}
    inits = {"b": packed, "scales": scales, "bias": bias}
    model = _node_model("MatMulNBits", inputs, inits, K=64, N=8, bits=4, block_size=32)
    got, want = _ours(model, {"a": a})[0], run_reference(model, {"a": a})[0]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, np.broadcast_to(bias, (3, 8)))


@pytest.mark.parametrize("zero_kind", ["none", "packed", "float"])
def test_matmul_nbits_large_weight_in_slices(zero_kind):
    # A weight of more than 2^20 values is multiplied a slice of rows at a time (two slices
    # here, the second padded); N = 1100 is no multiple of the slice.
    k, n = 1024, 1100
    inputs, inits = _nbits_case(4, 32, k, n, zero_kind, bias=True, lead=(3,))
    model = _node_model("MatMulNBits", inputs, inits, K=k, N=n, bits=4, block_size=32)
    feeds = {"a": inputs["a"]}
    np.testing.assert_allclose(
        _ours(model, feeds)[0], run_reference(model, feeds)[0], rtol=1e-4, atol=1e-4
    )


def test_matmul_nbits_float_weights_are_not_all_live_at_once():
    # Four 2048 x 2048 int4 layers: 16 MiB each in float32. Unpacked up front (they depend on
    # constants and params only) all four would be live together; sliced, the program's
    # scratch memory stays under one layer's float size.
    k = n = 2048
    nodes, inits, previous = [], [], "x"
    for i in range(4):
        inputs, layer = _nbits_case(4, 32, k, n, "none", lead=(1,))
        inits += [
            onnx.numpy_helper.from_array(layer["b"], f"w{i}"),
            onnx.numpy_helper.from_array(layer["scales"], f"s{i}"),
        ]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [previous, f"w{i}", f"s{i}"],
                [f"h{i}"],
                domain=MS,
                K=k,
                N=n,
                bits=4,
                block_size=32,
            )  # fmt: skip
        )
        previous = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
        ir_version=10,
    )
    compiled = onnx2jax.load(model)
    x = RNG.normal(size=(1, k)).astype(np.float32)
    program = jax.jit(compiled.apply).lower(compiled.params, x=x).compile()
    assert program.memory_analysis().temp_size_in_bytes < k * n * 4
    # Four layers of 2048-term sums grow the outputs to about 1e4 while some cancel to near 0:
    # float32 rounding is relative to the outputs' scale, not to each element.
    want = run_reference(model, {"x": x})[0]
    np.testing.assert_allclose(
        _ours(model, {"x": x})[0], want, rtol=1e-3, atol=1e-5 * np.abs(want).max()
    )


@pytest.mark.parametrize("length,unidirectional", [(1, 1), (3, 1), (2, 0)])
def test_attention_past_present_share_buffer(length, unidirectional):
    # onnxruntime's CPU kernel refuses the shared form, so the reference is onnxruntime on the
    # same step with the buffer's tokens as an ordinary past; the buffer's later rows must
    # come back unchanged.
    batch, heads, size, rows, cached = 2, 2, 8, 8, 3
    x = RNG.normal(size=(batch, length, 16)).astype(np.float32)
    weights = RNG.normal(size=(16, 3 * heads * size)).astype(np.float32)
    buffer = RNG.normal(size=(2, batch, heads, rows, size)).astype(np.float32)
    common = dict(num_heads=heads, unidirectional=unidirectional)
    inputs = {"x": x, "w": weights, "bias": None, "mask": None, "past": buffer}
    shared = _node_model(
        "Attention",
        {**inputs, "attention_bias": None, "past_sequence_length": np.array(cached, np.int32)},
        {"w": weights},
        outputs=("y", "present"),
        past_present_share_buffer=1,
        **common,
    )
    feeds = {"x": x, "past": buffer, "past_sequence_length": np.array(cached, np.int32)}
    y, present = _ours(shared, feeds)
    plain = _node_model(
        "Attention",
        {**inputs, "past": buffer[:, :, :, :cached]},
        {"w": weights},
        outputs=("y", "present"),
        **common,
    )
    want_y, want_present = run_reference(plain, {"x": x, "past": buffer[:, :, :, :cached]})
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    assert present.shape == buffer.shape
    end = cached + length
    np.testing.assert_allclose(present[:, :, :, :end], want_present, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(present[:, :, :, end:], buffer[:, :, :, end:])
