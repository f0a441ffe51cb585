"""Models written by onnxruntime-genai's model builder (random small Llama, Qwen2 and Phi-3,
fp32 and int4) against onnxruntime: prefill and decode steps that feed each step's present
keys and values back as the next step's past, as genai_config.json names them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import onnx
import onnxruntime
import pytest

import onnx2jax
from tests.models.exports import float_accuracy, run_genai_builder

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai")
tokenizers = pytest.importorskip("tokenizers")

ARCHITECTURES = ["llama", "qwen2", "phi3"]
VOCAB = 256


def _save_tiny(kind: str, folder: Path) -> None:
    """A random 2-layer, hidden-64 model of ``kind`` and a word-level tokenizer (the builder
    reads one) saved with save_pretrained."""
    import torch

    torch.manual_seed(0)
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    if kind == "llama":
        module = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind in ("qwen2", "qwen2-tied"):
        config = transformers.Qwen2Config(**common, tie_word_embeddings=kind == "qwen2-tied")
        module = transformers.Qwen2ForCausalLM(config)
    elif kind == "phi3-longrope":
        # A longer context than the original: the builder's Phi-3 with two cos/sin caches, the
        # long ones chosen by an If past 64 tokens.
        config = transformers.Phi3Config(
            **{**common, "num_key_value_heads": 4, "max_position_embeddings": 256},
            original_max_position_embeddings=64,
            rope_scaling={
                "type": "longrope",
                "long_factor": [1.0 + 0.1 * i for i in range(8)],
                "short_factor": [1.0] * 8,
            },
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        module = transformers.Phi3ForCausalLM(config)
    else:
        # Equal context lengths make the builder's Phi-3 mini (no long-rope caches).
        config = transformers.Phi3Config(
            **{**common, "num_key_value_heads": 4},
            original_max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        module = transformers.Phi3ForCausalLM(config)
    module.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t0"
    )
    fast.save_pretrained(folder)


@pytest.fixture(scope="session")
def builder_models(tmp_path_factory):
    """Built once per session: {(kind, precision): folder}, precision fp32, int4, and
    int4-acc0 (the int4 model with accuracy_level 0, so onnxruntime computes it in float) for
    each of ARCHITECTURES, ("phi3-longrope", "fp32") and "qwen2-tied" int4 and int4-acc0."""
    root = tmp_path_factory.mktemp("builder")
    built = {}

    def build(kind, precision, *extra):
        source = root / f"{kind}_hf"
        if not source.exists():
            _save_tiny(kind, source)
        out = root / f"{kind}_{precision}"
        built[kind, precision] = run_genai_builder(source, out, precision, root / "cache", *extra)

    build("phi3-longrope", "fp32")
    # Tied embeddings shared with the int4 lm_head: the embedding is a GatherBlockQuantized.
    build("qwen2-tied", "int4", "--extra_options", "shared_embeddings=true")
    for kind in ARCHITECTURES:
        build(kind, "fp32")
        build(kind, "int4")
    for kind in [*ARCHITECTURES, "qwen2-tied"]:
        exact = root / f"{kind}_int4-acc0"
        shutil.copytree(built[kind, "int4"], exact)
        proto = float_accuracy(onnx.load(exact / "model.onnx"))
        (exact / "model.onnx.data").unlink()
        onnx.save(
            proto, exact / "model.onnx", save_as_external_data=True, location="model.onnx.data"
        )
        built[kind, "int4-acc0"] = exact
    return built


def _run_steps(folder: Path, prompt: np.ndarray, steps: int, run) -> list[np.ndarray]:
    """Logits of the prompt and of ``steps`` greedy tokens, with ``run(feeds) -> dict``; past
    inputs named by genai_config.json, the first ones empty."""
    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    names, layers = config["inputs"], config["num_hidden_layers"]
    outs = config["outputs"]
    batch = prompt.shape[0]
    empty = np.zeros((batch, config["num_key_value_heads"], 0, config["head_size"]), np.float32)
    past = {names[f"past_{kv}_names"] % i: empty for i in range(layers) for kv in ("key", "value")}
    ids, length, logits = prompt, prompt.shape[1], []
    for _ in range(steps + 1):
        feeds = {
            names["input_ids"]: ids.astype(np.int64),
            names["attention_mask"]: np.ones((batch, length), np.int64),
            **past,
        }
        result = run(feeds)
        step_logits = np.asarray(result[outs["logits"]])
        logits.append(step_logits)
        past = {
            names[f"past_{kv}_names"] % i: np.asarray(result[outs[f"present_{kv}_names"] % i])
            for i in range(layers)
            for kv in ("key", "value")
        }
        ids = step_logits[:, -1].argmax(-1)[:, None]
        length += 1
    return logits


def _greedy_in_buffer(folder: Path, prompt: np.ndarray, steps: int, run) -> np.ndarray:
    """``steps`` greedy tokens with the cache in one buffer of prompt + steps rows, as
    onnxruntime-genai runs these models (past_present_share_buffer): every decode step has
    the same shapes, the mask marks the tokens so far."""
    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    names, outs, layers = config["inputs"], config["outputs"], config["num_hidden_layers"]
    batch, length = prompt.shape
    rows = length + steps
    empty = np.zeros((batch, config["num_key_value_heads"], rows, config["head_size"]), np.float32)
    past = {names[f"past_{kv}_names"] % i: empty for i in range(layers) for kv in ("key", "value")}
    ids, mask, tokens = prompt, np.ones((batch, length), np.int64), []
    for step in range(steps):
        result = run(
            {names["input_ids"]: ids.astype(np.int64), names["attention_mask"]: mask, **past}
        )
        past = {
            names[f"past_{kv}_names"] % i: np.asarray(result[outs[f"present_{kv}_names"] % i])
            for i in range(layers)
            for kv in ("key", "value")
        }
        ids = np.asarray(result[outs["logits"]])[:, -1].argmax(-1)[:, None]
        tokens.append(ids[:, 0])
        mask = (np.arange(rows)[None, :] < length + step + 1).astype(np.int64).repeat(batch, 0)
    return np.stack(tokens, axis=1)


def _ort_runner(folder: Path):
    session = onnxruntime.InferenceSession(
        str(folder / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(None, feeds), strict=True))


def _our_runner(folder: Path, call: bool = False):
    """onnx2jax on the folder's model: ``jax.jit(model.apply)``, or ``model(...)`` (its
    engine's program) with ``call``."""
    model = onnx2jax.load(folder / "model.onnx")
    if call:
        return lambda feeds: model(**feeds)
    apply = jax.jit(model.apply)
    return lambda feeds: apply(model.params, **feeds)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


PROMPT = np.random.default_rng(0).integers(3, VOCAB, size=(2, 7))


@pytest.mark.parametrize("kind", ARCHITECTURES)
@pytest.mark.parametrize("precision", ["fp32", "int4-acc0"])
def test_builder_model_matches_onnxruntime(builder_models, kind, precision):
    # fp32, and int4 with onnxruntime computing in float (accuracy_level 0): the same numbers.
    folder = builder_models[kind, precision]
    theirs = _run_steps(folder, PROMPT, 4, _ort_runner(folder))
    for call in (False, True):
        ours = _run_steps(folder, PROMPT, 4, _our_runner(folder, call))
        for got, want in zip(ours, theirs, strict=True):
            assert got.shape == want.shape
            assert _relative(got, want) < 1e-4


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_builder_int4_model_within_onnxruntimes_own_rounding(builder_models, kind):
    # As built (accuracy_level 4) onnxruntime rounds activations to int8 per block, onnx2jax
    # computes in float32: their distance must stay well inside what int4 quantization itself
    # moves the logits (onnxruntime's int4 model from its fp32 model), and the steps feed the
    # same tokens (onnxruntime's, so both runs see one sequence).
    int4, fp32 = builder_models[kind, "int4"], builder_models[kind, "fp32"]
    theirs = _run_steps(int4, PROMPT, 4, _ort_runner(int4))
    tokens = [PROMPT] + [step[:, -1].argmax(-1)[:, None] for step in theirs[:-1]]
    ours_run, fp32_run = _our_runner(int4), _ort_runner(fp32)
    for index, want in enumerate(theirs):
        context = np.concatenate(tokens[: index + 1], axis=1)
        got = _run_steps(int4, context, 0, ours_run)[0][:, -want.shape[1] :]
        reference = _run_steps(fp32, context, 0, fp32_run)[0][:, -want.shape[1] :]
        assert _relative(got, want) < 0.5 * _relative(reference, want)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_builder_model_greedy_tokens_match_genai(builder_models, kind):
    import onnxruntime_genai as og

    folder = builder_models[kind, "fp32"]
    prompt, steps = PROMPT[:1], 32
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    theirs = np.asarray(generator.get_sequence(0))[prompt.shape[1] :]
    # The cache in one preallocated buffer: the decode steps compile once.
    ours = _greedy_in_buffer(folder, prompt, steps, _our_runner(folder, call=True))[0]
    np.testing.assert_array_equal(ours, theirs)
    # A batch of two, the same buffer, against onnxruntime running the graph.
    np.testing.assert_array_equal(
        _greedy_in_buffer(folder, PROMPT, steps, _our_runner(folder, call=True)),
        _greedy_in_buffer(folder, PROMPT, steps, _ort_runner(folder)),
    )


def test_builder_phi3_longrope_past_the_original_context(builder_models):
    # Prompts of 5 and of 70 tokens (the If picks the short or the long cos/sin caches), and
    # greedy steps in one buffer that cross the original 64-token context.
    folder = builder_models["phi3-longrope", "fp32"]
    rng = np.random.default_rng(1)
    for length in (5, 70):
        prompt = rng.integers(3, VOCAB, size=(2, length))
        theirs = _run_steps(folder, prompt, 2, _ort_runner(folder))
        ours = _run_steps(folder, prompt, 2, _our_runner(folder, call=True))
        for got, want in zip(ours, theirs, strict=True):
            assert _relative(got, want) < 1e-4
    prompt = rng.integers(3, VOCAB, size=(2, 60))
    np.testing.assert_array_equal(
        _greedy_in_buffer(folder, prompt, 10, _our_runner(folder, call=True)),
        _greedy_in_buffer(folder, prompt, 10, _ort_runner(folder)),
    )


def test_builder_tied_int4_embeddings(builder_models):
    folder = builder_models["qwen2-tied", "int4-acc0"]
    ops = {node.op_type for node in onnx.load(folder / "model.onnx").graph.node}
    assert "GatherBlockQuantized" in ops
    theirs = _run_steps(folder, PROMPT, 3, _ort_runner(folder))
    ours = _run_steps(folder, PROMPT, 3, _our_runner(folder, call=True))
    for got, want in zip(ours, theirs, strict=True):
        assert _relative(got, want) < 1e-4
