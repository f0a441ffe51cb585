"""onnx2jax.generation: greedy tokens equal to transformers' generate, compiled once per shape.

Tiny random GPT-2 and Llama decoders are exported by torch.onnx with their KV cache as
``past_key_values.{i}.key/value`` inputs and ``present.{i}.key/value`` outputs, the layout
optimum writes.
"""

from __future__ import annotations

import json

import huggingface_hub
import huggingface_hub.constants
import jax
import numpy as np
import onnx
import onnxruntime
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import onnx2jax
from benchmarks.generate import export_with_cache, tiny_decoder
from onnx2jax.core.errors import ModelLoadError
from onnx2jax.generation import (
    GenerationError,
    TextGenerator,
    cache_layout,
    decoder,
    generate,
    generate_stream,
    merge_decoders,
    next_tokens,
)
from tests.hub_cache import put_in_cache

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 100  # tiny_decoder's vocabulary
EOS_ID = 2  # tiny_decoder's eos
KV = ("key", "value")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def exported(request, tmp_path_factory):
    """(transformers module, onnx2jax model) of one tiny decoder."""
    module = tiny_decoder(request.param)
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    return module, onnx2jax.load(export_with_cache(module, path))


def transformers_greedy(module, prompt, new_tokens, eos_token_id=None):
    """transformers' greedy tokens after one unpadded prompt: the reference."""
    with torch.no_grad():
        out = module.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new_tokens,
            min_new_tokens=0 if eos_token_id is not None else new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


PROMPTS = [[5, 17, 42, 8, 99, 3, 61], [11, 23, 4]]


def test_greedy_tokens_equal_transformers_generate(exported):
    module, model = exported
    for prompt in PROMPTS:
        tokens = generate(model, np.array([prompt]), 24)
        assert tokens.shape == (1, len(prompt) + 24)
        assert tokens[0, : len(prompt)].tolist() == prompt
        assert tokens[0, len(prompt) :].tolist() == transformers_greedy(module, prompt, 24)


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_gives_each_row_its_own_tokens(exported, side):
    module, model = exported
    width = max(map(len, PROMPTS))
    ids = np.zeros((len(PROMPTS), width), np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(PROMPTS):
        cols = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        ids[row, cols], mask[row, cols] = prompt, 1
    tokens = generate(model, ids, 24, attention_mask=mask)
    assert tokens.shape == (2, width + 24) and tokens.dtype == ids.dtype
    np.testing.assert_array_equal(tokens[:, :width], ids)
    for row, prompt in enumerate(PROMPTS):
        assert tokens[row, width:].tolist() == transformers_greedy(module, prompt, 24)


def test_generate_compiles_two_programs_for_a_hundred_steps(exported):
    _, model = exported
    compiled = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(event)

    traces = decoder(model).compilations
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        # Batch 3 is a shape no other test uses; both prompts fall in the bucket of 16 tokens.
        tokens = generate(model, np.array([PROMPTS[1]] * 3), 100)
        first = len(compiled)
        again = generate(model, np.array([PROMPTS[0]] * 3), 100, max_length=tokens.shape[1] + 25)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert tokens.shape == (3, 103) and again.shape == (3, 107)
    assert decoder(model).compilations - traces == 2  # prefill and decode, once each
    assert first == 2
    assert len(compiled) == first  # same batch, bucket and max_length: nothing new


def test_eos_stops_a_row_and_pads_it(exported):
    module, model = exported
    free = [transformers_greedy(module, p, 24) for p in PROMPTS]
    eos = free[0][5]  # a token the first row makes at step 5 or before
    stops = [row.index(eos) + 1 if eos in row else 24 for row in free]
    ids = np.zeros((2, 7), np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(PROMPTS):
        ids[row, 7 - len(prompt) :], mask[row, 7 - len(prompt) :] = prompt, 1
    tokens = generate(model, ids, 24, attention_mask=mask, eos_token_id=[eos], pad_token_id=0)
    assert tokens.shape[1] == 7 + max(stops)
    for row, prompt in enumerate(PROMPTS):
        new = tokens[row, 7:].tolist()
        assert new[: stops[row]] == free[row][: stops[row]]
        assert new[stops[row] :] == [0] * (max(stops) - stops[row])
        assert new[: stops[row]] == transformers_greedy(module, prompt, 24, eos_token_id=eos)
    single = generate(model, np.array([PROMPTS[0]]), 24, eos_token_id=eos)
    assert single[0, 7:].tolist() == free[0][: stops[0]]


def test_sampling_is_reproducible_and_top_k_one_is_greedy(exported):
    _, model = exported
    ids = np.array([PROMPTS[0], PROMPTS[0]])
    greedy = generate(model, ids, 20)
    sample = generate(model, ids, 20, temperature=1.5, seed=3)
    assert np.array_equal(sample, generate(model, ids, 20, temperature=1.5, seed=3))
    assert not np.array_equal(sample, generate(model, ids, 20, temperature=1.5, seed=4))
    assert not np.array_equal(sample[0], sample[1])  # each row draws its own tokens
    assert not np.array_equal(sample, greedy)
    np.testing.assert_array_equal(generate(model, ids, 20, temperature=1.5, top_k=1), greedy)
    np.testing.assert_array_equal(generate(model, ids, 20, temperature=0.7, top_p=1e-6), greedy)


def test_next_tokens_samples_from_the_filtered_softmax():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    keys = jax.random.split(jax.random.key(0), 4000)

    def draw(**options):
        picks = jax.vmap(lambda k: next_tokens(logits, k, temperature=1.0, **options))(keys)
        return np.bincount(np.asarray(picks).ravel(), minlength=4) / len(keys)

    np.testing.assert_allclose(draw(), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    np.testing.assert_allclose(draw(top_k=2), [0.625, 0.375, 0, 0], atol=0.03)
    # top_p keeps the most probable tokens until their mass reaches p: 0.5 + 0.3 >= 0.7.
    np.testing.assert_allclose(draw(top_p=0.7), [0.625, 0.375, 0, 0], atol=0.03)
    np.testing.assert_allclose(draw(top_p=0.85), [0.526, 0.316, 0.158, 0], atol=0.03)
    assert draw(top_p=0.4).tolist() == [1, 0, 0, 0]
    hot = jax.vmap(lambda k: next_tokens(logits, k, temperature=1e-3))(keys)
    assert set(np.asarray(hot).ravel().tolist()) == {0}


def test_streaming_gives_each_step_as_it_comes(exported):
    _, model = exported
    ids = np.array([PROMPTS[0]])
    seen = []
    tokens = generate(model, ids, 12, stream=lambda step, new: seen.append((step, new.tolist())))
    assert [step for step, _ in seen] == list(range(12))
    assert [new for _, new in seen] == tokens[:, 7:].T.tolist()
    steps = list(generate_stream(model, ids, 12))
    assert len(steps) == 12
    np.testing.assert_array_equal(np.stack(steps, axis=1), tokens[:, 7:])


def test_params_replace_the_models_weights(exported, tmp_path):
    _, model = exported
    ids = np.array([PROMPTS[0]])
    tuned = {name: value * 0.7 for name, value in model.params.items()}
    tokens = generate(model, ids, 12, params=tuned)
    assert not np.array_equal(tokens, generate(model, ids, 12))
    model.save(tmp_path / "tuned.onnx", tuned)
    np.testing.assert_array_equal(tokens, generate(onnx2jax.load(tmp_path / "tuned.onnx"), ids, 12))


def tiny_whisper():
    """A tiny random Whisper (2 + 2 layers, d_model 64, 4 heads, vocabulary 100)."""
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        decoder_start_token_id=1,
        init_std=0.2,
        tie_word_embeddings=False,  # tied, the random decoder repeats its last token
    )
    return transformers.WhisperForConditionalGeneration(config).eval()


def whisper_decoder(path):
    """A tiny random Whisper, and its decoder exported with the self-attention cache as graph
    inputs and outputs and ``encoder_hidden_states`` as an input (the cross-attention's keys
    and values are computed from it at every step)."""
    module = tiny_whisper()
    past = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    present = [n.replace("past_key_values", "present") for n in past]

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, input_ids, attention_mask, position_ids, encoder_hidden_states, *cache):
            own = transformers.DynamicCache()
            for i in range(2):
                own.update(cache[2 * i], cache[2 * i + 1], i)
            out = self.inner.model.decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                encoder_hidden_states=encoder_hidden_states,
                past_key_values=transformers.EncoderDecoderCache(own, transformers.DynamicCache()),
                use_cache=True,
            )
            layers = out.past_key_values.self_attention_cache.layers
            flat = [t for layer in layers for t in (layer.keys, layer.values)]
            return (self.inner.proj_out(out.last_hidden_state), *flat)

    names = ["input_ids", "attention_mask", "position_ids", "encoder_hidden_states", *past]
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "sequence"},
        "encoder_hidden_states": {0: "batch"},
        "logits": {0: "batch", 1: "sequence"},
        **{n: {0: "batch", 2: "past"} for n in past},
        **{n: {0: "batch", 2: "total"} for n in present},
    }
    sample = (
        torch.randint(0, VOCAB, (2, 3)),
        torch.ones(2, 8, dtype=torch.long),
        torch.arange(5, 8).repeat(2, 1),
        torch.randn(2, 16, 64),
        *(torch.randn(2, 4, 5, 16) for _ in past),
    )
    with torch.no_grad():
        torch.onnx.export(
            Decoder().eval(),
            sample,
            str(path),
            input_names=names,
            output_names=["logits", *present],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return module, onnx2jax.load(path)


WHISPER_PROMPTS = [[1, 5, 7], [1, 9]]


def whisper_reference(module, steps=20):
    """Encoded features of two random inputs, and transformers' greedy tokens after each of
    WHISPER_PROMPTS: its forward, every step recomputed from the whole sequence."""
    features = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        encoded = module.model.encoder(features).last_hidden_state
    expected = []
    for row, prompt in enumerate(WHISPER_PROMPTS):
        tokens = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(steps):
                logits = module(input_features=features[row : row + 1], decoder_input_ids=tokens)
                tokens = torch.cat([tokens, logits.logits[:, -1].argmax(-1, keepdim=True)], 1)
        expected.append(tokens[0, len(prompt) :].tolist())
    assert len(set(expected[0])) > 3  # not one token repeated
    return encoded.numpy(), expected


# WHISPER_PROMPTS as one batch, the second row padded on the left.
WHISPER_IDS, WHISPER_MASK = np.array([[1, 5, 7], [0, 1, 9]]), np.array([[1, 1, 1], [0, 1, 1]])


def test_a_whisper_decoder_generates_transformers_greedy_tokens(tmp_path):
    module, model = whisper_decoder(tmp_path / "decoder.onnx")
    encoded, expected = whisper_reference(module)
    extra = {"encoder_hidden_states": encoded}
    tokens = generate(model, WHISPER_IDS, 20, attention_mask=WHISPER_MASK, extra_inputs=extra)
    assert tokens[:, 3:].tolist() == expected
    with pytest.raises(GenerationError, match="extra_inputs must give exactly those"):
        generate(model, WHISPER_IDS, 4, attention_mask=WHISPER_MASK)


def whisper_optimum_decoders(folder):
    """A tiny random Whisper's decoder in optimum's three files: ``decoder_model.onnx`` (no
    past; returns the self-attention's ``present.{i}.decoder.*`` and the cross-attention's
    ``present.{i}.encoder.*``), ``decoder_with_past_model.onnx`` (takes both caches as
    ``past_key_values.{i}.decoder.*`` / ``.encoder.*``, returns the self-attention's) and
    ``decoder_model_merged.onnx`` (both, chosen by ``use_cache_branch``: merge_decoders), each with
    ``attention_mask`` and ``position_ids`` inputs beside optimum's."""
    module = tiny_whisper()
    layers, heads, size = 2, 4, 16
    past = [
        f"past_key_values.{i}.{part}.{kv}"
        for i in range(layers)
        for part in ("decoder", "encoder")
        for kv in KV
    ]
    present = [n.replace("past_key_values", "present") for n in past]
    own_present = [n for n in present if ".decoder." in n]

    def run(input_ids, attention_mask, position_ids, encoder_hidden_states, cache):
        out = module.model.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            encoder_hidden_states=encoder_hidden_states,
            past_key_values=cache,
            use_cache=True,
        )
        caches = out.past_key_values
        flat = []
        for own, cross in zip(
            caches.self_attention_cache.layers, caches.cross_attention_cache.layers, strict=True
        ):
            flat += [own.keys, own.values, cross.keys, cross.values]
        return module.proj_out(out.last_hidden_state), flat

    class First(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, input_ids, attention_mask, position_ids, encoder_hidden_states):
            empty = transformers.EncoderDecoderCache(
                transformers.DynamicCache(), transformers.DynamicCache()
            )
            logits, flat = run(
                input_ids, attention_mask, position_ids, encoder_hidden_states, empty
            )
            return (logits, *flat)

    class WithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, input_ids, attention_mask, position_ids, *cache):
            own, cross = transformers.DynamicCache(), transformers.DynamicCache()
            for i in range(layers):
                own.update(cache[4 * i], cache[4 * i + 1], i)
                cross.update(cache[4 * i + 2], cache[4 * i + 3], i)
            # Only tells the layers to run their cross-attention, on the keys and values of
            # the cache (EncoderDecoderCache marks a filled cross cache as computed).
            unused = torch.zeros(input_ids.shape[0], 1, 64)
            both = transformers.EncoderDecoderCache(own, cross)
            logits, flat = run(input_ids, attention_mask, position_ids, unused, both)
            return (logits, *(t for k, t in enumerate(flat) if k % 4 < 2))

    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "sequence"},
        "encoder_hidden_states": {0: "batch", 1: "frames"},
        "logits": {0: "batch", 1: "sequence"},
        **{n: {0: "batch", 2: "frames" if ".encoder." in n else "past"} for n in past},
    }
    tokens = ["input_ids", "attention_mask", "position_ids"]
    ids = torch.randint(0, VOCAB, (2, 3))
    first_args = (ids, torch.ones(2, 3, dtype=torch.long), torch.arange(3).repeat(2, 1))
    past_args = (ids, torch.ones(2, 8, dtype=torch.long), torch.arange(5, 8).repeat(2, 1))
    past_args += tuple(torch.randn(2, heads, 16 if ".encoder." in n else 5, size) for n in past)
    files = {}
    for name, wrapper, inputs, outputs, args, grown in [
        (
            "decoder_model.onnx",
            First(),
            [*tokens, "encoder_hidden_states"],
            present,
            (*first_args, torch.randn(2, 16, 64)),
            "sequence",
        ),
        (
            "decoder_with_past_model.onnx",
            WithPast(),
            [*tokens, *past],
            own_present,
            (
                *past_args,
                *(torch.randn(2, heads, 16 if ".encoder." in n else 5, size) for n in past),
            ),
            "total",
        ),
    ]:
        dims = {
            **axes,
            **{n: {0: "batch", 2: "frames" if ".encoder." in n else grown} for n in present},
        }
        with torch.no_grad():
            torch.onnx.export(
                wrapper.eval(),
                args,
                str(folder / name),
                input_names=inputs,
                output_names=["logits", *outputs],
                dynamic_axes={n: dims[n] for n in [*inputs, "logits", *outputs]},
                opset_version=17,
                dynamo=False,
            )
        files[name] = folder / name
    merged = merge_decoders(*files.values())
    # The weights both files hold are kept once.
    sizes = [len(onnx.load(path).graph.initializer) for path in files.values()]
    assert max(sizes) <= len(merged.graph.initializer) < sum(sizes)
    files["decoder_model_merged.onnx"] = folder / "decoder_model_merged.onnx"
    onnx.save(merged, files["decoder_model_merged.onnx"])
    return module, files


def onnxruntime_whisper_greedy(path, prompt, encoded, steps):
    """Greedy tokens of optimum's merged decoder in onnxruntime, as optimum runs it: a first
    call with use_cache_branch False and empty pasts, then one token a step with the past."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    past = {
        i.name: np.zeros((1, 4, 0, 16), np.float32)
        for i in session.get_inputs()
        if i.name.startswith("past_key_values.")
    }
    ids, tokens, length = np.array([prompt]), [], len(prompt)
    feeds = {"position_ids": np.arange(length)[None], "use_cache_branch": np.array([False])}
    for _ in range(steps):
        feeds.update(
            input_ids=ids,
            attention_mask=np.ones((1, length), np.int64),
            encoder_hidden_states=encoded,
            **past,
        )
        out = dict(zip(names, session.run(None, feeds), strict=True))
        ids = out["logits"][:, -1:].argmax(-1)
        tokens.append(int(ids[0, 0]))
        past = {p: out[p.replace("past_key_values", "present")] for p in past}
        feeds = {"position_ids": np.array([[length]]), "use_cache_branch": np.array([True])}
        length += 1
    return tokens


def test_a_merged_whisper_decoder_computes_the_cross_cache_once(tmp_path):
    module, files = whisper_optimum_decoders(tmp_path)
    encoded, expected = whisper_reference(module)
    path = files["decoder_model_merged.onnx"]
    for row, prompt in enumerate(WHISPER_PROMPTS):  # the file runs as optimum runs it
        assert onnxruntime_whisper_greedy(path, prompt, encoded[row : row + 1], 20) == expected[row]
    model = onnx2jax.load(path)
    layout = cache_layout(model)
    assert layout.past == tuple(f"past_key_values.{i}.decoder.{kv}" for i in (0, 1) for kv in KV)
    assert layout.cross_past == tuple(
        f"past_key_values.{i}.encoder.{kv}" for i in (0, 1) for kv in KV
    )
    assert layout.extra == ("encoder_hidden_states",)
    extra = {"encoder_hidden_states": encoded}
    before = decoder(model).compilations
    tokens = generate(model, WHISPER_IDS, 20, attention_mask=WHISPER_MASK, extra_inputs=extra)
    assert tokens[:, 3:].tolist() == expected
    # The rows swapped, each with its encoder output: the same shapes, nothing compiles.
    swapped = {"encoder_hidden_states": encoded[::-1].copy()}
    again = generate(
        model, WHISPER_IDS[::-1], 20, attention_mask=WHISPER_MASK[::-1], extra_inputs=swapped
    )
    assert again[:, 3:].tolist() == expected[::-1]
    # Prefill (the first-step branch) and decode (the branch with a past), once each.
    assert decoder(model).compilations - before == 2
    with pytest.raises(GenerationError, match="decoder_with_past_model.onnx"):
        cache_layout(onnx2jax.load(files["decoder_with_past_model.onnx"]))
    with pytest.raises(GenerationError, match="the first one does not"):  # swapped files
        merge_decoders(files["decoder_with_past_model.onnx"], files["decoder_model.onnx"])


@pytest.mark.parametrize("exported", ["gpt2"], indirect=True)
def test_a_merged_decoder_only_model_runs_its_branch_with_a_past(exported, tmp_path):
    # A merged decoder-only model (as optimum writes GPT-2's; here both branches are the
    # export with a past): prefill and decode run the branch with a past, one program each.
    module, model = exported
    model.save(tmp_path / "plain.onnx")
    plain = onnx.load(tmp_path / "plain.onnx")
    merged = onnx2jax.load(merge_decoders(plain, plain))
    assert len(merged.params) == len(model.params)  # one copy of each weight
    assert cache_layout(merged).use_cache_branch == "use_cache_branch"
    before = decoder(merged).compilations
    tokens = generate(merged, np.array([PROMPTS[0]]), 12)
    assert tokens[0, 7:].tolist() == transformers_greedy(module, PROMPTS[0], 12)
    assert decoder(merged).compilations - before == 2


@pytest.mark.parametrize("exported", ["gpt2"], indirect=True)
def test_merge_decoders_reads_external_data_through_the_loaders_checks(exported, tmp_path):
    _, model = exported
    model.save(tmp_path / "inline.onnx")
    inline = onnx.load(tmp_path / "inline.onnx")
    external = onnx.ModelProto()
    external.CopyFrom(inline)  # onnx.save moves the data out of the proto it is given
    onnx.save(external, tmp_path / "external.onnx", save_as_external_data=True, size_threshold=0)
    path = tmp_path / "external.onnx"
    want = {t.name: t.raw_data for t in merge_decoders(inline, inline).graph.initializer}
    got = {t.name: t.raw_data for t in merge_decoders(path, path).graph.initializer}
    assert got == want
    outside = onnx.load(path, load_external_data=False)
    for tensor in outside.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere.bin"
    onnx.save(outside, tmp_path / "outside.onnx")
    with pytest.raises(ModelLoadError):
        merge_decoders(tmp_path / "outside.onnx", tmp_path / "outside.onnx")


def test_a_model_that_does_not_fit_is_refused_with_what_it_lacks(tmp_path):
    with pytest.raises(GenerationError, match="lacks input_ids, attention_mask, past_key_values"):
        cache_layout(onnx2jax.load(onnx2jax.example_path()))
    no_positions = export_with_cache(tiny_decoder("gpt2"), tmp_path / "m.onnx", position_ids=False)
    with pytest.raises(GenerationError, match="no position_ids input"):
        generate(onnx2jax.load(no_positions), [[1, 2, 3]], 4)


def test_the_benchmark_runs_the_same_greedy_tokens_as_onnxruntime(tmp_path, capsys):
    from benchmarks.generate import main

    assert (
        main(
            ["--batch", "2", "--prompt", "9", "--new", "5", "--runs", "1"]
            + ["--models", str(tmp_path), "--json"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert [case["same_tokens"] for case in result["cases"]] == [True]
    assert set(result["cases"][0]["onnx2jax"]) == {
        "prefill_ms",
        "decode_ms",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
    }


def test_the_builder_benchmark_runs_onnxruntime_genais_greedy_tokens(tmp_path, capsys):
    pytest.importorskip("onnxruntime_genai")
    from benchmarks.generate_builder import main

    args = ["--archs", "qwen2", "--precisions", "fp32", "--batch", "2", "--prompt", "9"]
    args += ["--new", "5", "--runs", "1", "--hidden", "64", "--layers", "2", "--vocab", "256"]
    assert main([*args, "--models", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    [case] = result["cases"]
    assert (case["model"], case["precision"], case["batch"]) == ("qwen2", "fp32", 2)
    assert case["same_tokens"] and case["agreement"] == 1.0
    assert (
        set(case["onnx2jax"])
        == set(case["genai"])
        == {
            "prefill_ms",
            "decode_ms",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
        }
    )


def test_bad_arguments_are_refused(exported):
    _, model = exported
    with pytest.raises(GenerationError, match="max_length=20 cache slots"):
        generate(model, [[1, 2, 3]], 8, max_length=20)
    with pytest.raises(GenerationError, match="rows \\[1\\] of attention_mask have no token"):
        generate(model, [[1, 2], [3, 4]], 4, attention_mask=[[1, 1], [0, 0]])
    with pytest.raises(GenerationError, match="top_p"):
        generate(model, [[1, 2]], 4, temperature=1.0, top_p=0.0)


WORDS = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, VOCAB)}}


def tiny_tokenizer() -> Tokenizer:
    """Words ``w3`` ... ``w99`` are the token ids 3 ... 99; [BOS] comes first."""
    tokenizer = Tokenizer(models.WordLevel(WORDS, unk_token="[PAD]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", 1)]
    )
    return tokenizer


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this test (huggingface_hub reads the variable once, at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("exported", ["gpt2"], indirect=True)
def test_text_generator_from_the_hub_reads_tokenizer_and_generation_config(
    tmp_path, offline, exported
):
    _, model = exported
    folder = tmp_path / "repo"
    folder.mkdir()
    model.save(folder / "decoder.onnx")
    tiny_tokenizer().save(str(folder / "tokenizer.json"))
    texts = ["w5 w17 w42 w8", "w11 w23"]
    prompts = [[1, 5, 17, 42, 8], [1, 11, 23]]
    free = [generate(model, np.array([p]), 16)[0, len(p) :].tolist() for p in prompts]
    eos = free[1][3]
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "pad_token_id": 0, "do_sample": False, "top_k": 4})
    )
    (folder / "genai_config.json").write_text(
        json.dumps({"model": {"decoder": {"filename": "decoder.onnx"}, "eos_token_id": 7}})
    )
    cache = tmp_path / "cache"
    files = {p.name: p for p in folder.iterdir()}
    put_in_cache(cache, "org/tiny-decoder", files)
    generator = TextGenerator.from_hub("org/tiny-decoder", cache_dir=cache)
    # generation_config.json wins over genai_config.json; do_sample false: greedy, no top_k.
    assert generator.defaults["eos_token_id"] == eos and generator.defaults["temperature"] == 0
    assert generator.defaults["top_k"] is None
    expected = [
        " ".join(f"w{t}" for t in row[: row.index(eos) if eos in row else 16]) for row in free
    ]
    assert generator.generate(texts, 16) == expected
    capped = TextGenerator.from_folder(folder, max_length=7, eos_token_id=None)
    assert capped.generate(texts[1:], 16) == [" ".join(f"w{t}" for t in free[1][:4])]


def test_text_generator_refuses_a_config_that_is_not_an_object(tmp_path):
    tiny_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text("[2]")
    with pytest.raises(ModelLoadError, match="generation_config.json does not hold a JSON object"):
        TextGenerator.from_folder(tmp_path)


@pytest.fixture(scope="module")
def builder_folder(tmp_path_factory):
    """A tiny random Llama written by onnxruntime-genai's model builder (fp32, CPU), and the
    transformers module it came from."""
    from tests.models.exports import run_genai_builder

    pytest.importorskip("onnxruntime_genai")
    root = tmp_path_factory.mktemp("builder")
    module = tiny_decoder("llama")
    module.save_pretrained(root / "hf")
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer(), bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]"
    ).save_pretrained(root / "hf")
    return module, run_genai_builder(root / "hf", root / "out", "fp32", root / "cache")


def genai_greedy(folder, prompt, new_tokens):
    """onnxruntime-genai's greedy tokens after one prompt."""
    import onnxruntime_genai

    model = onnxruntime_genai.Model(str(folder))
    params = onnxruntime_genai.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = onnxruntime_genai.Generator(model, params)
    generator.append_tokens(np.array([prompt], np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt) :]


@pytest.mark.slow
def test_builder_models_generate_onnxruntime_genais_tokens(builder_folder):
    module, folder = builder_folder
    model = onnx2jax.load(folder / "model.onnx")
    layout = cache_layout(model)
    assert layout.kind == "shared" and layout.position_ids is None
    assert layout.shapes[0] == (0, 2, 0, 16)
    prompts = [[1, *p] for p in PROMPTS]
    alone = []
    for prompt in prompts:
        free = genai_greedy(folder, prompt, 32)
        expected = free[: free.index(EOS_ID) + 1] if EOS_ID in free else free
        tokens = generate(model, np.array([prompt]), 32, eos_token_id=EOS_ID)[0, len(prompt) :]
        assert tokens.tolist() == expected
        assert expected == transformers_greedy(module, prompt, 32, eos_token_id=EOS_ID)
        alone.append(expected)
    # A batch left-padded: each row as alone (the cache holds each row's tokens first).
    ids = np.zeros((2, 8), np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, 8 - len(prompt) :], mask[row, 8 - len(prompt) :] = prompt, 1
    batch = generate(model, ids, 32, attention_mask=mask, eos_token_id=EOS_ID)
    for row, tokens in enumerate(alone):
        assert batch[row, 8 : 8 + len(tokens)].tolist() == tokens
    # genai_config.json gives the decoder's file and the eos id.
    generator = TextGenerator.from_folder(folder)
    assert generator.defaults["eos_token_id"] == EOS_ID and generator.max_length == 1024
    texts = [" ".join(f"w{t}" for t in prompt) for prompt in PROMPTS]
    # The builder's tokenizer.json marks [PAD], [BOS] and [EOS] special: decoding skips them.
    words = [" ".join(f"w{t}" for t in tokens if t > EOS_ID) for tokens in alone]
    assert generator.generate(texts, 32) == words


@pytest.mark.slow
def test_int4_builder_decode_runs_the_native_kernel_to_the_same_tokens(
    builder_folder, tmp_path, monkeypatch
):
    """Where the native 4-bit kernel runs, generate()'s programs compute MatMulNBits with it
    (NativeMatMulNBits nodes) and make the tokens XLA's path makes."""
    from onnx2jax import generation, native
    from tests.models.exports import run_genai_builder

    if native.backend("nbits") is None:
        pytest.skip("no native 4-bit kernel on this machine")
    _, folder = builder_folder
    out = run_genai_builder(folder.parent / "hf", tmp_path / "int4", "int4", tmp_path / "cache")
    ids = np.array([[1, *PROMPTS[0]], [1, 9, 8, 7, 6, 5, 4, 3]])

    def native_nodes(model):
        return [n for n in decoder(model).plan("decode").nodes if n.op_type == "NativeMatMulNBits"]

    with_kernel = onnx2jax.load(out / "model.onnx")
    tokens = generate(with_kernel, ids, 24)
    assert native_nodes(with_kernel)
    monkeypatch.setattr(generation, "backend", lambda kind: None)
    xla = onnx2jax.load(out / "model.onnx")
    np.testing.assert_array_equal(generate(xla, ids, 24), tokens)
    assert not native_nodes(xla)
