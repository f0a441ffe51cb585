"""com.microsoft SparseAttention (Phi-3-small's block-sparse attention, as onnxruntime-genai's
builder writes it), one node at a time against a float64 NumPy reference written from the
op's spec here, and against onnxruntime's CPU kernel where that kernel is right.

onnxruntime's kernel only runs with past and present sharing one buffer, so it runs here
through an IO binding that binds the same OrtValue as past_key and present_key (and value).
onnxruntime 1.32's CPU kernel writes each row's probabilities at strides of the longest row
(total_sequence_length) but reads them back at strides of the row's own length
(key_total_sequence_lengths[b]), so its output is wrong for a batch whose rows differ in
length: those cases are checked against the NumPy reference only (and the reference is checked
against onnxruntime on batches of equal lengths).
The block masks are built as the builder builds them (local blocks plus vertical stripes, one
layout per head or one for all), as CSR initializers padded with -1."""

from __future__ import annotations

import jax
import numpy as np
import onnxruntime as ort
import pytest

import onnx2jax
from onnx2jax.core.errors import OpError
from tests.helpers import single_node_model

MS = "com.microsoft"
RNG = np.random.default_rng(0)
BLOCK = 16

_INPUTS = (
    "query",
    "key",
    "value",
    "past_key",
    "past_value",
    "block_row_indices",
    "block_col_indices",
    "total_sequence_length",
    "key_total_sequence_lengths",
    "cos_cache",
    "sin_cache",
)


def _block_mask(layouts, blocks, local_blocks=1, vert_stride=3):
    """Dense block masks [layouts, blocks, blocks] as the builder's ``calculate_block_mask``:
    causal, the last ``local_blocks`` blocks plus every ``vert_stride``-th block (shifted per
    layout)."""
    q = np.arange(blocks)[:, None]
    k = np.arange(blocks)[None, :]
    masks = [
        (q >= k) & ((q - k < local_blocks) | ((k + layout + 1) % vert_stride == 0))
        for layout in range(layouts)
    ]
    return np.stack(masks)


def _csr(masks):
    """(block_row_indices, block_col_indices) of dense block masks, columns padded with -1."""
    rows = [np.concatenate([[0], np.cumsum(m.sum(1))]) for m in masks]
    cols = [np.nonzero(m)[1] for m in masks]
    width = max(len(c) for c in cols)
    cols = [np.pad(c, (0, width - len(c)), constant_values=-1) for c in cols]
    return np.stack(rows).astype(np.int32), np.stack(cols).astype(np.int32)


def _caches(positions, half):
    freq = 1.0 / (10000 ** (np.arange(half) / half))
    angles = np.arange(positions)[:, None] * freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _onnxruntime(model, feeds):
    """onnxruntime's outputs, past and present bound to the same buffers."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    # The OrtValues wrap these arrays' memory without owning it: keep them alive.
    buffers = {name: feeds[name].copy() for name in ("past_key", "past_value")}
    shared = {}
    for name, value in feeds.items():
        if name in buffers:
            shared[name] = ort.OrtValue.ortvalue_from_numpy(buffers[name])
            binding.bind_ortvalue_input(name, shared[name])
        else:
            binding.bind_cpu_input(name, value)
    binding.bind_output("y")
    binding.bind_ortvalue_output("present_key", shared["past_key"])
    binding.bind_ortvalue_output("present_value", shared["past_value"])
    session.run_with_iobinding(binding)
    return [binding.copy_outputs_to_cpu()[0], buffers["past_key"], buffers["past_value"]]


def _rotate(x, cos, sin, positions, interleaved):
    """Rotary embedding of x [B, N, S, H] at positions [B, S], the first 2 * cos.shape[1]
    values of each head turning."""
    half = cos.shape[1]
    c, s = cos[positions][:, None], sin[positions][:, None]
    turned, kept = x[..., : 2 * half], x[..., 2 * half :]
    if interleaved:
        x1, x2 = turned[..., 0::2], turned[..., 1::2]
    else:
        x1, x2 = turned[..., :half], turned[..., half:]
    real, imag = c * x1 - s * x2, s * x1 + c * x2
    if interleaved:
        turned = np.stack([real, imag], axis=-1).reshape(turned.shape)
    else:
        turned = np.concatenate([real, imag], axis=-1)
    return np.concatenate([turned, kept], axis=-1)


def _reference(feeds, masks, heads, kv_heads, total, scale=0.0, do_rotary=0, rotary_interleaved=0):
    """The op from its spec in float64: (output, present_key, present_value)."""
    f = {n: v.astype(np.float64) if v.dtype.kind == "f" else v for n, v in feeds.items()}
    query = f["query"]
    batch, length, width = query.shape
    if "key" in f:
        size = width // heads
        q, k, v = query, f["key"], f["value"]
    else:
        size = width // (heads + 2 * kv_heads)
        q, k, v = np.split(query, [heads * size, (heads + kv_heads) * size], axis=-1)
    q = q.reshape(batch, length, heads, size).transpose(0, 2, 1, 3)
    k = k.reshape(batch, length, kv_heads, size).transpose(0, 2, 1, 3)
    v = v.reshape(batch, length, kv_heads, size).transpose(0, 2, 1, 3)
    lengths = f["key_total_sequence_lengths"]
    # The first prompt starts at position 0; a later step follows the row's cached tokens.
    start = np.zeros(batch, int) if length == total else lengths - length
    positions = start[:, None] + np.arange(length)[None, :]
    if do_rotary:
        q = _rotate(q, f["cos_cache"], f["sin_cache"], positions, rotary_interleaved)
        k = _rotate(k, f["cos_cache"], f["sin_cache"], positions, rotary_interleaved)
    present_k, present_v = f["past_key"].copy(), f["past_value"].copy()
    for b in range(batch):
        present_k[b, :, start[b] : start[b] + length] = k[b]
        present_v[b, :, start[b] : start[b] + length] = v[b]
    scale = scale or 1 / np.sqrt(size)
    out = np.zeros((batch, heads, length, size))
    for b in range(batch):
        for n in range(heads):
            layout = masks[n % len(masks)]
            for s in range(length):
                p = positions[b, s]
                keys = np.arange(p + 1)
                keys = keys[layout[p // BLOCK, keys // BLOCK]]
                kv = n // (heads // kv_heads)
                scores = present_k[b, kv, keys] @ q[b, n, s] * scale
                probs = np.exp(scores - scores.max())
                out[b, n, s] = probs / probs.sum() @ present_v[b, kv, keys]
    out = out.transpose(0, 2, 1, 3).reshape(batch, length, heads * size)
    return [out, present_k, present_v]


def _ours(model, feeds):
    compiled = onnx2jax.load(model)
    out = jax.jit(compiled.apply)(compiled.params, **feeds)
    return [np.asarray(out[name]) for name in compiled.output_names]


def _model(inputs, constants, heads, kv_heads, **attrs):
    """One SparseAttention node; ``inputs`` by name (None for absent ones), ``constants`` of
    them as initializers."""
    return single_node_model(
        "SparseAttention",
        {name: inputs.get(name, constants.get(name)) for name in _INPUTS},
        outputs=("y", "present_key", "present_value"),
        domain=MS,
        initializers=constants,
        num_heads=heads,
        kv_num_heads=kv_heads,
        sparse_block_size=BLOCK,
        **attrs,
    )


def _sparse(
    *,
    batch=2,
    length=40,
    heads=4,
    kv_heads=2,
    size=16,
    valid=None,
    decode=False,
    buffer=64,
    layouts=1,
    blocks=4,
    packed=False,
    rotary=False,
    csr_fed=False,
    dtype=np.float32,
    **attrs,
):
    """One SparseAttention node: (ours, the reference's, onnxruntime's or None when its kernel
    is wrong for these lengths, valid, block masks)."""
    valid = np.array(valid if valid is not None else [length] * batch, np.int32)
    total = int(valid.max()) if decode else length
    q = RNG.normal(size=(batch, length, heads * size)).astype(np.float32)
    k = RNG.normal(size=(batch, length, kv_heads * size)).astype(np.float32)
    v = RNG.normal(size=(batch, length, kv_heads * size)).astype(np.float32)
    values = (
        {"query": np.concatenate([q, k, v], axis=-1)} if packed else dict(query=q, key=k, value=v)
    )
    shape = (batch, kv_heads, buffer, size)
    # Rows past each batch row's cached tokens are zero, as onnxruntime leaves them.
    cached = (valid - length)[:, None, None, None] if decode else np.zeros((batch, 1, 1, 1))
    tail = np.arange(buffer)[None, None, :, None] >= cached
    values["past_key"] = np.where(tail, 0, RNG.normal(size=shape)).astype(np.float32)
    values["past_value"] = np.where(tail, 0, RNG.normal(size=shape)).astype(np.float32)
    masks = _block_mask(layouts, blocks)
    rows, cols = _csr(masks)
    values["total_sequence_length"] = np.array(total, np.int32)
    values["key_total_sequence_lengths"] = valid
    if rotary:
        values["cos_cache"], values["sin_cache"] = _caches(96, size // 2)
    values = {n: v.astype(dtype) if v.dtype == np.float32 else v for n, v in values.items()}
    # total_sequence_length is a constant here; in builder models it is a shape, known at trace.
    initializers = {"total_sequence_length": values["total_sequence_length"]}
    if csr_fed:
        values["block_row_indices"], values["block_col_indices"] = rows, cols
    else:
        initializers.update(block_row_indices=rows, block_col_indices=cols)
    model = _model(values, initializers, heads, kv_heads, do_rotary=int(rotary), **attrs)
    feeds = {n: v for n, v in values.items() if v is not None and n not in initializers}
    everything = {n: v for n, v in values.items() if v is not None}
    reference = _reference(
        everything, masks, heads, kv_heads, total, **attrs, do_rotary=int(rotary)
    )
    theirs = _onnxruntime(model, feeds) if (valid == total).all() else None
    return _ours(model, feeds), reference, theirs, valid, masks


def _assert_close(ours, theirs, valid, prompt, tolerance=1e-5):
    """Output rows of real tokens match, and the whole present caches."""
    (y, pk, pv), (ty, tpk, tpv) = ours, theirs
    assert y.shape == ty.shape and pk.shape == tpk.shape and pv.shape == tpv.shape
    assert y.dtype == pk.dtype == pv.dtype
    y, ty = y.astype(np.float64), ty.astype(np.float64)
    for b, count in enumerate(valid):
        rows = count if prompt else y.shape[1]
        np.testing.assert_allclose(y[b, :rows], ty[b, :rows], rtol=tolerance, atol=tolerance)
    # Float16 caches may differ by one rounding (2^-10 relative) where keys were rotated.
    cache_tolerance = 2e-3 if pk.dtype == np.float16 else 1e-6
    for mine, other in ((pk, tpk), (pv, tpv)):
        mine, other = mine.astype(np.float64), other.astype(np.float64)
        np.testing.assert_allclose(mine, other, rtol=cache_tolerance, atol=cache_tolerance)


def _check(case, prompt, tolerance=1e-5):
    ours, reference, theirs, valid, _ = case
    _assert_close(ours, reference, valid, prompt, tolerance)
    if theirs is not None:
        _assert_close(ours, theirs, valid, prompt, tolerance)


def _leaves_out_causal_keys(masks, positions):
    """Whether some query position reads fewer keys than plain causal attention (else the test
    could not tell sparse from dense)."""
    return any(
        not masks[layout, p // BLOCK, : p // BLOCK + 1].all()
        for layout in range(len(masks))
        for p in positions
    )


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("layouts", [1, 4])
@pytest.mark.parametrize("valid", [[56, 56], [56, 37]])
def test_sparse_attention_prompt(packed, rotary, layouts, valid):
    case = _sparse(length=56, valid=valid, packed=packed, rotary=rotary, layouts=layouts)
    assert _leaves_out_causal_keys(case[-1], range(56))
    assert (case[2] is None) == (valid[0] != valid[1])
    _check(case, prompt=True)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("layouts", [1, 2])
@pytest.mark.parametrize("valid", [[50, 50], [50, 33]])
def test_sparse_attention_decode_step(packed, rotary, layouts, valid):
    # Rows of 50 (and 33) tokens after this step: the query at position 49 reads block 3 of a
    # layout that leaves out block 1 (and 0 or 2, by layout).
    case = _sparse(
        length=1, decode=True, valid=valid, packed=packed, rotary=rotary, layouts=layouts
    )
    assert _leaves_out_causal_keys(case[-1], [49])
    _check(case, prompt=False)


def test_sparse_attention_decode_steps_follow_a_prompt():
    # A prompt, then three decode steps, each feeding the present caches back as the next past.
    heads, kv_heads, size, buffer = 4, 1, 16, 64
    masks = _block_mask(2, 4)
    rows, cols = _csr(masks)
    zeros = np.zeros((2, kv_heads, buffer, size), np.float32)
    lengths = np.array([30, 45], np.int32)
    ours_cache = reference_cache = (zeros, zeros)
    for step in range(4):
        length = 45 if step == 0 else 1
        lengths = lengths + (step > 0)
        total = np.array(length if step == 0 else lengths.max(), np.int32)
        feeds = {
            "query": RNG.normal(size=(2, length, heads * size)).astype(np.float32),
            "key": RNG.normal(size=(2, length, kv_heads * size)).astype(np.float32),
            "value": RNG.normal(size=(2, length, kv_heads * size)).astype(np.float32),
            "past_key": zeros,
            "past_value": zeros,
            "key_total_sequence_lengths": lengths,
        }
        constants = {"block_row_indices": rows, "block_col_indices": cols}
        constants["total_sequence_length"] = total
        model = _model(feeds, constants, heads, kv_heads)
        ours = _ours(model, dict(feeds, past_key=ours_cache[0], past_value=ours_cache[1]))
        past = dict(past_key=reference_cache[0], past_value=reference_cache[1])
        reference = _reference(dict(feeds, **past, **constants), masks, heads, kv_heads, total)
        _assert_close(ours, reference, lengths, prompt=step == 0)
        ours_cache = ours[1], ours[2]
        reference_cache = tuple(c.astype(np.float32) for c in reference[1:])


def test_sparse_attention_scale_interleaved_and_partial_rotary():
    case = _sparse(length=1, decode=True, valid=[40, 20], size=32, scale=0.3)
    _check(case, prompt=False)
    # A head of 32 and a rotary cache of 8 values: the first 16 of each head turn.
    for valid in ([24, 24], [24, 9]):
        case = _sparse(length=24, valid=valid, size=32, rotary=True, rotary_interleaved=1)
        _check(case, prompt=True)


@pytest.mark.parametrize("decode", [False, True])
def test_sparse_attention_float16(decode):
    # onnx2jax computes in float32 and rounds the output to float16 once; the caches hold the
    # float16 keys and values (rotated in float32, then rounded).
    length = 1 if decode else 40
    for valid in ([40, 40], [40, 23]):
        case = _sparse(length=length, decode=decode, valid=valid, rotary=True, dtype=np.float16)
        assert case[0][0].dtype == np.float16
        _check(case, prompt=not decode, tolerance=5e-3)


def test_sparse_attention_block_mask_fed_at_run_time():
    # The CSR tensors as graph inputs rather than initializers: expanded inside the program.
    for valid in ([50, 50], [50, 33]):
        _check(_sparse(length=1, decode=True, valid=valid, layouts=2, csr_fed=True), prompt=False)


def test_sparse_attention_refuses_a_prompt_past_the_block_mask():
    masks = _block_mask(1, 2)
    rows, cols = _csr(masks)
    constants = {
        "block_row_indices": rows,
        "block_col_indices": cols,
        "total_sequence_length": np.array(40, np.int32),
    }
    feeds = {
        "query": np.zeros((1, 40, 32), np.float32),
        "key": np.zeros((1, 40, 32), np.float32),
        "value": np.zeros((1, 40, 32), np.float32),
        "past_key": np.zeros((1, 2, 64, 16), np.float32),
        "past_value": np.zeros((1, 2, 64, 16), np.float32),
        "key_total_sequence_lengths": np.array([40], np.int32),
    }
    model = _model(feeds, constants, 2, 2)
    with pytest.raises(OpError, match="block mask's 32 positions"):
        _ours(model, feeds)
