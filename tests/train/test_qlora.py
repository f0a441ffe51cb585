"""LoRA on 4-bit MatMulNBits models (QLoRA-style): the packed base stays packed and frozen, the
float adapters train, and the saved file runs in onnxruntime, with the adapters as extra nodes
(the default) or merged and re-quantized in the file's block format."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import optax
import pytest

import onnx2jax
from onnx2jax import train
from onnx2jax.core.errors import InputError
from onnx2jax.ops.blockwise_quant import pack_low_first, unpack_low_first
from onnx2jax.ops.registry import MS
from onnx2jax.train.lora import LoRA, quantize_blocks
from tests.train.test_qdq_finetune import export_torch, ort_run

torch = pytest.importorskip("torch")


def nbits_mlp(folder: Path, symmetric: bool) -> tuple[Path, Path, np.ndarray]:
    """A torch MLP (its Linear layers exported as MatMul + Add) and the same model with its
    MatMuls 4-bit block-quantized by onnxruntime's MatMulNBitsQuantizer: (float, 4-bit, x)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
    ).eval()
    x = np.random.default_rng(0).normal(size=(2, 5, 64)).astype(np.float32)
    base = export_torch(net, x, folder / "mlp.onnx")
    quantizer = MatMulNBitsQuantizer(onnx.load(str(base)), block_size=32, is_symmetric=symmetric)
    quantizer.process()
    out = folder / "mlp-int4.onnx"
    onnx.save(quantizer.model.model, str(out))
    return base, out, x


@pytest.fixture(scope="module", params=[False, True], ids=["zero-points", "symmetric"])
def int4(request, tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    return nbits_mlp(tmp_path_factory.mktemp("int4"), request.param)


def initializers(path: Path) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in onnx.load(str(path)).graph.initializer}


def stored(model: onnx2jax.Model, name: str) -> np.ndarray:
    """A packed weight as the model holds it: a frozen param, or a constant under 1 KiB."""
    if name in model.params:
        return np.asarray(model.params[name])
    return np.asarray(model.plan.constants[name])


@pytest.fixture(scope="module")
def tuned(int4):
    """30 adam steps of rank-4 adapters on both MatMulNBits nodes, towards reversed outputs."""
    _, path, x = int4
    model = onnx2jax.load(path)
    lora = LoRA(model, targets="*", rank=4)
    target = np.asarray(model(x)["y"])[..., ::-1].copy()

    def loss_fn(params, batch):
        return jnp.mean((lora.apply(params, batch)["y"] - target) ** 2)

    result = train.fit(
        loss_fn,
        optax.adam(1e-2),
        lora.init(jax.random.key(0)),
        lambda step: x,
        steps=30,
        frozen=model.params,
        progress=False,
    )
    return model, lora, result


def test_packed_weights_are_targets_and_frozen_uint8(int4):
    _, path, x = int4
    model = onnx2jax.load(path)
    lora = LoRA(model, targets="*", rank=4)
    assert [(t.op_type, t.shape) for t in lora.targets] == [
        ("MatMulNBits", (64, 64)),
        ("MatMulNBits", (8, 64)),
    ]
    # The first layer's 2 KiB of packed weight is a frozen param, the second's 256 bytes a
    # constant; both uint8, and never selected for training.
    assert lora.targets[0].weight in model.params
    assert lora.targets[1].weight in model.plan.constants
    for target in lora.targets:
        assert stored(model, target.weight).dtype == np.uint8
    assert not set(train.trainable_names(model.params)) & {t.weight for t in lora.targets}
    adapters = lora.init(jax.random.key(0))
    params = {**model.params, **adapters}
    # b starts at zero: the adapted model is the model, through its adapter nodes.
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lora.apply)(params, x)["y"]),
        np.asarray(model.apply(model.params, x)["y"]),
    )
    assert [n.op_type for n in lora.plan.nodes].count("MatMulNBits") == 2
    assert [n.op_type for n in lora.plan.nodes].count("MatMul") == 4
    with pytest.raises(InputError, match="packed integers"):
        lora.merge(params)


def test_loss_falls_and_only_adapters_are_in_the_optimizer_state(int4, tuned):
    _, path, _ = int4
    model, lora, result = tuned
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert set(result.state.opt_state[0].mu) == set(lora.adapter_names)
    assert set(result.state.params) == set(lora.adapter_names)
    # The packed base is the file's, byte for byte.
    for target in lora.targets:
        file = next(t for t in onnx.load(str(path)).graph.initializer if t.name == target.weight)
        assert stored(model, target.weight).tobytes() == file.raw_data


def test_saved_with_adapter_nodes_runs_in_onnxruntime_as_tuned(int4, tuned, tmp_path):
    _, path, x = int4
    model, lora, result = tuned
    saved = tmp_path / "adapters.onnx"
    report = lora.save(saved, result.params, verify={"x": x})
    assert report.worst < 1e-4
    np.testing.assert_allclose(
        ort_run(saved, x), np.asarray(lora.apply(result.params, x)["y"]), atol=1e-4, rtol=0
    )
    before, after = initializers(path), initializers(saved)
    assert all(after[name] == data for name, data in before.items())
    assert set(after) - set(before) == {
        t.weight + suffix
        for t in lora.targets
        for suffix in ("::lora_a", "::lora_b", "::lora_scale")
    }
    # onnx2jax reads the file back to the same numbers.
    again = onnx2jax.load(saved)
    np.testing.assert_allclose(
        np.asarray(again(x)["y"]), np.asarray(lora.apply(result.params, x)["y"]), atol=1e-5
    )


def test_merged_and_requantized_within_the_formats_own_error(int4, tuned, tmp_path):
    base, path, x = int4
    model, lora, result = tuned
    requantized = lora.requantize(result.params)
    symmetric = all(
        len(node.input) < 4 or not node.input[3]
        for node in onnx.load(str(path)).graph.node
        if node.op_type == "MatMulNBits"
    )
    for target in lora.targets:
        # Each value within half a step of its block (the largest step bounds them all); a
        # symmetric block clips the far end of the other sign by up to one step.
        bound = (1.0 if symmetric else 0.5) * requantized.step[target.weight]
        assert requantized.error[target.weight] <= bound * 1.001
    saved = tmp_path / "merged.onnx"
    lora.save(saved, result.params, merge=True)
    assert [n.op_type for n in onnx.load(str(saved)).graph.node] == [
        n.op_type for n in onnx.load(str(path)).graph.node
    ]
    served = ort_run(saved, x)
    np.testing.assert_allclose(served, np.asarray(onnx2jax.load(saved)(x)["y"]), atol=1e-4, rtol=0)
    # The re-quantized model is as far from the tuned one as the 4-bit file was from the float
    # model it was quantized from: the format's own error, once more.
    own_error = np.abs(ort_run(path, x) - ort_run(base, x)).max()
    merged_error = np.abs(served - np.asarray(lora.apply(result.params, x)["y"])).max()
    assert merged_error <= 2 * own_error


def test_block_quantizer_round_trips_through_the_packed_layout():
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(3, 40)).astype(np.float32)
    for asymmetric in (True, False):
        q, scales, zero = quantize_blocks(weight, 4, 16, asymmetric)
        assert q.shape == (3, 48) and scales.shape == zero.shape == (3, 3)
        packed = pack_low_first(q, 4)
        np.testing.assert_array_equal(np.asarray(unpack_low_first(packed, 4)), q)
        back = (q.reshape(3, 3, 16) - zero[..., None]) * scales[..., None]
        error = np.abs(back.reshape(3, 48)[:, :40] - weight)
        assert error.max() <= (0.5 if asymmetric else 1.0) * np.abs(scales).max() * 1.001


def test_float16_node_adapter_nodes_run_in_onnxruntime(int4, tmp_path):
    """A float16 MatMulNBits (one node of the 4-bit file, its scales float16): the adapter
    nodes compute in float32 between two Casts, and onnxruntime agrees within a float16 step."""
    from onnx import TensorProto, helper, numpy_helper

    _, path, _ = int4
    source = onnx.load(str(path))
    node = next(n for n in source.graph.node if n.op_type == "MatMulNBits")
    stored = {t.name: t for t in source.graph.initializer}
    scales = numpy_helper.to_array(stored[node.input[2]]).astype(np.float16)
    tensors = [stored[node.input[1]], numpy_helper.from_array(scales, node.input[2])]
    tensors += [stored[name] for name in node.input[3:4] if name]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    graph = helper.make_graph(
        [helper.make_node("MatMulNBits", list(node.input[:4]), ["y"], "nbits", domain=MS, **attrs)],
        "float16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [None, 64])],
        tensors,
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    )
    model = onnx2jax.load(proto)
    lora = LoRA(model, targets="nbits", rank=4)
    adapters = lora.init(jax.random.key(0))
    assert {v.dtype for v in adapters.values()} == {np.dtype(np.float32)}
    b = lora.targets[0].weight + "::lora_b"
    adapters[b] = jax.random.normal(jax.random.key(1), adapters[b].shape) * 0.05
    params = {**model.params, **adapters}
    x = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float16)
    ours = np.asarray(lora.apply(params, x)["y"])
    assert ours.dtype == np.float16
    assert np.abs(ours.astype(np.float32) - np.asarray(model(x)["y"], np.float32)).max() > 0.01
    saved = tmp_path / "float16.onnx"
    lora.save(saved, params)
    assert [n.op_type for n in onnx.load(str(saved)).graph.node] == [
        "MatMulNBits",
        "Cast",
        "MatMul",
        "MatMul",
        "Mul",
        "Cast",
        "Add",
    ]
    served = ort_run(saved, x)
    assert served.dtype == np.float16
    step = np.spacing(np.abs(served).max().astype(np.float16)).astype(np.float32)
    assert np.abs(served.astype(np.float32) - ours.astype(np.float32)).max() <= 2 * step


@pytest.mark.slow
def test_lora_on_an_int4_builder_llama(tmp_path):
    """onnxruntime-genai's builder writes a random tiny Llama in int4: adapters on every
    MatMulNBits train on next-token loss, the packed weights stay frozen uint8 params with
    their bytes,
    and the saved model's logits in onnxruntime are lora.apply's."""
    import json

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime_genai")
    from tests.models.exports import float_accuracy, run_genai_builder
    from tests.test_generation import tiny_tokenizer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    source, built = tmp_path / "hf", tmp_path / "int4"
    transformers.LlamaForCausalLM(config).save_pretrained(source)
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer(), bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]"
    ).save_pretrained(source)
    run_genai_builder(source, built, "int4", tmp_path / "cache")
    proto = float_accuracy(onnx.load(str(built / "model.onnx")))
    model = onnx2jax.load(proto)
    lora = LoRA(model, targets="*", rank=4)
    packed = [t for t in lora.targets if t.packed]
    assert len(packed) >= 2 * 4 and all(model.params[t.weight].dtype == np.uint8 for t in packed)
    before = {t.weight: stored(model, t.weight).tobytes() for t in packed}

    decoder = json.loads((built / "genai_config.json").read_text())["model"]["decoder"]
    names = decoder["inputs"]
    ids = np.random.default_rng(0).integers(3, 100, size=(2, 12))
    empty = np.zeros((2, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
    feeds = {
        names["input_ids"]: ids.astype(np.int64),
        names["attention_mask"]: np.ones(ids.shape, np.int64),
        **{
            names[f"past_{kv}_names"] % i: empty
            for i in range(decoder["num_hidden_layers"])
            for kv in ("key", "value")
        },
    }
    logits_name = decoder["outputs"]["logits"]

    def loss_fn(params, batch):
        logits = lora.apply(params, **batch, outputs=[logits_name])[logits_name]
        labels = batch[names["input_ids"]][:, 1:]
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], labels).mean()

    result = train.fit(
        loss_fn,
        optax.adam(1e-2),
        lora.init(jax.random.key(0)),
        lambda step: feeds,
        steps=15,
        frozen=model.params,
        progress=False,
    )
    assert result.losses[-1] < 0.8 * result.losses[0]
    assert set(result.state.opt_state[0].mu) == set(lora.adapter_names)
    assert {t.weight: stored(model, t.weight).tobytes() for t in packed} == before

    saved = tmp_path / "tuned.onnx"
    lora.save(saved, result.params)
    session = onnxruntime.InferenceSession(str(saved), providers=["CPUExecutionProvider"])
    served = session.run([logits_name], feeds)[0]
    ours = np.asarray(lora.apply(result.params, **feeds)[logits_name])
    np.testing.assert_allclose(served, ours, atol=1e-4, rtol=1e-4)

    # Re-quantized in the builder's block format: each value within a step of its block, and
    # onnxruntime reads the packed bytes, scales and zero points as onnx2jax does.
    requantized = lora.requantize(result.params)
    assert all(requantized.error[t.weight] <= requantized.step[t.weight] for t in packed)
    merged = tmp_path / "merged.onnx"
    lora.save(merged, result.params, merge=True)
    session = onnxruntime.InferenceSession(str(merged), providers=["CPUExecutionProvider"])
    again = onnx2jax.load(merged)
    np.testing.assert_allclose(
        session.run([logits_name], feeds)[0],
        np.asarray(again.apply(again.params, **feeds)[logits_name]),
        atol=1e-4,
        rtol=1e-4,
    )


def test_save_refuses_to_replace_the_file_whose_data_the_model_reads(int4, tuned, tmp_path):
    _, path, x = int4
    _, _, result = tuned
    folder = tmp_path / "external"
    folder.mkdir()
    stored = folder / "model.onnx"
    onnx.save(onnx.load(str(path)), str(stored), save_as_external_data=True, size_threshold=0)
    model = onnx2jax.load(stored)
    lora = LoRA(model, targets="*", rank=4)
    params = {**model.params, **{k: result.params[k] for k in lora.adapter_names}}
    with pytest.raises(InputError, match="another name"):
        lora.save(stored, params)
    lora.save(folder / "tuned.onnx", params)
    np.testing.assert_allclose(
        ort_run(folder / "tuned.onnx", x), np.asarray(lora.apply(params, x)["y"]), atol=1e-4
    )
    assert ort_run(stored, x).shape == (2, 5, 8)  # the original still runs
